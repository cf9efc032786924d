"""Write a prepared model as an HF-shaped compressed-tensors directory, atomically.

The directory is written to a temporary sibling and renamed into place; an existing target is refused unless
``overwrite`` (then it is replaced only once the new one is complete).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import compressed_tensors
import torch
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import save_file
from torch import nn

from lsr.export import format as fmt
from lsr.export import kv_format
from lsr.export.config import ExportConfig
from lsr.export.r4 import r4_tensor, r4_tensor_name
from lsr.hadamard import decompose
from lsr.models.adapter import adapter_for
from lsr.pipeline.apply import QuantizedModel
from lsr.quant.rtn import QuantSpec, quantize
from lsr.transforms.linear import QLinear

W8_SPEC = QuantSpec(bits=8, symmetric=True, granularity="channel")


@dataclass
class ExportResult:
    """Where the export went and what it holds."""

    path: Path
    config: dict

    @property
    def lsr(self) -> dict:
        return self.config["lsr"]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (per output channel / per token id): codes ``[R, C]`` and scales ``[R, 1]``."""
    q, scale, _ = quantize(weight.detach().float(), W8_SPEC)
    return q.to(torch.int8), scale.reshape(-1, 1).float()


def _packed(prefix: str, q: torch.Tensor, scale: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    packed = fmt.pack(q, bits)
    if not torch.equal(fmt.unpack(packed, bits, tuple(q.shape)), q.to(torch.int8)):  # cheap self-check
        raise RuntimeError(f"{prefix}: compressed-tensors packing did not round-trip")
    return {
        f"{prefix}.weight_packed": packed,
        f"{prefix}.weight_scale": scale.reshape(-1, 1).float().contiguous(),
        f"{prefix}.weight_shape": torch.tensor(list(q.shape), dtype=torch.int64),
    }


@dataclass(frozen=True)
class OnlineR4:
    """The online R4 of a rotated model: the same at every down_proj, stored once under ``owner`` (the first)."""

    owner: str
    size: int  # in_features
    block: int | None  # None: one Hadamard of the whole row

    @property
    def matrix_size(self) -> int:
        """Size of the stored ±1 matrix: the block's for a block-diagonal R4."""
        return self.block or self.size


def online_r4(model: nn.Module) -> OnlineR4:
    """The model's online R4, checked: only at down_proj, present, one layout (in_features, block) in all layers."""
    online = [(n, m) for n, m in model.named_modules() if isinstance(m, QLinear) and m.online_hadamard]
    outside = [n for n, _ in online if not fmt.matches_any(n, fmt.R4_TARGETS)]
    if outside:
        raise ValueError(f"online Hadamards outside down_proj are not supported by the export: {outside[:3]}")
    if not online:
        raise ValueError("the export format holds rotated models (an online R4 at every down_proj); this model has "
                         "none: use a recipe with the rotate step")
    layouts = {(m.in_features, m.hadamard_block) for _, m in online}
    if len(layouts) != 1:
        raise ValueError(f"the export needs one online R4 layout (in_features, block) in all layers, found {layouts}")
    (size, block), = layouts
    return OnlineR4(online[0][0], size, block)


def export_tensors(prepared: QuantizedModel, config: ExportConfig) -> dict[str, torch.Tensor]:
    """Every tensor of the export: packed int4 decoder linears, 16-bit (or int8) embedding/lm_head, the online R4
    matrix (one shared ±1 tensor, in the storage dtype), float32 rest."""
    model = prepared.model
    adapter = adapter_for(model)
    names = {id(m): n for n, m in model.named_modules()}
    embed_name = names[id(adapter.embeddings(model))]
    head_name = names[id(adapter.lm_head(model))]
    linears = adapter.decoder_linears(model)
    missing = sorted(set(linears) - set(prepared.weights))
    if missing:
        raise ValueError(f"no quantized weight for {missing[:3]}...: call quantize_weights first")
    storage = getattr(torch, config.storage_dtype)
    tensors: dict[str, torch.Tensor] = {}
    for name, linear in linears.items():
        qw = prepared.weights[name]
        if qw.scale.shape[1] != 1:
            raise ValueError(f"{name}: {qw.scale.shape[1]} weight groups; the export needs one scale per channel")
        tensors.update(_packed(name, qw.q, qw.scale, 4))
        if linear.bias is not None:
            tensors[f"{name}.bias"] = linear.bias.detach().float()
    for key, tensor in model.state_dict().items():
        module_name, _, param = key.rpartition(".")
        if module_name in linears:
            continue
        tensor = tensor.detach()
        if module_name in (embed_name, head_name) and param == "weight":
            if config.embeddings_8bit:
                tensors.update(_packed(module_name, *_int8_rows(tensor), 8))
            else:
                tensors[key] = tensor.to(storage)
        else:
            tensors[key] = tensor.float()
    r4 = online_r4(model)
    tensors[r4_tensor_name(r4.owner)] = r4_tensor(r4.matrix_size, storage)
    return {k: v.contiguous().cpu() for k, v in tensors.items()}


def quantization_config(prepared: QuantizedModel, config: ExportConfig) -> dict:
    """``quantization_config`` for config.json, built with compressed-tensors' own pydantic schema."""
    model = prepared.model
    adapter = adapter_for(model)
    names = {id(m): n for n, m in model.named_modules()}
    embed_name = names[id(adapter.embeddings(model))]
    head_name = names[id(adapter.lm_head(model))]
    groups = {fmt.W4A4_GROUP: fmt.decoder_scheme(config.scheme)}
    ignore = [head_name]
    if config.embeddings_8bit:
        groups[fmt.W8_GROUP] = fmt.w8_scheme([f"re:^{re.escape(embed_name)}$", f"re:^{re.escape(head_name)}$"])
        ignore = []
    qconfig = QuantizationConfig(
        config_groups=groups, format=fmt.PACK_FORMAT, quantization_status="compressed", ignore=ignore
    )
    r4 = online_r4(model)
    kv, (_, _, head_dim) = prepared.recipe.kv_cache, adapter.head_dims(model)
    transforms = kv_format.transform_config(r4.size, head_dim if kv is not None and kv.r3 else None, r4.block)
    out = {
        "version": compressed_tensors.__version__,
        "sparsity_config": {},
        "transform_config": transforms.model_dump(mode="json"),
        **qconfig.model_dump(mode="json"),
    }
    kv_scheme = kv_format.kv_cache_scheme(kv, head_dim)
    if kv_scheme is not None:
        out["kv_cache_scheme"] = kv_scheme
    return out


def lsr_section(prepared: QuantizedModel, config: ExportConfig) -> dict:
    """lsr's own metadata: what the compressed-tensors schema cannot say (or cannot say exactly)."""
    model = prepared.model
    adapter = adapter_for(model)
    r4 = online_r4(model)
    m, k = decompose(r4.matrix_size)
    transforms = [{"name": "R4", "targets": list(fmt.R4_TARGETS), "location": "input", "size": r4.size,
                   **({"block": r4.block, "layout": fmt.BLOCK_LAYOUT} if r4.block else {}), "m": m, "k": k,
                   "construction": fmt.HADAMARD_CONSTRUCTION, "tensor": r4_tensor_name(r4.owner),
                   "stored": fmt.R4_STORED}]
    quantizer = {"name": prepared.recipe.weights.method}
    if prepared.recipe.weights.uses_gptq:
        quantizer.update(asdict(prepared.recipe.weights.gptq))
        if prepared.recipe.weights.method == "gptq":
            del quantizer["alpha"]  # gptaq's strength
    names = {id(mod): n for n, mod in model.named_modules()}
    embed_mode = "int8 per row" if config.embeddings_8bit else config.storage_dtype
    head_mode = "int8 per output channel" if config.embeddings_8bit else config.storage_dtype
    kv = kv_format.kv_section(prepared.recipe.kv_cache, adapter.head_dims(model)[2])
    return {
        "format_version": (fmt.BLOCK_R4_VERSION if r4.block else
                           fmt.FORMAT_VERSION if kv is None else kv_format.FORMAT_VERSION),
        "source": prepared.source,
        "recipe": prepared.recipe.to_dict(),
        "weight_quantizer": quantizer,
        "weights": {"bits": 4, "symmetric": True, "granularity": "channel", "range": [-8, 7],
                    "scale_dtype": "float32", "targets": list(fmt.W4A4_TARGETS)},
        "scheme": config.scheme,
        "activation_quantization": activation_section(prepared, config),
        "online_transforms": transforms,
        "unquantized": {names[id(adapter.embeddings(model))]: embed_mode, names[id(adapter.lm_head(model))]: head_mode,
                        "norms and biases": "float32"},
        **({"kv_cache": kv} if kv is not None else {}),
    }


def activation_section(prepared: QuantizedModel, config: ExportConfig) -> dict | None:
    """How the runtime quantizes the decoder linears' inputs: the recipe's int4 rule and clips (``w4a4``), plain
    int8 absmax (``w4a8``), nothing (``w4a16``)."""
    targets = {"targets": list(fmt.W4A4_TARGETS)}
    if config.scheme == "w4a16":
        return None
    if config.scheme == "w4a8":
        return {**targets, **fmt.ACT_QUANT_INT8, "clip_ratio": 1.0, "clip_ratios": {}}
    return {**targets, **fmt.ACT_QUANT,
            "clip_ratio": fmt.activation_clip(prepared.recipe.activations, prepared.recipe.name),
            "clip_ratios": learned_act_clips(prepared.model)}


def learned_act_clips(model: nn.Module) -> dict[str, float]:
    """``{decoder linear: clip}`` for every linear with a learned activation clip (refused outside (0, 1])."""
    out = {}
    for name, linear in adapter_for(model).decoder_linears(model).items():
        clip = getattr(linear, "act_clip", None)
        if clip is not None:
            value = float(clip)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name}: learned activation clip {value} is outside (0, 1]")
            out[name] = value
    return out


def _model_config(prepared: QuantizedModel, config: ExportConfig) -> dict:
    model = prepared.model
    data = model.config.to_dict()
    data.pop("lsr_rotation", None)
    data.pop("quantization_config", None)
    data["architectures"] = [type(model).__name__]
    data["tie_word_embeddings"] = False
    data["dtype"] = config.storage_dtype
    data.pop("torch_dtype", None)
    data["use_cache"] = True
    return data


def _default_permissions(directory: Path) -> None:
    """mkdtemp makes a 0700 directory: give it (and its files) the permissions of a plain mkdir / open."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for file in directory.iterdir():
        if file.is_file():
            file.chmod(0o666 & ~umask)


def write_export(prepared: QuantizedModel, out_dir: str | Path, config: ExportConfig, tokenizer=None) -> ExportResult:
    """Write `prepared` (a recipe applied: fake-quant model + int codes) and `tokenizer` to `out_dir` atomically."""
    target = Path(out_dir).expanduser()
    if target.exists() and not config.overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = export_tensors(prepared, config)
    data = _model_config(prepared, config)
    data["quantization_config"] = quantization_config(prepared, config)
    section = lsr_section(prepared, config)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    old = None
    try:
        weights_path = tmp / fmt.WEIGHTS_FILE
        save_file(tensors, weights_path, metadata={"format": "pt"})
        section["files"] = {fmt.WEIGHTS_FILE: {"bytes": weights_path.stat().st_size,
                                               "sha256": sha256_file(weights_path)}}
        data["lsr"] = section
        (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        generation = getattr(prepared.model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        _default_permissions(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, old / target.name)
            try:
                os.replace(tmp, target)
            except OSError:
                os.replace(old / target.name, target)
                raise
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return ExportResult(target, data)
