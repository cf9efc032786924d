"""lsr: learned smooth-rotation W4A4 quantization for LLaMA-family models."""

from typing import TYPE_CHECKING

from lsr.hadamard import hadamard_matrix, hadamard_transform, random_hadamard_matrix
from lsr.learn.method import MethodConfig, preset
from lsr.learn.refined import apply_refined
from lsr.models import load_model, load_tokenizer
from lsr.quant import QuantSpec
from lsr.transforms import rotate_model

if TYPE_CHECKING:
    from lsr.export import export_model, load_quantized

__all__ = [
    "MethodConfig",
    "QuantSpec",
    "apply_refined",
    "export_model",
    "hadamard_matrix",
    "hadamard_transform",
    "load_model",
    "load_quantized",
    "load_tokenizer",
    "preset",
    "random_hadamard_matrix",
    "rotate_model",
]


def __getattr__(name: str):
    # lsr.export imports compressed-tensors (~2.5 s): load it on first use only.
    if name in ("export_model", "load_quantized"):
        import lsr.export

        return getattr(lsr.export, name)
    raise AttributeError(f"module 'lsr' has no attribute {name!r}")
