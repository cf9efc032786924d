"""Turn every decoder-block linear into a `QLinear` (same parameters), ready for fake or real quantization."""

from __future__ import annotations

from torch import nn

from lsr.models.adapter import adapter_for
from lsr.transforms.linear import QLinear


def to_qlinears(model: nn.Module) -> nn.Module:
    """Replace q/k/v/o/gate/up/down in every block by QLinears sharing their parameters (in place)."""
    adapter = adapter_for(model)
    for layer in adapter.layers(model):
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and not isinstance(child, QLinear):
                    setattr(parent, name, QLinear.from_linear(child))
    return model
