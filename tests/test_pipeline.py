"""The one block walk: its FP chain is the model's own forward, its quantized chain the fake-quant model's."""

from __future__ import annotations

import math

import torch

from lsr.pipeline import BlockPipeline, apply_recipe, prepare_model
from lsr.pipeline.apply import recipe_hooks
from lsr.quant import QuantSpec, gptq
from lsr.recipe import Recipe

from .conftest import tiny_model


class Inputs:
    """Records the inputs each block gets (FP chain and quantized prefix)."""

    def __init__(self) -> None:
        self.fp: list[torch.Tensor] = []
        self.q: list[torch.Tensor] = []

    def on_block(self, block) -> None:
        self.fp.append(block.x_fp.clone())
        self.q.append(block.x_q.clone())


def test_fp_chain_is_the_models_forward(tiny_ids):
    model = tiny_model("qwen2")
    with torch.no_grad():
        hidden = model(tiny_ids, output_hidden_states=True).hidden_states
    seen = Inputs()
    spec = QuantSpec(bits=4, granularity="token")
    BlockPipeline(model, tiny_ids, act=spec, weight=spec, batch_size=1, log=None).run([seen])
    assert len(seen.fp) == model.config.num_hidden_layers
    for i, x in enumerate(seen.fp):  # hidden_states[i] is block i's input (the last entry is after the final norm)
        torch.testing.assert_close(x, hidden[i], rtol=1e-5, atol=1e-5)


def test_quantized_chain_is_the_fake_quant_models_forward(tiny_ids):
    model = tiny_model("llama")
    recipe = Recipe.from_name("quantile-gptq")
    prepare_model(model, recipe)
    seen = Inputs()
    pipeline = BlockPipeline(model, tiny_ids, act=recipe.activations, weight=recipe.weights.spec,
                             batch_size=tiny_ids.shape[0], log=None)
    pipeline.run([seen, *recipe_hooks(recipe)])
    with torch.no_grad():  # the model is now the W4A4 fake-quant model
        hidden = model(tiny_ids, output_hidden_states=True).hidden_states
    for i, x in enumerate(seen.q):  # the walk's quantized-prefix inputs are what the deployed model computes
        torch.testing.assert_close(x, hidden[i], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen.q[-1], seen.fp[-1], atol=1e-3)
    assert all(0 < r.error_final < 1 for r in pipeline.records)


def _windows(n: int = 8) -> torch.Tensor:
    return torch.randint(0, 96, (n, 32), generator=torch.Generator().manual_seed(5))


def test_gptaq_lowers_block_errors_and_reduces_to_gptq():
    # GPTAQ pulls each linear towards the float model's outputs: on the calibration windows the final block errors
    # drop (measured: about half of GPTQ's on every block of tiny llama / qwen2); with alpha = 0 it is GPTQ exactly.
    windows = _windows()
    for kind in ("llama", "qwen2"):
        gptq_run = apply_recipe(tiny_model(kind), Recipe.from_name("quarot-gptq"), windows, log=None)
        gptaq_run = apply_recipe(tiny_model(kind), Recipe.from_name("quarot-gptaq"), windows, log=None)
        plain = [r.error_final for r in gptq_run.records]
        asym = [r.error_final for r in gptaq_run.records]
        assert all(math.isfinite(e) and 0 < e < 1 for e in plain + asym)
        assert all(math.isfinite(e) for r in gptaq_run.records for e in r.linear_error_final.values())
        assert sum(asym) < 0.8 * sum(plain), (asym, plain)
        assert gptaq_run.weights.keys() == gptq_run.weights.keys()

        zero = apply_recipe(tiny_model(kind), Recipe.from_name("quarot-gptaq", weights={"gptq": {"alpha": 0.0}}),
                            windows, log=None)
        for name, w in gptq_run.weights.items():
            assert torch.equal(zero.weights[name].q, w.q) and torch.equal(zero.weights[name].scale, w.scale)
        assert [r.error_final for r in zero.records] == plain
        assert any(not torch.equal(gptaq_run.weights[n].q, w.q) for n, w in gptq_run.weights.items())


def test_gptaq_sees_the_float_models_inputs(monkeypatch):
    # The cross term pairs each linear's inputs in the quantized model (those plain GPTQ's Hessian sees) with its
    # inputs in the float model: the float block, float weights even after earlier groups were quantized, no activation
    # quantizer, after the online Hadamard.
    windows = _windows(4)
    seen: dict[gptq.CrossAccumulator, list] = {}  # keeps every accumulator alive, in the order of their first add
    original = gptq.CrossAccumulator.add

    def spy(self, x_q, x_fp):
        seen.setdefault(self, []).append((x_q.clone(), x_fp.clone()))
        return original(self, x_q, x_fp)

    monkeypatch.setattr(gptq.CrossAccumulator, "add", spy)
    recipe = Recipe.from_name("quarot-gptaq")
    apply_recipe(tiny_model("llama"), recipe, windows, batch_size=2, log=None)

    reference = prepare_model(tiny_model("llama"), recipe)  # the rotated float model: the FP chain's function
    layers = reference.model.layers
    names = [f"{i}.{n}" for i in range(len(layers)) for n in ("self_attn.q_proj", "self_attn.k_proj",
                                                                "self_attn.v_proj", "self_attn.o_proj",
                                                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    inputs = {n: [] for n in names}
    handles = [layers.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: inputs[n].append(mod.prepare_input(args[0]))) for n in names]
    with torch.no_grad():
        for b in torch.arange(4).split(2):
            reference(windows[b])
    for h in handles:
        h.remove()
    calls = list(seen.values())  # one accumulator per linear: block by block, group by group, in forward order
    assert len(calls) == len(names) and all(len(c) == 2 for c in calls)
    for name, batches in zip(names, calls, strict=True):
        for (x_q, x_fp), expected in zip(batches, inputs[name], strict=True):
            torch.testing.assert_close(x_fp, expected, rtol=1e-4, atol=1e-4, msg=name)
            assert not torch.allclose(x_q, x_fp, atol=1e-3), name


def test_linear_errors_are_optional_and_change_nothing_else():
    from lsr.learn.report import full_layer_mean_error

    recipe = Recipe.from_name("quantile-gptq")
    scored = apply_recipe(tiny_model("llama"), recipe, _windows(), batch_size=4, log=None)
    quiet = apply_recipe(tiny_model("llama"), recipe, _windows(), batch_size=4, log=None, linear_errors=False)
    assert all(r.linear_error_final for r in scored.records) and not any(r.linear_error_final for r in quiet.records)
    assert math.isfinite(full_layer_mean_error(scored.records)) and math.isnan(full_layer_mean_error(quiet.records))
    for name, weight in scored.weights.items():
        assert torch.equal(weight.q, quiet.weights[name].q), name
