"""Real INT4 export: fold rotations and learned scales, quantize weights (RTN or GPTQ), write a compressed-tensors
directory, and load it back as a model that runs W4A4 with integer products.

    export_model("runs/smollm2-lsr", "exports/smollm2-w4a4")          # refined checkpoint (lsr fit output)
    export_model("smollm2", "exports/quarot", method="quarot", weight_quantizer="gptq")
    model = load_quantized("exports/smollm2-w4a4", backend="reference")
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lsr.export.config import CalibrationData, ExportConfig, GPTQOptions
from lsr.export.loader import load_quantized
from lsr.export.prepare import (
    PreparedModel,
    QuantizedWeight,
    calibration_windows,
    fake_quant_twin,
    load_source,
    quantize_weights,
)
from lsr.export.quantized_linear import Int8Embedding, Int8WeightLinear, QuantizedLinear, set_backend
from lsr.export.writer import ExportResult, write_export


def prepare_export(
    source: str | nn.Module, config: ExportConfig | None = None, *, refined: str | Path | None = None,
    tokenizer=None, calibration: torch.Tensor | None = None, for_export: bool = True, **overrides,
) -> PreparedModel:
    """Load `source`, apply rotations + smoothing scales, quantize the decoder weights (RTN or GPTQ).

    The result's ``weights`` are what `write_export` stores; `fake_quant_twin(result)` is the matching fake-quantized
    model (for comparisons, pass ``for_export=False`` to also allow group-wise GPTQ/RTN weights).
    """
    config = (config or ExportConfig()).with_overrides(**overrides)
    prepared = load_source(source, config, refined=refined, tokenizer=tokenizer, calibration=calibration)
    quantize_weights(prepared, config, calibration=calibration, for_export=for_export)
    return prepared


def export_model(
    source: str | nn.Module, out_dir: str | Path, config: ExportConfig | None = None, *,
    refined: str | Path | None = None, tokenizer=None, calibration: torch.Tensor | None = None, **overrides,
) -> ExportResult:
    """Export `source` as a real INT4 (W4A4) compressed-tensors directory at `out_dir`.

    `source`: a refined checkpoint directory (``lsr fit`` output), a model name/directory (with ``method=`` preset,
    default quarot), or an original in-memory model (optionally with ``refined=`` a checkpoint of it and
    ``tokenizer=``). Keyword `overrides` set `ExportConfig` fields (``weight_quantizer="gptq"``,
    ``embeddings_8bit=True``, ``overwrite=True``, ...). `calibration`: explicit ``[n, seq_len]`` token windows for
    GPTQ instead of ``config.data``. Never overwrites an existing directory unless ``overwrite=True``.
    """
    config = (config or ExportConfig()).with_overrides(**overrides)
    target = Path(out_dir).expanduser()
    if target.exists() and not config.overwrite:  # fail before any expensive work
        raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
    prepared = prepare_export(source, config, refined=refined, tokenizer=tokenizer, calibration=calibration)
    return write_export(prepared, target, config)


__all__ = [
    "CalibrationData",
    "ExportConfig",
    "ExportResult",
    "GPTQOptions",
    "Int8Embedding",
    "Int8WeightLinear",
    "PreparedModel",
    "QuantizedLinear",
    "QuantizedWeight",
    "calibration_windows",
    "export_model",
    "fake_quant_twin",
    "load_quantized",
    "load_source",
    "prepare_export",
    "quantize_weights",
    "set_backend",
    "write_export",
]
