"""The on-disk format of an lsr INT4 export, shared by the writer and the loader.

A Hugging Face directory: ``config.json`` (the model config + ``quantization_config`` in compressed-tensors' schema +
an ``lsr`` section), ``model.safetensors``, the tokenizer files. Decoder linears are compressed-tensors
``pack-quantized`` tensors (``weight_packed`` int32, ``weight_scale`` float32 ``[N, 1]``, ``weight_shape``), packed and
unpacked with compressed-tensors' own `pack_to_int32` / `unpack_from_int32`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme
from compressed_tensors.utils.match import is_match, match_name
from torch import nn

from lsr.export.r4 import R4_GROUP, R4_LOCATION, r4_kind
from lsr.models.adapter import LINEAR_NAMES, LLAMA
from lsr.quant.rtn import QuantSpec

# 2: activation_quantization.clip_ratio (1 reads as clip 1.0); 3: activation_quantization.clip_ratios, learned
# clips per linear (module name -> clip) overriding clip_ratio; 4: the online R4 matrix stored as a tensor
# (`lsr.export.r4`, required), `scheme` (w4a4 / w4a16 / w4a8; older formats are w4a4); 5: a kv_cache entry (R3,
# KV-cache quantizer; written only when the recipe has one, see lsr.export.kv_format); 6: a block-diagonal R4
# (online transform entry ``block``; written only for `RotateStep.r4` ``block-diagonal``)
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)
R4_TENSOR_SINCE = 4
BLOCK_R4_VERSION = 6
WEIGHTS_FILE = "model.safetensors"
PACK_FORMAT = "pack-quantized"
W4A4_GROUP, W8_GROUP = "group_0", "group_1"  # group_0 holds the decoder linears whatever the scheme
DECODER_ROLES = ("w4a4", "w4a16", "w4a8")  # = ExportConfig.scheme; "w8" is the int8 weight-only embedding/lm_head
ACT_BITS = {"w4a4": 4, "w4a8": 8, "w4a16": None}
W4A4_TARGETS = ["re:.*\\.(" + "|".join(LINEAR_NAMES) + ")$"]
R4_TARGETS = ["re:.*\\." + re.escape(LLAMA.online_hadamard) + "$"]
PACKED_PARAMS = ("weight_packed", "weight_scale", "weight_shape")
HADAMARD_CONSTRUCTION = (
    "lsr.hadamard.hadamard_matrix(n) = (H_m ⊗ S_{2^k}) / sqrt(n), n = m·2^k with the smallest m of "
    "lsr.hadamard.SPECIAL_ORDERS that works (H_m from lsr.hadamard_orders, S the Sylvester matrix in natural order); "
    "applied as x ← x·H over the last dimension"
)
BLOCK_LAYOUT = "block-diagonal I_{size/block} ⊗ H_block: x ← x·H_block on each run of `block` input channels"
R4_STORED = ("±1 entries of H_m ⊗ S_{2^k} (not divided by sqrt(n), not transposed), storage dtype, stored once and "
             "shared by every targeted module (vLLM: SharedWeightParameter, divided by sqrt(n) at load, x·W)")
ACT_QUANT = {
    "bits": 4, "symmetric": True, "granularity": "token", "dynamic": True, "after": "online transforms",
    "scale": "(max|x_t| · clip_ratio) / 7 in float32 (1 where that is 0); clip_ratio is in this section (absent: 1), "
             "a linear named in clip_ratios uses its own (learned) clip; "
             "compressed-tensors' schema has no field for it, so a consumer of quantization_config alone (vLLM) "
             "would quantize with the plain max|x_t| / 7",
    "rounding": "half to even", "range": [-8, 7], "clamp": "codes clamped to [-8, 7] (|x| > scale·7.5 with a clip)",
    "output": "(Σ_k q_a·q_w) · scale_t · scale_w, exact integer sums, float32 rescale",
}
ACT_QUANT_INT8 = {
    "bits": 8, "symmetric": True, "granularity": "token", "dynamic": True, "after": "online transforms",
    "scale": "max|x_t| / 127 in float32 (1 where that is 0); no clip (learned int4 clips do not apply)",
    "rounding": "half to even", "range": [-128, 127],
    "output": "(Σ_k q_a·q_w) · scale_t · scale_w, exact integer sums, float32 rescale",
}


def activation_clip(spec: QuantSpec, recipe_name: str = "") -> float:
    """The activation clip ratio the INT4 runtime applies for ``spec``; ValueError if the runtime cannot hold ``spec``.

    The runtime quantizes activations to symmetric int4 per token with ``scale = max|x_t| · clip / 7`` for one fixed
    ``clip`` in (0, 1]: other bits, asymmetric, non-token granularity and a per-token ``clip_search`` are refused.
    """
    why = []
    if spec.bits != 4 or not spec.symmetric or spec.granularity != "token":
        why.append("symmetric int4 per token")
    if spec.clip_search:
        why.append("a fixed clip ratio (clip_search picks one per token, which the runtime does not do)")
    if not 0.0 < spec.clip_ratio <= 1.0:
        why.append("a clip ratio in (0, 1]")
    if why:
        raise ValueError(f"the INT4 runtime quantizes activations to symmetric int4 per token with scale "
                         f"max|x|·clip_ratio/7 (needs {'; '.join(why)}); recipe {recipe_name!r} uses {spec} "
                         "(fake quantization only)")
    return float(spec.clip_ratio)


def decoder_scheme(scheme: str = "w4a4") -> QuantizationScheme:
    """int4 symmetric weights per output channel, packed; inputs: int4 (``w4a4``) or int8 (``w4a8``) symmetric dynamic
    per token, or not quantized (``w4a16``). The format is explicit: compressed-tensors would infer ``int-quantized``
    for a scheme with input activations, and vLLM's integer predicates require ``pack-quantized``."""
    bits = ACT_BITS[scheme]
    acts = None if bits is None else QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="token",
                                                      dynamic=True)
    return QuantizationScheme(
        targets=list(W4A4_TARGETS),
        weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="channel", dynamic=False),
        input_activations=acts,
        format=PACK_FORMAT,
    )


def w4a4_scheme() -> QuantizationScheme:
    """int4 symmetric weights per output channel, int4 symmetric dynamic per-token inputs, packed."""
    return decoder_scheme("w4a4")


def w8_scheme(targets: list[str]) -> QuantizationScheme:
    """int8 symmetric weight-only, one scale per output channel (= per row of an embedding), packed."""
    return QuantizationScheme(
        targets=targets,
        weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel", dynamic=False),
        format=PACK_FORMAT,
    )


def r4_transform_config(size: int, block: int | None = None) -> TransformConfig:
    """The online down_proj Hadamard in compressed-tensors' transform schema; a block-diagonal R4 (``block``) is
    ``head_dim: block`` there, its matrix that of the block.

    compressed-tensors' ``hadamard`` type is the normalised Sylvester matrix, which is lsr's matrix for power-of-two
    sizes only. For ``n = m·2^k`` with ``m > 1`` no registered compressed-tensors type builds lsr's matrix, so the
    scheme names the type ``lsr-hadamard`` (not registered in compressed-tensors: a consumer that applies transforms
    fails loudly instead of silently using another matrix) and the construction lives in the ``lsr`` section.
    The ``weight_input`` entry records that the inverse is already fused into the weights. The matrix itself is in
    the checkpoint (`lsr.export.r4`), where vLLM loads it from.
    """
    return TransformConfig(config_groups={R4_GROUP: TransformScheme(type=r4_kind(block or size), head_dim=block, apply=[
        TransformArgs(targets=list(R4_TARGETS), location=R4_LOCATION),
        TransformArgs(targets=list(R4_TARGETS), location="weight_input", inverse=True),
    ])})


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' dense int32 packing of int8 codes ``[N, K]`` (offset binary, element i at bit i·bits)."""
    return pack_to_int32(q.to(torch.int8).contiguous(), bits)


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of `pack`: int8 codes ``[N, K]``."""
    return unpack_from_int32(packed, bits, torch.Size(shape))


def packed_cols(cols: int, bits: int) -> int:
    return -(-cols * bits // 32)


@dataclass(frozen=True)
class TensorSpec:
    """What the loader expects of one stored tensor: ``kind`` is ``float``, ``int32`` or ``int``."""

    kind: str
    shape: tuple[int, ...]

    def accepts(self, dtype: torch.dtype) -> bool:
        if self.kind == "float":
            return dtype.is_floating_point
        if self.kind == "int32":
            return dtype == torch.int32
        return dtype in (torch.int32, torch.int64)

    def describe(self) -> str:
        kind = {"float": "a floating dtype", "int32": "int32", "int": "int32/int64"}[self.kind]
        return f"{kind} {list(self.shape)}"


def _check_args(args: QuantizationArgs | None, what: str, *, bits: int, strategy: str, dynamic: bool) -> None:
    if args is None:
        raise ValueError(f"{what}: missing (lsr's runtime needs int{bits} {strategy})")
    ok = (args.num_bits == bits and args.type == "int" and args.symmetric and args.strategy == strategy
          and bool(args.dynamic) == dynamic and args.group_size is None)
    if not ok:
        raise ValueError(
            f"{what}: {args.num_bits}-bit {args.type} symmetric={args.symmetric} strategy={args.strategy} "
            f"dynamic={args.dynamic} group_size={args.group_size} is not supported by lsr's runtime (expected "
            f"int{bits} symmetric {strategy}{' dynamic' if dynamic else ''})"
        )


def scheme_role(name: str, scheme: QuantizationScheme) -> str:
    """``w4a4``, ``w4a8``, ``w4a16`` (int4 weights) or ``w8`` (int8 weight-only); a clear error for schemes lsr's
    runtime cannot run."""
    fmt = scheme.format or PACK_FORMAT
    if fmt != PACK_FORMAT:
        raise ValueError(f"config group {name}: format {fmt!r} is not supported (lsr reads {PACK_FORMAT!r})")
    if scheme.output_activations is not None:
        raise ValueError(f"config group {name}: output activation quantization is not supported")
    acts = scheme.input_activations
    if acts is None:
        bits = 8 if scheme.weights is not None and scheme.weights.num_bits == 8 else 4
        _check_args(scheme.weights, f"config group {name} weights", bits=bits, strategy="channel", dynamic=False)
        return "w8" if bits == 8 else "w4a16"
    _check_args(scheme.weights, f"config group {name} weights", bits=4, strategy="channel", dynamic=False)
    act_bits = 8 if acts.num_bits == 8 else 4
    _check_args(acts, f"config group {name} input_activations", bits=act_bits, strategy="token", dynamic=True)
    return f"w4a{act_bits}"


def module_roles(model: nn.Module, qconfig: QuantizationConfig) -> dict[str, str]:
    """``{module name: "w4a4" | "w4a8" | "w4a16" | "w8"}`` for the quantized modules of a (skeleton) model, with
    compressed-tensors' name matching (``re:`` targets, ``ignore``)."""
    roles: dict[str, str] = {}
    group_roles = {name: scheme_role(name, scheme) for name, scheme in qconfig.config_groups.items()}
    ignore = qconfig.ignore or []
    for module_name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        hits = [g for g, scheme in qconfig.config_groups.items()
                if is_match(module_name, module, scheme.targets, ignore)]
        if len(hits) > 1:
            raise ValueError(f"module {module_name} matches several config groups: {hits}")
        if hits:
            role = group_roles[hits[0]]
            if role in DECODER_ROLES and not isinstance(module, nn.Linear):
                raise ValueError(f"{module_name}: {role.upper()} applies to linears only, got {type(module).__name__}")
            roles[module_name] = role
    return roles


def expected_tensors(model: nn.Module, roles: dict[str, str]) -> dict[str, TensorSpec]:
    """The stored tensors a (skeleton) model with these module roles needs, with dtype kind and shape."""
    expected: dict[str, TensorSpec] = {}
    quantized = {name: model.get_submodule(name) for name in roles}
    for name, module in quantized.items():
        rows, cols = module.weight.shape
        bits = 8 if roles[name] == "w8" else 4
        expected[f"{name}.weight_packed"] = TensorSpec("int32", (rows, packed_cols(cols, bits)))
        expected[f"{name}.weight_scale"] = TensorSpec("float", (rows, 1))
        expected[f"{name}.weight_shape"] = TensorSpec("int", (2,))
    for key, tensor in model.state_dict().items():
        module_name, _, param = key.rpartition(".")
        if module_name in quantized and param == "weight":
            continue
        expected[key] = TensorSpec("float", tuple(tensor.shape))
    return expected


def online_hadamard_targets(lsr_section: dict) -> list[dict]:
    """The online transforms recorded in the ``lsr`` section (each: targets, location, size, m, k)."""
    return list(lsr_section.get("online_transforms", []))


def matches_any(module_name: str, targets: list[str]) -> bool:
    return any(match_name(module_name, t) for t in targets)
