"""`QLinear`: an nn.Linear with an optional online Hadamard on its input and optional fake quantizers.

Parameter names stay those of nn.Linear (`weight`, `bias`), so a transformed model keeps HF's state-dict keys.
Forward: ``x → x·H (online_hadamard) → Q_a(x) → x · Q_w(W)ᵀ + b``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lsr.hadamard import hadamard_transform
from lsr.quant.rtn import QuantSpec, fake_quantize


class QLinear(nn.Linear):
    online_hadamard: bool
    act_quant: QuantSpec | None
    weight_quant: QuantSpec | None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, online_hadamard: bool = False) -> QLinear:
        """Wrap `linear`'s own parameters (no copy)."""
        if isinstance(linear, QLinear):
            linear.online_hadamard = linear.online_hadamard or online_hadamard
            return linear
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.online_hadamard = online_hadamard
        new.act_quant = None
        new.weight_quant = None
        return new

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor the weight actually multiplies: after the online Hadamard and the activation quantizer."""
        if self.online_hadamard:
            x = hadamard_transform(x)
        if self.act_quant is not None:
            x = fake_quantize(x, self.act_quant)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.weight_quant is None else fake_quantize(self.weight, self.weight_quant)
        return F.linear(self.prepare_input(x), weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, online_hadamard={self.online_hadamard}, "
            f"act_quant={self.act_quant}, weight_quant={self.weight_quant}"
        )


def qlinears(module: nn.Module) -> list[QLinear]:
    return [m for m in module.modules() if isinstance(m, QLinear)]


def set_quantizers(module: nn.Module, act: QuantSpec | None, weight: QuantSpec | None) -> None:
    """Set the fake quantizers of every QLinear inside `module`."""
    for linear in qlinears(module):
        linear.act_quant, linear.weight_quant = act, weight
