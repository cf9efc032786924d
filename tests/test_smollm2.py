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


@torch.no_grad()
def test_smollm2_r3_is_exact_and_helps_a_4bit_kv_cache(smollm2, windows):
    """R3 leaves SmolLM2's logits unchanged; with per-head 4-bit keys and values (float weights and activations) it
    keeps perplexity closer to FP than the same KV4 without R3."""
    from lsr.recipe import KVCacheStep
    from lsr.transforms import to_qattention

    model, _ = smollm2
    ref = model(windows).logits
    rotated, _ = load_model("smollm2")
    rotate_model(rotated, seed=0)
    to_qattention(rotated, r3=True, kv_quant=None)
    out = rotated(windows).logits
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-3
    ppl = {}
    for name, logits in (("fp", ref), ("r3", out)):
        metric = Perplexity()
        metric.update(logits, windows)
        ppl[name] = metric.compute().item()
    spec = KVCacheStep(bits=4).spec(64)
    for r3 in (True, False):
        to_qattention(rotated, r3=r3, kv_quant=spec, active=True)
        metric = Perplexity()
        metric.update(rotated(windows).logits, windows)
        ppl[f"kv4 r3={r3}"] = metric.compute().item()
    print(ppl)
    assert abs(ppl["r3"] / ppl["fp"] - 1) < 1e-3
    assert ppl["fp"] < ppl["kv4 r3=True"] < ppl["kv4 r3=False"]
