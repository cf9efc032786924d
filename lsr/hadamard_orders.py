"""Integer (±1) Hadamard matrices of the small non-power-of-two orders used by :mod:`lsr.hadamard`.

Every matrix is built by code from a classical construction:

* Paley I: ``q`` a prime power with ``q % 4 == 3`` gives order ``q + 1``.
* Paley II: ``q`` a prime power with ``q % 4 == 1`` gives order ``2 (q + 1)``.
* Sylvester doubling: ``[[H, H], [H, -H]]``.
* Goethals–Seidel array: four circulant ±1 matrices of order ``n`` whose periodic autocorrelations sum
  to zero at every nonzero shift give order ``4 n`` (used for 156 = 4·39 and 172 = 4·43).

Prime-power fields ``GF(p**e)`` (needed for ``q = 25, 27``) are implemented with polynomial arithmetic
modulo a monic irreducible polynomial found by search.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# Four ±1 sequences each, "+" = +1 and "-" = -1, with sum_i PAF_i(s) = 0 for every shift s != 0
# (PAF = periodic autocorrelation), i.e. first rows of circulants A, B, C, D with
# A A^T + B B^T + C C^T + D D^T = 4 n I. They were found for this project by a numpy stochastic local
# search (randomised tabu search over swap moves that keep each sequence's sum fixed, objective
# sum_s (sum_i PAF_i(s))**2, restart after 3000 non-improving steps, one CPU core): n = 39 with row sums
# (7, 7, 7, 3), seed 0, ~0.4M steps / 40 s; n = 43 with row sums (7, 7, 7, 5), seed 1, ~3.0M steps / 5 min.
# They are checked by ``goethals_seidel`` every time the matrix is built.
GS_SEQUENCES: dict[int, tuple[str, str, str, str]] = {
    39: (
        "--++-++-+-+-+++-+++++-+++------++++-+-+",
        "--++--++---++++-++++++-+-++-+-+-+++-+--",
        "+-+++--+--+++-+--++++-++-+++-+-----++++",
        "--+--+--++-+--+--+++--+-++++-++++--+++-",
    ),
    43: (
        "+++-+--+--+-+-+--+++-++++++-+++++---+-++---",
        "+++++--++--++++--+--+---++-++++----+-++-+++",
        "-+--+-+++-+---+-+++++---++++-+-+-+-++-++++-",
        "+-+---+---++--+++++++-+-+++---++--++-++-+-+",
    ),
}


def _factor_prime_power(q: int) -> tuple[int, int]:
    """Return ``(p, e)`` with ``q == p**e`` and ``p`` prime; raise ``ValueError`` otherwise."""
    if q < 2:
        raise ValueError(f"{q} is not a prime power")
    p = next(d for d in range(2, q + 1) if q % d == 0)
    e, r = 0, q
    while r % p == 0:
        r //= p
        e += 1
    if r != 1:
        raise ValueError(f"{q} is not a prime power")
    return p, e


class _GaloisField:
    """Minimal ``GF(p**e)``: elements are ints ``0..q-1`` read as base-``p`` coefficient vectors."""

    def __init__(self, q: int) -> None:
        self.q = q
        self.p, self.e = _factor_prime_power(q)
        if self.e > 3:
            raise ValueError(f"GF({q}): only extension degree <= 3 is implemented")
        self.modulus = self._find_irreducible()

    def _digits(self, a: int) -> list[int]:
        return [(a // self.p**i) % self.p for i in range(self.e)]

    def _from_digits(self, d: Sequence[int]) -> int:
        return sum((c % self.p) * self.p**i for i, c in enumerate(d))

    def _find_irreducible(self) -> list[int]:
        """Monic polynomial of degree ``e`` without roots in GF(p) (irreducible since ``e <= 3``)."""
        p, e = self.p, self.e
        if e == 1:
            return [0, 1]
        for low in range(p**e):
            coeffs = [(low // p**i) % p for i in range(e)] + [1]
            if all(sum(c * x**i for i, c in enumerate(coeffs)) % p for x in range(p)):
                return coeffs
        raise AssertionError("no irreducible polynomial found")  # unreachable

    def sub(self, a: int, b: int) -> int:
        return self._from_digits([x - y for x, y in zip(self._digits(a), self._digits(b), strict=True)])

    def mul(self, a: int, b: int) -> int:
        p, e = self.p, self.e
        prod = [0] * (2 * e - 1)
        for i, x in enumerate(self._digits(a)):
            for j, y in enumerate(self._digits(b)):
                prod[i + j] += x * y
        for deg in range(2 * e - 2, e - 1, -1):  # reduce modulo the monic modulus
            c = prod[deg] % p
            for i in range(e + 1):
                prod[deg - e + i] -= c * self.modulus[i]
        return self._from_digits(prod[:e])

    def quadratic_character(self) -> list[int]:
        """``chi[a]`` = 0 for a = 0, +1 for a nonzero square, -1 otherwise."""
        squares = {self.mul(a, a) for a in range(1, self.q)}
        return [0] + [1 if a in squares else -1 for a in range(1, self.q)]


def _jacobsthal(q: int) -> torch.Tensor:
    """Jacobsthal matrix ``Q[a, b] = chi(a - b)`` over GF(q)."""
    field = _GaloisField(q)
    chi = field.quadratic_character()
    return torch.tensor([[chi[field.sub(a, b)] for b in range(q)] for a in range(q)], dtype=torch.int64)


def _bordered(core: torch.Tensor, column_sign: int) -> torch.Tensor:
    """``[[0, 1^T], [column_sign * 1, core]]``."""
    q = core.shape[0]
    out = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    out[0, 1:] = 1
    out[1:, 0] = column_sign
    out[1:, 1:] = core
    return out


def paley_i(q: int) -> torch.Tensor:
    """Paley construction I: order ``q + 1`` for a prime power ``q = 3 mod 4``; ``H = I + S`` (S skew)."""
    if q % 4 != 3:
        raise ValueError(f"Paley I needs q = 3 mod 4, got {q}")
    skew = _bordered(_jacobsthal(q), column_sign=-1)
    return torch.eye(q + 1, dtype=torch.int64) + skew


def paley_ii(q: int) -> torch.Tensor:
    """Paley construction II: order ``2 (q + 1)`` for a prime power ``q = 1 mod 4``."""
    if q % 4 != 1:
        raise ValueError(f"Paley II needs q = 1 mod 4, got {q}")
    conference = _bordered(_jacobsthal(q), column_sign=1)  # symmetric, zero diagonal
    eye = torch.eye(q + 1, dtype=torch.int64)
    h2 = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    on_zero = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    return torch.kron(conference, h2) + torch.kron(eye, on_zero)


def sylvester_double(h: torch.Tensor) -> torch.Tensor:
    """``[[H, H], [H, -H]]``."""
    return torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)


def _circulant(row: torch.Tensor) -> torch.Tensor:
    """Circulant matrix with ``C[i, j] = row[(j - i) mod n]``."""
    n = row.shape[0]
    idx = (torch.arange(n)[None, :] - torch.arange(n)[:, None]) % n
    return row[idx]


def _parse_pm(row: str) -> torch.Tensor:
    """``"+-+"`` -> ``tensor([1, -1, 1])``."""
    return torch.tensor([1 if ch == "+" else -1 for ch in row], dtype=torch.int64)


def goethals_seidel(rows: Sequence[str]) -> torch.Tensor:
    """Goethals–Seidel array: order ``4 n`` from four length-``n`` ±1 first rows (as ``+``/``-`` strings).

    Raises ``ValueError`` if the rows do not have complementary periodic autocorrelations.
    """
    a, b, c, d = (_circulant(_parse_pm(r)) for r in rows)
    n = a.shape[0]
    if any(m.shape[0] != n for m in (b, c, d)):
        raise ValueError("Goethals-Seidel rows must have equal length")
    gram = a @ a.T + b @ b.T + c @ c.T + d @ d.T
    if not torch.equal(gram, 4 * n * torch.eye(n, dtype=torch.int64)):
        raise ValueError("rows are not complementary: A A^T + B B^T + C C^T + D D^T != 4 n I")
    r = torch.eye(n, dtype=torch.int64).flip(1)  # back-diagonal
    blocks = [
        [a, b @ r, c @ r, d @ r],
        [-b @ r, a, d.T @ r, -c.T @ r],
        [-c @ r, -d.T @ r, a, b.T @ r],
        [-d @ r, c.T @ r, -b.T @ r, a],
    ]
    return torch.cat([torch.cat(row, 1) for row in blocks], 0)


def _builders() -> dict[int, Callable[[], torch.Tensor]]:
    builders: dict[int, Callable[[], torch.Tensor]] = {
        1: lambda: torch.ones(1, 1, dtype=torch.int64),
        12: lambda: paley_i(11),
        20: lambda: paley_i(19),
        28: lambda: paley_i(27),  # GF(27) = GF(3)[x] / (cubic)
        36: lambda: paley_ii(17),
        40: lambda: sylvester_double(paley_i(19)),
        44: lambda: paley_i(43),
        52: lambda: paley_ii(25),  # GF(25) = GF(5)[x] / (quadratic)
        60: lambda: paley_i(59),
        108: lambda: paley_i(107),
        140: lambda: paley_i(139),
    }
    for n, rows in GS_SEQUENCES.items():
        builders[4 * n] = lambda rows=rows: goethals_seidel(rows)
    return builders


#: Order ``m`` -> zero-argument function returning the ±1 (int64) Hadamard matrix of order ``m``.
BUILDERS: dict[int, Callable[[], torch.Tensor]] = _builders()
