"""`QLinear`: an nn.Linear with an optional online Hadamard on its input and optional fake quantizers.

Parameter names stay those of nn.Linear (`weight`, `bias`), so a transformed model keeps HF's state-dict keys.
Forward: ``x → x·H (online_hadamard) → Q_a(x) → x · Q_w(W)ᵀ + b``, H block-diagonal ``I ⊗ H_b`` with
``hadamard_block`` b. ``act_clip`` (a scalar tensor) and ``weight_clip`` (``[out, 1]``) replace the quantizers'
fixed clip ratios when set: learned clipping; the export writes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lsr.hadamard import hadamard_transform
from lsr.quant.rtn import QuantSpec, fake_quantize
from lsr.transforms.attention import qattentions


class QLinear(nn.Linear):
    online_hadamard: bool
    hadamard_block: int | None
    act_quant: QuantSpec | None
    weight_quant: QuantSpec | None
    act_clip: torch.Tensor | None
    weight_clip: torch.Tensor | None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, online_hadamard: bool = False, hadamard_block: int | None = None
                    ) -> QLinear:
        """Wrap `linear`'s own parameters (no copy)."""
        if isinstance(linear, QLinear):
            if online_hadamard:
                linear.online_hadamard, linear.hadamard_block = True, hadamard_block
            return linear
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.online_hadamard = online_hadamard
        new.hadamard_block = hadamard_block
        new.act_quant = None
        new.weight_quant = None
        new.act_clip = None
        new.weight_clip = None
        return new

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` after the online Hadamard (itself without one)."""
        return hadamard_transform(x, self.hadamard_block) if self.online_hadamard else x

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor the weight actually multiplies: after the online Hadamard and the activation quantizer."""
        x = self.rotate_input(x)
        if self.act_quant is not None:
            x = fake_quantize(x, self.act_quant, self.act_clip)
        return x

    def quantized_weight(self) -> torch.Tensor:
        """``Q_w(W)``; for the module's own frozen parameter, cached until the weight or the spec changes."""
        if self.weight_quant is None:
            return self.weight
        weight = self.weight
        if self.weight_clip is not None:
            return fake_quantize(weight, self.weight_quant, self.weight_clip)
        if not isinstance(weight, nn.Parameter) or (torch.is_grad_enabled() and weight.requires_grad):
            return fake_quantize(weight, self.weight_quant)  # e.g. functional_call's substituted tensors
        key = (weight, weight._version, self.weight_quant)
        cached = self.__dict__.get("_weight_cache")
        if cached is None or cached[0][0] is not weight or cached[0][1:] != key[1:]:
            with torch.no_grad():
                cached = (key, fake_quantize(self.weight, self.weight_quant))
            self.__dict__["_weight_cache"] = cached
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.prepare_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, online_hadamard={self.online_hadamard}, "
            + (f"hadamard_block={self.hadamard_block}, " if self.hadamard_block else "")
            + f"act_quant={self.act_quant}, weight_quant={self.weight_quant}"
            + (f", act_clip={float(self.act_clip):.4f}" if self.act_clip is not None else "")
        )


def qlinears(module: nn.Module) -> list[QLinear]:
    return [m for m in module.modules() if isinstance(m, QLinear)]


def set_quantizers(module: nn.Module, act: QuantSpec | None, weight: QuantSpec | None) -> None:
    """Set the fake quantizers of every QLinear inside `module`; the KV-cache quantizers of its `QAttention`s (their
    spec fixed by the recipe) run while activations are quantized (`act` set)."""
    for linear in qlinears(module):
        linear.act_quant, linear.weight_quant = act, weight
    for attention in qattentions(module):
        attention.kv_active = act is not None


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Set the submodule at dotted path `name` of `root`."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
