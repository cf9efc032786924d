"""Tests for lsr.hadamard: constructions, orthonormality, fast transform, errors, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from lsr.hadamard import (
    SPECIAL_ORDERS,
    decompose,
    hadamard_matrix,
    hadamard_transform,
    random_hadamard_matrix,
    supported_orders,
)
from lsr.hadamard_orders import BUILDERS, GS_SEQUENCES, goethals_seidel

F64 = torch.float64


def _gram_error(h: torch.Tensor) -> float:
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    return (h @ h.T - eye).abs().max().item()


def _sampled_gram_error(h: torch.Tensor, m: int, rows_per_block: int = 1, chunk: int = 2048) -> float:
    """Max |(H H^T - I)[S, :]| for rows S covering every one of the m Kronecker blocks."""
    n = h.shape[0]
    block = n // m
    gen = torch.Generator().manual_seed(0)
    offsets = torch.randint(0, block, (m, rows_per_block), generator=gen)
    rows = (torch.arange(m)[:, None] * block + offsets).flatten()
    sub = h[rows]
    err = 0.0
    for start in range(0, n, chunk):
        g = sub @ h[start:start + chunk].T
        target = (rows[:, None] == torch.arange(start, min(start + chunk, n))[None, :]).to(h.dtype)
        err = max(err, (g - target).abs().max().item())
    return err


def test_special_orders_constant() -> None:
    assert SPECIAL_ORDERS == (1, 12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 156, 172)
    assert supported_orders() == SPECIAL_ORDERS
    assert sorted(BUILDERS) == sorted(SPECIAL_ORDERS)


@pytest.mark.parametrize("m", sorted(BUILDERS))
def test_base_matrices_are_integer_hadamard(m: int) -> None:
    h = BUILDERS[m]()
    assert h.shape == (m, m) and h.dtype == torch.int64
    assert bool((h.abs() == 1).all())
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.int64))


@pytest.mark.parametrize("n", sorted(GS_SEQUENCES))
def test_goethals_seidel_rows_rejected_when_broken(n: int) -> None:
    rows = list(GS_SEQUENCES[n])
    rows[0] = ("-" if rows[0][0] == "+" else "+") + rows[0][1:]
    with pytest.raises(ValueError, match="complementary"):
        goethals_seidel(rows)


@pytest.mark.parametrize("m", SPECIAL_ORDERS)
@pytest.mark.parametrize("k", [0, 1, 3])
def test_hadamard_matrix_orthonormal_all_orders(m: int, k: int) -> None:
    n = m * 2**k
    h = hadamard_matrix(n, dtype=F64)
    assert h.shape == (n, n) and h.dtype == F64
    assert _gram_error(h) < 1e-12
    assert bool((h.abs() == 1 / math.sqrt(n)).all())
    h32 = hadamard_matrix(n)
    assert h32.dtype == torch.float32
    assert bool((h32.abs() == torch.tensor(1 / math.sqrt(n), dtype=torch.float32)).all())


@pytest.mark.parametrize("n, m", [(576, 36), (1536, 12)])
def test_hadamard_matrix_orthonormal_medium(n: int, m: int) -> None:
    assert decompose(n)[0] == m
    h = hadamard_matrix(n, dtype=F64)
    assert _gram_error(h) < 1e-12
    assert bool((h.abs() == 1 / math.sqrt(n)).all())


@pytest.mark.parametrize("n, m", [(11008, 172), (14336, 28)])
def test_hadamard_matrix_orthonormal_large(n: int, m: int) -> None:
    assert decompose(n) == (m, int(math.log2(n // m)))
    h = hadamard_matrix(n, dtype=F64)
    # One wrong sign would move some Gram entry by 2/n (> 1e-4): the tolerance is far below that.
    assert _sampled_gram_error(h, m, rows_per_block=max(1, 32 // m)) < 1e-10
    assert bool((h[:: n // 64].abs() == 1 / math.sqrt(n)).all())
    del h


def test_hadamard_matrix_is_kronecker_and_fresh() -> None:
    a = hadamard_matrix(12 * 4, dtype=F64)
    b = torch.kron(hadamard_matrix(12, dtype=F64), hadamard_matrix(4, dtype=F64))
    assert torch.allclose(a, b, atol=1e-15)
    a.zero_()
    assert hadamard_matrix(12 * 4, dtype=F64).abs().min() > 0


@pytest.mark.parametrize("n", [1, 2, 8, 12, 40, 56, 80, 104, 120, 144, 216, 280, 312, 344, 1024])
def test_transform_matches_matmul_float64(n: int) -> None:
    x = torch.randn(3, 2, n, dtype=F64)
    y = hadamard_transform(x)
    assert y.dtype == F64 and y.shape == x.shape
    torch.testing.assert_close(y, x @ hadamard_matrix(n, dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [12, 96, 576, 1536])
def test_transform_matches_matmul_float32(n: int) -> None:
    x = torch.randn(5, n)
    y = hadamard_transform(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x @ hadamard_matrix(n), rtol=1e-5, atol=1e-5)
    x1 = torch.randn(n)  # 1-D input
    torch.testing.assert_close(hadamard_transform(x1), x1 @ hadamard_matrix(n), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("n", "block"), [(80, 4), (96, 32), (1536, 512), (48, 12)])
def test_block_diagonal_transform_is_kron_identity_hadamard(n: int, block: int) -> None:
    x = torch.randn(3, n, dtype=F64)
    h = hadamard_matrix(n, dtype=F64, block=block)
    expected = torch.kron(torch.eye(n // block, dtype=F64), hadamard_matrix(block, dtype=F64))
    assert torch.equal(h, expected)
    torch.testing.assert_close(hadamard_transform(x, block), x @ expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(hadamard_transform(x, n), hadamard_transform(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not divide"):
        hadamard_transform(x, n + 1)


def test_transform_is_inverse_of_transpose() -> None:
    n = 20 * 8  # Paley I base is not symmetric: checks the transpose convention
    x = torch.randn(4, n, dtype=F64)
    h = hadamard_matrix(n, dtype=F64)
    assert not torch.allclose(h, h.T)
    torch.testing.assert_close(hadamard_transform(x) @ h.T, x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_transform_keeps_half_dtype(dtype: torch.dtype) -> None:
    n = 28 * 16
    x = torch.randn(2, 3, n).to(dtype)
    y = hadamard_transform(x)
    assert y.dtype == dtype and y.shape == x.shape
    ref = (x.double() @ hadamard_matrix(n, dtype=F64)).to(dtype)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(y.double(), ref.double(), rtol=tol, atol=tol)


def test_transform_rejects_integer_and_bad_size() -> None:
    with pytest.raises(TypeError):
        hadamard_transform(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="nearest sizes that work"):
        hadamard_transform(torch.randn(2, 100))


@pytest.mark.parametrize("n", [24, 36 * 4, 64])
def test_transform_gradient_matches_matmul(n: int) -> None:
    x = torch.randn(3, n, dtype=F64, requires_grad=True)
    w = torch.randn(3, n, dtype=F64)
    (g_fast,) = torch.autograd.grad((hadamard_transform(x) * w).sum(), x)
    (g_ref,) = torch.autograd.grad((x @ hadamard_matrix(n, dtype=F64) * w).sum(), x)
    torch.testing.assert_close(g_fast, g_ref, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(hadamard_transform, (torch.randn(2, 24, dtype=F64, requires_grad=True),))


@pytest.mark.parametrize("n", [12, 256, 52 * 8])
def test_random_hadamard_matrix(n: int) -> None:
    q = random_hadamard_matrix(n, seed=3, dtype=F64)
    assert _gram_error(q) < 1e-12
    assert bool((q.abs() == 1 / math.sqrt(n)).all())
    assert torch.equal(q, random_hadamard_matrix(n, seed=3, dtype=F64))
    assert not torch.equal(q, random_hadamard_matrix(n, seed=4, dtype=F64))
    signs = (q * hadamard_matrix(n, dtype=F64)).sum(1)  # diag(s) H => row i scaled by s_i
    assert bool((signs.abs() - 1).abs().max() < 1e-12)
    assert random_hadamard_matrix(n, seed=3).dtype == torch.float32


@pytest.mark.parametrize(
    "n, expected",
    [(1, (1, 0)), (2, (1, 1)), (1024, (1, 10)), (12, (12, 0)), (40, (20, 1)), (576, (36, 4)),
     (1536, (12, 7)), (14336, (28, 9)), (4096 * 3, (12, 10)), (108, (108, 0)), (140 * 2, (140, 1))],
)
def test_decompose(n: int, expected: tuple[int, int]) -> None:
    assert decompose(n) == expected


def test_decompose_11008() -> None:
    assert decompose(11008) == (172, 6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [64, 11008, 14336, 12 * 4])
def test_transform_cuda_matches_matmul(n: int) -> None:
    x = torch.randn(4, n, device="cuda")
    y = hadamard_transform(x)
    assert y.device == x.device and y.dtype == x.dtype
    ref = (x.double() @ hadamard_matrix(n, dtype=F64, device="cuda")).float()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    xh = x.half()
    assert hadamard_transform(xh).dtype == torch.float16


@pytest.mark.parametrize("n, below, above", [(100, 96, 104), (7, 4, 8), (3, 2, 4), (26, 24, 28)])
def test_decompose_unsupported_names_neighbours(n: int, below: int, above: int) -> None:
    with pytest.raises(ValueError, match=f"n={n}") as info:
        decompose(n)
    assert f"nearest sizes that work: {below}, {above}" in str(info.value)
    decompose(below), decompose(above)


@pytest.mark.parametrize("n", [0, -4])
def test_decompose_nonpositive(n: int) -> None:
    with pytest.raises(ValueError):
        decompose(n)
