"""`load_quantized`: an lsr INT4 directory back to a runnable model with integer linears.

The HF skeleton is built from config.json (without its quantization_config) on the meta device; decoder linears
become `QuantizedLinear`; every stored tensor is checked against what the config implies (presence, dtype kind,
shape), and unreadable or modified files are refused with an error naming them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.transform import TransformConfig
from safetensors import safe_open
from torch import nn

from lsr.export import format as fmt
from lsr.export import kv_format
from lsr.export.kv_format import attach_kv
from lsr.export.quantized_linear import Int8Embedding, Int8WeightLinear, QuantizedLinear
from lsr.export.r4 import R4_GROUP, R4_LOCATION, check_r4_tensor
from lsr.export.writer import sha256_file
from lsr.hadamard import decompose
from lsr.kernels import BACKENDS
from lsr.models.adapter import adapter_for

CT_EXTRA_KEYS = ("version", "sparsity_config", "transform_config")


def read_config(path: Path) -> tuple[dict, QuantizationConfig, dict, dict | None]:
    """(model config dict, compressed-tensors QuantizationConfig, lsr section, raw ``transform_config``) of an
    export; clear errors."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not an exported model directory")
    try:
        data = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path}: cannot parse ({err})") from err
    qc = data.pop("quantization_config", None)
    section = data.pop("lsr", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{config_path}: no compressed-tensors quantization_config (not an lsr INT4 export)")
    if not isinstance(section, dict) or section.get("format_version") not in fmt.READABLE_VERSIONS:
        found = section.get("format_version") if isinstance(section, dict) else None
        raise ValueError(f"{config_path}: lsr section format_version {found!r}, this lsr reads {fmt.READABLE_VERSIONS}")
    try:
        qconfig = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k not in CT_EXTRA_KEYS})
        if qc.get("transform_config"):
            TransformConfig.model_validate(qc["transform_config"])
    except Exception as err:  # noqa: BLE001 - pydantic's message, with the file
        raise ValueError(f"{config_path}: quantization_config is not compressed-tensors' schema: {err}") from err
    return data, qconfig, section, qc.get("transform_config")


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{file}: not a readable safetensors file, truncated or corrupt ({err})") from err


def read_tensors(path: Path, section: dict, *, verify_checksums: bool = True) -> dict[str, torch.Tensor]:
    """All stored tensors, after checking each file's size (and SHA-256) against config.json."""
    files = section.get("files") or {fmt.WEIGHTS_FILE: {}}
    tensors: dict[str, torch.Tensor] = {}
    for name, meta in files.items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"{file} is missing")
        size = file.stat().st_size
        if "bytes" in meta and size != meta["bytes"]:
            raise ValueError(f"{file} is {size} bytes but config.json records {meta['bytes']}: truncated or replaced")
        if verify_checksums and "sha256" in meta and sha256_file(file) != meta["sha256"]:
            raise ValueError(f"{file}: SHA-256 differs from config.json: the file is corrupt or was modified")
        for key, tensor in _read_safetensors(file).items():
            if key in tensors:
                raise ValueError(f"tensor {key} is stored twice ({file})")
            tensors[key] = tensor
    return tensors


def build_skeleton(data: dict, dtype: torch.dtype) -> nn.Module:
    """The HF model of the config on the meta device (no weights allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(data)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError("config.json has no model_type")
    data.pop("dtype", None)
    data.pop("torch_dtype", None)
    config = AutoConfig.for_model(model_type, **data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    adapter_for(model)
    return model


def check_tensors(expected: dict[str, fmt.TensorSpec], tensors: dict[str, torch.Tensor]) -> None:
    """Presence, dtype kind and shape of every tensor; a ValueError naming the first offender."""
    for name, spec in expected.items():
        if name not in tensors:
            raise ValueError(f"tensor {name} is missing from the checkpoint (config.json implies {spec.describe()})")
        tensor = tensors[name]
        if not spec.accepts(tensor.dtype) or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"tensor {name} is {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)} but config.json "
                f"implies {spec.describe()}: the config does not match the tensors"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"unexpected tensor {extra[0]} ({len(extra)} in all): config.json describes no such parameter")


def _block(section: dict, transform: dict) -> int | None:
    """The block of a block-diagonal online transform entry (format 6), else None."""
    block = transform.get("block")
    if block is not None and section["format_version"] < fmt.BLOCK_R4_VERSION:
        raise ValueError(f"config.json: a block-diagonal online transform in a format {section['format_version']} "
                         f"export (block-diagonal R4 is format {fmt.BLOCK_R4_VERSION})")
    return int(block) if block is not None else None


def _online(section: dict, module_name: str, in_features: int) -> tuple[bool, int | None]:
    """``(online Hadamard at the input?, its block)`` of a decoder linear, checked against this lsr's construction."""
    for transform in fmt.online_hadamard_targets(section):
        if not fmt.matches_any(module_name, transform["targets"]):
            continue
        if transform.get("location") != "input":
            raise ValueError(f"{module_name}: online transform at {transform.get('location')!r} is not supported")
        size, m, k, block = transform["size"], transform["m"], transform["k"], _block(section, transform)
        matrix = block or size
        if size != in_features or m * 2**k != matrix or size % matrix:
            raise ValueError(f"{module_name}: online Hadamard of size {size} (block {block}, m={m}, k={k}) for "
                             f"{in_features} inputs")
        if decompose(matrix) != (m, k):
            raise ValueError(f"{module_name}: this lsr builds H_{matrix} as {decompose(matrix)}, the export had "
                             f"({m}, {k})")
        return True, block
    return False, None


def r4_tensors(section: dict) -> dict[str, tuple[str, int]]:
    """``{tensor name: (module, size)}`` of the stored online R4 matrices an export of this format must hold (none
    before format 4, whose exports had no tensor: vLLM would run such an export on uninitialised memory)."""
    if section["format_version"] < fmt.R4_TENSOR_SINCE:
        return {}
    out = {}
    for transform in fmt.online_hadamard_targets(section):
        name = transform.get("tensor")
        if not isinstance(name, str) or not name.endswith(f".{R4_GROUP}_{R4_LOCATION}.weight"):
            raise ValueError(f"config.json: online transform {transform.get('name')!r} names no stored tensor "
                             f"({name!r}); this export cannot be served (vLLM loads the matrix from the checkpoint)")
        size = _block(section, transform) or int(transform["size"])
        out[name] = (name.removesuffix(f".{R4_GROUP}_{R4_LOCATION}.weight"), size)
    return out


def check_transform_config(section: dict, transform_config: dict | None) -> None:
    """Format 4: the ``transform_config`` consumers read is the R4 lsr runs (``hadamard`` only for a power of two),
    plus R3 where the export has a ``kv_cache`` entry with it."""
    if section["format_version"] < fmt.R4_TENSOR_SINCE:
        return
    layouts = sorted({(int(t["size"]), _block(section, t)) for t in fmt.online_hadamard_targets(section)},
                     key=str)
    if len(layouts) != 1:
        raise ValueError(f"config.json: lsr section records online R4 (size, block) {layouts}, expected exactly one")
    (size, block), = layouts
    kv = section.get("kv_cache") or {}
    r3_head_dim = kv.get("head_dim") if kv.get("r3") else None
    expected = kv_format.transform_config(size, r3_head_dim, block).model_dump(mode="json")
    if transform_config != expected:
        raise ValueError(f"config.json: quantization_config.transform_config is not the R4 of size {size} (block "
                         f"{block}) this export runs (expected {expected})")


def decoder_scheme_of(section: dict, roles: dict[str, str], decoder: set[str]) -> str:
    """The export's scheme (w4a4 / w4a8 / w4a16): the group covering exactly the decoder linears, as recorded."""
    found = {n: r for n, r in roles.items() if r in fmt.DECODER_ROLES}
    if set(found) != decoder:
        odd = sorted(set(found) ^ decoder)
        raise ValueError(f"the int4 config group must cover exactly the decoder linears; differs at {odd[:3]}")
    schemes = set(found.values())
    if len(schemes) != 1:
        raise ValueError(f"the decoder linears have several schemes {sorted(schemes)}; an export has one")
    scheme = schemes.pop()
    recorded = section.get("scheme", "w4a4")
    if recorded != scheme:
        raise ValueError(f"config.json: lsr.scheme is {recorded!r} but quantization_config describes {scheme!r}")
    return scheme


def _clip_value(clip: object, where: str) -> float:
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0.0 < clip <= 1.0:
        raise ValueError(f"config.json: lsr.activation_quantization.{where} is {clip!r}, not a number in (0, 1]")
    return float(clip)


def _act_clips(section: dict, linears: set[str], scheme: str = "w4a4") -> dict[str, float]:
    """Each decoder linear's activation clip ratio: its learned one (``clip_ratios``), else the section's
    ``clip_ratio`` (absent, as in exports before it was recorded: 1); 1 for w4a8 / w4a16 (no clip)."""
    act = section.get("activation_quantization") or {}
    if scheme != "w4a4":
        if act and (act.get("clip_ratio", 1.0) != 1.0 or act.get("clip_ratios")):
            raise ValueError(f"config.json: lsr.activation_quantization has clips, unused by a {scheme} export")
        return dict.fromkeys(linears, 1.0)
    default = _clip_value(act.get("clip_ratio", 1.0), "clip_ratio")
    learned = act.get("clip_ratios") or {}
    unknown = sorted(set(learned) - linears)
    if unknown:
        raise ValueError(f"config.json: lsr.activation_quantization.clip_ratios names {unknown[0]!r}, not a decoder "
                         "linear of this model")
    return {name: _clip_value(learned.get(name, default), f"clip_ratios[{name!r}]") for name in linears}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def load_quantized(
    path: str | Path, *, backend: str = "auto", device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32, verify_checksums: bool = True,
) -> nn.Module:
    """Load an `lsr export` directory as a causal LM whose decoder linears run W4A4 with integer products (or the
    export's W4A8 / W4A16 scheme: `QuantizedLinear.act_bits`).

    `backend` (``auto`` | ``reference`` | ``triton`` | ``fp8``) goes to every `QuantizedLinear` (switch later with
    `lsr.export.quantized_linear.set_backend`), and so does each linear's activation clip ratio (learned, or the
    section's; absent: 1);
    `dtype` is the compute dtype of the non-quantized parts (embeddings, norms, attention). An export with a
    ``kv_cache`` entry gets R3 and its key/value quantizer in every attention (fake-quantized without a cache, stored
    as codes in a `lsr.export.kv_cache.QuantizedKVCache`). Raises ValueError with the offending file or tensor when
    the directory is truncated, corrupt, or inconsistent with its config.json, and when a format-4 export lacks the
    stored R4 matrix or holds another one (what vLLM would multiply by).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    path = Path(path).expanduser()
    data, qconfig, section, transform_config = read_config(path)
    tensors = read_tensors(path, section, verify_checksums=verify_checksums)
    model = build_skeleton(data, dtype)
    roles = fmt.module_roles(model, qconfig)
    adapter = adapter_for(model)
    names = {id(m): n for n, m in model.named_modules()}
    decoder = set(adapter.decoder_linears(model))
    scheme = decoder_scheme_of(section, roles, decoder)
    act_clips = _act_clips(section, decoder, scheme)
    # read (and checked) once, before the transform check, which builds R3 from it
    entry = section.get("kv_cache")
    kv = kv_format.read_kv_section(entry, adapter.head_dims(model)[2]) if entry else None
    check_transform_config(section, transform_config)
    expected = fmt.expected_tensors(model, roles)
    stored_r4 = r4_tensors(section)
    for name, (module, size) in stored_r4.items():
        if not fmt.matches_any(module, fmt.R4_TARGETS) or module not in decoder:
            raise ValueError(f"config.json: R4 tensor {name} does not belong to a down_proj of this model")
        expected[name] = fmt.TensorSpec("float", (size, size))
    check_tensors(expected, tensors)
    for name, (_, size) in stored_r4.items():
        check_r4_tensor(name, tensors.pop(name), size)
    for name, role in roles.items():
        module = model.get_submodule(name)
        shape = tuple(int(v) for v in tensors.pop(f"{name}.weight_shape").tolist())
        if shape != tuple(module.weight.shape):
            raise ValueError(f"tensor {name}.weight_shape is {list(shape)}, config.json implies "
                             f"{list(module.weight.shape)}")
        q = fmt.unpack(tensors.pop(f"{name}.weight_packed"), 8 if role == "w8" else 4, shape)
        scale = tensors.pop(f"{name}.weight_scale").float().reshape(-1)
        bias = tensors.pop(f"{name}.bias", None)
        if role in fmt.DECODER_ROLES:
            online, block = _online(section, name, shape[1])
            new = QuantizedLinear.from_int(q, scale, bias, online_hadamard=online, hadamard_block=block,
                                           backend=backend, act_clip=act_clips[name], act_bits=fmt.ACT_BITS[role])
        elif isinstance(module, nn.Embedding):
            new = Int8Embedding(q, scale, dtype)
        else:
            new = Int8WeightLinear(q, scale, bias)
        _replace(model, name, new)
    result = model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"unexpected tensor {result.unexpected_keys[0]}")
    rotary = adapter.rotary_embedding(model)
    with torch.device(device):
        _replace(model, names[id(rotary)], type(rotary)(config=model.config))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"tensor {left[0]} was not loaded ({len(left)} in all)")
    attach_kv(model, kv)
    model.to(device).eval().requires_grad_(False)
    model.lsr_export = section
    return model
