"""Runtime modules of a loaded INT4 model.

`QuantizedLinear`: int4 weight (the `lsr.kernels` packed container, uint8 ``[N, K/2]``) with float32 per-channel
scales; every forward quantizes its input per token to int4 (after the online Hadamard where it applies;
``scale_t = max|x_t| · act_clip / 7``, ``act_clip`` the export's activation clip ratio), multiplies integers and
rescales, through `lsr.kernels.w4a4_linear` (backend ``reference`` is exact on any device; ``triton`` /
``fp8`` / ``auto`` pick the fused CUDA kernels).

`Int8WeightLinear` / `Int8Embedding`: the optional 8-bit weight-only lm_head (per output channel) and embedding
(per row), dequantized on the fly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lsr.kernels import BACKENDS, pack_int4, unpack_int4, w4a4_linear


class QuantizedLinear(nn.Module):
    """W4A4 linear: ``y = (Q_a(x [·H]) · Q_wᵀ) · scale_t · scale_w (+ bias)``."""

    packed_weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool = False, online_hadamard: bool = False,
        backend: str = "auto", act_clip: float = 1.0, device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features % 2:
            raise ValueError(f"int4 packing needs an even in_features, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.online_hadamard = online_hadamard
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

    def get_extra_state(self) -> dict:
        """``act_clip`` travels with ``state_dict`` (``<name>._extra_state``)."""
        return {"act_clip": self.act_clip}

    def set_extra_state(self, state: dict) -> None:
        self.act_clip = state.get("act_clip", 1.0)

    @classmethod
    def from_int(
        cls, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *, online_hadamard: bool = False,
        backend: str = "auto", act_clip: float = 1.0,
    ) -> QuantizedLinear:
        """From int8 codes ``q [N, K]`` in [-8, 7] and per-channel scales ``[N]`` (or ``[N, 1]``)."""
        n, k = q.shape
        module = cls(k, n, bias=bias is not None, online_hadamard=online_hadamard, backend=backend, act_clip=act_clip,
                     device=q.device)
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
        return w4a4_linear(x, self.packed_weight, self.weight_scale, hadamard=self.online_hadamard,
                           backend=self.backend, bias=self.bias, act_clip=self.act_clip)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"online_hadamard={self.online_hadamard}, backend={self.backend}, act_clip={self.act_clip}")


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
