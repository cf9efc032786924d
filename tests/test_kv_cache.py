"""R3 and the KV cache: R3 is exact, the KV quantizer's numbers, the fake-quant attention and the block pipeline see
it, the real cache stores codes and reads back the fake-quant values, the export records it, generation works."""

from __future__ import annotations

import json

import pytest
import torch

from lsr.export import ExportConfig, load_quantized, prepare_export, round_like_export, write_export
from lsr.export.kv_cache import (
    QuantizedKVCache,
    QuantizedKVLayer,
    bf16_bytes_per_token_per_layer,
    pack_codes,
    unpack_codes,
)
from lsr.hadamard import hadamard_matrix, hadamard_transform
from lsr.pipeline import BlockPipeline, apply_recipe, prepare_model
from lsr.pipeline.apply import recipe_hooks
from lsr.quant.kv import kv_dequantize, kv_fake_quantize, kv_quantize
from lsr.quant.rtn import QuantSpec
from lsr.recipe import KVCacheStep, Recipe
from lsr.transforms import QAttention, rotate_model, to_qattention
from lsr.transforms.linear import set_quantizers
from tests.conftest import TINY, tiny_model

HEAD_DIM = TINY["hidden_size"] // TINY["num_attention_heads"]  # 8
KV_HEADS = TINY["num_key_value_heads"]
IDS = torch.randint(0, TINY["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, TINY["vocab_size"], (8, 32), generator=torch.Generator().manual_seed(2))
KV4 = QuantSpec(bits=4, symmetric=False, granularity="token", clip_ratio=1.0)


class RecordingCache(QuantizedKVCache):
    """A quantizing cache that records the keys and the spec the attention hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: dict[int, torch.Tensor] = {}
        self.specs: dict[int, QuantSpec | None] = {}

    def update(self, key, value, layer_idx, *args, spec=None, **kwargs):
        self.keys[layer_idx], self.specs[layer_idx] = key.clone(), spec
        return super().update(key, value, layer_idx, *args, spec=spec, **kwargs)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


# ----------------------------------------------------------------------------------------------- R3
@torch.no_grad()
def test_r3_is_exact(tiny, tiny_ids):
    """R1/R2/R4 and R3 together compute the original logits (LLaMA, tied, Mistral, Qwen2)."""
    ref = tiny(tiny_ids).logits
    rotate_model(tiny, seed=3)
    to_qattention(tiny, r3=True, kv_quant=None)
    assert all(isinstance(layer.self_attn, QAttention) and layer.self_attn.r3 for layer in tiny.model.layers)
    assert _rel(ref, tiny(tiny_ids).logits) <= 1e-5


@torch.no_grad()
def test_r3_rotates_queries_and_keys_after_rope():
    """The keys the cache gets are the RoPE'd keys times H_head_dim; the state dict is unchanged."""
    plain, rotated = tiny_model("qwen2"), tiny_model("qwen2")
    keys_before = set(rotated.state_dict())
    to_qattention(plain, r3=False, kv_quant=None)
    to_qattention(rotated, r3=True, kv_quant=None)
    assert set(rotated.state_dict()) == keys_before
    a, b = RecordingCache(), RecordingCache()
    plain(IDS, cache=a, use_cache=True)
    rotated(IDS, cache=b, use_cache=True)
    h = hadamard_matrix(HEAD_DIM, dtype=torch.float64)
    for layer in range(TINY["num_hidden_layers"]):
        k, k3 = a.keys[layer], b.keys[layer]
        assert k.shape == (2, KV_HEADS, 32, HEAD_DIM)
        assert (k - k3).abs().max() > 0.1  # R3 changed them ...
        torch.testing.assert_close(k3.double(), k.double() @ h, rtol=1e-5, atol=1e-5)  # ... by exactly H
        assert a.specs[layer] is None  # no quantizer asked for


def test_r3_spreads_a_key_outlier_channel():
    """Why R3: one massive channel per head makes per-head 4-bit keys coarse; after H it is spread out."""
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(4, 2, 64, 64, generator=gen)
    k[..., 5] += 40.0
    err = (kv_fake_quantize(k, KV4) - k).pow(2).mean()
    k3 = hadamard_transform(k)
    err3 = (kv_fake_quantize(k3, KV4) - k3).pow(2).mean()
    assert err3 < err / 4


# ----------------------------------------------------------------------------------------------- the quantizer
def test_asymmetric_kv_quantizer_by_hand():
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    q, scale, zero = kv_quantize(x, KV4)
    s = torch.tensor(0.2, dtype=torch.float16).float()  # 3 / 15, stored in float16
    assert scale.item() == s.item() and zero.item() == 5  # round(1 / 0.19995) = 5
    assert q.tolist() == [[0.0, 5.0, 8.0, 15.0]]  # -5.0012 → -5 (+5), 0, 2.5006 → 3, 10.002 → 10
    torch.testing.assert_close(kv_fake_quantize(x, KV4), torch.tensor([[-5, 0, 3, 10]]) * s)


def test_symmetric_grouped_and_clipped_kv_quantizer():
    x = torch.tensor([[-4.0, 1.0, 0.25, 0.5, 1.0, -7.0, 3.0, 0.0]])
    spec = QuantSpec(bits=4, symmetric=True, granularity="group", group_size=4, clip_ratio=1.0)
    q, scale, zero = kv_quantize(x, spec)
    assert zero is None and q.shape == (1, 2, 4)
    assert scale.flatten().tolist() == [torch.tensor(4 / 7, dtype=torch.float16).item(), 1.0]  # per group
    assert q.tolist() == [[[-7.0, 2.0, 0.0, 1.0], [1.0, -7.0, 3.0, 0.0]]]
    clipped = kv_fake_quantize(x, QuantSpec(bits=4, symmetric=True, granularity="group", group_size=4,
                                            clip_ratio=0.5))
    assert clipped[0, 0].item() == pytest.approx(-8 * torch.tensor(2 / 7, dtype=torch.float16).item())  # clamped


@pytest.mark.parametrize("bits, symmetric", [(4, False), (8, False), (4, True), (3, False)])
def test_kv_quantizer_error_is_half_a_step(bits, symmetric):
    x = torch.randn(3, 2, 17, 64, generator=torch.Generator().manual_seed(bits)) * 3
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="token", clip_ratio=1.0)
    q, scale, zero = kv_quantize(x, spec)
    assert q.min() >= spec.qmin and q.max() <= spec.qmax
    err = (kv_dequantize(q, scale, zero, x.shape, x.dtype) - x).abs()
    # half a step, and the float16 scale's rounding (2^-11 relative) over the qmax steps of the range
    assert (err <= scale * (0.5 + spec.qmax * 2**-11) + 1e-6).all()
    assert err.max() > scale.min() * 0.4  # and not much better: it is a b-bit grid
    x16 = x.clone().requires_grad_()
    kv_fake_quantize(x16, spec).sum().backward()  # straight through
    assert torch.isfinite(x16.grad).all() and x16.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_codes_round_trip(bits):
    u = torch.randint(0, 2**bits, (2, 3, 5, 64), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    u[0, 0, 0, : 2**bits] = torch.arange(2**bits, dtype=torch.uint8)[:64]
    packed = pack_codes(u, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == (64 * bits // 8 if bits in (2, 4, 8) else 64)
    assert torch.equal(unpack_codes(packed, bits), u)


def test_recipe_kv_cache_step():
    recipe = Recipe.from_name("lsr-gptaq", kv_cache={"bits": 4})
    assert recipe.kv_cache == KVCacheStep(bits=4, symmetric=False, group_size=None, clip_ratio=0.95, r3=True)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    old = recipe.to_dict()
    del old["kv_cache"]  # a recipe.json written before the step existed
    assert Recipe.from_dict(old).kv_cache is None and Recipe.from_name("lsr-gptaq").kv_cache is None
    # without a KV step the recipe writes (and fingerprints) as before it existed: finished runs are still found
    assert "kv_cache" not in Recipe.from_name("lsr-gptaq").to_dict()
    assert recipe.kv_cache.spec(64) == QuantSpec(4, False, "token", 64, 0.95)
    assert KVCacheStep(bits=8, group_size=16).spec(64) == QuantSpec(8, False, "group", 16, 0.95)
    assert KVCacheStep(bits=16).spec(64) is None
    for bad, match in (({"bits": 12}, "kv_cache.bits=12"), ({"clip_ratio": 0.0}, "kv_cache.clip_ratio"),
                       ({"group_size": 0}, "kv_cache.group_size"), ({"r3": "yes"}, "kv_cache.r3")):
        with pytest.raises(ValueError, match=match):
            KVCacheStep(**bad)
    with pytest.raises(ValueError, match="does not divide head_dim 64"):
        KVCacheStep(group_size=48).spec(64)


def test_cli_kv_cache_override():
    from lsr.cli import build_config, parse

    _, cfg = parse(["fit", "--config", "configs/smollm2.yaml", "--recipe.kv_cache.bits", "4"])
    recipe = build_config(Recipe, cfg["recipe"])
    assert recipe.name == "lsr-gptq" and recipe.kv_cache == KVCacheStep(bits=4)
    _, cfg = parse(["fit", "--config", "configs/smollm2.yaml", "--recipe.name", "quarot",
                    "--recipe.kv_cache.bits", "8", "--recipe.kv_cache.symmetric", "true"])
    assert build_config(Recipe, cfg["recipe"]).kv_cache == KVCacheStep(bits=8, symmetric=True)


# ----------------------------------------------------------------------------------------------- fake quant
@torch.no_grad()
def test_kv_quantizer_runs_with_the_models_quantizers():
    """KV4 changes the fake-quant model's logits (more than KV8), and only while its quantizers are on."""
    logits = {}
    for bits in (16, 8, 4):
        model = apply_recipe(tiny_model("llama"), Recipe.from_name("quarot", kv_cache={"bits": bits})).model
        logits[bits] = model(IDS).logits
        if bits == 4:
            set_quantizers(model, None, None)
            assert not any(layer.self_attn.kv_active for layer in model.model.layers)
            off = model(IDS).logits
    plain = apply_recipe(tiny_model("llama"), Recipe.from_name("quarot")).model(IDS).logits
    assert _rel(plain, logits[16]) < 1e-5  # R3 is exact on the fake-quant model too
    d8, d4 = ((logits[b] - logits[16]).abs().max().item() for b in (8, 4))
    assert 0 < d8 < d4 and d4 > 1e-3
    assert (off - logits[4]).abs().max() > 1e-3


class Recorder:
    def __init__(self, seen: list) -> None:
        self.seen = seen

    def on_block(self, block) -> None:
        self.seen.append(block.x_q.clone())


def test_the_block_pipeline_sees_the_kv_quantizer(tiny_ids):
    """The walk's quantized-prefix inputs are the KV4 fake-quant model's hidden states, and KV4 raises block errors."""
    errors = {}
    for bits in (16, 4):
        model = tiny_model("llama")
        recipe = Recipe.from_name("quantile-gptq", kv_cache={"bits": bits})
        prepare_model(model, recipe)
        seen = []
        pipeline = BlockPipeline(model, tiny_ids, act=recipe.activations, weight=recipe.weights.spec,
                                 batch_size=tiny_ids.shape[0], log=None)
        pipeline.run([Recorder(seen), *recipe_hooks(recipe)])
        with torch.no_grad():
            hidden = model(tiny_ids, output_hidden_states=True).hidden_states
        for i, x in enumerate(seen):
            torch.testing.assert_close(x, hidden[i], rtol=1e-5, atol=1e-5)
        errors[bits] = [r.error_final for r in pipeline.records]
    assert errors[4][-1] > errors[16][-1] * 1.02


def test_learning_sees_the_kv_quantizer():
    """The learned block's loss includes the KV quantizer: with KV4 its initial and learned errors are higher."""
    from lsr.learn import quantize_

    learned = {}
    for bits in (16, 4):
        recipe = Recipe.from_name("lsr", kv_cache={"bits": bits}, learn={"epochs": 1})
        result = quantize_(tiny_model("llama"), recipe, CALIB, batch_size=4, log=None,
                           trainer={"accelerator": "cpu", "enable_progress_bar": False}, linear_errors=False)
        learned[bits] = result.records
    for r16, r4 in zip(learned[16], learned[4], strict=True):
        assert r4.error_init > r16.error_init and r4.error_learned > r16.error_learned


# ----------------------------------------------------------------------------------------------- the real cache
def _kv_model(bits: int = 4, kind: str = "llama", **kv) -> torch.nn.Module:
    return apply_recipe(tiny_model(kind), Recipe.from_name("quarot", kv_cache={"bits": bits, **kv})).model


@pytest.mark.parametrize("kind, kv", [("llama", {}), ("qwen2", {"bits": 8}), ("mistral", {"symmetric": True,
                                                                                          "group_size": 4})])
@torch.no_grad()
def test_quantized_cache_reads_back_the_fake_quant_values(kind, kv):
    """Prefill through the cache = the fake-quant forward, to the bit; decoding token by token = the full forward."""
    model = _kv_model(kind=kind, **{"bits": 4, **kv})
    full = model(IDS).logits
    cache = QuantizedKVCache()
    assert torch.equal(model(IDS, cache=cache, use_cache=True).logits, full)
    cache = QuantizedKVCache()
    model(IDS[:, :20], cache=cache, use_cache=True)
    steps = torch.cat([model(IDS[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(20, 32)], dim=1)
    torch.testing.assert_close(steps, full[:, 20:], rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 32


@torch.no_grad()
def test_quantized_cache_stores_packed_codes_and_fp16_scales():
    model = _kv_model(4)
    cache = QuantizedKVCache()
    model(IDS, cache=cache, use_cache=True)
    layer = cache.layers[0]
    assert isinstance(layer, QuantizedKVLayer) and layer.keys is None  # no float copy
    for stored in layer.stored:
        parts = stored.parts
        assert parts["codes"].dtype == torch.uint8 and parts["codes"].shape == (2, KV_HEADS, 32, HEAD_DIM // 2)
        assert parts["scale"].dtype == torch.float16 and parts["scale"].shape == (2, KV_HEADS, 32, 1)
        assert parts["zero"].dtype == torch.uint8 and int(parts["zero"].max()) <= 15
    per_token = 2 * KV_HEADS * (HEAD_DIM // 2 + 2 + 1)  # keys and values: codes, fp16 scale, uint8 zero per head
    assert cache.bytes_per_token_per_layer() == per_token == 28
    assert bf16_bytes_per_token_per_layer(KV_HEADS, HEAD_DIM) == 64
    # SmolLM2's shape (3 kv heads of 64): 0.273x a bf16 cache, scales and zero points included
    layer = QuantizedKVLayer()
    k = torch.randn(1, 3, 5, 64)
    layer.update(k, k, spec=QuantSpec(4, False, "token", 64, 0.95))
    assert layer.nbytes / 5 == 2 * 3 * (32 + 3) == 210 and 210 / bf16_bytes_per_token_per_layer(3, 64) < 0.3


@torch.no_grad()
def test_cache_reorder_crop_and_refusal():
    layer = QuantizedKVLayer()
    k = torch.randn(3, 2, 6, HEAD_DIM, generator=torch.Generator().manual_seed(0))
    keys, _ = layer.update(k, k, spec=KV4)
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    again, _ = layer.update(k[:, :, :1], k[:, :, :1], spec=KV4)
    assert torch.equal(again[:, :, :6], keys[[2, 0, 1]])  # exact: every token is quantized on its own
    layer.crop(-3)
    assert layer.get_seq_length() == 4 and layer.update(k[:, :, :1], k[:, :, :1], spec=KV4)[0].shape[-2] == 5
    with pytest.raises(ValueError, match="quantized with"):
        layer.update(k, k, spec=None)


@torch.no_grad()
def test_generate_with_the_quantized_cache():
    """model.generate with the quantized cache gives the tokens of the fake-quant model with a float cache."""
    model = _kv_model(4)
    prompt = IDS[:1, :10]
    cache = QuantizedKVCache()
    quantized = model.generate(prompt, attention_mask=torch.ones_like(prompt), cache=cache, max_new_tokens=12,
                               do_sample=False, pad_token_id=0)
    floats = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                            pad_token_id=0)
    assert quantized.shape == (1, 22) and torch.equal(quantized, floats)
    assert cache.get_seq_length() == 21  # the prompt and every new token but the last


# ----------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("kind, kv, exact", [("llama", {"bits": 4}, False), ("qwen2", {"bits": 8}, True),
                                             ("llama-tied", {"bits": 16}, True)])
@torch.no_grad()
def test_export_records_and_runs_the_kv_cache(tmp_path, kind, kv, exact):
    recipe = Recipe.from_name("quarot", kv_cache=kv)
    prepared, _ = prepare_export(tiny_model(kind), recipe, calibration=CALIB)
    write_export(prepared, tmp_path / "out", ExportConfig(), None)
    twin = round_like_export(prepared.model, ExportConfig())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    section, qc = config["lsr"], config["quantization_config"]
    assert section["format_version"] == 5 and Recipe.from_dict(section["recipe"]) == recipe
    entry = section["kv_cache"]
    assert {k: entry[k] for k in ("bits", "symmetric", "group_size", "clip_ratio", "r3", "head_dim")} == {
        "bits": kv["bits"], "symmetric": False, "group_size": HEAD_DIM if kv["bits"] < 16 else None,
        "clip_ratio": 0.95, "r3": True, "head_dim": HEAD_DIM}
    r3 = qc["transform_config"]["config_groups"]["R3"]
    assert r3["type"] == "hadamard" and r3["head_dim"] == HEAD_DIM
    assert [a["location"] for a in r3["apply"]] == ["q_attn", "k_cache"]
    if kv["bits"] < 16:
        assert {k: qc["kv_cache_scheme"][k] for k in ("num_bits", "symmetric", "strategy", "group_size", "dynamic")} \
            == {"num_bits": kv["bits"], "symmetric": False, "strategy": "group", "group_size": HEAD_DIM,
                "dynamic": True}
    else:
        assert qc.get("kv_cache_scheme") is None
    model = load_quantized(tmp_path / "out", backend="reference")
    attention = model.model.layers[0].self_attn
    assert isinstance(attention, QAttention) and attention.r3 and attention.kv_active
    ref, out = twin(IDS).logits, model(IDS).logits
    # KV4's coarse steps turn float-rounding differences of the integer linears into rare code flips
    assert (out - ref).abs().max().item() < (1e-5 if exact else 1e-2)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95
    cache = QuantizedKVCache()
    assert torch.equal(model(IDS, cache=cache, use_cache=True).logits, out)  # the reference cache, exactly
    tokens = model.generate(IDS[:1, :6], attention_mask=torch.ones(1, 6, dtype=torch.long), cache=QuantizedKVCache(),
                            max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert tokens.shape == (1, 11)


def test_transformers_and_compressed_tensors_still_read_a_kv_export(tmp_path):
    """The kv_cache_scheme and the R3 transform scheme keep the config readable by transformers + compressed-tensors,
    which decompress the weights to ours."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from lsr.export.quantized_linear import QuantizedLinear

    prepared, _ = prepare_export(tiny_model("llama"), Recipe.from_name("quarot", kv_cache={"bits": 4}),
                                 calibration=CALIB)
    write_export(prepared, tmp_path / "out", ExportConfig(), None)
    ours = load_quantized(tmp_path / "out", backend="reference")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(dequantize=True))
    linears = [(n, m) for n, m in ours.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 7 * TINY["num_hidden_layers"]
    for name, module in linears:
        assert torch.equal(hf.get_submodule(name).weight, module.dequantized_weight()), name


def test_export_kv_entry_is_checked(tmp_path):
    prepared, _ = prepare_export(tiny_model("llama"), Recipe.from_name("quarot", kv_cache={"bits": 4}),
                                 calibration=CALIB)
    path = tmp_path / "out"
    write_export(prepared, path, ExportConfig(), None)
    config = json.loads((path / "config.json").read_text())
    for key, value, match in (("head_dim", 16, "head_dim is 16"), ("bits", 1, "kv_cache.bits=1"),
                              ("r3_hadamard", {"m": 12, "k": 0}, "R3 was H_8")):
        broken = json.loads(json.dumps(config))
        broken["lsr"]["kv_cache"][key] = value
        (path / "config.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=match):
            load_quantized(path, backend="reference")


def test_generate_command(tmp_path, capsys):
    """`lsr generate` on a tiny export: streamed tokens, tokens/s and the cache's bytes per token per layer."""
    from lsr.cli import main
    from tests.conftest import save_tiny

    model_dir, _ = save_tiny(tmp_path)
    main(["export", str(model_dir), str(tmp_path / "exp"), "--recipe.name", "quarot", "--recipe.kv_cache.bits", "4"])
    out_json = tmp_path / "gen.json"
    main(["generate", str(tmp_path / "exp"), "--prompt", "w1 w2 w3 w4", "--max_new_tokens", "6",
          "--json", str(out_json)])
    printed = capsys.readouterr().out
    assert "KV4, R3" in printed and "tokens/s" in printed
    assert "28.0 bytes per token per layer, bf16: 64 (0.438x)" in printed
    report = json.loads(out_json.read_text())
    assert report["new_tokens"] == 6 and report["cache"] == "QuantizedKVCache"
    assert report["text"] and report["text"] in printed
    main(["generate", str(tmp_path / "exp"), "--prompt", "w1 w2 w3 w4", "--max_new_tokens", "6", "--variant",
          "fake_quant", "--json", str(out_json)])
    assert json.loads(out_json.read_text())["text"] == report["text"]  # the fake-quant model says the same
    main(["generate", str(tmp_path / "exp"), "--prompt", "w1 w2 w3 w4", "--max_new_tokens", "3", "--variant",
          "fp", "--json", str(out_json)])
    fp = json.loads(out_json.read_text())
    assert fp["cache"] == "DynamicCache" and fp["cache_bytes_per_token_per_layer"] == 2 * KV_HEADS * HEAD_DIM * 4


@torch.no_grad()
def test_refined_checkpoint_with_a_kv_cache_rebuilds_the_same_model(tmp_path):
    from lsr.checkpoint import CheckpointWriter, load_checkpoint
    from lsr.pipeline import apply_checkpoint

    recipe = Recipe.from_name("quantile", kv_cache={"bits": 4, "group_size": 4})
    writer = CheckpointWriter(tmp_path / "run", recipe, model="tiny", fingerprint="test",
                              num_blocks=TINY["num_hidden_layers"])
    first = apply_recipe(tiny_model("llama"), recipe, CALIB, writer=writer, log=None).model
    assert load_checkpoint(tmp_path / "run").recipe == recipe
    again = apply_checkpoint(tiny_model("llama"), tmp_path / "run").model
    assert torch.equal(first(IDS).logits, again(IDS).logits)
    assert again.model.layers[1].self_attn.kv_quant == QuantSpec(4, False, "group", 4, 0.95)
