"""Smoothing, quantile init and blockwise learning on tiny random models (the block pipeline and `quantize_`)."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lsr.learn import BlockModule, LearnScales, quantize_
from lsr.models import adapter_for
from lsr.pipeline import Block, BlockPipeline, apply_recipe, prepare_model
from lsr.pipeline.apply import recipe_hooks
from lsr.pipeline.runner import BlockRecord
from lsr.pipeline.smooth import SmoothInit
from lsr.quant import QuantSpec
from lsr.quant.rtn import best_clip, fake_quantize
from lsr.recipe import PRESETS, LearnStep, Recipe, RotateStep, SmoothStep, WeightStep
from lsr.transforms.linear import set_quantizers
from lsr.transforms.smooth import BlockGeometry, fold_scales
from tests.conftest import TINY, tiny_model

ALL_POINTS = ["down", "qkv", "gateup", "vo"]
CPU = {"accelerator": "cpu"}


def _windows(n: int = 8, seq_len: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (n, seq_len), generator=torch.Generator().manual_seed(seed))


def _random_scales(layer, heads, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sizes = {"down": layer.mlp.down_proj.in_features, "vo": heads[1] * heads[2],
             "qkv": layer.self_attn.q_proj.in_features, "gateup": layer.self_attn.q_proj.in_features}
    return {p: torch.exp(torch.randn(n, generator=gen)) for p, n in sizes.items()}


def _block(recipe: Recipe, index: int = 0, windows: torch.Tensor | None = None,
           init: SmoothInit | None = None) -> Block:
    """Block `index` of a prepared tiny llama, its predecessors run through the recipe's hooks (no learning);
    `init` watches the block's targets pass (for its statistics)."""
    model = prepare_model(tiny_model("llama"), recipe)
    pipeline = BlockPipeline(model, _windows() if windows is None else windows, act=recipe.activations,
                             weight=recipe.weights.spec, batch_size=4, log=None)
    for i in range(index):
        hooks = recipe_hooks(replace(recipe, learn=None))
        block = pipeline.open_block(i, hooks)
        for hook in hooks:
            hook.on_block(block)
        pipeline.advance(block)
    return pipeline.open_block(index, [init] if init is not None else [])


def _flat(scales: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([scales[p].detach().flatten() for p in sorted(scales)])


class ScalesOf:
    """`on_block_end` of the pipeline: keep every block's (learned) log-scales."""

    def __init__(self) -> None:
        self.scales: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, block: Block) -> None:
        self.scales[block.index] = {p: t.detach().clone() for p, t in block.log_scales.items()}


# ----------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", ["llama", "llama-tied", "mistral", "qwen2"])
@torch.no_grad()
def test_scaled_and_rotated_fp_model_equals_original(kind, tiny_ids):
    model = tiny_model(kind)
    ref = model(tiny_ids).logits
    prepare_model(model, PRESETS["quarot"])
    adapter = adapter_for(model)
    heads = adapter.head_dims(model)
    for i, layer in enumerate(adapter.layers(model)):
        scales = _random_scales(layer, heads, i)
        assert set(scales) == set(adapter.mapping.smoothing_points)
        fold_scales(layer, scales, BlockGeometry.of(layer, adapter.mapping, *heads))
    out = model(tiny_ids).logits
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-4


@pytest.mark.parametrize("point", ALL_POINTS)
@torch.no_grad()
def test_each_smoothing_point_changes_the_quantized_model(point, tiny_ids):
    outputs = []
    for scaled in (False, True):
        model = prepare_model(tiny_model("qwen2"), PRESETS["quarot"])
        adapter = adapter_for(model)
        heads = adapter.head_dims(model)
        for i, layer in enumerate(adapter.layers(model)):
            if scaled:
                fold_scales(layer, {point: _random_scales(layer, heads, i)[point]},
                            BlockGeometry.of(layer, adapter.mapping, *heads))
            set_quantizers(layer, QuantSpec(granularity="token"), QuantSpec())
        outputs.append(model(tiny_ids).logits)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------- gradients
def test_log_scale_gradients_flow_through_fake_quant():
    recipe = PRESETS["lsr"]
    init = SmoothInit(recipe.smooth, seed=recipe.seed)
    block = _block(recipe, init=init)
    init.on_block(block)
    assert set(block.log_scales) == set(ALL_POINTS)
    thetas = {p: t.clone().requires_grad_(True) for p, t in block.log_scales.items()}
    idx = torch.arange(4)
    out = block.forward(block.inputs[idx], block.params(thetas), quantized=True)
    F.mse_loss(out, block.targets[idx]).backward()
    for point, theta in thetas.items():
        assert theta.grad is not None and torch.isfinite(theta.grad).all(), point
        assert theta.grad.abs().sum() > 0, point


def test_clip_gradients_flow_and_one_clip_per_quantizer():
    recipe = PRESETS["lsr"]
    init = SmoothInit(recipe.smooth, seed=recipe.seed)
    block = _block(recipe, init=init)
    init.on_block(block)
    module = BlockModule(block, recipe.learn, act_clip=0.9)
    assert len(module.act_logits) == len(block.mapping.gptq_groups) == 4
    assert len(module.weight_logits) == 7
    act, weight = module.clips()
    assert all(abs(float(c) - 0.9) < 1e-6 for c in act.values())
    # the weight clips start at the MSE-searched clip of each row (at most 0.995)
    down = block.params(block.log_scales)["mlp.down_proj.weight"]
    searched = QuantSpec(bits=4, granularity="channel", clip_search=True)
    expected = torch.clamp(best_clip(down, searched), max=0.995)
    torch.testing.assert_close(weight["mlp.down_proj"], expected, atol=1e-5, rtol=0)
    idx = torch.arange(4)
    loss, _ = module._loss(block.inputs[idx], block.targets[idx])
    loss.backward()
    for name, p in [*module.act_logits.items(), *module.weight_logits.items()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("loss", ["mse", "relative"])
def test_linear_loss_adds_each_linears_own_relative_error(loss):
    """``learn.linear_loss`` adds λ × the mean over the block's linears of ``‖Q_a(x)Q_w(W)ᵀ − xWᵀ‖² / ‖xWᵀ‖²`` on
    the inputs each linear receives (in the block loss's units), and its gradient reaches the log-scales."""
    recipe = Recipe.from_name("lsr", learn={"loss": loss})
    init = SmoothInit(recipe.smooth, seed=recipe.seed)
    block = _block(recipe, init=init)
    init.on_block(block)
    x, y = block.inputs[:4], block.targets[:4]
    plain = BlockModule(block, recipe.learn, act_clip=0.9)
    weighted = BlockModule(block, replace(recipe.learn, linear_loss=2.0), act_clip=0.9)
    base, _ = plain._loss(x, y)
    seen = []  # (rotated input, weight, activation clip, weight clip) of every linear call, as the block runs them

    def capture(mod, args):
        seen.append((mod.rotate_input(args[0]).detach(), mod.weight.detach(), mod.act_clip, mod.weight_clip))

    with block.hooked({name: capture for name in block.mapping.linears}):
        total, _ = weighted._loss(x, y)
    assert len(seen) == 7
    errors = []
    for inp, weight, act_clip, weight_clip in seen:
        reference = F.linear(inp, weight)
        spec = replace(block.weight_spec, clip_search=False)
        approx = F.linear(fake_quantize(inp, block.act, act_clip.detach()), fake_quantize(weight, spec,
                                                                                         weight_clip.detach()))
        errors.append(((approx - reference).pow(2).sum() / reference.pow(2).sum()).item())
    unit = 1.0 if loss == "relative" else y.pow(2).mean().item()
    assert min(errors) > 0
    assert (total - base).item() == pytest.approx(2.0 * sum(errors) / len(errors) * unit, rel=1e-4)
    (total - base).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in weighted.log_scales.values())


def test_float_weight_learning_then_gptq():
    """``learn.weights: float``: activation clips and scales learn with unquantized weights (no weight clips), then
    GPTQ quantizes; the learned activation clips are what GPTQ's Hessians and the final model see."""
    recipe = Recipe.from_name("lsr-gptq", learn={"weights": "float", "epochs": 2})
    assert not recipe.learn.learns_weight_clip
    result = quantize_(tiny_model("llama"), recipe, _windows(), batch_size=4, trainer=CPU, log=None)
    clips = [float(m.act_clip) for m in result.model.modules() if getattr(m, "act_clip", None) is not None]
    assert len(clips) == 7 * TINY["num_hidden_layers"] and any(abs(c - 0.9) > 1e-4 for c in clips)
    for r in result.records:
        assert math.isfinite(r.error_learned) and math.isfinite(r.error_final)


# ----------------------------------------------------------------------------------------------- learning
def test_learning_lowers_the_block_error():
    recipe = Recipe.from_name("lsr", learn={"epochs": 20, "lr": 1e-2, "batch_size": 1})
    result = quantize_(tiny_model("llama"), recipe, _windows(), batch_size=4, trainer=CPU, log=None)
    assert [r.index for r in result.records] == list(range(TINY["num_hidden_layers"]))
    drops = []
    for r in result.records:
        assert r.init in ("quantile", "max", "identity") and not r.stopped_on_nonfinite
        assert math.isfinite(r.error_init) and math.isfinite(r.error_learned)
        assert r.error_learned <= r.error_init  # the best scales are kept, never worse than the init
        # RTN weights of the learned scales on the quantized-prefix inputs: what the next block is fed
        assert r.error_final == pytest.approx(r.error_learned, rel=1e-4)
        assert r.linear_error_init and r.linear_error_final
        drops.append(1 - r.error_learned / r.error_init)
    assert max(drops) >= 0.1, drops


def test_band_keeps_scales_near_their_init():
    band = 0.05
    recipe = Recipe.from_name("lsr", learn={"band": band, "lr": 1.0, "epochs": 3})
    init = SmoothInit(recipe.smooth, seed=recipe.seed)
    block = _block(recipe, init=init)
    init.on_block(block)
    theta0 = _flat(block.log_scales)
    seen: list[torch.Tensor] = []

    class Watch(L.Callback):
        def on_train_epoch_end(self, trainer, module) -> None:
            seen.append(_flat(dict(module.log_scales)))

    LearnScales(recipe.learn, trainer={**CPU, "callbacks": [Watch()]}).on_block(block)
    assert len(seen) == recipe.learn.epochs
    moved = max((theta - theta0).abs().max().item() for theta in seen)
    assert band - 1e-3 < moved <= band + 1e-6  # lr 1 pushes the scales to the edge of the band, not beyond
    assert (_flat(block.log_scales) - theta0).abs().max() <= band + 1e-6


def test_quantile_init_with_guard_is_no_worse_than_max_init():
    """On the same inputs (the FP chain), the guarded quantile init scores at most the max init in every block."""
    errors = {}
    for name, smooth in (("max", {"statistic": "max", "guard": False}), ("quantile", {"quantile": 0.5})):
        recipe = Recipe.from_name("quantile", smooth=smooth, inputs="fp")
        result = apply_recipe(tiny_model("llama"), recipe, _windows(), batch_size=4, log=None)
        errors[name] = [r.error_init for r in result.records]
        if name == "max":
            assert {r.init for r in result.records} == {"max"}
    assert len(errors["max"]) == TINY["num_hidden_layers"]
    for quantile, maximum in zip(errors["quantile"], errors["max"], strict=True):
        assert quantile <= maximum + 1e-12


def test_same_seed_same_result():
    recipe = Recipe.from_name("lsr", learn={"epochs": 3})
    runs = []
    for _ in range(2):
        scales = ScalesOf()
        result = quantize_(tiny_model("llama"), recipe, _windows(), batch_size=4, trainer=CPU, log=None,
                           on_block_end=scales)
        runs.append((scales.scales, result.weights))
    (scales_a, weights_a), (scales_b, weights_b) = runs
    assert scales_a.keys() == scales_b.keys() == set(range(TINY["num_hidden_layers"]))
    for i in scales_a:
        assert torch.equal(_flat(scales_a[i]), _flat(scales_b[i])), i
    assert weights_a.keys() == weights_b.keys() and weights_a
    for name in weights_a:
        assert torch.equal(weights_a[name].q, weights_b[name].q), name
        assert torch.equal(weights_a[name].scale, weights_b[name].scale), name


def test_nonfinite_loss_restores_the_last_good_scales(monkeypatch):
    recipe = Recipe.from_name("lsr", learn={"epochs": 3})
    n = _windows().shape[0]
    calls = {"block0": 0}
    original = BlockModule._loss

    def loss(self, x, y):
        out = original(self, x, y)
        if self.walk.index != 0:
            return out
        calls["block0"] += 1
        if calls["block0"] > n + 2:  # good steps through epoch 1 and into epoch 2, then NaN
            return torch.full_like(out[0], float("nan")), out[1]
        return out

    monkeypatch.setattr(BlockModule, "_loss", loss)
    best_before_nan: list[dict[str, torch.Tensor]] = []

    class Watch(L.Callback):
        def on_train_epoch_start(self, trainer, module) -> None:
            if module.walk.index == 0:
                best_before_nan.append({k.removeprefix("scale/"): t.clone() for k, t in module.best.items()
                                        if k.startswith("scale/")})

    scales = ScalesOf()
    with pytest.warns(UserWarning, match="block 0: non-finite"):
        result = quantize_(tiny_model("llama"), recipe, _windows(), batch_size=4,
                           trainer={**CPU, "callbacks": [Watch()]}, log=None, on_block_end=scales)
    assert calls["block0"] == n + 3  # training of block 0 stopped at the first non-finite loss
    assert len(best_before_nan) == 2  # epochs 1 and 2 started; epoch 3 never did
    assert torch.equal(_flat(scales.scales[0]), _flat(best_before_nan[-1]))
    assert result.records[0].stopped_on_nonfinite and not result.records[1].stopped_on_nonfinite
    assert math.isfinite(result.records[0].error_learned)
    assert result.records[0].error_learned <= result.records[0].error_init
    with torch.no_grad():
        assert torch.isfinite(result.model(_windows(2)).logits).all()


# ----------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: QuantSpec(bits=9), r"bits must be an integer in \[2, 8\]"),
        (lambda: QuantSpec(bits=1), "bits must be"),
        (lambda: QuantSpec(clip_ratio=0.0), "clip_ratio"),
        (lambda: SmoothStep(alpha=1.5), r"smooth\.alpha=1\.5 is invalid: expected a number in \[0, 1\]"),
        (lambda: SmoothStep(quantile=0.0), r"smooth\.quantile=0\.0 is invalid: expected a number in \(0, 1\]"),
        (lambda: SmoothStep(quantile=1.2), r"smooth\.quantile=1\.2 is invalid"),
        (lambda: SmoothStep(points=("nowhere",)), r"smooth\.points='nowhere' is invalid: expected one of 'qkv'"),
        (lambda: Recipe.from_name("lsr", smooth={"points": ["qkv", "nowhere"]}), r"smooth\.points='nowhere'"),
        (lambda: Recipe(learn=LearnStep()), "learn trains the smoothing scales: it needs a smooth step"),
        (lambda: Recipe(smooth=SmoothStep(points=()), learn=LearnStep()), "needs a smooth step with at least one"),
        (lambda: Recipe(rotate=None, smooth=SmoothStep()), "smooth needs rotate"),
        (lambda: Recipe.from_name("lsr", rotate=None), "smooth needs rotate"),
        (lambda: Recipe.from_dict({"name": "x", "nope": 1}), "unknown recipe field 'nope'"),
        (lambda: Recipe.from_dict({"smooth": {"alpah": 0.5}}), r"unknown recipe field smooth\.'alpah'"),
        (lambda: Recipe.from_name("lsr", nope=1), "unknown recipe field 'nope'"),
        (lambda: Recipe.from_name("gptq-only"), "recipe 'gptq-only' is not a preset: choose one of quarot"),
        (lambda: LearnStep(epochs=0), r"learn\.epochs=0 is invalid: expected an int >= 1"),
        (lambda: Recipe.from_name("lsr", learn={"epochs": 0}), r"learn\.epochs=0 is invalid"),
        (lambda: Recipe.from_name("lsr", weights={"method": "awq"}), r"weights\.method='awq' is invalid"),
        (lambda: Recipe.from_name("lsr-gptaq", weights={"gptq": {"alpha": -0.5}}),
         r"weights\.gptq\.alpha=-0\.5 is invalid: expected a number >= 0"),
        (lambda: Recipe.from_name("lsr", weights={"spec": {"bits": 1}}), "bits must be"),
        (lambda: Recipe(inputs="both"), r"inputs='both' is invalid"),
    ],
)
def test_invalid_settings_give_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_learning_needs_the_learner_and_calibration():
    with pytest.raises(ValueError, match="learns its scales"):
        apply_recipe(tiny_model("llama"), PRESETS["lsr"], _windows(), log=None)
    for name in ("smoothrot", "quarot-gptq", "quarot-gptaq"):
        with pytest.raises(ValueError, match="needs calibration windows"):
            apply_recipe(tiny_model("llama"), PRESETS[name], None, log=None)
    with pytest.raises(ValueError, match="trainer.max_epochs is set by lsr"):
        LearnScales(LearnStep(), trainer={"max_epochs": 3})


def test_presets_are_distinct_methods():
    assert PRESETS["quarot"].smooth is None and PRESETS["quarot"].learn is None
    assert PRESETS["quarot"].rotate == RotateStep()
    smoothrot = PRESETS["smoothrot"].smooth
    assert smoothrot.statistic == "max" and smoothrot.points == ("down",) and not smoothrot.guard
    assert PRESETS["smoothrot"].learn is None
    assert PRESETS["quantile"].smooth.statistic == "quantile" and PRESETS["quantile"].learn is None
    assert PRESETS["lsr"].learn is not None and PRESETS["lsr"].smooth == PRESETS["quantile"].smooth
    assert PRESETS["lsr"].learn.weights == "rtn" and PRESETS["lsr"].activations.clip_ratio == 0.9
    for name in ("quarot", "smoothrot", "quantile", "lsr"):
        assert PRESETS[name].weights == WeightStep()
        for method in ("gptq", "gptaq"):
            variant = PRESETS[f"{name}-{method}"]
            assert variant.weights == WeightStep(method=method) and variant.weights.uses_gptq
            base = PRESETS[name]
            learn = base.learn and replace(base.learn, weights="float")  # float weights before GPTQ
            assert variant.learn == learn and (learn is None or learn.weights == "float")
            assert replace(variant, name=name, weights=WeightStep(), learn=base.learn) == base
    assert len({repr(replace(r, name="")) for r in PRESETS.values()}) == len(PRESETS) == 12
    for name, recipe in PRESETS.items():
        assert recipe.name == name
        assert Recipe.from_dict(recipe.to_dict()) == recipe
        assert Recipe.from_name(name) == recipe
    overridden = Recipe.from_name("lsr", learn={"epochs": 7}, smooth={"alpha": 0.3})
    assert overridden.learn == replace(LearnStep(), epochs=7) and overridden.smooth.alpha == 0.3
    assert overridden.smooth.points == PRESETS["lsr"].smooth.points


def test_quantized_inputs_differ_from_fp_inputs():
    recipe = PRESETS["quarot-gptq"]  # quarot itself calibrates nothing: GPTQ runs it through the pipeline
    model = prepare_model(tiny_model("llama"), recipe)
    pipeline = BlockPipeline(model, _windows(), act=recipe.activations, weight=recipe.weights.spec, batch_size=4,
                             log=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = pipeline.run(recipe_hooks(recipe))
    assert not torch.allclose(pipeline.x_q, pipeline.x_fp)
    assert all(0 < r.error_final < 1 for r in records)


def test_fp_chain_inputs_still_score_each_block():
    """With ``inputs: fp`` the final error is the quantized block's on the FP chain's inputs (not left unscored)."""
    recipe = replace(PRESETS["quarot-gptq"], inputs="fp")
    model = prepare_model(tiny_model("llama"), recipe)
    pipeline = BlockPipeline(model, _windows(), act=recipe.activations, weight=recipe.weights.spec, batch_size=4,
                             keep_quantized_inputs=False, log=None)
    records = pipeline.run(recipe_hooks(recipe))
    assert pipeline.x_q is None
    assert all(0 < r.error_final < 1 for r in records)


def test_report_table_shows_linear_errors_only_when_scored():
    from lsr.learn.report import markdown_table

    scored = BlockRecord(index=0, init="max", error_init=0.1, linear_error_final={"q_proj": 0.01, "k_proj": 0.03})
    table = markdown_table([scored])
    assert "| q_proj | k_proj | mean |" in table and "| 0.0100 | 0.0300 | 0.0200 |" in table
    assert "full-layer mean error: 0.0200" in table
    unscored = markdown_table([BlockRecord(index=0, init="max", error_init=0.1)])
    assert "mean" not in unscored and "0.0000" not in unscored and "not scored" in unscored
