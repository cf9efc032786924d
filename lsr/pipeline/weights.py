"""The weight step: RTN or GPTQ codes for every linear of the block; the block's weights become their dequantized
values (so the model in memory is the fake-quantized W4A4 model the export writes).

GPTQ sees the quantized model: each linear's Hessian ``H = 2/n Σ xᵀx`` is accumulated on ``prepare_input(x)`` (after
the online Hadamard and the activation quantizer) for the block's quantized-prefix inputs; with ``true_sequential``
the mapping's GPTQ groups are quantized in order, re-running the block between groups.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lsr.pipeline.runner import Block
from lsr.quant.gptq import HessianAccumulator, gptq_quantize
from lsr.quant.rtn import QuantSpec, quantize
from lsr.quant.weights import QuantizedWeight
from lsr.recipe import WeightStep
from lsr.transforms.linear import QLinear

log = logging.getLogger(__name__)


def _codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, shape: torch.Size) -> QuantizedWeight:
    if zero is not None:
        raise ValueError("asymmetric weight quantization is not supported (the export stores symmetric int4)")
    return QuantizedWeight.from_codes(q, scale, shape)


@torch.no_grad()
def rtn_weight(linear: nn.Linear, spec: QuantSpec, clip: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest codes and scales of one linear (the fake quantizer's own; `clip`: learned ``[out, 1]``)."""
    weight = linear.weight.detach().float()
    clip = None if clip is None else clip.to(weight.device, torch.float32)
    return _codes(*quantize(weight, spec, clip), weight.shape)


@torch.no_grad()
def set_quantized(linear: nn.Linear, weight: QuantizedWeight) -> None:
    """Replace a linear's weight by the dequantized codes."""
    linear.weight.copy_(weight.dequantize().reshape(linear.weight.shape).to(linear.weight.dtype))


class QuantizeWeights:
    """RTN or GPTQ for the block's linears (``WeightStep``)."""

    def __init__(self, step: WeightStep) -> None:
        self.step = step

    def on_block(self, block: Block) -> None:
        linears = {name: block.layer.get_submodule(name) for name in block.mapping.linears}
        spec = self.step.effective_spec
        block.float_params = {n: p.detach().clone() for n, p in block.layer.named_parameters()}
        if self.step.method == "rtn":
            codes = {name: rtn_weight(linear, spec, block.weight_clips.get(name)) for name, linear in linears.items()}
        else:
            codes = self._gptq(block, spec)
        for name, weight in codes.items():
            set_quantized(linears[name], weight)
        block.weights = codes

    @torch.no_grad()
    def _gptq(self, block: Block, spec: QuantSpec) -> dict[str, QuantizedWeight]:
        options = self.step.gptq
        groups = block.mapping.gptq_groups if options.true_sequential else (block.mapping.linears,)
        out: dict[str, QuantizedWeight] = {}
        for names in groups:
            accumulators: dict[str, HessianAccumulator] = {}
            hooks = {}
            for name in names:
                linear = block.layer.get_submodule(name)
                if not isinstance(linear, QLinear):
                    raise TypeError(f"{name} is {type(linear).__name__}, expected a QLinear")
                acc = accumulators[name] = HessianAccumulator(linear.in_features, device=linear.weight.device)
                hooks[name] = lambda mod, args, acc=acc: acc.add(mod.prepare_input(args[0]))
            with block.hooked(hooks):  # the linears quantized so far hold their dequantized weights
                for b in block.batches():
                    block.forward(block.inputs[b].to(block.device), quantized=True, weights_ready=True)
            for name in names:
                linear = block.layer.get_submodule(name)
                weight = linear.weight.detach().float()
                codes = gptq_quantize(weight, accumulators[name].hessian, spec, damp=options.damp,
                                      act_order=options.act_order, block_size=options.block_size)
                out[name] = _codes(*codes, weight.shape)
                set_quantized(linear, out[name])
        return out
