"""The one block walk: its FP chain is the model's own forward, its quantized chain the fake-quant model's."""

from __future__ import annotations

import torch

from lsr.pipeline import BlockPipeline, prepare_model
from lsr.pipeline.apply import recipe_hooks
from lsr.quant import QuantSpec
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
