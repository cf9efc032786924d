"""Channel smoothing before rotation (SmoothRot / lsr), as a differentiable function of the scales.

A smoothing point divides a tensor's channels by ``s`` (absorbed by its producer) and multiplies the consumers'
input columns by ``s``, *before* the rotation that follows, so the quantizer sees ``(x / s)·H``:

- ``down``: down_proj input. ``W_up ← diag(1/s) W_up``; ``W_down ← (W_down⁰ diag(s)) H`` with W_down⁰ the
  weight before the online Hadamard was absorbed.
- ``vo``: per kv head, v_proj outputs / o_proj inputs, before the head-wise Hadamard R2:
  with ``A(s) = Hᵀ diag(s) H``: ``W_v ← A(1/s) W_v``, ``b_v ← b_v A(1/s)``, ``W_o[:, h] ← W_o[:, h] A(s_{kv(h)})``.
- ``qkv`` / ``gateup``: the norm-fed inputs, in the rotated basis (after R1): the norm weight (1 after folding)
  becomes ``1/s`` and q/k/v (gate/up) columns absorb ``s``.

`smoothed_parameters` is used both for learning (as `functional_call` parameters, so gradients reach the
log-scales) and for folding (the same tensors copied into the block): one code path, exact in float.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lsr.hadamard import hadamard_matrix

NORM_POINTS = {
    "qkv": ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "gateup": ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
}


@dataclass
class BlockGeometry:
    """Shapes and fixed rotations of one (rotated) decoder block."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    head_hadamard: torch.Tensor  # [head_dim, head_dim], the R2 block
    down_hadamard: torch.Tensor  # [intermediate, intermediate], R4

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def of(cls, layer: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int) -> BlockGeometry:
        device = layer.mlp.down_proj.weight.device
        return cls(
            num_heads,
            num_kv_heads,
            head_dim,
            hadamard_matrix(head_dim, dtype=torch.float32, device=device),
            hadamard_matrix(layer.mlp.down_proj.in_features, dtype=torch.float32, device=device),
        )


def point_channels(point: str, layer: nn.Module, num_kv_heads: int, head_dim: int) -> int:
    """Number of channels (scales) of a smoothing point."""
    if point == "down":
        return layer.mlp.down_proj.in_features
    if point == "vo":
        return num_kv_heads * head_dim
    return layer.self_attn.q_proj.in_features


def base_parameters(layer: nn.Module, geometry: BlockGeometry) -> dict[str, torch.Tensor]:
    """Detached copies of the block's parameters, plus ``mlp.down_proj.weight0`` (before the online Hadamard)."""
    base = {name: p.detach().clone() for name, p in layer.named_parameters()}
    w_down = base["mlp.down_proj.weight"]
    base["mlp.down_proj.weight0"] = (w_down.double() @ geometry.down_hadamard.double().T).to(w_down.dtype)
    return base


def _head_conjugate(s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``A(s) = Hᵀ diag(s) H`` for each row of s ([heads, d]) -> [heads, d, d]."""
    return torch.einsum("ad,hd,db->hab", h.T, s, h)


def smoothed_parameters(
    base: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], geometry: BlockGeometry
) -> dict[str, torch.Tensor]:
    """The block's parameters after smoothing with per-point scales ``scales[point]`` (differentiable)."""
    out = {k: v for k, v in base.items() if not k.endswith("weight0")}
    if "down" in scales:
        s = scales["down"]
        out["mlp.up_proj.weight"] = out["mlp.up_proj.weight"] / s[:, None]
        out["mlp.down_proj.weight"] = (base["mlp.down_proj.weight0"] * s) @ geometry.down_hadamard
    for point, (norm, readers) in NORM_POINTS.items():
        if point in scales:
            s = scales[point]
            out[f"{norm}.weight"] = out[f"{norm}.weight"] / s
            for reader in readers:
                out[f"{reader}.weight"] = out[f"{reader}.weight"] * s
    if "vo" in scales:
        g, h, d = geometry, geometry.head_hadamard, geometry.head_dim
        s = scales["vo"].reshape(g.num_kv_heads, d)
        inv = _head_conjugate(1.0 / s, h)  # [kv, d, d]
        wv = out["self_attn.v_proj.weight"].reshape(g.num_kv_heads, d, -1)
        out["self_attn.v_proj.weight"] = torch.einsum("hab,hbi->hai", inv, wv).reshape(-1, wv.shape[-1])
        if "self_attn.v_proj.bias" in out:
            bv = out["self_attn.v_proj.bias"].reshape(g.num_kv_heads, d)
            out["self_attn.v_proj.bias"] = torch.einsum("hb,hba->ha", bv, inv).reshape(-1)
        fwd = _head_conjugate(s, h).repeat_interleave(g.group, dim=0)  # [heads, d, d]
        wo = out["self_attn.o_proj.weight"].reshape(-1, g.num_heads, d)
        out["self_attn.o_proj.weight"] = torch.einsum("ohb,hba->oha", wo, fwd).reshape(wo.shape[0], -1)
    return out


def weight_statistic(point: str, base: dict[str, torch.Tensor], geometry: BlockGeometry) -> torch.Tensor:
    """``w_j = max_i |W[i, j]|`` over the consumers of a point, in the basis where the scale acts."""
    if point == "down":
        return base["mlp.down_proj.weight0"].abs().amax(dim=0)
    if point in NORM_POINTS:
        _, readers = NORM_POINTS[point]
        return torch.cat([base[f"{r}.weight"] for r in readers]).abs().amax(dim=0)
    g, h, d = geometry, geometry.head_hadamard, geometry.head_dim
    wo = base["self_attn.o_proj.weight"].reshape(-1, g.num_heads, d) @ h.T  # back to the pre-R2 basis
    per_head = wo.abs().amax(dim=0)  # [heads, d]
    return per_head.reshape(g.num_kv_heads, g.group, d).amax(dim=1).reshape(-1)


def activation_basis(point: str, x: torch.Tensor, geometry: BlockGeometry) -> torch.Tensor:
    """Map the input a point's consumer sees (as a [tokens, channels] tensor) to the point's channel basis.

    For ``vo`` the o_proj input is per query head and after R2: undo R2 and fold query heads of one kv group
    into the token axis, so a statistic over rows is a statistic over tokens and heads of the group.
    """
    if point != "vo":
        return x
    g, d = geometry, geometry.head_dim
    pre = x.reshape(-1, g.num_heads, d) @ geometry.head_hadamard.T
    pre = pre.reshape(-1, g.num_kv_heads, g.group, d).transpose(1, 2)
    return pre.reshape(-1, g.num_kv_heads * d)


def smoothing_scales(
    act_stat: torch.Tensor, weight_stat: torch.Tensor, alpha: float, eps: float = 1e-5
) -> torch.Tensor:
    """SmoothQuant's ``s_j = a_j^α / w_j^(1-α)``."""
    return act_stat.clamp_min(eps).pow(alpha) / weight_stat.clamp_min(eps).pow(1.0 - alpha)
