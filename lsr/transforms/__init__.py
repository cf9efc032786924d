"""Exact, offline model surgery: fold norms, rotate (R1/R2/R4), smooth channels."""

from lsr.transforms.fold import fold_norms, untie_embeddings
from lsr.transforms.linear import QLinear
from lsr.transforms.rotate import rotate_model

__all__ = ["QLinear", "fold_norms", "rotate_model", "untie_embeddings"]
