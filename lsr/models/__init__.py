"""Model loading (hub id, local directory, embedded SmolLM2) and the architecture adapter."""

from lsr.models.adapter import SUPPORTED_MODEL_TYPES, BlockLinears, adapter_for
from lsr.models.loading import EMBEDDED_MODELS, load_model, load_tokenizer

__all__ = [
    "EMBEDDED_MODELS",
    "SUPPORTED_MODEL_TYPES",
    "BlockLinears",
    "adapter_for",
    "load_model",
    "load_tokenizer",
]
