"""lsr: learned smooth-rotation W4A4 quantization for LLaMA-family models."""

from lsr.hadamard import hadamard_matrix, hadamard_transform, random_hadamard_matrix
from lsr.learn.method import MethodConfig, preset
from lsr.learn.refined import apply_refined
from lsr.models import load_model, load_tokenizer
from lsr.quant import QuantSpec
from lsr.transforms import rotate_model

__all__ = [
    "MethodConfig",
    "QuantSpec",
    "apply_refined",
    "hadamard_matrix",
    "hadamard_transform",
    "load_model",
    "load_tokenizer",
    "preset",
    "random_hadamard_matrix",
    "rotate_model",
]
