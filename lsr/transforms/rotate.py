"""Exact Hadamard rotations (QuaRot): R1 on the residual stream, R2 per head (v→o), R4 online at down_proj.

All products are computed in float64 and cast back, so the rotated float model computes the same function.
"""

from __future__ import annotations

import torch
from torch import nn

from lsr.hadamard import hadamard_matrix, random_hadamard_matrix
from lsr.models.adapter import adapter_for
from lsr.transforms.fold import fold_norms
from lsr.transforms.linear import QLinear, replace_module


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


@torch.no_grad()
def _rotate_readers(linears: list[nn.Linear], rotation: torch.Tensor) -> None:
    """Linears that read the residual stream: ``W ← W R``."""
    for linear in linears:
        _set(linear.weight, linear.weight.double() @ rotation.to(linear.weight.device))


@torch.no_grad()
def _rotate_writers(linears: list[nn.Linear], rotation: torch.Tensor) -> None:
    """Linears that write the residual stream: ``W ← Rᵀ W``, ``b ← b R``."""
    for linear in linears:
        r = rotation.to(linear.weight.device)
        _set(linear.weight, r.T @ linear.weight.double())
        if linear.bias is not None:
            _set(linear.bias, linear.bias.double() @ r)


@torch.no_grad()
def _rotate_heads(v_proj: nn.Linear, o_proj: nn.Linear, head_dim: int) -> None:
    """R2: per-head Hadamard on v_proj's outputs and o_proj's matching inputs."""
    h = hadamard_matrix(head_dim, dtype=torch.float64, device=v_proj.weight.device)
    wv = v_proj.weight.double().reshape(-1, head_dim, v_proj.in_features)
    _set(v_proj.weight, torch.einsum("hdi,de->hei", wv, h).reshape_as(v_proj.weight))
    if v_proj.bias is not None:
        _set(v_proj.bias, (v_proj.bias.double().reshape(-1, head_dim) @ h).reshape(-1))
    wo = o_proj.weight.double().reshape(o_proj.out_features, -1, head_dim)
    _set(o_proj.weight, (wo @ h).reshape_as(o_proj.weight))


def r4_block(size: int, r4: str) -> int | None:
    """The block of R4 on ``size`` channels: ``None`` (one Hadamard of all of them) for ``full`` or a power of two,
    else the largest power of two ``2^k`` dividing ``size = m·2^k`` (``block-diagonal``: ``I_m ⊗ H_2^k``, any odd
    ``m``: 1536 → 3 blocks of 512, 14336 → 7 of 2048)."""
    if r4 not in ("full", "block-diagonal"):
        raise ValueError(f"r4={r4!r}: expected 'full' or 'block-diagonal'")
    block = size & -size
    return block if r4 == "block-diagonal" and block != size else None


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, *, head_rotation: bool = True, r4: str = "full") -> nn.Module:
    """Fold norms, then apply R1 (random-sign Hadamard, size hidden), R2 (per head) and R4 (online, down_proj;
    ``r4``: see `lsr.recipe.RotateStep`).

    In place; returns `model`. The mapping's online-Hadamard target (down_proj) becomes a `QLinear` with
    ``online_hadamard=True`` (and its ``hadamard_block``) whose weight absorbed H.
    """
    adapter = adapter_for(model)
    fold_norms(model)
    hidden = model.config.hidden_size
    r1 = random_hadamard_matrix(hidden, seed, dtype=torch.float64)
    embed = adapter.embeddings(model)
    _set(embed.weight, embed.weight.double() @ r1.to(embed.weight.device))
    _rotate_readers([adapter.lm_head(model)], r1)
    _, _, head_dim = adapter.head_dims(model)
    mapping = adapter.mapping
    for layer in adapter.layers(model):
        _rotate_readers([layer.get_submodule(n) for n in mapping.residual_readers], r1)
        _rotate_writers([layer.get_submodule(n) for n in mapping.residual_writers], r1)
        if head_rotation:
            _rotate_heads(*(layer.get_submodule(n) for n in mapping.head_rotation), head_dim)
        down = layer.get_submodule(mapping.online_hadamard)
        block = r4_block(down.in_features, r4)
        h4 = hadamard_matrix(down.in_features, dtype=torch.float64, device=down.weight.device, block=block)
        _set(down.weight, down.weight.double() @ h4)
        replace_module(layer, mapping.online_hadamard,
                       QLinear.from_linear(down, online_hadamard=True, hadamard_block=block))
    model.config.lsr_rotation = {"seed": seed, "head_rotation": head_rotation, "r4": r4}
    return model
