"""From a source (refined checkpoint, model name or in-memory model) to the quantized model the export writes.

A refined checkpoint is rebuilt from its saved recipe (`lsr.pipeline.apply_checkpoint`); a plain model gets a
recipe that needs no learning (default: the ``quarot`` preset), applied through the block pipeline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lsr.checkpoint import is_checkpoint, load_checkpoint
from lsr.data.config import DataConfig
from lsr.export import format as fmt
from lsr.export.config import ExportConfig
from lsr.models.adapter import adapter_for
from lsr.models.loading import load_model
from lsr.pipeline.apply import QuantizedModel, apply_checkpoint, apply_recipe, needs_calibration
from lsr.quant.rtn import QuantSpec, quantize
from lsr.recipe import Recipe
from lsr.transforms.linear import QLinear

# Calibration windows for recipes that calibrate (smoothing, GPTQ) when a plain model is exported.
EXPORT_CALIBRATION = DataConfig(seq_len=512, num_calibration=16)


def check_exportable(recipe: Recipe, scheme: str = "w4a4") -> None:
    """The INT4 runtime holds symmetric int4 weights with one scale per output channel and, for ``scheme`` w4a4,
    symmetric int4 per-token activations with ``scale = max|x|·clip/7`` for a fixed clip in (0, 1]: anything else is
    refused (never silently dropped), activation ``clip_search`` included. w4a8 / w4a16 replace the recipe's
    activation quantizer (int8 absmax per token / none), so only the weights are checked for them."""
    w, a = recipe.weights.effective_spec, recipe.activations
    if w.bits != 4 or not w.symmetric or w.granularity not in ("channel", "token"):
        raise ValueError(f"the INT4 export stores symmetric 4-bit weights with one scale per output channel; recipe "
                         f"{recipe.name!r} quantizes weights with {w} (fake quantization only)")
    if scheme == "w4a4":
        fmt.activation_clip(a, recipe.name)


def prepare_export(
    source: str | Path | nn.Module, recipe: Recipe | str | None = None, *, data: DataConfig | None = None,
    calibration: torch.Tensor | None = None, tokenizer=None, batch_size: int = 4, check: bool = True,
    scheme: str = "w4a4",
) -> tuple[QuantizedModel, object]:
    """Load `source` and apply its recipe; returns the quantized model and the tokenizer.

    `source`: a refined checkpoint directory (``lsr fit`` output; brings its own recipe), a model name / directory,
    or an original in-memory model (with `tokenizer`). `recipe`: for a plain model (default ``quarot``); it may not
    learn. `calibration` windows, or `data`'s, feed recipes that calibrate (smoothing, GPTQ). `check`: refuse what
    the INT4 export cannot store with ``scheme`` (turn off for fake-quant comparisons).
    """
    if isinstance(source, (str, Path)) and is_checkpoint(source):
        if recipe is not None:
            raise ValueError(f"{source} is a refined checkpoint with its own recipe: do not pass another recipe")
        ckpt = load_checkpoint(source)
        if check:
            check_exportable(ckpt.recipe, scheme)
        model, tokenizer = load_model(ckpt.model)
        return apply_checkpoint(model, ckpt), tokenizer
    recipe = Recipe.from_name(recipe or "quarot") if not isinstance(recipe, Recipe) else recipe
    if check:
        check_exportable(recipe, scheme)
    if recipe.learn is not None:
        raise ValueError(f"recipe {recipe.name!r} learns its scales: run `lsr fit` and export the refined checkpoint "
                         "(or use a recipe without learning: quarot, smoothrot, quantile and their -gptq / -gptaq "
                         "variants)")
    info = {"model": str(source)} if isinstance(source, (str, Path)) else {}
    if isinstance(source, (str, Path)):
        model, tokenizer = load_model(str(source))
    else:
        model = source
        info["model"] = getattr(model.config, "_name_or_path", "") or type(model).__name__
    windows = calibration
    if windows is None and needs_calibration(recipe):
        if tokenizer is None:
            raise ValueError(f"recipe {recipe.name!r} calibrates: pass calibration windows or a tokenizer")
        windows = (data or EXPORT_CALIBRATION).calibration_windows(tokenizer)
    result = apply_recipe(model, recipe, windows, batch_size=batch_size)
    result.source = info
    return result, tokenizer


INT8_TOKENS = QuantSpec(bits=8, granularity="token")


def set_activation_scheme(model: nn.Module, scheme: str) -> nn.Module:
    """Give the decoder linears the activation quantizer of the export ``scheme`` in place: the recipe's own for
    ``w4a4`` (unchanged), int8 absmax per token without clip for ``w4a8``, none for ``w4a16``."""
    if scheme == "w4a4":
        return model
    for linear in adapter_for(model).decoder_linears(model).values():
        if not isinstance(linear, QLinear):
            raise TypeError(f"{type(linear).__name__} is not a QLinear: apply a recipe first")
        linear.act_quant = INT8_TOKENS if scheme == "w4a8" else None
        linear.act_clip = None
    return model


@torch.no_grad()
def round_like_export(model: nn.Module, config: ExportConfig) -> nn.Module:
    """Give the embedding and lm_head the values the export stores (``storage_dtype`` rounding, or int8 per row with
    ``embeddings_8bit``) and the decoder linears the activation quantizer of ``config.scheme``
    (`set_activation_scheme`), in place, so the fake-quant model computes what the INT4 directory holds, in float."""
    set_activation_scheme(model, config.scheme)
    adapter = adapter_for(model)
    for module in (adapter.embeddings(model), adapter.lm_head(model)):
        w = module.weight
        if config.embeddings_8bit:
            q, scale, _ = quantize(w.float(), QuantSpec(bits=8, granularity="channel"))
            w.copy_(q * scale)
        else:
            w.copy_(w.to(getattr(torch, config.storage_dtype)).to(w.dtype))
    return model
