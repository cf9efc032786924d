"""lsr: learned smooth-rotation W4A4 quantization for LLaMA-family models.

    import lsr
    model, tokenizer = lsr.load_model("smollm2")
    windows = lsr.DataConfig(seq_len=512, num_calibration=8).calibration_windows(tokenizer)
    result = lsr.quantize_(model, lsr.Recipe.from_name("lsr", learn={"epochs": 2}), windows)
    lsr.export.export_model(...)  # or `lsr fit` / `lsr export` from the command line
"""

from lsr.data.config import DataConfig
from lsr.hadamard import hadamard_matrix, hadamard_transform, random_hadamard_matrix
from lsr.models import load_model, load_tokenizer
from lsr.quant import QuantSpec
from lsr.recipe import PRESETS, Recipe
from lsr.transforms import rotate_model

__all__ = [
    "PRESETS",
    "DataConfig",
    "QuantSpec",
    "Recipe",
    "apply_checkpoint",
    "export_model",
    "hadamard_matrix",
    "hadamard_transform",
    "load_model",
    "load_quantized",
    "load_tokenizer",
    "quantize_",
    "random_hadamard_matrix",
    "rotate_model",
]

_LAZY = {  # heavy imports on first use: Lightning (quantize_), compressed-tensors (export)
    "quantize_": "lsr.learn.fit",
    "apply_checkpoint": "lsr.pipeline.apply",
    "export_model": "lsr.export",
    "load_quantized": "lsr.export",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lsr' has no attribute {name!r}")
