"""Rotations are exact: the rotated float model computes the same logits as the original."""

from __future__ import annotations

import pytest
import torch

from lsr.models import adapter_for
from lsr.recipe import Recipe
from lsr.transforms import QLinear, fold_norms, rotate_model
from lsr.transforms.rotate import r4_block
from tests.conftest import tiny_model


def _rel_logit_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


@torch.no_grad()
def test_fold_norms_is_exact(tiny, tiny_ids):
    ref = tiny(tiny_ids).logits
    fold_norms(tiny)
    adapter = adapter_for(tiny)
    assert torch.all(adapter.final_norm(tiny).weight == 1)
    assert _rel_logit_error(ref, tiny(tiny_ids).logits) <= 1e-5


@torch.no_grad()
def test_rotated_model_matches_original(tiny, tiny_ids):
    ref = tiny(tiny_ids).logits
    tied = tiny.lm_head.weight is tiny.model.embed_tokens.weight
    rotate_model(tiny, seed=3)
    out = tiny(tiny_ids).logits
    assert _rel_logit_error(ref, out) <= 1e-3
    assert _rel_logit_error(ref, out) <= 1e-5  # float64 folding: far tighter than the bound
    if tied:
        assert tiny.lm_head.weight is not tiny.model.embed_tokens.weight
    for layer in tiny.model.layers:
        assert isinstance(layer.mlp.down_proj, QLinear) and layer.mlp.down_proj.online_hadamard


@torch.no_grad()
def test_block_diagonal_r4_is_exact_and_mixes_within_blocks_only(tiny, tiny_ids):
    ref = tiny(tiny_ids).logits
    rotate_model(tiny, seed=3, r4="block-diagonal")
    assert _rel_logit_error(ref, tiny(tiny_ids).logits) <= 1e-5
    k = tiny.config.intermediate_size  # 80 = 5 · 2^4 (tiny): 5 blocks of 16
    down = tiny.model.layers[0].mlp.down_proj
    assert down.online_hadamard and down.hadamard_block == r4_block(k, "block-diagonal") == 16
    x = torch.zeros(1, k)
    x[0, 21] = 1.0
    assert torch.nonzero(down.rotate_input(x)[0]).flatten().tolist() == list(range(16, 32))
    assert r4_block(k, "full") is None and r4_block(64, "block-diagonal") is None  # a power of two: one Hadamard
    assert r4_block(1536, "block-diagonal") == 512 and r4_block(14336, "block-diagonal") == 2048
    with pytest.raises(ValueError, match="r4='blocks'"):
        Recipe.from_name("quarot", rotate={"r4": "blocks"})


@torch.no_grad()
def test_rotation_changes_weights_and_depends_on_seed(tiny_ids):
    a, b, c = tiny_model("llama"), tiny_model("llama"), tiny_model("llama")
    w0 = a.model.layers[0].self_attn.q_proj.weight.clone()
    rotate_model(a, seed=0)
    rotate_model(b, seed=0)
    rotate_model(c, seed=1)
    wa = a.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(wa, w0, atol=1e-3)
    assert torch.equal(wa, b.model.layers[0].self_attn.q_proj.weight)
    assert not torch.allclose(wa, c.model.layers[0].self_attn.q_proj.weight, atol=1e-3)


@torch.no_grad()
def test_rotation_spreads_a_massive_channel():
    """The point of R1: an outlier channel in the residual stream is spread over all channels."""
    from lsr.hadamard import random_hadamard_matrix

    x = torch.randn(64, 576)
    x[:, 7] = 1000.0
    rotated = x @ random_hadamard_matrix(576, seed=0)
    ratio = lambda t: (t.abs().amax(-1) / t.abs().mean(-1)).mean().item()
    assert ratio(x) > 100 and ratio(rotated) < 5


def test_unknown_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*llama, mistral, qwen2"):
        rotate_model(model)
