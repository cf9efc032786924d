"""Exact model surgery: fold norms, rotate (R1/R2/R4 offline; R3 online in `QAttention`), smooth channels."""

from lsr.transforms.attention import QAttention, to_qattention
from lsr.transforms.fold import fold_norms, untie_embeddings
from lsr.transforms.linear import QLinear
from lsr.transforms.rotate import rotate_model

__all__ = ["QAttention", "QLinear", "fold_norms", "rotate_model", "to_qattention", "untie_embeddings"]
