"""Data layer: text sources, token windows and the data config."""

from lsr.data.config import DataConfig
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
    "DataConfig",
    "cached_token_ids",
    "calibration_windows",
    "eval_windows",
    "join_and_tokenize",
    "load_texts",
]
