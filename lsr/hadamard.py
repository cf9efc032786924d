"""Orthonormal Hadamard matrices and a fast O(n log n) Hadamard transform.

A size ``n = m * 2**k`` is supported when a ±1 Hadamard matrix of order ``m`` can be built (see
:mod:`lsr.hadamard_orders`). The orthonormal matrix is ``H_n = (H_m ⊗ S_{2^k}) / sqrt(n)`` with ``S``
the Sylvester matrix in natural order, and :func:`hadamard_transform` computes ``x @ H_n`` over the
last dimension without materialising ``H_n``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from lsr.hadamard_orders import BUILDERS

__all__ = [
    "SPECIAL_ORDERS",
    "decompose",
    "hadamard_matrix",
    "hadamard_signs",
    "hadamard_transform",
    "random_hadamard_matrix",
    "supported_orders",
]

SPECIAL_ORDERS: tuple[int, ...] = (1, 12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 156, 172)

_FHT_MIN, _FHT_MAX = 8, 32768  # power-of-two sizes handed to fast_hadamard_transform on CUDA


def supported_orders() -> tuple[int, ...]:
    """The orders ``m`` in :data:`SPECIAL_ORDERS` that this build can actually construct."""
    return tuple(m for m in SPECIAL_ORDERS if m in BUILDERS)


def _split(n: int) -> tuple[int, int] | None:
    """``(m, k)`` with the smallest constructible ``m`` and ``n == m * 2**k``, or ``None``."""
    for m in supported_orders():
        if n % m == 0:
            q = n // m
            if q & (q - 1) == 0:
                return m, q.bit_length() - 1
    return None


def _nearest_supported(n: int) -> tuple[int | None, int]:
    below = next((c for c in range(n - 1, 0, -1) if _split(c) is not None), None)
    above = next(c for c in range(max(n + 1, 1), 2 * max(n, 1) + 1) if _split(c) is not None)
    return below, above


def decompose(n: int) -> tuple[int, int]:
    """Return ``(m, k)`` with ``n == m * 2**k`` and ``m`` a constructible order (smallest such ``m``).

    Raises ``ValueError`` for ``n <= 0`` or sizes without a construction, naming the nearest sizes that work.
    """
    if n <= 0:
        raise ValueError(f"Hadamard size must be positive, got n={n}")
    split = _split(n)
    if split is None:
        below, above = _nearest_supported(n)
        near = ", ".join(str(c) for c in (below, above) if c is not None)
        raise ValueError(
            f"no Hadamard construction for n={n} (need n = m * 2**k with m in {supported_orders()}); "
            f"nearest sizes that work: {near}"
        )
    return split


@functools.lru_cache(maxsize=64)
def _base_pm1(m: int) -> torch.Tensor:
    """Cached ±1 Hadamard matrix of order ``m`` (float64, CPU). Never hand this tensor out directly."""
    return BUILDERS[m]().to(torch.float64)


def _sylvester_pm1(size: int) -> torch.Tensor:
    """±1 Sylvester matrix (natural order): ``S[b, d] = (-1) ** popcount(b & d)``."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_signs(n: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
                   ) -> torch.Tensor:
    """The unnormalised ±1 matrix ``H_m ⊗ S_{2^k}`` (``hadamard_matrix(n) · sqrt(n)``), built in ``dtype`` (exact in
    any float dtype: the factors are cast before the Kronecker product, so no float64 ``n × n`` copy is made)."""
    m, k = decompose(n)
    base = _base_pm1(m).to(dtype=dtype, device=device)
    return torch.kron(base, _sylvester_pm1(2**k).to(dtype=dtype, device=device)) if k else base.clone()


def hadamard_matrix(n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                    block: int | None = None) -> torch.Tensor:
    """Orthonormal Hadamard matrix ``(H_m ⊗ S_{2^k}) / sqrt(n)`` with entries ``±1/sqrt(n)``; with ``block``, the
    block-diagonal ``I_{n/block} ⊗ H_block`` (see :func:`hadamard_transform`)."""
    if block is not None and block != n:
        _check_block(n, block)
        return torch.block_diag(*[hadamard_matrix(block, dtype=dtype, device=device)] * (n // block))
    return hadamard_signs(n).mul_(1.0 / math.sqrt(n)).to(dtype=dtype, device=device)


def _check_block(n: int, block: int) -> None:
    if block <= 0 or n % block:
        raise ValueError(f"a Hadamard block of {block} does not divide the size {n}")


def random_hadamard_matrix(n: int, seed: int, *, dtype: torch.dtype = torch.float32,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """``diag(s) @ hadamard_matrix(n)`` with signs ``s`` drawn from a CPU generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64).mul_(2).sub_(1)
    h = hadamard_matrix(n, dtype=torch.float64)
    return (signs[:, None] * h).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=1)
def _fast_kernel() -> Callable[..., torch.Tensor] | None:
    """``fast_hadamard_transform.hadamard_transform`` if the optional package imports, else ``None``."""
    try:
        from fast_hadamard_transform import hadamard_transform as kernel
    except ImportError:
        return None
    return kernel


def _butterfly(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh–Hadamard transform over the last dim (power of two): ``x @ S``."""
    size = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < size:
        pairs = x.reshape(*lead, size // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, size)
        h *= 2
    return x


def _power_of_two_transform(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised ``x @ S_{2^k}`` over the last dim, via the CUDA kernel when available."""
    size = x.shape[-1]
    if x.is_cuda and _FHT_MIN <= size <= _FHT_MAX:
        kernel = _fast_kernel()
        if kernel is not None:
            return kernel(x.contiguous(), 1.0)
    return _butterfly(x)


def hadamard_transform(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """``x @ hadamard_matrix(n)`` over the last dimension ``n`` in O(n log n); keeps ``x.dtype``.

    ``block``: the block-diagonal ``I_{n/block} ⊗ H_block`` instead (each run of ``block`` channels rotated on its
    own; what compressed-tensors calls ``head_dim``); ``None`` or ``n``: one Hadamard of the whole dimension.
    fp16/bf16 inputs are computed in float32. Differentiable (pure torch ops, or the autograd-aware
    ``fast_hadamard_transform`` kernel on CUDA).
    """
    if not x.is_floating_point():
        raise TypeError(f"hadamard_transform needs a floating-point tensor, got {x.dtype}")
    n = x.shape[-1]
    if block is not None and block != n:
        _check_block(n, block)
        return hadamard_transform(x.unflatten(-1, (n // block, block))).flatten(-2)
    m, k = decompose(n)
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    y = x.to(compute).reshape(*x.shape[:-1], m, 2**k)  # row index = a * 2**k + b, as in the Kronecker product
    if k:
        y = _power_of_two_transform(y)
    scale = 1.0 / math.sqrt(n)
    if m > 1:
        hm_t = (_base_pm1(m).T * scale).to(dtype=compute, device=x.device)
        y = torch.matmul(hm_t, y)  # y[c, d] = sum_a H_m[a, c] z[a, d]
    else:
        y = y * scale
    return y.reshape(x.shape).to(x.dtype)
