"""Serving an export with vLLM: the stored R4 matrix, the W4A4 / W4A16 / W4A8 schemes, the vLLM loading contract
(no vLLM import) and a CPU round trip through transformers + compressed-tensors (no lsr code on the loading side)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from lsr.export import ExportConfig, load_quantized, prepare_export, round_like_export, write_export
from lsr.export import format as fmt
from lsr.export.quantized_linear import QuantizedLinear
from lsr.export.vllm_contract import check_vllm_contract, vllm_scheme
from lsr.export.writer import sha256_file
from lsr.hadamard import hadamard_transform
from lsr.recipe import Recipe
from tests.conftest import TINY, tiny_model
from tests.ct_consumer import load_with_compressed_tensors, online_only
from tests.test_export import CALIB, IDS, as_old_format

LAYERS = TINY["num_hidden_layers"]
R4_NAME = "model.layers.0.mlp.down_proj.R4_input.weight"
VLLM_CLASS = {"w4a4": "CompressedTensorsWNA4Int", "w4a16": "CompressedTensorsWNA16",
              "w4a8": "CompressedTensorsWNA8Int"}


def tiny_pow2() -> torch.nn.Module:
    """A tiny LLaMA whose MLP width is a power of two (64): R4 is compressed-tensors' / vLLM's ``hadamard``."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "intermediate_size": 64}, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prepared():
    """quarot-gptq applied once to each tiny kind (``block``: LLaMA with the block-diagonal R4); every scheme is
    written from the same prepared model."""
    models = {"llama": tiny_model("llama"), "qwen2": tiny_model("qwen2"), "pow2": tiny_pow2(),
              "block": tiny_model("llama")}
    recipes = {kind: Recipe.from_name("quarot-gptq", rotate={"r4": "block-diagonal"} if kind == "block" else {})
               for kind in models}
    return {kind: prepare_export(model, recipes[kind], calibration=CALIB) for kind, model in models.items()}


def _write(prepared, tmp_path: Path, kind: str, scheme: str, **overrides) -> tuple[Path, torch.nn.Module]:
    """Export ``kind`` with ``scheme``; returns the directory and the fake-quant twin of that export."""
    model, tokenizer = prepared[kind]
    config = ExportConfig(scheme=scheme, overwrite=True, **overrides)
    out = tmp_path / f"{kind}-{scheme}"
    write_export(model, out, config, tokenizer)
    twin = copy.deepcopy(model.model)
    return out, round_like_export(twin, config)


def _rewrite(path: Path, tensors: dict | None = None, edit=None) -> None:
    """Replace the weights file (manifest updated, so only the checks under test can object) and/or edit config."""
    config = json.loads((path / "config.json").read_text())
    if tensors is not None:
        save_file(tensors, path / fmt.WEIGHTS_FILE, metadata={"format": "pt"})
        config["lsr"]["files"][fmt.WEIGHTS_FILE] = {"bytes": (path / fmt.WEIGHTS_FILE).stat().st_size,
                                                    "sha256": sha256_file(path / fmt.WEIGHTS_FILE)}
    if edit is not None:
        edit(config)
    (path / "config.json").write_text(json.dumps(config))


# ----------------------------------------------------------------------------------------------- the R4 tensor
@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_r4_tensor_is_what_vllm_multiplies_by(prepared, tmp_path, storage):
    path, _ = _write(prepared, tmp_path, "llama", "w4a4", storage_dtype=storage)
    tensors = load_file(path / fmt.WEIGHTS_FILE)
    r4 = {k: v for k, v in tensors.items() if "R4_input" in k}
    assert list(r4) == [R4_NAME]  # one shared copy, under the first down_proj
    w = r4[R4_NAME]
    n = TINY["intermediate_size"]
    assert w.dtype == getattr(torch, storage) and w.shape == (n, n)
    assert bool((w.float().abs() == 1).all())  # unnormalised ±1
    h = hadamard_transform(torch.eye(n, dtype=torch.float64))  # lsr's x·H on the identity: H
    assert torch.equal(w.double(), h * math.sqrt(n))  # exactly, in float64
    # vLLM: W / sqrt(n) in the model dtype after loading, then the dense fallback computes linear(x, W.T) = x·W
    w16 = w.half().div_(math.sqrt(n))
    torch.testing.assert_close(w16, h.half(), atol=1e-3, rtol=0)  # fp16 tolerance
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(0))
    vllm = F.linear(x.half().float(), w16.float().T)  # fp16 operands, float accumulation (a GEMM's)
    torch.testing.assert_close(vllm, hadamard_transform(x.half().float()), atol=3e-3, rtol=3e-3)
    section = json.loads((path / "config.json").read_text())["lsr"]
    assert section["format_version"] == 4 and section["online_transforms"][0]["tensor"] == R4_NAME


def test_power_of_two_r4_is_hadamard_and_compressed_tensors_own_matrix(prepared, tmp_path):
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    path, _ = _write(prepared, tmp_path, "pow2", "w4a16")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["transform_config"]["config_groups"]["R4"]["type"] == "hadamard"  # vLLM: HadaCore
    w = load_file(path / fmt.WEIGHTS_FILE)[R4_NAME]
    assert torch.equal(w.double(), deterministic_hadamard_matrix(64, torch.float64))
    contract = check_vllm_contract(path)
    assert {v[:3] for v in contract.transforms.values()} == {("R4", "hadamard", 64)}


def test_block_diagonal_r4_is_hadacores_matrix_per_block(prepared, tmp_path):
    """``rotate.r4: block-diagonal`` on 80 = 5 · 2^4 channels: ``I_5 ⊗ H_16``, in compressed-tensors' schema
    ``type: hadamard`` with ``head_dim: 16`` (vLLM: HadaCore per block), one stored ±1 Sylvester ``[16, 16]``, format 6;
    an older format claiming a block is refused (an lsr without blocks would apply one Hadamard of all 80)."""
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    path, twin = _write(prepared, tmp_path, "block", "w4a4")
    config = json.loads((path / "config.json").read_text())
    r4 = config["quantization_config"]["transform_config"]["config_groups"]["R4"]
    assert (r4["type"], r4["head_dim"]) == ("hadamard", 16)
    entry = config["lsr"]["online_transforms"][0]
    assert (entry["size"], entry["block"], entry["m"], entry["k"]) == (TINY["intermediate_size"], 16, 1, 4)
    assert config["lsr"]["format_version"] == fmt.BLOCK_R4_VERSION == 6
    w = load_file(path / fmt.WEIGHTS_FILE)[R4_NAME]
    assert torch.equal(w.double(), deterministic_hadamard_matrix(16, torch.float64))
    contract = check_vllm_contract(path)
    assert {v[:3] for v in contract.transforms.values()} == {("R4", "hadamard", 16)}
    assert contract.tensors[R4_NAME] == ("float", (16, 16))
    model = load_quantized(path, backend="reference")
    assert {m.hadamard_block for m in model.modules() if isinstance(m, QuantizedLinear) and m.online_hadamard} == {16}
    assert (model(IDS).logits - twin(IDS).logits).abs().max().item() < 1e-5
    _rewrite(path, edit=lambda c: c["lsr"].update(format_version=5))
    with pytest.raises(ValueError, match="block-diagonal online transform in a format 5 export"):
        load_quantized(path)


def test_export_of_an_unrotated_model_is_refused(tmp_path):
    unrotated, _ = prepare_export(tiny_model("llama"), Recipe(name="rtn-only", rotate=None), calibration=CALIB)
    with pytest.raises(ValueError, match="use a recipe with the rotate step"):
        write_export(unrotated, tmp_path / "x", ExportConfig(overwrite=True), None)


# ----------------------------------------------------------------------------------------------- schemes
@pytest.mark.parametrize("scheme", ["w4a4", "w4a16", "w4a8"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "block"])
@torch.no_grad()
def test_each_scheme_reloads_and_matches_its_fake_quant_twin(prepared, tmp_path, kind, scheme):
    path, twin = _write(prepared, tmp_path, kind, scheme)
    config = json.loads((path / "config.json").read_text())
    group = config["quantization_config"]["config_groups"][fmt.W4A4_GROUP]
    acts = group["input_activations"]
    assert (acts["num_bits"] if acts else None) == fmt.ACT_BITS[scheme]
    assert group["weights"]["num_bits"] == 4 and group["format"] == "pack-quantized"
    assert config["lsr"]["scheme"] == scheme
    model = load_quantized(path, backend="reference")
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 7 * LAYERS and {m.act_bits for m in linears} == {fmt.ACT_BITS[scheme]}
    diff = (model(IDS).logits - twin(IDS).logits).abs()
    if scheme != "w4a8":
        assert diff.max().item() < 1e-5, diff.max().item()
    else:  # integer sums rescaled vs float products: float32 rounding flips a few of int8's 255 levels (see below)
        assert diff.max().item() < 5e-3 and (diff > 1e-5).float().mean().item() < 0.05, diff.max().item()


@torch.no_grad()
def test_w4a8_linear_is_its_fake_quant_twin_in_integers():
    """One linear: the int8 activation codes and the integer accumulators are the fake-quant twin's exactly; the
    output differs by float32 rounding only (which, across layers, flips the odd int8 code at a rounding boundary)."""
    from lsr.quant.rtn import QuantSpec, quantize
    from lsr.transforms.linear import QLinear

    gen = torch.Generator().manual_seed(4)
    fq = QLinear.from_linear(torch.nn.Linear(80, 24), online_hadamard=True)
    fq.act_quant, fq.weight_quant = QuantSpec(bits=8, granularity="token"), QuantSpec(bits=4, granularity="channel")
    x = torch.randn(3, 7, 80, generator=gen)
    x[..., 3] *= 30.0
    q_w, s_w, _ = quantize(fq.weight.detach(), fq.weight_quant)
    real = QuantizedLinear.from_int(q_w.to(torch.int8), s_w, fq.bias.detach(), online_hadamard=True, act_bits=8)
    torch.testing.assert_close(real(x), fq(x), rtol=1e-5, atol=1e-5)
    from lsr.export.quantized_linear import quantize_per_token_int8

    q_a, s_a = quantize_per_token_int8(hadamard_transform(x.reshape(-1, 80)))
    q_twin, s_twin, _ = quantize(hadamard_transform(x.reshape(-1, 80)), fq.act_quant)
    assert torch.equal(q_a, q_twin) and torch.equal(s_a, s_twin.squeeze(-1))
    assert (q_a.abs() > 7).any()  # int8 codes: beyond int4's range


@torch.no_grad()
def test_schemes_share_weights_and_differ_in_activations(prepared, tmp_path):
    paths = {s: _write(prepared, tmp_path, "llama", s)[0] for s in ("w4a4", "w4a16", "w4a8")}
    files = {s: load_file(p / fmt.WEIGHTS_FILE) for s, p in paths.items()}
    assert files["w4a4"].keys() == files["w4a16"].keys() == files["w4a8"].keys()
    for key, tensor in files["w4a4"].items():  # same codes, scales, R4 and float tensors
        assert torch.equal(tensor, files["w4a16"][key]) and torch.equal(tensor, files["w4a8"][key]), key
    logits = {s: load_quantized(p, backend="reference")(IDS).logits for s, p in paths.items()}
    w4a16_vs = {s: (logits[s] - logits["w4a16"]).abs().max().item() for s in ("w4a4", "w4a8")}
    assert w4a16_vs["w4a8"] < w4a16_vs["w4a4"] / 4, w4a16_vs  # int8 activations are 16x finer than int4
    assert w4a16_vs["w4a8"] > 0 and w4a16_vs["w4a4"] > 1e-3, w4a16_vs
    activation = json.loads((paths["w4a8"] / "config.json").read_text())["lsr"]["activation_quantization"]
    assert (activation["bits"], activation["clip_ratio"], activation["clip_ratios"]) == (8, 1.0, {})
    assert json.loads((paths["w4a16"] / "config.json").read_text())["lsr"]["activation_quantization"] is None


def test_w4a8_activation_codes_are_rtn_int8(tmp_path):
    from lsr.export.quantized_linear import quantize_per_token_int8
    from lsr.quant.rtn import QuantSpec, quantize

    x = torch.randn(64, 80, generator=torch.Generator().manual_seed(3)).half().float()
    x[:, 5] *= 40.0
    q, scale = quantize_per_token_int8(x)
    q_ref, s_ref, _ = quantize(x, QuantSpec(bits=8, granularity="token"))
    assert torch.equal(q, q_ref) and torch.equal(scale, s_ref.squeeze(-1))
    assert q.abs().max().item() == 127 and q.min().item() >= -128


def test_scheme_option_is_checked_and_parsed():
    from lsr.cli import build_config, parse

    with pytest.raises(ValueError, match="export.scheme='w4a2' is invalid"):
        ExportConfig(scheme="w4a2")
    _, cfg = parse(["export", "src", "out", "--export.scheme", "w4a16"])
    assert build_config(ExportConfig, cfg["export"]) == ExportConfig(scheme="w4a16")


def test_w4a16_and_w4a8_accept_recipes_whose_activations_w4a4_cannot_hold(tmp_path):
    from lsr.recipe import Recipe

    searched = Recipe.from_name("quarot", activations={"clip_search": True, "clip_ratio": 1.0})
    with pytest.raises(ValueError, match="fixed clip ratio"):
        prepare_export(tiny_model("llama"), searched, calibration=CALIB)
    for scheme in ("w4a16", "w4a8"):
        model, tokenizer = prepare_export(tiny_model("llama"), searched, calibration=CALIB, scheme=scheme)
        write_export(model, tmp_path / scheme, ExportConfig(scheme=scheme), tokenizer)
        assert load_quantized(tmp_path / scheme, backend="reference")(IDS).logits.isfinite().all()


# ----------------------------------------------------------------------------------------------- lsr refuses
@torch.no_grad()
def test_export_without_its_r4_tensor_is_refused_and_old_formats_load(prepared, tmp_path):
    path, twin = _write(prepared, tmp_path, "llama", "w4a4")
    tensors = load_file(path / fmt.WEIGHTS_FILE)
    r4 = tensors.pop(R4_NAME)
    _rewrite(path, tensors)
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.R4_input\.weight is missing"):
        load_quantized(path)
    flipped = r4.clone()
    flipped[3, 7] *= -1
    _rewrite(path, {**tensors, R4_NAME: flipped})
    with pytest.raises(ValueError, match="is not lsr's ±1 Hadamard"):
        load_quantized(path)
    _rewrite(path, {**tensors, R4_NAME: r4 / math.sqrt(r4.shape[0])})  # normalised: vLLM would divide again
    with pytest.raises(ValueError, match="is not lsr's ±1 Hadamard"):
        load_quantized(path)
    _rewrite(path, {**tensors, R4_NAME: r4}, edit=lambda c: c["quantization_config"]["transform_config"][
        "config_groups"]["R4"].update(type="hadamard"))  # HadaCore's Sylvester matrix is not H_20 ⊗ S_4
    with pytest.raises(ValueError, match="transform_config is not the R4"):
        load_quantized(path)
    _rewrite(path, edit=lambda c: c["quantization_config"]["transform_config"]["config_groups"]["R4"].update(
        type="lsr-hadamard"))
    ref = load_quantized(path, backend="reference")(IDS).logits
    assert (ref - twin(IDS).logits).abs().max().item() < 1e-5
    as_old_format(path, 3)  # what formats 1-3 wrote: no tensor; still loads, same numbers
    assert torch.equal(load_quantized(path, backend="reference")(IDS).logits, ref)
    with pytest.raises(ValueError, match="no R4 transform tensor of size 80"):
        check_vllm_contract(path)  # ... but vLLM would run it on uninitialised memory


# ----------------------------------------------------------------------------------------------- vLLM contract
@pytest.mark.parametrize("scheme", ["w4a4", "w4a16", "w4a8"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_vllm_contract(prepared, tmp_path, kind, scheme):
    from compressed_tensors.quantization import QuantizationArgs

    path, _ = _write(prepared, tmp_path, kind, scheme)
    contract = check_vllm_contract(path)
    decoder = {n: c for n, c in contract.schemes.items() if n != "lm_head"}
    assert len(decoder) == 7 * LAYERS and set(decoder.values()) == {VLLM_CLASS[scheme]}
    assert contract.schemes["lm_head"] == "unquantized"
    header = load_file(path / fmt.WEIGHTS_FILE)
    assert set(contract.tensors) == set(header)  # every tensor vLLM creates is there, and nothing else
    down = "model.layers.1.mlp.down_proj"
    k = TINY["intermediate_size"]
    assert contract.tensors[f"{down}.weight_packed"] == ("int32", (48, k // 8))
    assert header[f"{down}.weight_packed"].dtype == torch.int32
    assert contract.tensors[f"{down}.weight_scale"].shape == header[f"{down}.weight_scale"].shape == (48, 1)
    assert header[f"{down}.weight_shape"].dtype == torch.int64 and header[f"{down}.weight_shape"].tolist() == [48, k]
    assert contract.transforms == {f"model.layers.{i}.mlp.down_proj": (
        "R4", "lsr-hadamard", k, f"model.layers.{i}.mlp.down_proj.R4_input.weight") for i in range(LAYERS)}
    assert contract.tensors[R4_NAME] == ("float", (k, k)) and header[R4_NAME].dtype == torch.float16
    # the predicate itself, on the group's own args: what routes the layer, and what would not
    group = json.loads((path / "config.json").read_text())["quantization_config"]["config_groups"][fmt.W4A4_GROUP]
    w = QuantizationArgs.model_validate(group["weights"])
    a = QuantizationArgs.model_validate(group["input_activations"]) if group["input_activations"] else None
    assert vllm_scheme(w, a, None, "pack-quantized") == VLLM_CLASS[scheme]
    if a is not None:
        assert vllm_scheme(w, a, None, "int-quantized") is None  # compressed-tensors' inferred format: no route
        assert vllm_scheme(w, a.model_copy(update={"dynamic": False}), None, "pack-quantized") is None
        assert vllm_scheme(w, a.model_copy(update={"symmetric": False}), None, "pack-quantized") is None


def test_vllm_contract_catches_what_vllm_would_not_load(prepared, tmp_path):
    path, _ = _write(prepared, tmp_path, "llama", "w4a4")
    tensors = load_file(path / fmt.WEIGHTS_FILE)
    _rewrite(path, {**tensors, "model.layers.1.mlp.down_proj.R4_input.weight": tensors[R4_NAME].clone()})
    check_vllm_contract(path)  # a second copy of a shared tensor is a parameter vLLM has: fine
    _rewrite(path, {**tensors, "model.layers.0.mlp.down_proj.extra": tensors[R4_NAME].clone()})
    with pytest.raises(ValueError, match="down_proj.extra .* matches no parameter vLLM creates"):
        check_vllm_contract(path)
    _rewrite(path, {**tensors, R4_NAME: tensors[R4_NAME] / math.sqrt(80)})
    with pytest.raises(ValueError, match="entries are not ±1"):
        check_vllm_contract(path)
    _rewrite(path, {**tensors, "model.layers.0.mlp.up_proj.weight_scale": tensors[
        "model.layers.0.mlp.up_proj.weight_scale"].reshape(1, -1)})
    with pytest.raises(ValueError, match=r"up_proj\.weight_scale is torch.float32 \[1, 80\], vLLM creates float"):
        check_vllm_contract(path)
    _rewrite(path, tensors, edit=lambda c: c["quantization_config"]["transform_config"]["config_groups"][
        "R4"].update(type="hadamard"))
    with pytest.raises(ValueError, match="HadaCore, which needs a power of two"):
        check_vllm_contract(path)


# ----------------------------------------------------------------------------------------------- CPU round trip
@pytest.mark.parametrize("scheme", ["w4a4", "w4a16", "w4a8"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "pow2", "block"])
@torch.no_grad()
def test_compressed_tensors_round_trip_matches_lsr(prepared, tmp_path, kind, scheme):
    """transformers + compressed-tensors (no lsr code) load the export, apply its online R4 with the stored matrix,
    and compute lsr's logits with activation quantization off on both sides."""
    path, _ = _write(prepared, tmp_path, kind, scheme)
    consumer, copied = load_with_compressed_tensors(path)
    assert copied == {f"model.layers.{i}.mlp.down_proj.R4_input" for i in range(LAYERS)}
    ours = load_quantized(path, backend="reference")
    for module in ours.modules():
        if isinstance(module, QuantizedLinear):
            module.act_bits = None
    theirs, mine = consumer(IDS).logits, ours(IDS).logits
    assert (theirs - mine).abs().max().item() < 2e-5 * max(1.0, mine.abs().max().item())
    assert torch.equal(theirs.argmax(-1), mine.argmax(-1))


@torch.no_grad()
def test_round_trip_fails_without_the_stored_matrix_or_with_the_fused_entry_applied_again(prepared, tmp_path):
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from transformers import CompressedTensorsConfig

    path, _ = _write(prepared, tmp_path, "llama", "w4a16")
    ours = load_quantized(path, backend="reference")(IDS).logits
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    full = TransformConfig.model_validate(qc["transform_config"])
    assert [a.location for a in online_only(full).config_groups["R4"].apply] == ["input"]

    def plain():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                    quantization_config=CompressedTensorsConfig(dequantize=True))

    no_r4 = plain()(IDS).logits  # transformers alone ignores transform_config
    assert (no_r4 - ours).abs().max().item() > 1e-2
    placeholder = plain()
    apply_transform_config(placeholder, online_only(full))  # the factory's NaN matrix, never copied over
    assert placeholder(IDS).logits.isnan().all()
    tensors = load_file(path / fmt.WEIGHTS_FILE)
    _rewrite(path, {k: v for k, v in tensors.items() if k != R4_NAME})
    with pytest.raises(ValueError, match="no stored tensor for transform"):
        load_with_compressed_tensors(path)
    # n = 64: compressed-tensors builds the matrix itself (type hadamard), so the fused entry can be applied too
    path, _ = _write(prepared, tmp_path, "pow2", "w4a16")
    ours = load_quantized(path, backend="reference")(IDS).logits
    once, _ = load_with_compressed_tensors(path)
    assert (once(IDS).logits - ours).abs().max().item() < 1e-5
    twice = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    apply_transform_config(twice, TransformConfig.model_validate(json.loads((path / "config.json").read_text())[
        "quantization_config"]["transform_config"]))  # weight_input rotates the already-rotated weights again
    assert (twice(IDS).logits - ours).abs().max().item() > 1e-2


# ----------------------------------------------------------------------------------------------- SmolLM2 (slow)
@pytest.mark.slow
@torch.no_grad()
def test_smollm2_exports_meet_the_vllm_contract_and_round_trip(tmp_path):
    """The embedded SmolLM2 (quarot, RTN): R4 of size 1536 = 12·128 stored as vLLM loads it; W4A4 and W4A16 exports
    meet the vLLM contract; transformers + compressed-tensors compute lsr's logits (activation quantization off)."""
    from lsr.models import load_model

    model, tokenizer = load_model("smollm2")
    prepared, _ = prepare_export(model, "quarot", tokenizer=tokenizer)
    ids = tokenizer("The history of the city begins with a small settlement on the river, where traders met "
                    "to exchange salt, grain and wool before the first bridge was built.", return_tensors="pt")[
        "input_ids"]
    n, layers = 1536, 30
    for scheme, vllm_class in (("w4a4", "CompressedTensorsWNA4Int"), ("w4a16", "CompressedTensorsWNA16")):
        path = tmp_path / scheme
        write_export(prepared, path, ExportConfig(scheme=scheme), tokenizer)
        r4 = load_file(path / fmt.WEIGHTS_FILE)[R4_NAME]
        assert r4.dtype == torch.float16 and r4.shape == (n, n)
        assert torch.equal(r4.double(), hadamard_transform(torch.eye(n, dtype=torch.float64)) * math.sqrt(n))
        contract = check_vllm_contract(path)
        assert sorted(set(contract.schemes.values())) == sorted({vllm_class, "unquantized"})
        assert sum(c == vllm_class for c in contract.schemes.values()) == 7 * layers
        assert {v[:3] for v in contract.transforms.values()} == {("R4", "lsr-hadamard", n)}
        assert len(contract.transforms) == layers
        consumer, copied = load_with_compressed_tensors(path)
        assert len(copied) == layers
        ours = load_quantized(path, backend="reference")
        for module in ours.modules():
            if isinstance(module, QuantizedLinear):
                module.act_bits = None
        theirs, mine = consumer(ids).logits, ours(ids).logits
        scale = mine.abs().max().item()
        diff = (theirs - mine).abs().max().item()
        print(f"{scheme}: max |logits diff| {diff:.2e} of max |logit| {scale:.1f}; "
              f"argmax agreement {(theirs.argmax(-1) == mine.argmax(-1)).float().mean().item():.4f}")
        assert diff < 1e-4 * scale
        assert torch.equal(theirs.argmax(-1), mine.argmax(-1))
        del consumer, ours
