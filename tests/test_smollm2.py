"""Slow end-to-end checks on the real embedded SmolLM2-135M (FP32, dequantized GGUF) and Wikipedia text."""

from __future__ import annotations

import pytest
import torch

from lsr.data.sources import load_texts
from lsr.data.windows import eval_windows, join_and_tokenize
from lsr.metrics import Perplexity
from lsr.models import load_model
from lsr.transforms import rotate_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model("smollm2")
    return model, tokenizer


@pytest.fixture(scope="module")
def windows(smollm2):
    _, tokenizer = smollm2
    ids = join_and_tokenize(tokenizer, load_texts("embedded-wiki", "eval")[:60])
    return eval_windows(ids, 256, max_windows=2)


@torch.no_grad()
def test_smollm2_rotation_is_exact(smollm2, windows):
    model, _ = smollm2
    assert model.config.hidden_size == 576 and model.config.tie_word_embeddings
    ref = model(windows).logits
    ppl_ref = Perplexity()
    ppl_ref.update(ref, windows)
    rotated, _ = load_model("smollm2")
    rotate_model(rotated, seed=0)
    out = rotated(windows).logits
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-3
    ppl_rot = Perplexity()
    ppl_rot.update(out, windows)
    assert abs(ppl_rot.compute().item() / ppl_ref.compute().item() - 1) < 1e-3
    assert 5 < ppl_ref.compute().item() < 60  # a real language model on real prose
