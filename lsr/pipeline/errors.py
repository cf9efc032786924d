"""Per-linear relative output error of a block: ``‖xWᵀ − Q_a(x)Q_w(W)ᵀ‖² / ‖xWᵀ‖²`` per token, on FP inputs."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lsr.metrics import LayerError
from lsr.pipeline.runner import Block
from lsr.quant.rtn import fake_quantize
from lsr.transforms.linear import QLinear


@torch.no_grad()
def linear_errors(block: Block, params: dict[str, torch.Tensor] | None, quantized: dict[str, torch.Tensor]
                  ) -> dict[str, float]:
    """Per linear (short name), the mean relative error of its quantized product on the block's FP inputs.

    `params`: the block's float parameters to run with (None: its own); `quantized`: ``{"{path}.weight": Q_w(W)}``.
    """
    errors: dict[str, LayerError] = {}
    hooks = {}
    for name, module in block.layer.named_modules():
        if isinstance(module, QLinear):
            errors[name] = LayerError()

            def hook(mod, args, output, name=name):
                x = mod.rotate_input(args[0])
                approx = F.linear(fake_quantize(x, block.act, mod.act_clip), quantized[f"{name}.weight"])
                errors[name].update(F.linear(x, mod.weight), approx)

            hooks[name] = module.register_forward_hook(hook)
    try:
        for b in block.batches():
            block.forward(block.x_fp[b].to(block.device), params, quantized=False)
    finally:
        for handle in hooks.values():
            handle.remove()
    return {name.rpartition(".")[2]: metric.compute().item() for name, metric in errors.items()}


class LinearErrors:
    """Record per-linear errors at one stage: ``init`` (smoothing init, RTN weights) or ``final`` (final weights)."""

    def __init__(self, stage: Literal["init", "final"]) -> None:
        self.stage = stage

    def on_block(self, block: Block) -> None:
        if self.stage == "init":
            params = block.params()
            block.record.linear_error_init = linear_errors(block, params, block.quantized_params(params))
            return
        final = {n: p for n, p in block.layer.named_parameters()}  # the dequantized codes
        block.record.linear_error_final = linear_errors(block, block.float_params, final)
