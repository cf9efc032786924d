"""Round-to-nearest quantization (symmetric or asymmetric; per channel / token / group / tensor).

Convention, shared with the INT4 export and the kernels: the reduction runs over the LAST dimension, so
"channel" on a weight ``W[out, in]`` means one scale per output channel and "token" on an activation
``x[..., in]`` means one scale per token. Symmetric b-bit: ``scale = clip · absmax / (2^(b-1) − 1)``,
``q = clamp(round(x / scale), −2^(b-1), 2^(b-1) − 1)`` (round half to even, as torch.round).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Granularity = Literal["channel", "token", "group", "tensor"]


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized."""

    bits: int = 4
    symmetric: bool = True
    granularity: Granularity = "channel"
    group_size: int = 128
    clip_ratio: float = 1.0
    clip_search: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in [2, 8], got {self.bits!r}")
        if self.granularity not in ("channel", "token", "group", "tensor"):
            raise ValueError(f"granularity must be channel, token, group or tensor, got {self.granularity!r}")
        if self.granularity == "group" and self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")
        if self.clip_search and (not self.symmetric or self.clip_ratio != 1.0):
            raise ValueError("clip_search picks the clip ratio itself: it needs symmetric=True and clip_ratio=1.0")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View `x` so that each quantization group is one row of the last dimension."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    if spec.granularity == "group":
        if x.shape[-1] % spec.group_size:
            raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of group_size {spec.group_size}")
        return x.reshape(*x.shape[:-1], x.shape[-1] // spec.group_size, spec.group_size)
    return x


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


CLIP_GRID = tuple(1.0 - 0.03 * i for i in range(16))  # 1.00 ... 0.55


@torch.no_grad()
def _best_clip(g: torch.Tensor, absmax: torch.Tensor, spec: QuantSpec, norm: float = 2.4) -> torch.Tensor:
    """Per group, the clip ratio in CLIP_GRID minimising ``Σ|x − Q(x)|^2.4`` (QuaRot/GPTQ's weight-clip search)."""
    best_err = torch.full_like(absmax, float("inf"))
    best = torch.ones_like(absmax)
    for ratio in CLIP_GRID:
        scale = absmax * (ratio / spec.qmax)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        err = (torch.clamp(torch.round(g / scale), spec.qmin, spec.qmax) * scale - g).abs().pow(norm)
        err = err.sum(dim=-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best


def quantize(
    x: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Integer codes (float tensor of integers, grouped shape), scale and zero point (None if symmetric).

    `clip`: a clip ratio tensor broadcasting against the per-group absmax (a scalar per quantizer, ``[out, 1]`` per
    weight row), used instead of the spec's ``clip_ratio`` / ``clip_search``; gradients reach it (learned clipping).
    """
    g = _grouped(x, spec)
    if clip is not None:
        if not spec.symmetric or spec.granularity == "group":
            raise ValueError(f"a clip tensor needs a symmetric, non-grouped quantizer; got {spec}")
        absmax = g.abs().amax(dim=-1, keepdim=True)
        scale = absmax * clip / spec.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return torch.clamp(_round_ste(g / scale), spec.qmin, spec.qmax), scale, None
    if spec.symmetric:
        absmax = g.abs().amax(dim=-1, keepdim=True)
        ratio = _best_clip(g.detach(), absmax.detach(), spec) if spec.clip_search else spec.clip_ratio
        scale = absmax * ratio / spec.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(_round_ste(g / scale), spec.qmin, spec.qmax)
        return q, scale, None
    lo = g.amin(dim=-1, keepdim=True).clamp(max=0) * spec.clip_ratio
    hi = g.amax(dim=-1, keepdim=True).clamp(min=0) * spec.clip_ratio
    scale = (hi - lo) / spec.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).detach()
    q = torch.clamp(_round_ste(g / scale) + zero, spec.qmin, spec.qmax)
    return q, scale, zero


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, shape: torch.Size
) -> torch.Tensor:
    """Inverse of `quantize` back to `shape`."""
    values = (q - zero) * scale if zero is not None else q * scale
    return values.reshape(shape)


def best_clip(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The MSE-searched clip ratio of each row of ``w[out, in]`` (``[out, 1]``), as ``clip_search`` picks it."""
    g = w.detach()
    return _best_clip(g, g.abs().amax(dim=-1, keepdim=True), spec)


def fake_quantize(x: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize and dequantize with a straight-through gradient (through rounding; scales and `clip` stay
    differentiable)."""
    q, scale, zero = quantize(x, spec, clip)
    return dequantize(q, scale, zero, x.shape).to(x.dtype)
