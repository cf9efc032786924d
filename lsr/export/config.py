"""How an INT4 export stores what the recipe produced."""

from __future__ import annotations

from dataclasses import dataclass, replace

STORAGE_DTYPES = ("float16", "bfloat16")
# w4a4: int4 per-token activations (lsr's runtime, vLLM's WNA4Int); w4a16: weights only (vLLM's WNA16, Machete/Marlin);
# w4a8: int8 per-token activations (vLLM's WNA8Int). The int4 weights and the rotations are the same in all three.
SCHEMES = ("w4a4", "w4a16", "w4a8")


@dataclass(frozen=True)
class ExportConfig:
    """Options of `lsr.export.export_model` (the weights themselves come from the recipe).

    Args:
        scheme: what the decoder linears' inputs are quantized to at run time, one of ``SCHEMES`` (the int4 weights,
            the fused rotations and the online R4 Hadamard are the same for all).
        embeddings_8bit: store the embedding (per row) and lm_head (per output channel) as int8 weight-only instead of
            16-bit.
        storage_dtype: dtype of the tensors kept in 16 bit (embedding, lm_head); norms and biases stay float32.
        overwrite: replace an existing output directory (only once the new one is complete).
    """

    scheme: str = "w4a4"
    embeddings_8bit: bool = False
    storage_dtype: str = "float16"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"export.scheme={self.scheme!r} is invalid: expected one of {', '.join(SCHEMES)}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"export.storage_dtype={self.storage_dtype!r} is invalid: expected one of "
                             f"{', '.join(STORAGE_DTYPES)}")

    def with_overrides(self, **overrides) -> ExportConfig:
        return replace(self, **overrides)
