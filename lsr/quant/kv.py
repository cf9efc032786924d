"""The KV-cache quantizer: per token per head (or per group inside a head), symmetric or asymmetric, with a clip.

One definition for the fake-quant attention and the real cache (`lsr.export.kv_cache`): the scale is rounded to
float16 and the zero point is an integer in ``[0, 2^b − 1]``, exactly what the cache stores, so dequantizing the stored
codes gives the fake-quant values bit for bit. Asymmetric (QuaRot): ``lo = clip·min(x, 0)``, ``hi = clip·max(x, 0)``,
``scale = (hi − lo) / (2^b − 1)``, ``zero = round(−lo / scale)``, ``q = clamp(round(x / scale) + zero, 0, 2^b − 1)``;
symmetric: ``scale = clip·max|x| / (2^(b-1) − 1)``, ``q ∈ [−2^(b-1), 2^(b-1) − 1]``. Rounding is half to even.
"""

from __future__ import annotations

import torch

from lsr.quant.rtn import QuantSpec, _grouped, _round_ste

SCALE_DTYPE = torch.float16
_SCALE_MAX = torch.finfo(SCALE_DTYPE).max


def _storable(scale: torch.Tensor) -> torch.Tensor:
    """The scale as the cache stores it (float16), back in float32; 1 where it would be 0 (an all-zero group)."""
    scale = scale.clamp(max=_SCALE_MAX).to(SCALE_DTYPE).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def kv_quantize(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes (float tensor of integers, grouped ``[..., groups, group]`` or ``[..., head_dim]``), float32 scales
    holding float16 values and zero points (None if symmetric), each ``[..., 1]`` per group. Differentiable in `x`
    through a straight-through rounding."""
    g = _grouped(x.float(), spec)
    if spec.symmetric:
        scale = _storable(g.abs().amax(dim=-1, keepdim=True) * spec.clip_ratio / spec.qmax)
        return torch.clamp(_round_ste(g / scale), spec.qmin, spec.qmax), scale, None
    lo = g.amin(dim=-1, keepdim=True).clamp(max=0) * spec.clip_ratio
    hi = g.amax(dim=-1, keepdim=True).clamp(min=0) * spec.clip_ratio
    scale = _storable((hi - lo) / spec.qmax)
    zero = torch.clamp(torch.round(-lo / scale), 0, spec.qmax).detach()
    return torch.clamp(_round_ste(g / scale) + zero, spec.qmin, spec.qmax), scale, zero


def kv_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, shape: torch.Size,
                  dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `kv_quantize` (codes as any dtype, scales as float16 or float32) back to `shape` in `dtype`."""
    q, scale = q.float(), scale.float()
    values = (q - zero.float()) * scale if zero is not None else q * scale
    return values.reshape(shape).to(dtype)


def kv_fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize and dequantize keys or values ``[..., head_dim]`` (straight-through gradient)."""
    q, scale, zero = kv_quantize(x, spec)
    return kv_dequantize(q, scale, zero, x.shape, x.dtype)
