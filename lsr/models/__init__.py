"""Model loading (hub id, local directory, embedded SmolLM2) and the architecture mappings."""

from lsr.models.adapter import (
    MAPPINGS,
    SMOOTHING_POINTS,
    SUPPORTED_MODEL_TYPES,
    ArchitectureMapping,
    SmoothingPoint,
    adapter_for,
)
from lsr.models.loading import EMBEDDED_MODELS, load_model, load_tokenizer

__all__ = [
    "EMBEDDED_MODELS",
    "MAPPINGS",
    "SMOOTHING_POINTS",
    "SUPPORTED_MODEL_TYPES",
    "ArchitectureMapping",
    "SmoothingPoint",
    "adapter_for",
    "load_model",
    "load_tokenizer",
]
