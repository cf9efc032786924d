"""Runtime modules of a loaded INT4 model.

`QuantizedLinear`: int4 weight (the `lsr.kernels` packed container, uint8 ``[N, K/2]``) with float32 per-channel
scales; every forward quantizes its input per token to int4 (after the online Hadamard where it applies;
``scale_t = max|x_t| · act_clip / 7``, ``act_clip`` the export's activation clip ratio), multiplies integers and
rescales, through `lsr.kernels.w4a4_linear` (backend ``reference`` is exact on any device; ``triton`` /
``fp8`` / ``auto`` pick the fused CUDA kernels).

The W4A8 / W4A16 export variants use the same module with ``act_bits`` 8 (int8 per token, ``scale = max|x_t| / 127``,
integer sums) or ``None`` (no activation quantization), computed with torch ops on any device and backend: lsr's
fused kernels are W4A4 only.

`Int8WeightLinear` / `Int8Embedding`: the optional 8-bit weight-only lm_head (per output channel) and embedding
(per row), dequantized on the fly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lsr.hadamard import hadamard_transform
from lsr.kernels import BACKENDS, pack_int4, unpack_int4, w4a4_linear

ACT_BITS = (4, 8, None)
INT8_MAX = 127


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per token of float32 ``x [M, K]``: ``scale = max|x_t| / 127`` (1 where 0), round half to even,
    clamp [-128, 127]; ``(codes float32 [M, K], scale [M])`` (``lsr.quant.rtn.quantize`` with 8 bits, to the bit)."""
    scale = x.abs().amax(dim=-1) * 1.0 / INT8_MAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.round(x / scale.unsqueeze(-1)).clamp_(-INT8_MAX - 1, INT8_MAX), scale


class QuantizedLinear(nn.Module):
    """W4A4 linear: ``y = (Q_a(x [·H]) · Q_wᵀ) · scale_t · scale_w (+ bias)``; W4A8 (``act_bits=8``) or W4A16
    (``act_bits=None``) with the same int4 weights."""

    packed_weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool = False, online_hadamard: bool = False,
        hadamard_block: int | None = None, backend: str = "auto", act_clip: float = 1.0, act_bits: int | None = 4,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features % 2:
            raise ValueError(f"int4 packing needs an even in_features, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.online_hadamard = online_hadamard
        self.hadamard_block = hadamard_block if hadamard_block != in_features else None
        self.act_bits = act_bits
        self.backend = backend
        self.act_clip = act_clip
        self.register_buffer("packed_weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                          device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device))
        else:
            self.bias = None

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"unknown backend {value!r}; choose from {BACKENDS}")
        self._backend = value

    @property
    def act_clip(self) -> float:
        """Activation clip ratio in (0, 1]: ``scale_t = max|x_t| · act_clip / 7`` (1: the plain absmax)."""
        return self._act_clip

    @act_clip.setter
    def act_clip(self, value: float) -> None:
        value = float(value)
        if not 0.0 < value <= 1.0:
            raise ValueError(f"act_clip must be in (0, 1], got {value}")
        self._act_clip = value

    @property
    def act_bits(self) -> int | None:
        """4 (W4A4), 8 (W4A8) or None (W4A16: activations not quantized)."""
        return self._act_bits

    @act_bits.setter
    def act_bits(self, value: int | None) -> None:
        if value not in ACT_BITS:
            raise ValueError(f"act_bits must be one of {ACT_BITS}, got {value!r}")
        self._act_bits = value

    def get_extra_state(self) -> dict:
        """``act_clip`` and ``act_bits`` travel with ``state_dict`` (``<name>._extra_state``)."""
        return {"act_clip": self.act_clip, "act_bits": self.act_bits}

    def set_extra_state(self, state: dict) -> None:
        self.act_clip = state.get("act_clip", 1.0)
        self.act_bits = state.get("act_bits", 4)

    @classmethod
    def from_int(
        cls, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *, online_hadamard: bool = False,
        hadamard_block: int | None = None, backend: str = "auto", act_clip: float = 1.0, act_bits: int | None = 4,
    ) -> QuantizedLinear:
        """From int8 codes ``q [N, K]`` in [-8, 7] and per-channel scales ``[N]`` (or ``[N, 1]``)."""
        n, k = q.shape
        module = cls(k, n, bias=bias is not None, online_hadamard=online_hadamard, hadamard_block=hadamard_block,
                     backend=backend, act_clip=act_clip, act_bits=act_bits, device=q.device)
        module.packed_weight.copy_(pack_int4(q.to(torch.int8)))
        module.weight_scale.copy_(scale.reshape(n).float())
        if bias is not None:
            module.bias.copy_(bias.float())
        return module

    def int_weight(self) -> torch.Tensor:
        """The int8 codes ``[N, K]``."""
        return unpack_int4(self.packed_weight)

    def dequantized_weight(self) -> torch.Tensor:
        """``q_w · scale_w`` in float32 (what a fake-quantized twin multiplies)."""
        return self.int_weight().float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits == 4:
            if self.online_hadamard and self.hadamard_block is not None:  # the kernels rotate whole rows only
                rotated = hadamard_transform(x.float(), self.hadamard_block)  # float32, as inside the kernels
                return w4a4_linear(rotated, self.packed_weight, self.weight_scale, hadamard=False,
                                   backend=self.backend, bias=self.bias, act_clip=self.act_clip).to(x.dtype)
            return w4a4_linear(x, self.packed_weight, self.weight_scale, hadamard=self.online_hadamard,
                               backend=self.backend, bias=self.bias, act_clip=self.act_clip)
        return self._forward_torch(x)

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """W4A8: ``((Σ q_a·q_w) · scale_t) · scale_w``, exact integer sums in float64; W4A16: ``x·H`` times the
        dequantized weight in float32. The Hadamard and everything after it run in float32, as in W4A4."""
        xf = x.reshape(-1, self.in_features).float()
        if self.online_hadamard:
            xf = hadamard_transform(xf, self.hadamard_block)
        if self.act_bits is None:
            y = F.linear(xf, self.dequantized_weight())
        else:
            q, scale = quantize_per_token_int8(xf)
            acc = (q.double() @ self.int_weight().double().T).float()
            y = acc * scale.unsqueeze(-1) * self.weight_scale.unsqueeze(0)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"online_hadamard={self.online_hadamard}, hadamard_block={self.hadamard_block}, "
                f"act_bits={self.act_bits}, backend={self.backend}, "
                f"act_clip={self.act_clip}")


class Int8WeightLinear(nn.Module):
    """Weight-only int8 linear (per output channel scales), dequantized on every forward."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8", q.to(torch.int8))
        self.register_buffer("weight_scale", scale.reshape(-1).float())
        self.register_buffer("bias", None if bias is None else bias.float())

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per output channel"


class Int8Embedding(nn.Module):
    """Weight-only int8 embedding (one scale per row, i.e. per token id)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.dtype = dtype
        self.register_buffer("weight_int8", q.to(torch.int8))
        self.register_buffer("weight_scale", scale.reshape(-1).float())

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight_int8).float() * self.weight_scale[ids].unsqueeze(-1)
        return rows.to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row"


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every `QuantizedLinear` of `model` to `backend` (``auto`` | ``reference`` | ``triton`` | ``fp8``)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.backend = backend
    return model
