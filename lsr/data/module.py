"""Lightning data module: calibration windows (train split) and evaluation windows (eval split)."""

from __future__ import annotations

import os

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lsr.data.windows import cached_token_ids, calibration_windows, eval_windows


class LsrDataModule(L.LightningDataModule):
    """Token windows for calibration and perplexity evaluation.

    Batches are LongTensor ``[batch_size, seq_len]`` input ids. ``train_dataloader`` yields the
    ``num_calibration`` seeded random windows of the train split; ``val_dataloader`` and
    ``test_dataloader`` yield the non-overlapping windows of the eval split.

    Args:
        tokenizer: model name/path resolved by ``lsr.models.load_tokenizer``, or a built HF tokenizer.
        source: text source, see ``lsr.data.sources`` (``embedded-wiki``, ``wikitext2``, a path, ...).
        seq_len: tokens per window (> 1).
        num_calibration: number of calibration windows (> 0).
        max_eval_windows: cap on evaluation windows; ``None`` uses all of them.
        seed: seed of the calibration window offsets.
        batch_size: windows per batch (> 0).
        cache_dir: token-stream cache directory; ``None`` uses ``$LSR_CACHE/tokens``
            (default ``~/.cache/lsr/tokens``).
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase = "smollm2",
        source: str = "embedded-wiki",
        seq_len: int = 2048,
        num_calibration: int = 128,
        max_eval_windows: int | None = None,
        seed: int = 0,
        batch_size: int = 1,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (("seq_len", seq_len, 2), ("num_calibration", num_calibration, 1),
                                 ("batch_size", batch_size, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if max_eval_windows is not None and (not isinstance(max_eval_windows, int) or max_eval_windows < 1):
            raise ValueError(f"max_eval_windows must be None or an int >= 1, got {max_eval_windows!r}")
        self._tokenizer_arg = tokenizer
        self._tokenizer: PreTrainedTokenizerBase | None = None if isinstance(tokenizer, str) else tokenizer
        self.source = source
        self.seq_len = seq_len
        self.num_calibration = num_calibration
        self.max_eval_windows = max_eval_windows
        self.seed = seed
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self._calib: torch.Tensor | None = None
        self._eval: torch.Tensor | None = None
        name = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "name_or_path", "")
        self.save_hyperparameters({
            "tokenizer": name, "source": source, "seq_len": seq_len, "num_calibration": num_calibration,
            "max_eval_windows": max_eval_windows, "seed": seed, "batch_size": batch_size,
        })

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, loaded on first use through ``lsr.models.load_tokenizer``."""
        if self._tokenizer is None:
            from lsr.models import load_tokenizer

            self._tokenizer = load_tokenizer(self._tokenizer_arg)
        return self._tokenizer

    def _stream(self, split: str) -> torch.Tensor:
        cache = os.path.expanduser(self.cache_dir) if self.cache_dir else None
        return cached_token_ids(self.tokenizer, self.source, split, cache)

    def calibration_windows(self) -> torch.Tensor:
        """``[num_calibration, seq_len]`` random windows of the train split (seeded)."""
        if self._calib is None:
            ids = self._stream("train")
            self._calib = calibration_windows(ids, self.num_calibration, self.seq_len, self.seed)
        return self._calib

    def eval_windows(self) -> torch.Tensor:
        """``[n, seq_len]`` non-overlapping windows of the eval split (at most ``max_eval_windows``)."""
        if self._eval is None:
            self._eval = eval_windows(self._stream("eval"), self.seq_len, self.max_eval_windows)
        return self._eval

    def setup(self, stage: str | None = None) -> None:
        """Build the windows the stage needs: calibration for ``fit``, evaluation for every stage."""
        if stage in (None, "fit"):
            self.calibration_windows()
        self.eval_windows()

    def _loader(self, windows: torch.Tensor) -> DataLoader:
        return DataLoader(windows, batch_size=self.batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.calibration_windows())

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_windows())

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_windows())
