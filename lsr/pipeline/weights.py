"""The weight step: RTN, GPTQ or GPTAQ codes for every linear of the block; the block's weights become their
dequantized values (so the model in memory is the fake-quantized W4A4 model the export writes).

GPTQ sees the quantized model: each linear's Hessian ``H = 2/n Σ xᵀx`` is accumulated on ``prepare_input(x)`` (after
the online Hadamard and the activation quantizer) for the block's quantized-prefix inputs; with ``true_sequential``
the mapping's GPTQ groups are quantized in order, re-running the block between groups.

GPTAQ also sees the float model: for every batch the float block (its float parameters ``block.float_params``, no
activation quantization) runs on the FP chain's inputs and records each linear's float input ``x`` (after the online
Hadamard), then the current block records ``x̃`` as GPTQ does; the Hessian of ``x̃`` and the cross term
``2/n Σ (x − x̃)ᵀ x̃`` are accumulated batch by batch, and each linear is GPTQ-quantized from the asymmetric target
(`lsr.quant.gptq.asymmetric_target`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lsr.pipeline.runner import Block
from lsr.quant.gptq import CrossAccumulator, HessianAccumulator, asymmetric_target, gptq_quantize
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
    """RTN, GPTQ or GPTAQ for the block's linears (``WeightStep``)."""

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
        asymmetric = self.step.method == "gptaq"
        groups = block.mapping.gptq_groups if options.true_sequential else (block.mapping.linears,)
        out: dict[str, QuantizedWeight] = {}
        for names in groups:
            hessians, crosses = _statistics(block, names, asymmetric)
            for name in names:
                linear = block.layer.get_submodule(name)
                weight = linear.weight.detach().float()
                if asymmetric:
                    weight = asymmetric_target(weight, hessians[name].hessian, crosses[name].cross,
                                               alpha=options.alpha, damp=options.damp)
                clip = block.weight_clips.get(name)  # learned against RTN: they fix GPTQ's scales
                codes = gptq_quantize(weight, hessians[name].hessian, spec, damp=options.damp,
                                      act_order=options.act_order, block_size=options.block_size,
                                      clip=None if clip is None else clip.to(weight.device))
                out[name] = _codes(*codes, weight.shape)
                set_quantized(linear, out[name])
        return out


@torch.no_grad()
def _statistics(block: Block, names: tuple[str, ...], asymmetric: bool
                ) -> tuple[dict[str, HessianAccumulator], dict[str, CrossAccumulator]]:
    """Hessians of the linears `names` on the current block's inputs ``x̃`` (quantized-prefix inputs, activation
    quantization on, the linears quantized so far holding their dequantized weights); with `asymmetric` also the cross
    terms with their float inputs ``x`` (float block on the FP chain), batch by batch."""
    hessians: dict[str, HessianAccumulator] = {}
    crosses: dict[str, CrossAccumulator] = {}
    fp_inputs: dict[str, torch.Tensor] = {}  # the current batch's float inputs of the linears
    hooks, fp_hooks = {}, {}
    for name in names:
        linear = block.layer.get_submodule(name)
        if not isinstance(linear, QLinear):
            raise TypeError(f"{name} is {type(linear).__name__}, expected a QLinear")
        hessian = hessians[name] = HessianAccumulator(linear.in_features, device=linear.weight.device)
        if asymmetric:
            cross = crosses[name] = CrossAccumulator(linear.in_features, device=linear.weight.device)
            fp_hooks[name] = lambda mod, args, name=name: fp_inputs.__setitem__(name, mod.prepare_input(args[0]))
            hooks[name] = lambda mod, args, h=hessian, c=cross, name=name: _add_both(
                h, c, mod.prepare_input(args[0]), fp_inputs.pop(name))
        else:
            hooks[name] = lambda mod, args, h=hessian: h.add(mod.prepare_input(args[0]))
    for b in block.batches():
        if asymmetric:  # the float block (float weights, also once earlier groups are quantized), no act quantizer
            with block.hooked(fp_hooks):
                block.forward(block.x_fp[b].to(block.device), block.float_params, quantized=False)
        with block.hooked(hooks):
            block.forward(block.inputs[b].to(block.device), quantized=True, weights_ready=True)
    return hessians, crosses


def _add_both(hessian: HessianAccumulator, cross: CrossAccumulator, x_q: torch.Tensor, x_fp: torch.Tensor) -> None:
    hessian.add(x_q)
    cross.add(x_q, x_fp)
