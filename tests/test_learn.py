"""Smoothing, quantile init and blockwise learning on tiny random models."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lsr.learn.engine import BlockwiseEngine
from lsr.learn.method import PRESETS, MethodConfig, preset
from lsr.learn.refined import fold_scales
from lsr.models import adapter_for
from lsr.quant import QuantSpec
from lsr.transforms import rotate_model
from lsr.transforms.linear import set_quantizers
from lsr.transforms.prepare import to_qlinears
from lsr.transforms.smooth import BlockGeometry
from tests.conftest import TINY, tiny_model

ALL_POINTS = ["down", "qkv", "gateup", "vo"]


def _windows(n: int = 8, seq_len: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (n, seq_len), generator=torch.Generator().manual_seed(seed))


def _random_scales(layer, heads, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sizes = {"down": layer.mlp.down_proj.in_features, "vo": heads[1] * heads[2],
             "qkv": layer.self_attn.q_proj.in_features, "gateup": layer.self_attn.q_proj.in_features}
    return {p: torch.exp(torch.randn(n, generator=gen)) for p, n in sizes.items()}


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "mistral", "qwen2"])
@torch.no_grad()
def test_scaled_and_rotated_fp_model_equals_original(kind, tiny_ids):
    model = tiny_model(kind)
    ref = model(tiny_ids).logits
    rotate_model(model, seed=0)
    to_qlinears(model)
    adapter = adapter_for(model)
    heads = adapter.head_dims(model)
    for i, layer in enumerate(adapter.layers(model)):
        fold_scales(layer, _random_scales(layer, heads, i), BlockGeometry.of(layer, *heads))
    out = model(tiny_ids).logits
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-4


@pytest.mark.parametrize("point", ALL_POINTS)
@torch.no_grad()
def test_each_smoothing_point_changes_the_quantized_model(point, tiny_ids):
    outputs = []
    for scaled in (False, True):
        model = tiny_model("qwen2")
        rotate_model(model, seed=0)
        to_qlinears(model)
        adapter = adapter_for(model)
        heads = adapter.head_dims(model)
        for i, layer in enumerate(adapter.layers(model)):
            if scaled:
                fold_scales(layer, {point: _random_scales(layer, heads, i)[point]}, BlockGeometry.of(layer, *heads))
            set_quantizers(layer, QuantSpec(granularity="token"), QuantSpec())
        outputs.append(model(tiny_ids).logits)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3


def test_log_scale_gradients_flow_through_fake_quant():
    engine = BlockwiseEngine(tiny_model("llama"), preset("lsr"), _windows(), batch_size=4)
    engine.begin_block(0)
    loss = engine.batch_loss(torch.arange(4))
    loss.backward()
    for point, theta in engine.log_scales[0].items():
        assert theta.grad is not None and torch.isfinite(theta.grad).all(), point
        assert theta.grad.abs().sum() > 0, point


def _learn(engine: BlockwiseEngine, block: int, steps: int, lr: float = 2e-2) -> None:
    opt = torch.optim.Adam(engine.log_scales[block].parameters(), lr=lr)
    for _ in range(steps):
        for idx in torch.arange(engine.num_samples).split(engine.batch_size):
            opt.zero_grad()
            engine.batch_loss(idx).backward()
            opt.step()
            engine.project()
        engine.end_epoch()


def test_learning_lowers_the_block_loss():
    engine = BlockwiseEngine(tiny_model("llama"), preset("lsr"), _windows(), batch_size=4)
    engine.begin_block(0)
    init = engine.best_loss
    _learn(engine, 0, steps=15)
    result = engine.finish_block()
    assert result.loss_final < 0.9 * init
    assert result.loss_final == engine.results[0].loss_final


def test_band_keeps_scales_near_their_init():
    engine = BlockwiseEngine(tiny_model("llama"), preset("lsr", band=0.05), _windows(), batch_size=4)
    engine.begin_block(0)
    theta0 = engine.theta0.clone()
    _learn(engine, 0, steps=5, lr=1.0)
    flat = torch.cat([t.flatten() for t in engine.log_scales[0].values()])
    assert (flat - theta0).abs().max() <= 0.05 + 1e-6


def test_quantile_init_with_guard_is_no_worse_than_max_init():
    for index in range(2):
        losses = {}
        for statistic in ("max", "quantile"):
            engine = BlockwiseEngine(
                tiny_model("llama"), preset("quantile", statistic=statistic, quantile=0.5), _windows(), batch_size=4
            )
            for i in range(index + 1):
                engine.begin_block(i)
                if i < index:
                    engine.finish_block()
            losses[statistic] = engine.best_loss
        assert losses["quantile"] <= losses["max"] + 1e-12


def test_same_seed_same_result():
    runs = []
    for _ in range(2):
        engine = BlockwiseEngine(tiny_model("llama"), preset("lsr"), _windows(), batch_size=4)
        engine.begin_block(0)
        _learn(engine, 0, steps=3)
        engine.finish_block()
        runs.append(torch.cat([t.detach().flatten() for t in engine.log_scales[0].values()]))
    assert torch.equal(runs[0], runs[1])


def test_nonfinite_loss_restores_the_last_good_scales():
    engine = BlockwiseEngine(tiny_model("llama"), preset("lsr"), _windows(), batch_size=4)
    engine.begin_block(0)
    good = {p: t.detach().clone() for p, t in engine.log_scales[0].items()}
    with torch.no_grad():
        for t in engine.log_scales[0].values():
            t.fill_(float("nan"))
    assert not math.isfinite(engine.batch_loss(torch.arange(4)).item())
    with pytest.warns(UserWarning, match="block 0: non-finite"):
        engine.restore_best("non-finite loss nan")
    for p, t in engine.log_scales[0].items():
        assert torch.equal(t, good[p])
    assert engine.results[-1].stopped_on_nonfinite


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: QuantSpec(bits=9), "bits must be an integer in \\[2, 8\\]"),
        (lambda: QuantSpec(bits=1), "bits must be"),
        (lambda: QuantSpec(clip_ratio=0.0), "clip_ratio"),
        (lambda: MethodConfig(alpha=1.5), "alpha must be in \\[0, 1\\]"),
        (lambda: MethodConfig(quantile=0.0), "quantile must be in \\(0, 1\\]"),
        (lambda: MethodConfig(quantile=1.2), "quantile must be in"),
        (lambda: MethodConfig(points=["nowhere"]), "unknown smoothing points"),
        (lambda: preset("gptq-only"), "unknown method"),
    ],
)
def test_invalid_settings_give_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_presets_are_distinct_methods():
    assert PRESETS["quarot"].points == [] and not PRESETS["quarot"].learn
    assert PRESETS["smoothrot"].statistic == "max" and not PRESETS["smoothrot"].learn
    assert PRESETS["quantile"].statistic == "quantile" and not PRESETS["quantile"].learn
    assert PRESETS["lsr"].learn


def test_quantized_inputs_differ_from_fp_inputs():
    engine = BlockwiseEngine(tiny_model("llama"), preset("quarot"), _windows(), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.run()
    assert not torch.allclose(engine.x_q, engine.x_fp)
