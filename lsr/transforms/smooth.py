"""Channel smoothing before rotation (SmoothRot / lsr), as a differentiable function of the scales.

A smoothing point (`lsr.models.SmoothingPoint`, named by the architecture mapping) divides a tensor's channels by
``s`` (absorbed by its producer) and multiplies the consumers' input columns by ``s``, *before* the rotation that
follows, so the quantizer sees ``(x / s)·H``. The three kinds, for LLaMA's points:

- ``online_hadamard`` (``down``): down_proj input. ``W_up ← diag(1/s) W_up``; ``W_down ← (W_down⁰ diag(s)) H`` with
  W_down⁰ the weight before the online Hadamard was absorbed.
- ``heads`` (``vo``): per kv head, v_proj outputs / o_proj inputs, before the head-wise Hadamard R2:
  with ``A(s) = Hᵀ diag(s) H``: ``W_v ← A(1/s) W_v``, ``b_v ← b_v A(1/s)``, ``W_o[:, h] ← W_o[:, h] A(s_{kv(h)})``.
- ``norm`` (``qkv`` / ``gateup``): the norm-fed inputs, in the rotated basis (after R1): the norm weight (1 after
  folding) becomes ``1/s`` and q/k/v (gate/up) columns absorb ``s``.

`smoothed_parameters` is used both for learning (as `functional_call` parameters, so gradients reach the
log-scales) and for folding (the same tensors copied into the block): one code path, exact in float.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lsr.hadamard import hadamard_matrix
from lsr.models.adapter import ArchitectureMapping, SmoothingPoint


@dataclass
class BlockGeometry:
    """Shapes, fixed rotations and smoothing points of one (rotated) decoder block."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    head_hadamard: torch.Tensor  # [head_dim, head_dim], the R2 block
    online_hadamard: torch.Tensor  # [n, n], R4 at the mapping's online-Hadamard target
    mapping: ArchitectureMapping

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def points(self) -> dict[str, SmoothingPoint]:
        return self.mapping.smoothing_points

    @classmethod
    def of(cls, layer: nn.Module, mapping: ArchitectureMapping, num_heads: int, num_kv_heads: int, head_dim: int
           ) -> BlockGeometry:
        online = layer.get_submodule(mapping.online_hadamard)
        device = online.weight.device
        return cls(
            num_heads,
            num_kv_heads,
            head_dim,
            hadamard_matrix(head_dim, dtype=torch.float32, device=device),
            hadamard_matrix(online.in_features, dtype=torch.float32, device=device,
                            block=getattr(online, "hadamard_block", None)),
            mapping,
        )


def point_channels(point: SmoothingPoint, layer: nn.Module, num_kv_heads: int, head_dim: int) -> int:
    """Number of channels (scales) of a smoothing point."""
    if point.kind == "heads":
        return num_kv_heads * head_dim
    return layer.get_submodule(point.observed).in_features


def _unrotated(name: str) -> str:
    return f"{name}.weight0"


def base_parameters(layer: nn.Module, geometry: BlockGeometry) -> dict[str, torch.Tensor]:
    """Detached copies of the block's parameters, plus ``{online}.weight0``: the online-Hadamard target's weight
    before H was absorbed."""
    base = {name: p.detach().clone() for name, p in layer.named_parameters()}
    online = geometry.mapping.online_hadamard
    w = base[f"{online}.weight"]
    base[_unrotated(online)] = (w.double() @ geometry.online_hadamard.double().T).to(w.dtype)
    return base


def _head_conjugate(s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``A(s) = Hᵀ diag(s) H`` for each row of s ([heads, d]) -> [heads, d, d]."""
    return torch.einsum("ad,hd,db->hab", h.T, s, h)


def _smooth_heads(out: dict[str, torch.Tensor], point: SmoothingPoint, s: torch.Tensor, g: BlockGeometry) -> None:
    h, d = g.head_hadamard, g.head_dim
    (consumer,) = point.consumers
    s = s.reshape(g.num_kv_heads, d)
    inv = _head_conjugate(1.0 / s, h)  # [kv, d, d]
    wv = out[f"{point.producer}.weight"].reshape(g.num_kv_heads, d, -1)
    out[f"{point.producer}.weight"] = torch.einsum("hab,hbi->hai", inv, wv).reshape(-1, wv.shape[-1])
    if f"{point.producer}.bias" in out:
        bv = out[f"{point.producer}.bias"].reshape(g.num_kv_heads, d)
        out[f"{point.producer}.bias"] = torch.einsum("hb,hba->ha", bv, inv).reshape(-1)
    fwd = _head_conjugate(s, h).repeat_interleave(g.group, dim=0)  # [heads, d, d]
    wo = out[f"{consumer}.weight"].reshape(-1, g.num_heads, d)
    out[f"{consumer}.weight"] = torch.einsum("ohb,hba->oha", wo, fwd).reshape(wo.shape[0], -1)


def smoothed_parameters(
    base: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], geometry: BlockGeometry
) -> dict[str, torch.Tensor]:
    """The block's parameters after smoothing with per-point scales ``scales[point]`` (differentiable)."""
    out = {k: v for k, v in base.items() if not k.endswith("weight0")}
    for name, s in scales.items():
        point = geometry.points[name]
        if point.kind == "norm":
            out[f"{point.producer}.weight"] = out[f"{point.producer}.weight"] / s
            for reader in point.consumers:
                out[f"{reader}.weight"] = out[f"{reader}.weight"] * s
        elif point.kind == "online_hadamard":
            (consumer,) = point.consumers
            out[f"{point.producer}.weight"] = out[f"{point.producer}.weight"] / s[:, None]
            if f"{point.producer}.bias" in out:
                out[f"{point.producer}.bias"] = out[f"{point.producer}.bias"] / s
            out[f"{consumer}.weight"] = (base[_unrotated(consumer)] * s) @ geometry.online_hadamard
        else:
            _smooth_heads(out, point, s, geometry)
    return out


def weight_statistic(name: str, base: dict[str, torch.Tensor], geometry: BlockGeometry) -> torch.Tensor:
    """``w_j = max_i |W[i, j]|`` over the consumers of a point, in the basis where the scale acts."""
    point, g = geometry.points[name], geometry
    if point.kind == "online_hadamard":
        return base[_unrotated(point.consumers[0])].abs().amax(dim=0)
    if point.kind == "norm":
        return torch.cat([base[f"{r}.weight"] for r in point.consumers]).abs().amax(dim=0)
    h, d = g.head_hadamard, g.head_dim
    wo = base[f"{point.consumers[0]}.weight"].reshape(-1, g.num_heads, d) @ h.T  # back to the pre-R2 basis
    per_head = wo.abs().amax(dim=0)  # [heads, d]
    return per_head.reshape(g.num_kv_heads, g.group, d).amax(dim=1).reshape(-1)


def activation_basis(name: str, x: torch.Tensor, geometry: BlockGeometry) -> torch.Tensor:
    """Map the input a point's observed consumer sees (as a [tokens, channels] tensor) to the point's channel basis.

    For ``heads`` the consumer's input is per query head and after R2: undo R2 and fold query heads of one kv group
    into the token axis, so a statistic over rows is a statistic over tokens and heads of the group.
    """
    if geometry.points[name].kind != "heads":
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


@torch.no_grad()
def fold_scales(layer: nn.Module, scales: dict[str, torch.Tensor], geometry: BlockGeometry) -> None:
    """Fold smoothing scales into one rotated decoder block's parameters (exact in float)."""
    device = geometry.online_hadamard.device
    params = smoothed_parameters(
        base_parameters(layer, geometry), {p: s.to(device) for p, s in scales.items()}, geometry
    )
    for name, p in layer.named_parameters():
        p.copy_(params[name])
