"""Apply a recipe (or a refined checkpoint of one) to a model: the steps become hooks of one block pipeline.

`apply_recipe` is the framework-free core of `lsr.quantize_`, `lsr fit` and `lsr export`: it leaves the model as
the fake-quantized W4A4 model (rotated, smoothed, every decoder linear holding its dequantized int codes, activation
quantizers on) and returns the codes the export writes. Learning is a hook supplied by `lsr.learn` (this module
never imports the trainer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lsr.checkpoint import Checkpoint, CheckpointWriter, load_checkpoint
from lsr.models.adapter import adapter_for
from lsr.pipeline.errors import LinearErrors
from lsr.pipeline.runner import Block, BlockHook, BlockPipeline, BlockRecord
from lsr.pipeline.smooth import FoldScales, SmoothInit
from lsr.pipeline.weights import QuantizeWeights, rtn_weight, set_quantized
from lsr.quant.weights import QuantizedWeight
from lsr.recipe import Recipe
from lsr.transforms.attention import to_qattention
from lsr.transforms.linear import set_quantizers
from lsr.transforms.prepare import to_qlinears
from lsr.transforms.rotate import rotate_model
from lsr.transforms.smooth import BlockGeometry, fold_scales


@dataclass
class QuantizedModel:
    """A recipe applied: the fake-quant W4A4 model, the int codes of its decoder linears, per-block records."""

    model: nn.Module
    recipe: Recipe
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)  # "model.layers.{i}.{path}" -> codes
    records: list[BlockRecord] = field(default_factory=list)
    source: dict = field(default_factory=dict)


def needs_calibration(recipe: Recipe) -> bool:
    return recipe.smooth is not None or recipe.learn is not None or recipe.weights.uses_gptq


def prepare_model(model: nn.Module, recipe: Recipe) -> nn.Module:
    """The exact float transforms of the recipe: rotations (``rotate``), then QLinears everywhere, and with a
    ``kv_cache`` step QAttentions holding R3 and the (inactive until `set_quantizers`) KV quantizer (in place)."""
    if recipe.rotate is not None:
        rotate_model(model, seed=recipe.rotate.seed, r4=recipe.rotate.r4)
        del model.config.lsr_rotation
    to_qlinears(model)
    if recipe.kv_cache is not None:
        _, _, head_dim = adapter_for(model).head_dims(model)
        to_qattention(model, r3=recipe.kv_cache.r3, kv_quant=recipe.kv_cache.spec(head_dim))
    return model


def recipe_hooks(recipe: Recipe, learner: BlockHook | None = None, *, linear_errors: bool = True) -> list[BlockHook]:
    """The recipe's steps as pipeline hooks, in order (`linear_errors`: also score every linear before learning and
    at the end, for reports; about a quarter of a block's time on CPU)."""
    if recipe.learn is not None and learner is None:
        raise ValueError(f"recipe {recipe.name!r} learns its scales: use lsr.quantize_ or `lsr fit` (lsr.learn)")
    hooks: list[BlockHook] = []
    if recipe.smooth is not None:
        hooks.append(SmoothInit(recipe.smooth, seed=recipe.seed))
    if recipe.learn is not None:
        hooks += [LinearErrors("init"), learner] if linear_errors else [learner]
    hooks += [FoldScales(), QuantizeWeights(recipe.weights)]
    return hooks + [LinearErrors("final")] if linear_errors else hooks


@torch.no_grad()
def restore_block(layer: nn.Module, geometry: Callable[[], BlockGeometry], linears: tuple[str, ...],
                  checkpoint: Checkpoint, index: int) -> dict[str, QuantizedWeight]:
    """Fold block `index`'s saved scales into `layer`, give its linears the saved codes (GPTQ, learned weight clips)
    or the RTN codes the recipe implies, and their learned activation clips; returns the codes. `geometry` is only
    built when the block has scales."""
    scales = {p: t.exp() for p, t in checkpoint.block_log_scales(index).items()}
    if scales:
        fold_scales(layer, scales, geometry())
    for name, clip in checkpoint.block_act_clips(index).items():
        layer.get_submodule(name).act_clip = clip.reshape(())
    codes = checkpoint.block_weights(index)
    if codes is None:
        spec = checkpoint.recipe.weights.effective_spec
        codes = {name: rtn_weight(layer.get_submodule(name), spec) for name in linears}
    for name, weight in codes.items():
        set_quantized(layer.get_submodule(name), weight)
    return codes


class ReplayBlock:
    """Resume: apply a finished block's saved scales and weights exactly as the first run left them."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint

    def on_block(self, block: Block) -> None:
        block.log_scales = self.checkpoint.block_log_scales(block.index)
        block.weights = restore_block(block.layer, lambda: block.geometry, block.mapping.linears, self.checkpoint,
                                      block.index)
        record = self.checkpoint.state["records"][block.index]
        block.record = BlockRecord(**{**record, "init": "replayed"})


def _collect(model: nn.Module, records_blocks: list[tuple[int, dict[str, QuantizedWeight]]]) -> dict:
    layers = adapter_for(model).mapping.layers
    return {f"{layers}.{i}.{name}": w for i, block in records_blocks for name, w in block.items()}


def apply_recipe(
    model: nn.Module, recipe: Recipe, windows: torch.Tensor | None = None, *, learner: BlockHook | None = None,
    device: str | torch.device = "cpu", batch_size: int = 4, writer: CheckpointWriter | None = None,
    resume: Checkpoint | None = None, log: Callable[[str], None] | None = print,
    on_block_end: Callable[[Block], None] | None = None, linear_errors: bool = True,
) -> QuantizedModel:
    """Apply `recipe` to `model` in place, block by block over calibration `windows` ``[n, seq_len]``.

    `learner`: the learning hook (`lsr.learn.LearnScales`) when the recipe learns. `writer`: save a refined
    checkpoint after every block; `resume`: a checkpoint of the same run whose finished blocks are replayed;
    `on_block_end`: called with each finished block (reports); `linear_errors`: per-linear errors in the records.
    Without `windows`, only a recipe that needs no calibration (rotations + RTN) can be applied.
    """
    model.eval()
    prepare_model(model, recipe)
    if windows is None:
        if needs_calibration(recipe):
            raise ValueError(f"recipe {recipe.name!r} needs calibration windows (smoothing, learning, GPTQ or GPTAQ)")
        weights = {}
        for name, linear in adapter_for(model).decoder_linears(model).items():
            weights[name] = rtn_weight(linear, recipe.weights.effective_spec)
            set_quantized(linear, weights[name])
        set_quantizers(model, recipe.activations, None)
        return QuantizedModel(model, recipe, weights)
    pipeline = BlockPipeline(model, windows, act=recipe.activations, weight=recipe.weights.spec, device=device,
                             batch_size=batch_size, keep_quantized_inputs=recipe.inputs == "quantized", log=log)
    blocks: list[tuple[int, dict[str, QuantizedWeight]]] = []

    def block_done(block: Block) -> None:
        blocks.append((block.index, block.weights))
        if writer is not None and not (resume is not None and block.index < resume.completed_blocks):
            writer.save_block(block.index, block.log_scales, block.weights, asdict(block.record), block.act_clips())
        if on_block_end is not None:
            on_block_end(block)

    records = pipeline.run(recipe_hooks(recipe, learner, linear_errors=linear_errors),
                           replay=[ReplayBlock(resume)] if resume is not None else (),
                           replay_blocks=resume.completed_blocks if resume is not None else 0,
                           on_block_end=block_done)
    return QuantizedModel(model, recipe, _collect(model, blocks), records)


@torch.no_grad()
def apply_checkpoint(model: nn.Module, checkpoint: str | Checkpoint) -> QuantizedModel:
    """Rebuild the fake-quant W4A4 model a finished refined checkpoint describes, from the original `model`."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    if ckpt.completed_blocks != len(layers) or not ckpt.complete:
        raise ValueError(f"{ckpt.directory} holds {ckpt.completed_blocks} of {len(layers)} blocks: the run did not "
                         "finish (resume it with the same `lsr fit` command)")
    model.eval()
    prepare_model(model, ckpt.recipe)
    heads = adapter.head_dims(model)
    blocks = []
    for index, layer in enumerate(layers):
        geometry = lambda layer=layer: BlockGeometry.of(layer, adapter.mapping, *heads)  # noqa: E731
        blocks.append((index, restore_block(layer, geometry, adapter.mapping.linears, ckpt, index)))
    set_quantizers(model, ckpt.recipe.activations, None)
    records = [BlockRecord(**r) for r in ckpt.state["records"]]
    return QuantizedModel(model, ckpt.recipe, _collect(model, blocks), records,
                          source={"model": ckpt.model, "refined": str(ckpt.directory)})
