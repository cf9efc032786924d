"""Data layer: text sources, token windows and the Lightning data module."""

from lsr.data.module import LsrDataModule
from lsr.data.sources import load_texts
from lsr.data.windows import (
    DATA_VERSION,
    cached_token_ids,
    calibration_windows,
    eval_windows,
    join_and_tokenize,
)

__all__ = [
    "DATA_VERSION",
    "LsrDataModule",
    "cached_token_ids",
    "calibration_windows",
    "eval_windows",
    "join_and_tokenize",
    "load_texts",
]
