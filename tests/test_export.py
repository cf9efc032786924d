"""Real INT4 export: packing, QuantizedLinear vs its fake-quant twin, export → load → logits, compressed-tensors
interop, refusal of damaged or inconsistent directories, no silent overwrite."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lsr.checkpoint import CheckpointWriter
from lsr.data.config import DataConfig
from lsr.export import (
    ExportConfig,
    check_exportable,
    export_model,
    load_quantized,
    prepare_export,
    round_like_export,
    write_export,
)
from lsr.export import format as fmt
from lsr.export.evaluate import LmEvalUnavailable, LoglikelihoodScorer, make_lm_eval_model
from lsr.export.quantized_linear import QuantizedLinear
from lsr.export.sizes import size_report
from lsr.export.writer import sha256_file
from lsr.hadamard import hadamard_transform
from lsr.kernels import pack_int4, quantize_per_token_int4, unpack_int4, w4a4_accumulate_reference
from lsr.metrics import perplexity
from lsr.models import load_tokenizer
from lsr.pipeline import apply_recipe
from lsr.quant.rtn import QuantSpec, quantize
from lsr.recipe import PRESETS, Recipe
from lsr.transforms.linear import QLinear
from tests.conftest import TINY, save_tiny, tiny_model

W4 = QuantSpec(bits=4, granularity="channel")
A4 = QuantSpec(bits=4, granularity="token")
IDS = torch.randint(0, TINY["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, TINY["vocab_size"], (8, 32), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def refined_dir(tmp_path_factory) -> Path:
    """A refined checkpoint of tiny_model("llama") saved to disk (quantile init, no learning), written by the block
    pipeline without Lightning."""
    root = tmp_path_factory.mktemp("refined")
    model_dir, _ = save_tiny(root)
    recipe = PRESETS["quantile"]
    writer = CheckpointWriter(root / "run", recipe, model=str(model_dir), fingerprint="test",
                              num_blocks=TINY["num_hidden_layers"])
    apply_recipe(tiny_model("llama"), recipe, CALIB, batch_size=4, writer=writer, log=None)
    return root / "run"


def as_old_format(path: Path, version: int) -> dict:
    """Rewrite a format-4 export in place as format ``version`` < 4 wrote it (no stored R4 tensor, no scheme);
    returns its config.json (written)."""
    config = json.loads((path / "config.json").read_text())
    section = config["lsr"]
    tensors = load_file(path / fmt.WEIGHTS_FILE)
    for transform in section["online_transforms"]:
        del tensors[transform.pop("tensor")]
        del transform["stored"]
    save_file(tensors, path / fmt.WEIGHTS_FILE, metadata={"format": "pt"})
    section["files"][fmt.WEIGHTS_FILE] = {"bytes": (path / fmt.WEIGHTS_FILE).stat().st_size,
                                          "sha256": sha256_file(path / fmt.WEIGHTS_FILE)}
    section["format_version"] = version
    del section["scheme"]
    (path / "config.json").write_text(json.dumps(config))
    return config


def _export_with_twin(out: Path, source="llama", recipe: Recipe | str | None = None, **overrides):
    """Export a tiny model (a kind of `tiny_model`, or a refined checkpoint directory) and return (directory, the
    fake-quant model holding exactly the exported values)."""
    config = ExportConfig(overwrite=True, **overrides)
    source = tiny_model(source) if source in ("llama", "llama-tied", "mistral", "qwen2") else source
    prepared, tokenizer = prepare_export(source, recipe, calibration=CALIB)
    write_export(prepared, out, config, tokenizer)
    return out, round_like_export(prepared.model, config)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, refined_dir):
    return _export_with_twin(tmp_path_factory.mktemp("exp") / "rtn", refined_dir)


# ----------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("cols", [2, 6, 48, 80, 50])
def test_pack_unpack_is_bit_exact(cols):
    gen = torch.Generator().manual_seed(cols)
    q = torch.randint(-8, 8, (5, cols), generator=gen, dtype=torch.int8)
    q[0, : min(cols, 16)] = torch.arange(-8, 8, dtype=torch.int8)[: min(cols, 16)]  # every nibble value
    packed = fmt.pack(q, 4)
    assert packed.dtype == torch.int32 and packed.shape == (5, fmt.packed_cols(cols, 4))
    assert torch.equal(fmt.unpack(packed, 4, (5, cols)), q)
    runtime = pack_int4(q)  # the kernels' uint8 [N, K/2] container, as the loader builds it
    assert torch.equal(unpack_int4(runtime), q)
    assert torch.equal(pack_int4(fmt.unpack(packed, 4, (5, cols))), runtime)
    q8 = torch.randint(-128, 128, (5, cols), generator=gen, dtype=torch.int8)
    assert torch.equal(fmt.unpack(fmt.pack(q8, 8), 8, (5, cols)), q8)


# ----------------------------------------------------------------------------------------------- one linear
@pytest.mark.parametrize("in_features, online", [(48, False), (80, True)])
def test_quantized_linear_equals_fake_quant_twin(in_features, online):
    gen = torch.Generator().manual_seed(in_features)
    fq = QLinear.from_linear(torch.nn.Linear(in_features, 24), online_hadamard=online)
    fq.act_quant, fq.weight_quant = A4, W4
    x = torch.randn(3, 7, in_features, generator=gen)
    x[..., 3] *= 30.0  # an outlier channel
    q_w, s_w, _ = quantize(fq.weight.detach(), W4)
    real = QuantizedLinear.from_int(q_w.to(torch.int8), s_w, fq.bias.detach(), online_hadamard=online,
                                    backend="reference")
    # integer parts: weight codes, activation codes, and the integer accumulators, exactly
    assert torch.equal(real.int_weight(), q_w.to(torch.int8))
    q_a, s_a = quantize_per_token_int4(x, hadamard=online)
    q_twin, s_twin, _ = quantize(hadamard_transform(x) if online else x, A4)
    assert torch.equal(q_a, q_twin.to(torch.int8))
    torch.testing.assert_close(s_a, s_twin.squeeze(-1), rtol=1e-6, atol=0)
    acc = w4a4_accumulate_reference(q_a.reshape(-1, in_features), real.packed_weight)
    exact = q_a.reshape(-1, in_features).double() @ q_w.double().T
    assert torch.equal(acc.double(), exact)
    # the rescaled output is the fake-quant output up to float32 rounding
    with torch.no_grad():
        torch.testing.assert_close(real(x), fq(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(real.dequantized_weight(), q_w * s_w)


def test_fake_quant_activation_codes_equal_kernel_codes_on_16bit_values():
    """rtn's ``absmax * ratio / qmax`` is the kernels' ``absmax / 7`` to the bit (``absmax * (1/7)`` differed by an
    ulp for about half the tokens and flipped exact .5 ties, frequent on 16-bit-valued inputs)."""
    x = torch.randn(512, 576, generator=torch.Generator().manual_seed(0)).half().float()
    q_kernel, _ = quantize_per_token_int4(x)
    q_fake, _, _ = quantize(x, A4)
    assert torch.equal(q_kernel, q_fake.to(torch.int8))


# ----------------------------------------------------------------------------------------------- whole model
@torch.no_grad()
def test_export_load_logits_match_fake_quant(exported):
    path, twin = exported
    model = load_quantized(path, backend="reference")
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 7 * TINY["num_hidden_layers"]
    assert [m.online_hadamard for m in linears].count(True) == TINY["num_hidden_layers"]
    ref, out = twin(IDS).logits, model(IDS).logits
    assert (out - ref).abs().max().item() < 1e-5, (out - ref).abs().max().item()
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    assert perplexity(model, IDS) == pytest.approx(perplexity(twin, IDS), rel=1e-5)


@torch.no_grad()
def test_export_with_activation_clip_matches_fake_quant(tmp_path):
    """A fixed activation clip travels through the export: the loaded INT4 model computes the fake-quant model's
    logits, and differs from the clip-1 export of the same model."""
    clipped = Recipe.from_name("quarot", activations={"bits": 4, "granularity": "token", "clip_ratio": 0.85})
    check_exportable(clipped)
    path, twin = _export_with_twin(tmp_path / "clip", "llama", clipped)
    section = json.loads((path / "config.json").read_text())["lsr"]
    assert section["activation_quantization"]["clip_ratio"] == 0.85
    assert Recipe.from_dict(section["recipe"]) == clipped
    model = load_quantized(path, backend="reference")
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert linears and all(m.act_clip == 0.85 for m in linears)
    ref, out = twin(IDS).logits, model(IDS).logits
    assert (out - ref).abs().max().item() < 1e-5, (out - ref).abs().max().item()
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    plain_path, plain_twin = _export_with_twin(tmp_path / "plain", "llama",
                                               Recipe.from_name("quarot", activations={"clip_ratio": 1.0}))
    plain = load_quantized(plain_path, backend="reference")(IDS).logits
    assert (plain - out).abs().max().item() > 1e-3
    assert (plain - plain_twin(IDS).logits).abs().max().item() < 1e-5
    # the clip is a QuantizedLinear attribute that state_dict carries
    fresh = QuantizedLinear(linears[0].in_features, linears[0].out_features, bias=linears[0].bias is not None)
    fresh.load_state_dict(linears[0].state_dict())
    assert fresh.act_clip == 0.85
    # an export written before the clip was recorded (format 1) reads as clip 1; an unknown format is refused
    config = json.loads((path / "config.json").read_text())
    assert config["lsr"]["format_version"] == 4
    assert config["lsr"]["activation_quantization"]["clip_ratios"] == {}  # nothing learned
    config["lsr"]["format_version"] = max(fmt.READABLE_VERSIONS) + 1  # a newer lsr's export
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"format_version {max(fmt.READABLE_VERSIONS) + 1}"):
        load_quantized(path, backend="reference", verify_checksums=False)
    config = as_old_format(path, 1)
    del config["lsr"]["activation_quantization"]["clip_ratio"]
    (path / "config.json").write_text(json.dumps(config))
    old = load_quantized(path, backend="reference")
    assert all(m.act_clip == 1.0 for m in old.modules() if isinstance(m, QuantizedLinear))
    config["lsr"]["activation_quantization"]["clip_ratio"] = 1.5
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="clip_ratio"):
        load_quantized(path, backend="reference")


@pytest.mark.parametrize("kind, recipe, overrides", [
    ("qwen2", "quarot-gptq", {}),  # q/k/v biases, GPTQ on post-Hadamard, act-quantized inputs
    ("mistral", "smoothrot-gptq", {}),
    ("llama", "quarot-gptaq", {}),
    ("llama-tied", "quarot", {"embeddings_8bit": True, "storage_dtype": "bfloat16"}),
])
@torch.no_grad()
def test_export_variants_match_fake_quant(tmp_path, kind, recipe, overrides):
    path, twin = _export_with_twin(tmp_path / "out", kind, recipe, **overrides)
    lsr = json.loads((path / "config.json").read_text())["lsr"]
    assert Recipe.from_dict(lsr["recipe"]) == PRESETS[recipe]
    method = PRESETS[recipe].weights.method
    assert lsr["weight_quantizer"]["name"] == method and ("alpha" in lsr["weight_quantizer"]) == (method == "gptaq")
    model = load_quantized(path, backend="reference")
    assert (model(IDS).logits - twin(IDS).logits).abs().max().item() < 1e-5


@torch.no_grad()
def test_learned_clips_travel_through_checkpoint_and_export(tmp_path):
    """Learned activation clips (per quantizer) and weight clips (per output channel): the refined checkpoint rebuilds
    the learned fake-quant model exactly, and its INT4 export computes the same logits with the learned clips."""
    from lsr.learn import LearnScales

    model_dir, _ = save_tiny(tmp_path)
    recipe = Recipe.from_name("lsr", learn={"epochs": 3})
    writer = CheckpointWriter(tmp_path / "run", recipe, model=str(model_dir), fingerprint="test",
                              num_blocks=TINY["num_hidden_layers"])
    with torch.enable_grad():
        learned = apply_recipe(tiny_model("llama"), recipe, CALIB, batch_size=4, writer=writer, log=None,
                               learner=LearnScales(recipe.learn, trainer={"accelerator": "cpu"}))
    clips = {n: float(m.act_clip) for n, m in learned.model.named_modules() if isinstance(m, QLinear)}
    assert len(clips) == 7 * TINY["num_hidden_layers"]
    assert all(0 < c < 1 for c in clips.values()) and any(abs(c - 0.9) > 1e-3 for c in clips.values())
    for i in range(TINY["num_hidden_layers"]):  # one clip per quantizer: q, k and v read one input
        qkv = {clips[f"model.layers.{i}.self_attn.{p}_proj"] for p in "qkv"}
        assert len(qkv) == 1
    path, twin = _export_with_twin(tmp_path / "int4", tmp_path / "run")
    ours = round_like_export(learned.model, ExportConfig())(IDS).logits
    assert (twin(IDS).logits - ours).abs().max().item() < 1e-5  # the checkpoint rebuilds the learned model
    section = json.loads((path / "config.json").read_text())["lsr"]
    assert section["activation_quantization"]["clip_ratios"] == clips
    int4 = load_quantized(path, backend="reference")
    assert {n: m.act_clip for n, m in int4.named_modules() if isinstance(m, QuantizedLinear)} == clips
    assert (int4(IDS).logits - twin(IDS).logits).abs().max().item() < 1e-5
    # the learned weight clips are in the codes: plain RTN of the same weights (searched clip) differs
    name = "model.layers.0.mlp.down_proj"
    plain, scale, _ = quantize(learned.weights[name].dequantize().reshape(48, -1), recipe.weights.spec)
    assert not torch.equal(scale.flatten(), learned.weights[name].scale.flatten())


def test_gptq_differs_from_rtn_and_sees_quantized_inputs(tmp_path, monkeypatch):
    from lsr.quant import gptq

    seen: list[torch.Tensor] = []
    original = gptq.HessianAccumulator.add
    monkeypatch.setattr(gptq.HessianAccumulator, "add", lambda self, x: (seen.append(x), original(self, x))[1])
    rtn, _ = prepare_export(tiny_model("llama"), "quarot", calibration=CALIB)
    assert not seen  # RTN calibrates nothing
    unclipped = Recipe.from_name("quarot-gptq", activations={"clip_ratio": 1.0})  # max|x| is then 7·scale
    gp, _ = prepare_export(tiny_model("llama"), unclipped, calibration=CALIB)
    name = "model.layers.1.mlp.down_proj"
    assert not torch.equal(rtn.weights[name].q, gp.weights[name].q)
    assert seen
    for x in seen:  # every Hessian input is per-token int4 fake-quantized: x / (max|x| / 7) is an integer
        codes = x / (x.abs().amax(-1, keepdim=True) / 7)
        torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)


def test_gptq_groups_are_fake_quant_only(tmp_path):
    groups = Recipe.from_name("quarot-gptq", weights={"gptq": {"group_size": 16, "act_order": True}})
    with pytest.raises(ValueError, match="one scale per output channel"):
        prepare_export(tiny_model("llama"), groups, calibration=CALIB)
    with pytest.raises(ValueError, match="one scale per output channel"):
        export_model(tiny_model("llama"), tmp_path / "out", recipe=groups, calibration=CALIB)
    assert not (tmp_path / "out").exists()
    prepared, _ = prepare_export(tiny_model("llama"), groups, calibration=CALIB, check=False)
    weight = prepared.weights["model.layers.0.mlp.down_proj"]
    assert weight.scale.shape == (48, 80 // 16)
    with torch.no_grad():
        assert torch.isfinite(round_like_export(prepared.model, ExportConfig())(IDS).logits).all()
    with pytest.raises(ValueError, match="weight groups; the export needs one scale per channel"):
        write_export(prepared, tmp_path / "out", ExportConfig())  # the writer refuses them too
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recipe, match", [
    (Recipe.from_name("quarot", activations={"clip_search": True, "clip_ratio": 1.0}), "needs a fixed clip ratio"),
    (Recipe.from_name("quarot", activations={"symmetric": False}), "needs symmetric int4 per token"),
    (Recipe.from_name("quarot", activations={"bits": 8}), "quantizes activations"),
    (Recipe.from_name("quarot", activations={"granularity": "tensor"}), "quantizes activations"),
    (Recipe.from_name("quarot", weights={"spec": {"bits": 3}}), "symmetric 4-bit weights"),
    (Recipe.from_name("quarot", weights={"spec": {"symmetric": False, "clip_search": False}}), "symmetric 4-bit"),
    (Recipe.from_name("quarot", weights={"spec": {"granularity": "group", "group_size": 16}}), "one scale per"),
], ids=["act-clip-search", "act-asym", "act-bits", "act-tensor", "w-bits", "w-asym", "w-groups"])
def test_what_the_int4_runtime_cannot_hold_is_refused(tmp_path, recipe, match):
    with pytest.raises(ValueError, match=match):
        check_exportable(recipe)
    with pytest.raises(ValueError, match=match):
        export_model(tiny_model("llama"), tmp_path / "out", recipe=recipe, calibration=CALIB)
    assert not (tmp_path / "out").exists()


def test_sources_and_recipes_are_checked(refined_dir):
    with pytest.raises(ValueError, match="refined checkpoint with its own recipe"):
        prepare_export(str(refined_dir), "quarot")
    with pytest.raises(ValueError, match="learns its scales: run `lsr fit`"):
        prepare_export(tiny_model("llama"), "lsr", calibration=CALIB)
    with pytest.raises(ValueError, match="calibrates: pass calibration windows or a tokenizer"):
        prepare_export(tiny_model("llama"), "quantile")
    with pytest.raises(ValueError, match="not a preset"):
        prepare_export(tiny_model("llama"), "gptq-only")


@torch.no_grad()
def test_export_from_a_model_directory_with_data(tmp_path):
    """A saved model and a recipe that calibrates: windows come from `data` through the model's tokenizer."""
    model_dir, text = save_tiny(tmp_path)
    data = DataConfig(source=str(text), seq_len=32, num_calibration=4, cache_dir=str(tmp_path / "cache"))
    result = export_model(str(model_dir), tmp_path / "out", recipe="smoothrot", data=data)
    assert Recipe.from_dict(result.lsr["recipe"]) == PRESETS["smoothrot"]
    assert result.lsr["source"] == {"model": str(model_dir)}
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    windows = data.calibration_windows(load_tokenizer(str(model_dir)))
    prepared, _ = prepare_export(str(model_dir), "smoothrot", calibration=windows)
    twin = round_like_export(prepared.model, ExportConfig())
    model = load_quantized(tmp_path / "out", backend="reference")
    assert (model(IDS).logits - twin(IDS).logits).abs().max().item() < 1e-5


# ----------------------------------------------------------------------------------------------- format
def test_config_and_sizes(exported, refined_dir):
    path, _ = exported
    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["ignore"] == ["lm_head"] and set(qc["config_groups"]) == {fmt.W4A4_GROUP}
    group = qc["config_groups"][fmt.W4A4_GROUP]
    assert (group["weights"]["num_bits"], group["weights"]["strategy"], group["weights"]["dynamic"]) == (4, "channel",
                                                                                                        False)
    act = group["input_activations"]
    assert (act["num_bits"], act["strategy"], act["dynamic"], act["symmetric"]) == (4, "token", True, True)
    r4 = qc["transform_config"]["config_groups"]["R4"]
    assert r4["type"] == "lsr-hadamard" and r4["apply"][0]["location"] == "input"  # 80 = 20·4: not Sylvester
    lsr = config["lsr"]
    assert {k: lsr["online_transforms"][0][k] for k in ("size", "m", "k")} == {"size": 80, "m": 20, "k": 2}
    assert lsr["recipe"]["name"] == "quantile" and lsr["source"]["refined"] == str(refined_dir)
    assert Recipe.from_dict(lsr["recipe"]) == PRESETS["quantile"]  # the recipe the checkpoint was made with
    assert lsr["weight_quantizer"] == {"name": "rtn"}
    assert config["tie_word_embeddings"] is False
    tensors = load_file(path / fmt.WEIGHTS_FILE)
    assert tensors["model.layers.0.mlp.down_proj.weight_packed"].dtype == torch.int32
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].shape == (48, 1)
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    sizes = size_report(path)
    assert sizes["decoder_linear_ratio"] < 0.27 + 4 / 48  # tiny K: float32 scales weigh 4 B per 48-column row
    assert sizes["decoder_linear_fp16_bytes"] == 2 * sum(
        t.shape[0] * t.shape[1] * 8 for k, t in tensors.items() if k.endswith("weight_packed"))


def test_power_of_two_r4_uses_compressed_tensors_hadamard():
    """For n = 2^k lsr's H is compressed-tensors' normalised Sylvester matrix: the registered type is exact."""
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    from lsr.hadamard import hadamard_matrix

    assert fmt.r4_transform_config(64).config_groups["R4"].type == "hadamard"
    ct = deterministic_hadamard_matrix(64, torch.float64) / 8.0
    assert torch.equal(ct, hadamard_matrix(64, dtype=torch.float64))


def test_compressed_tensors_decompresses_to_our_values(exported, tmp_path):
    """compressed-tensors reads our config (its own pydantic schema and name matching) and decompresses every
    quantized tensor to exactly our dequantized values, through transformers' loader and its per-module API."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path, _ = exported
    ours = load_quantized(path, backend="reference")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, module in ours.named_modules():
        if isinstance(module, QuantizedLinear):
            assert torch.equal(hf.get_submodule(name).weight, module.dequantized_weight()), name
    assert torch.equal(hf.lm_head.weight, ours.lm_head.weight)

    path8, _ = _export_with_twin(tmp_path / "e8", embeddings_8bit=True)
    ours8 = load_quantized(path8, backend="reference")
    qc = json.loads((path8 / "config.json").read_text())["quantization_config"]
    qconfig = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k not in
                                                 ("version", "sparsity_config", "transform_config")})
    tensors = load_file(path8 / fmt.WEIGHTS_FILE)
    checked = 0
    for name, module in hf.named_modules():  # same architecture: its modules give names and types to match

        schemes = [s for s in qconfig.config_groups.values() if is_match(name, module, s.targets, qconfig.ignore)]
        if not schemes:
            continue
        compressor = BaseCompressor.get_value_from_registry(schemes[0].format)
        state = {p: tensors[f"{name}.{p}"] for p in compressor.compression_param_names(schemes[0])}
        weight = compressor.decompress(state, schemes[0])["weight"]
        assert torch.equal(weight, ours8.get_submodule(name).dequantized_weight()), name
        checked += 1
    assert checked == 7 * TINY["num_hidden_layers"] + 2  # + embedding and lm_head, int8


# ----------------------------------------------------------------------------------------------- refusals
def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def test_truncated_or_corrupt_file_is_refused(exported, tmp_path):
    path, _ = exported
    weights = (path / fmt.WEIGHTS_FILE).read_bytes()
    truncated = _copy(path, tmp_path / "truncated")
    (truncated / fmt.WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        load_quantized(truncated)
    corrupt = _copy(path, tmp_path / "corrupt")
    flipped = bytearray(weights)
    flipped[len(flipped) // 2] ^= 0xFF
    (corrupt / fmt.WEIGHTS_FILE).write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="model.safetensors.*SHA-256"):
        load_quantized(corrupt)
    # without the manifest check, safetensors' own error is re-raised naming the file
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        config = json.loads((truncated / "config.json").read_text())
        del config["lsr"]["files"]
        (truncated / "config.json").write_text(json.dumps(config))
        load_quantized(truncated)
    garbage = _copy(path, tmp_path / "garbage")
    (garbage / fmt.WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + weights[24:])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_quantized(garbage, verify_checksums=False)


def _edit_config(src: Path, dst: Path, edit) -> Path:
    out = _copy(src, dst)
    config = json.loads((out / "config.json").read_text())
    edit(config)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_config_that_does_not_match_tensors_is_refused(exported, tmp_path):
    path, _ = exported
    wider = _edit_config(path, tmp_path / "wider", lambda c: c.update(intermediate_size=96))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.(gate|up|down)_proj\.\w+ .*does not match"):
        load_quantized(wider)
    eight = _edit_config(path, tmp_path / "eight", lambda c: c["quantization_config"]["config_groups"][
        fmt.W4A4_GROUP]["weights"].update(num_bits=8))
    with pytest.raises(ValueError, match="not supported by lsr's runtime"):
        load_quantized(eight)
    fewer = _edit_config(path, tmp_path / "fewer", lambda c: c.update(num_hidden_layers=1))
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.1\."):
        load_quantized(fewer)
    # a tensor missing from the file (with a manifest that matches the damaged file)
    missing = _copy(path, tmp_path / "missing")
    tensors = load_file(missing / fmt.WEIGHTS_FILE)
    del tensors["model.layers.1.self_attn.k_proj.weight_scale"]
    save_file(tensors, missing / fmt.WEIGHTS_FILE, metadata={"format": "pt"})
    config = json.loads((missing / "config.json").read_text())
    config["lsr"]["files"][fmt.WEIGHTS_FILE] = {"bytes": (missing / fmt.WEIGHTS_FILE).stat().st_size,
                                                "sha256": sha256_file(missing / fmt.WEIGHTS_FILE)}
    (missing / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.1\.self_attn\.k_proj\.weight_scale is missing"):
        load_quantized(missing)


def test_export_never_overwrites_unless_asked(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_model(tiny_model("llama"), target)
    assert (target / "keep.txt").read_text() == "precious"
    export_model(tiny_model("llama"), target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "config.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or backup directory left behind
    load_quantized(target)


def test_cli_parsers(tmp_path):
    from lsr.cli import build_config, main, parse

    command, cfg = parse(["export", "src", "out", "--recipe.name", "quarot-gptq", "--recipe.weights.gptq.act_order",
                          "true", "--recipe.weights.gptq.damp", "0.05", "--export.embeddings_8bit", "true",
                          "--data.num_calibration", "4"])
    assert (command, cfg["source"], cfg["out_dir"]) == ("export", "src", "out")
    expected = Recipe.from_name("quarot-gptq", weights={"gptq": {"act_order": True, "damp": 0.05}})
    assert build_config(Recipe, cfg["recipe"]) == expected
    assert build_config(ExportConfig, cfg["export"]) == ExportConfig(embeddings_8bit=True)
    assert cfg["data"]["num_calibration"] == 4
    command, cfg = parse(["eval", "dir", "--data.seq_len", "128", "--data.max_eval_windows", "3", "--tasks", "a,b"])
    assert (command, cfg["path"], cfg["data"]["seq_len"], cfg["data"]["max_eval_windows"], cfg["tasks"]) == (
        "eval", "dir", 128, 3, "a,b")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit, match="lsr export: .* exists; pass overwrite"):
        main(["export", "smollm2", str(tmp_path)])  # refused before anything is loaded
    with pytest.raises(SystemExit, match="lsr eval: .*no config.json"):
        main(["eval", str(tmp_path)])
    with pytest.raises(SystemExit, match="lsr export: .*learns its scales"):
        main(["export", "smollm2", str(tmp_path / "out"), "--recipe.name", "lsr"])


# ----------------------------------------------------------------------------------------------- evaluation
class _CharTokenizer:
    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [3 + (ord(c) % 90) for c in text]}


@torch.no_grad()
def test_loglikelihood_scorer(exported):
    path, _ = exported
    model = load_quantized(path, backend="reference")
    scorer = LoglikelihoodScorer(model, _CharTokenizer(), max_length=64)
    ctx, cont = scorer.encode_pair("the cat ", "sat")
    assert (len(ctx), len(cont)) == (7, 4)  # the context's trailing space moves to the continuation
    logp, _ = scorer.loglikelihood([("the cat ", "sat")])[0]
    ids = torch.tensor([ctx + cont])
    manual = torch.log_softmax(model(ids[:, :-1]).logits[0, -4:], -1).gather(-1, ids[0, -4:, None]).sum()
    assert logp == pytest.approx(manual.item(), rel=1e-5)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        with pytest.raises(LmEvalUnavailable, match="lm-eval is not installed"):
            make_lm_eval_model(model, _CharTokenizer())
