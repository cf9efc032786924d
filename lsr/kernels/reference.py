"""Pure-torch reference for the W4A4 runtime: int4 packing, per-token quantization, integer GEMM.

Everything here runs on any device and defines the numbers the Triton kernels must reproduce
(see ``lsr/kernels/__init__.py`` for the conventions).
"""

from __future__ import annotations

import torch

__all__ = [
    "INT4_MIN",
    "INT4_MAX",
    "MAX_EXACT_K",
    "pack_int4",
    "unpack_int4",
    "quantize_per_token_int4",
    "quantize_weight_int4",
    "w4a4_accumulate_reference",
    "w4a4_matmul_reference",
]

INT4_MIN, INT4_MAX = -8, 7
# |q_a * q_w| <= 64, so float32 sums of integer products are exact while 64 * K <= 2**24.
MAX_EXACT_K = 2**24 // 64


def pack_int4(q: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """Pack int8 values in [-8, 7] along the last dim, two per byte.

    Byte j of a row holds element 2j in its low nibble and element 2j+1 in its high nibble, both as
    4-bit two's complement. Returns uint8 with the last dim halved.
    """
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dim, got {q.shape[-1]}")
    if check and q.numel() and bool(((q < INT4_MIN) | (q > INT4_MAX)).any()):
        raise ValueError("pack_int4: values outside [-8, 7]")
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [..., K/2] -> int8 [..., K] in [-8, 7]."""
    if p.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8, got {p.dtype}")
    lo = (p & 0xF).to(torch.int8)
    hi = (p >> 4).to(torch.int8)
    lo = (lo ^ 8) - 8  # sign-extend the nibble
    hi = (hi ^ 8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def _as_int8(q: torch.Tensor) -> torch.Tensor:
    if q.dtype == torch.uint8:
        return unpack_int4(q)
    if q.dtype == torch.int8:
        return q
    raise TypeError(f"expected int8 values or a uint8 packed container, got {q.dtype}")


def quantize_per_token_int4(
    x: torch.Tensor, hadamard: bool = False, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int4 quantization of ``x [..., K]``, optionally after ``x @ H_K``.

    The Hadamard (``lsr.hadamard.hadamard_transform``) and everything after it runs in float32 whatever the
    input dtype. ``scale = (max|x_t| · clip_ratio) / 7`` in float32, as ``lsr.quant.rtn.quantize`` computes it (1
    where that is 0), ``q = clamp(round_half_even(x / scale), -8, 7)``; ``clip_ratio`` in (0, 1]. Returns
    ``(q int8 [..., K], scale float32 [...])``.
    """
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    xf = x.float()
    if hadamard:
        from lsr.hadamard import hadamard_transform

        xf = hadamard_transform(xf)
    scale = xf.abs().amax(dim=-1) * clip_ratio / INT4_MAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(xf / scale.unsqueeze(-1)).clamp_(INT4_MIN, INT4_MAX).to(torch.int8)
    return q, scale


def quantize_weight_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric per-output-channel int4 of ``w [N, K]``: ``(packed uint8 [N, K/2], scale [N])``.

    A convenience for tests and benchmarks (same rule as the activations: ``scale = max|w_n| / 7``); the exporter
    may produce ``q_w`` any other way (GPTQ) and call :func:`pack_int4` itself.
    """
    q, scale = quantize_per_token_int4(w, hadamard=False)
    return pack_int4(q, check=False), scale


def w4a4_accumulate_reference(q_a: torch.Tensor, q_w: torch.Tensor) -> torch.Tensor:
    """Exact integer accumulators ``Σ_k q_a[m,k]·q_w[n,k]`` as int32 [M, N] (inputs int8 or packed uint8)."""
    qa, qw = _as_int8(q_a), _as_int8(q_w)
    if qa.shape[-1] != qw.shape[-1]:
        raise ValueError(f"K mismatch: activations {qa.shape[-1]}, weights {qw.shape[-1]}")
    if qa.shape[-1] > MAX_EXACT_K:
        raise ValueError(f"K={qa.shape[-1]} > {MAX_EXACT_K}: float32 accumulation would not be exact")
    # float32 matmul on integer values |q| <= 8 is exact (also under TF32, which keeps 10 mantissa bits).
    return (qa.float() @ qw.float().T).to(torch.int32)


def w4a4_matmul_reference(
    q_a: torch.Tensor,
    scale_a: torch.Tensor,
    q_w: torch.Tensor,
    scale_w: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``y[m, n] = ((Σ_k q_a[m,k]·q_w[n,k]) · scale_a[m]) · scale_w[n]`` in float32, cast to ``out_dtype``.

    ``q_a [M, K]`` / ``q_w [N, K]`` may be int8 values or the packed uint8 container. The rescale order (token
    scale first, then channel scale, both float32) is the one every kernel epilogue uses.
    """
    acc = w4a4_accumulate_reference(q_a, q_w).float()
    y = acc * scale_a.float().unsqueeze(-1) * scale_w.float().unsqueeze(0)
    return y.to(out_dtype)
