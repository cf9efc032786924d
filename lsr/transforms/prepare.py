"""Turn every decoder-block linear into a `QLinear` (same parameters), ready for fake or real quantization."""

from __future__ import annotations

from torch import nn

from lsr.models.adapter import adapter_for
from lsr.transforms.linear import QLinear, replace_module


def to_qlinears(model: nn.Module) -> nn.Module:
    """Replace the mapping's decoder-block linears by QLinears sharing their parameters (in place)."""
    adapter = adapter_for(model)
    for layer in adapter.layers(model):
        for name, linear in adapter.linears(layer).items():
            if not isinstance(linear, QLinear):
                replace_module(layer, name, QLinear.from_linear(linear))
    return model
