"""Real INT4 export: a recipe's quantized model written as a compressed-tensors directory, and loaded back as a model
that runs W4A4 with integer products.

    export_model("runs/smollm2-lsr", "exports/smollm2-w4a4")             # refined checkpoint (lsr fit output)
    export_model("smollm2", "exports/quarot-gptq", recipe="quarot-gptq")  # a plain model and a recipe without learning
    model = load_quantized("exports/smollm2-w4a4", backend="reference")

Depends on the recipe, the block pipeline and the refined-checkpoint format; never on the trainer or Lightning.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lsr.data.config import DataConfig
from lsr.export.config import ExportConfig
from lsr.export.loader import load_quantized
from lsr.export.prepare import check_exportable, prepare_export, round_like_export, set_activation_scheme
from lsr.export.quantized_linear import Int8Embedding, Int8WeightLinear, QuantizedLinear, set_backend
from lsr.export.writer import ExportResult, write_export
from lsr.recipe import Recipe


def export_model(
    source: str | Path | nn.Module, out_dir: str | Path, config: ExportConfig | None = None, *,
    recipe: Recipe | str | None = None, data: DataConfig | None = None, calibration: torch.Tensor | None = None,
    tokenizer=None, batch_size: int = 4, **overrides,
) -> ExportResult:
    """Export `source` (see `prepare_export`) as a real INT4 compressed-tensors directory at `out_dir` (W4A4, or the
    W4A16 / W4A8 variant of the same weights with ``scheme=``).

    Keyword `overrides` set `ExportConfig` fields (``scheme="w4a16"``, ``embeddings_8bit=True``, ``overwrite=True``,
    ...). Never
    overwrites an existing directory unless ``overwrite=True``, and never leaves a half-written one.
    """
    config = (config or ExportConfig()).with_overrides(**overrides)
    target = Path(out_dir).expanduser()
    if target.exists() and not config.overwrite:  # fail before any expensive work
        raise FileExistsError(f"{target} exists; pass overwrite=True (--export.overwrite true) to replace it")
    prepared, tokenizer = prepare_export(source, recipe, data=data, calibration=calibration, tokenizer=tokenizer,
                                         batch_size=batch_size, scheme=config.scheme)
    return write_export(prepared, target, config, tokenizer)


__all__ = [
    "ExportConfig",
    "ExportResult",
    "Int8Embedding",
    "Int8WeightLinear",
    "QuantizedLinear",
    "check_exportable",
    "export_model",
    "load_quantized",
    "prepare_export",
    "round_like_export",
    "set_activation_scheme",
    "set_backend",
    "write_export",
]
