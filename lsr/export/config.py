"""What an INT4 export does: the weight quantizer (RTN or GPTQ and its options), embeddings, calibration data."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

WeightQuantizerName = Literal["rtn", "gptq"]
STORAGE_DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ settings (see `lsr.quant.gptq.gptq_quantize`).

    Args:
        damp: relative diagonal damping of the Hessian (× mean diag H).
        act_order: quantize columns by descending Hessian diagonal.
        block_size: lazy-batch width.
        group_size: quantize in groups of this many input channels (``None``: one scale per output channel).
            Groups work for fake quantization (comparisons); the INT4 export and its runtime use one scale per output
            channel and refuse groups.
        true_sequential: within a block, quantize q/k/v, then o, then gate/up, then down, re-running the block in
            between so each linear's Hessian comes from the inputs it sees once the linears before it are quantized.
    """

    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    group_size: int | None = None
    true_sequential: bool = True

    def __post_init__(self) -> None:
        if not self.damp > 0:
            raise ValueError(f"gptq damp must be positive, got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"gptq block_size must be positive, got {self.block_size}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"gptq group_size must be None or positive, got {self.group_size}")


@dataclass(frozen=True)
class CalibrationData:
    """Calibration windows for GPTQ (and for presets that calibrate smoothing scales without learning)."""

    source: str = "embedded-wiki"
    seq_len: int = 512
    num_calibration: int = 16
    seed: int = 0
    batch_size: int = 4


@dataclass(frozen=True)
class ExportConfig:
    """Options of `lsr.export.export_model`.

    Args:
        weight_quantizer: ``rtn`` (round to nearest, the fake-quant model's own quantizer) or ``gptq``.
        gptq: GPTQ options.
        embeddings_8bit: store the embedding (per row) and lm_head (per output channel) as int8 weight-only instead of
            16-bit.
        storage_dtype: dtype of the tensors kept in 16 bit (embedding, lm_head); norms and biases stay float32.
        method: preset applied when the source is a plain model (``quarot``: rotations only; ``smoothrot`` /
            ``quantile``: smoothing scales calibrated without learning). A refined checkpoint brings its own method.
        data: calibration data (GPTQ, calibrated presets).
        overwrite: replace an existing output directory.
    """

    weight_quantizer: WeightQuantizerName = "rtn"
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    embeddings_8bit: bool = False
    storage_dtype: str = "float16"
    method: str = "quarot"
    data: CalibrationData = field(default_factory=CalibrationData)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.weight_quantizer not in ("rtn", "gptq"):
            raise ValueError(f"weight_quantizer must be 'rtn' or 'gptq', got {self.weight_quantizer!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {self.storage_dtype!r}")
        if isinstance(self.gptq, dict):
            object.__setattr__(self, "gptq", GPTQOptions(**self.gptq))
        if isinstance(self.data, dict):
            object.__setattr__(self, "data", CalibrationData(**self.data))

    def with_overrides(self, **overrides) -> ExportConfig:
        return replace(self, **overrides)
