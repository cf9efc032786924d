"""Shared fixtures: tiny random LLaMA-family models built in-process (no hub, no files)."""

from __future__ import annotations

import os

# Triton kernels run under the interpreter on machines without a GPU; this must be set before anything
# (transformers included) imports triton.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

TINY = dict(
    vocab_size=96,
    hidden_size=48,  # 12·4: exercises a non-power-of-two Hadamard
    intermediate_size=80,  # 20·4
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)


def tiny_model(kind: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of `kind` in float32, eval mode, with non-trivial norm weights."""
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(**TINY, tie_word_embeddings=False)
    elif kind == "llama-tied":
        config = LlamaConfig(**TINY, tie_word_embeddings=True)
    elif kind == "mistral":
        config = MistralConfig(**TINY, sliding_window=None, tie_word_embeddings=False)
    elif kind == "qwen2":
        config = Qwen2Config(**TINY, tie_word_embeddings=False)
    else:
        raise ValueError(kind)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.5 * torch.rand_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model


TINY_KINDS = ("llama", "llama-tied", "mistral", "qwen2")


@pytest.fixture(params=TINY_KINDS)
def tiny(request) -> torch.nn.Module:
    return tiny_model(request.param)


@pytest.fixture
def tiny_ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))


def tiny_tokenizer():
    """A WordLevel tokenizer over TINY's vocabulary: ``[UNK]`` and the words ``w1 .. w95``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, TINY["vocab_size"])}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


def save_tiny(directory, kind: str = "llama", words: int = 4000) -> tuple:
    """Save tiny_model(kind) and `tiny_tokenizer` as an HF directory ``directory/tiny`` and a text file of `words`
    seeded random words ``directory/text.txt`` in paragraphs; returns (model dir, text file)."""
    from pathlib import Path

    directory = Path(directory)
    model_dir = directory / "tiny"
    tiny_model(kind).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, TINY["vocab_size"], (words,), generator=gen).tolist()
    paragraphs = [" ".join(f"w{i}" for i in ids[k : k + 50]) for k in range(0, words, 50)]
    text = directory / "text.txt"
    text.write_text("\n\n".join(paragraphs) + "\n")
    return model_dir, text
