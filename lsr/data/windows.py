"""Token streams and fixed-length windows (QuaRot / GPTQ protocol), with a disk cache of the stream.

Documents are joined with ``"\\n\\n"`` and tokenized once without special tokens. Evaluation uses
non-overlapping windows of the stream (tail dropped); calibration uses seeded random windows.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lsr.data.sources import CHAT_SOURCE, embedded_wiki_conversations, load_texts, source_fingerprint

DATA_VERSION = 1  # bump whenever tokenization or splitting changes, to invalidate caches


def join_and_tokenize(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Join ``texts`` with ``"\\n\\n"`` and tokenize once, no special tokens: a 1-D LongTensor of ids."""
    if not texts:
        raise ValueError("no texts to tokenize")
    text = "\n\n".join(texts)
    # verbose=False silences the "longer than model_max_length" warning; nothing is truncated.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _check_stream(ids: torch.Tensor, seq_len: int) -> None:
    if ids.dim() != 1:
        raise ValueError(f"token stream must be 1-D, got shape {tuple(ids.shape)}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if ids.numel() < seq_len:
        raise ValueError(f"token stream has {ids.numel()} tokens, shorter than one window of {seq_len}")


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` windows of ``ids`` (tail dropped), at most ``max_windows``."""
    _check_stream(ids, seq_len)
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].reshape(n, seq_len).clone()


def calibration_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens starting at uniformly random offsets (seeded generator)."""
    _check_stream(ids, seq_len)
    if n < 1:
        raise ValueError(f"number of calibration windows must be >= 1, got {n}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n,), generator=gen)
    return ids[starts[:, None] + torch.arange(seq_len)]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Name, vocab size and a hash of the full tokenizer definition (vocab, merges, added tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha1(definition.encode("utf-8")).hexdigest()
    return f"{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}|{type(tokenizer).__name__}|{digest}"


def default_cache_dir() -> Path:
    """``$LSR_CACHE/tokens``, default ``~/.cache/lsr/tokens``."""
    return Path(os.environ.get("LSR_CACHE", Path.home() / ".cache" / "lsr")).expanduser() / "tokens"


def source_documents(tokenizer: Any, source: str, split: str) -> list[str]:
    """The documents of ``split`` of ``source`` as text; a chat source rendered with the tokenizer's chat template."""
    if source != CHAT_SOURCE:
        return load_texts(source, split)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"data source {source!r} needs a tokenizer with a chat template; "
                         f"{getattr(tokenizer, 'name_or_path', 'this tokenizer')} has none (use 'embedded-wiki')")
    return [tokenizer.apply_chat_template(c, tokenize=False) for c in embedded_wiki_conversations(split)]


def cached_token_ids(
    tokenizer: Any, source: str, split: str, cache_dir: str | os.PathLike | None = None
) -> torch.Tensor:
    """Token stream of ``split`` of ``source``, cached on disk.

    The key hashes (tokenizer fingerprint, source fingerprint, split, ``DATA_VERSION``). The stream is
    cached rather than windows: cutting windows for any ``seq_len`` is cheap, so one cache entry serves
    every sequence length. Writes are atomic (temp file + ``os.replace``); an unreadable or mismatching
    cache file is ignored and rebuilt.
    """
    meta = {
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "source": source_fingerprint(source),
        "split": split,
        "version": str(DATA_VERSION),
    }
    key = hashlib.sha1(json.dumps(meta, sort_keys=True).encode("utf-8")).hexdigest()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / f"{split}-{key[:20]}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                ids = f.get_tensor("ids") if f.metadata() == meta else None
            if ids is not None and ids.dim() == 1 and ids.numel() > 0:
                return ids.long()
        except Exception:  # corrupt or foreign file: rebuild below
            pass
    ids = join_and_tokenize(tokenizer, source_documents(tokenizer, source, split))
    try:
        _atomic_save(ids, meta, path)
    except OSError as e:
        warnings.warn(f"could not write token cache {path}: {e}", stacklevel=2)
    return ids


def _atomic_save(ids: torch.Tensor, meta: dict[str, str], path: Path) -> None:
    """Write ``ids`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = torch.int32 if int(ids.max()) < 2**31 else torch.int64
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is shareable
        save_file({"ids": ids.to(dtype).contiguous()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
