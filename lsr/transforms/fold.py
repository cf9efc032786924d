"""Untie embeddings and fold RMSNorm weights into the linears that read them (exact)."""

from __future__ import annotations

import torch
from torch import nn

from lsr.models.adapter import adapter_for


@torch.no_grad()
def scale_input_columns(linear: nn.Linear, scale: torch.Tensor) -> None:
    """``W ← W · diag(scale)`` computed in float64."""
    w = linear.weight
    w.copy_((w.double() * scale.double().to(w.device)).to(w.dtype))


@torch.no_grad()
def untie_embeddings(model: nn.Module) -> None:
    """Give lm_head its own weight when it shares the embedding's (so it can absorb the final norm)."""
    adapter = adapter_for(model)
    embed, head = adapter.embeddings(model), adapter.lm_head(model)
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None


@torch.no_grad()
def fold_norms(model: nn.Module) -> None:
    """``W ← W diag(g)`` for every linear fed by an RMSNorm, then ``g ← 1``; final norm into lm_head."""
    adapter = adapter_for(model)
    untie_embeddings(model)
    for layer in adapter.layers(model):
        for norm_name, readers in adapter.mapping.norm_readers:
            norm = layer.get_submodule(norm_name)
            for reader in readers:
                scale_input_columns(layer.get_submodule(reader), norm.weight)
            norm.weight.fill_(1.0)
    final_norm = adapter.final_norm(model)
    scale_input_columns(adapter.lm_head(model), final_norm.weight)
    final_norm.weight.fill_(1.0)
