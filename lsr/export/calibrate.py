"""Sequential GPTQ on the rotated, smoothed model: each linear's Hessian from the inputs it really multiplies.

Calibration windows run block by block. Inside block l every QLinear's input is fake-quantized with ``method.act``
(after the online Hadamard for down_proj) and hooked through `QLinear.prepare_input`, which is exactly what the weight
multiplies in the W4A4 model. With ``true_sequential`` the linears are quantized in four groups (q/k/v, o, gate/up,
down), re-running the block between groups so that later linears see the outputs of the quantized earlier ones. The
block's W4A4 outputs (quantized weights and activations) are the next block's inputs.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lsr.export.config import GPTQOptions
from lsr.export.prepare import QuantizedWeight
from lsr.learn.method import MethodConfig
from lsr.models.adapter import adapter_for
from lsr.quant.gptq import HessianAccumulator, gptq_quantize
from lsr.quant.rtn import QuantSpec, dequantize
from lsr.transforms.linear import QLinear, set_quantizers

log = logging.getLogger(__name__)

SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def _run_block(layer: nn.Module, x: torch.Tensor, kwargs: dict, batch_size: int) -> torch.Tensor:
    outs = []
    for chunk in x.split(batch_size):
        out = layer(chunk, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs)


def _hessians(layer: nn.Module, names: tuple[str, ...], x: torch.Tensor, kwargs: dict, batch_size: int
              ) -> dict[str, torch.Tensor]:
    """Run the block on `x` and accumulate ``H = 2/n Σ xᵀx`` of ``prepare_input(x)`` for the named QLinears."""
    accumulators: dict[str, HessianAccumulator] = {}
    handles = []
    for name in names:
        linear = layer.get_submodule(name)
        if not isinstance(linear, QLinear):
            raise TypeError(f"{name} is {type(linear).__name__}, expected a QLinear (call to_qlinears first)")
        acc = accumulators[name] = HessianAccumulator(linear.in_features, device=linear.weight.device)
        handles.append(linear.register_forward_pre_hook(
            lambda mod, args, acc=acc: acc.add(mod.prepare_input(args[0]))
        ))
    try:
        _run_block(layer, x, kwargs, batch_size)
    finally:
        for handle in handles:
            handle.remove()
    return {name: acc.hessian for name, acc in accumulators.items()}


@torch.no_grad()
def gptq_weights(
    model: nn.Module, method: MethodConfig, windows: torch.Tensor, spec: QuantSpec, options: GPTQOptions,
    *, batch_size: int = 4,
) -> dict[str, QuantizedWeight]:
    """GPTQ-quantize every decoder linear of `model` (rotated, QLinears) in place, block by block.

    Returns ``{"model.layers.{i}.{self_attn|mlp}.{name}": QuantizedWeight}``; each weight is left equal to its
    dequantized value. Activation quantization follows ``method.act``; `spec` is the weight quantizer.
    """
    adapter = adapter_for(model)
    device = next(model.parameters()).device
    windows = windows.to(device)
    x = torch.cat([adapter.embeddings(model)(w) for w in windows.split(batch_size)]).float()
    positions = torch.arange(windows.shape[1], device=device)[None]
    kwargs = {"position_embeddings": adapter.rotary_embedding(model)(x[:1], positions), "attention_mask": None}
    groups = SEQUENTIAL_GROUPS if options.true_sequential else (tuple(n for g in SEQUENTIAL_GROUPS for n in g),)
    module_names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, QuantizedWeight] = {}
    for index, layer in enumerate(adapter.layers(model)):
        prefix = module_names[id(layer)] + "."
        set_quantizers(layer, method.act, None)
        try:
            for names in groups:
                hessians = _hessians(layer, names, x, kwargs, batch_size)
                for name in names:
                    linear = layer.get_submodule(name)
                    weight = linear.weight.detach().float()
                    q, scale, zero = gptq_quantize(
                        weight, hessians[name], spec, damp=options.damp, act_order=options.act_order,
                        block_size=options.block_size,
                    )
                    if zero is not None:
                        raise ValueError("asymmetric weights are not supported by the export")
                    linear.weight.copy_(dequantize(q, scale, zero, weight.shape).to(linear.weight.dtype))
                    out[prefix + name] = QuantizedWeight.from_codes(q, scale, weight.shape)
            x = _run_block(layer, x, kwargs, batch_size)
        finally:
            set_quantizers(layer, None, None)
        log.info("GPTQ: block %d done", index)
    return out
