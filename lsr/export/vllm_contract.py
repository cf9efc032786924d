"""What vLLM loads from a compressed-tensors checkpoint, checked without vLLM (no lsr code either: a consumer's view).

    python -m lsr.export.vllm_contract EXPORT_DIR

Rules read in vLLM's source (2026; ``model_executor/layers/quantization/compressed_tensors/``):

* ``compressed_tensors.py::get_quant_method`` / ``_get_scheme_from_parts``: every linear that a config group targets
  (and ``ignore`` does not) gets a scheme from the group's weight / input-activation args and format, tried in order;
  the integer ones are ``_is_wNa8o8_int`` → ``_is_wNaM_int`` with 8-bit inputs (``CompressedTensorsWNA8Int``) →
  ``_is_wNaM_int`` with 4-bit inputs (``CompressedTensorsWNA4Int``, Humming) → ``_is_wNa16_group_channel`` with
  ``pack-quantized`` (``CompressedTensorsWNA16``). Each creates ``weight_packed`` int32 ``[N, ceil(K·bits/32)]``,
  ``weight_scale`` ``[N, K/group]`` (``[N, 1]`` per channel; loaded into the model dtype) and ``weight_shape``
  int64 ``[2]``; linears no group covers keep a float ``weight``.
* ``transform/linear.py``: a linear matched by an online (``input``/``output``) transform arg gets a submodule
  ``f"{group}_{location}"`` whose ``weight`` (``[n, n]``, n = ``head_dim`` or the linear's in/out features) is
  loaded from the checkpoint, shared across layers (``SharedWeightParameter``, one tensor per (scheme, n)), divided
  by sqrt(n) after loading; ``type: hadamard`` runs HadaCore instead (power of two ≤ 32768), any other type a dense
  ``x·W`` (``inverse: false``). ``apply`` asserts the linear has no bias. Offline args (``weight_*``) are ignored:
  already fused. Tensor parallelism > 1 raises.
* The model loader has no check for unloaded weights on quantized models, so a missing tensor is uninitialised
  memory at run time; a checkpoint tensor no parameter takes is a KeyError in the model's ``load_weights``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from torch import nn

PACK_FORMAT = "pack-quantized"
HADACORE_MAX = 2**15


class Expected(NamedTuple):
    """One tensor vLLM loads: dtype kind (``float``, ``int32``, ``int64``) and shape."""

    kind: str
    shape: tuple[int, ...]


@dataclass
class Contract:
    """What vLLM would build from a checkpoint: the scheme class per linear, the tensors it loads, the online
    transforms (module → ``(group, type, n, tensor)``), and notes on what the checkpoint cannot tell vLLM."""

    schemes: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, Expected] = field(default_factory=dict)
    weight_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    transforms: dict[str, tuple[str, str, int, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def vllm_scheme(weights, input_acts, output_acts, fmt: str | None) -> str | None:
    """The integer scheme class ``_get_scheme_from_parts`` picks for these args (None: not an integer scheme this
    contract covers, e.g. FP8/FP4 ones)."""
    if weights is None or weights.type != "int":
        return None
    int_weight = not weights.dynamic and weights.strategy in ("channel", "group")

    def static_int8_tensor(args) -> bool:
        return args is not None and args.type == "int" and args.strategy == "tensor" and args.num_bits == 8 \
            and not args.dynamic

    if int_weight and fmt in (PACK_FORMAT, "int-quantized") and static_int8_tensor(input_acts) \
            and static_int8_tensor(output_acts):
        return "CompressedTensorsWNA8O8Int"
    wnam = (input_acts is not None and int_weight and fmt == PACK_FORMAT and input_acts.type == "int"
            and input_acts.symmetric and input_acts.dynamic and input_acts.strategy in ("token", "group"))
    if wnam and input_acts.num_bits == 8:
        return "CompressedTensorsWNA8Int"
    if wnam and input_acts.num_bits == 4:
        return "CompressedTensorsWNA4Int"
    if input_acts is None and int_weight and fmt == PACK_FORMAT:
        return "CompressedTensorsWNA16"
    return None


def _skeleton(config: dict) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    data = {k: v for k, v in config.items() if k not in ("quantization_config", "lsr", "dtype", "torch_dtype")}
    hf_config = AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def _header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                out[key] = (getattr(torch, {"F16": "float16", "BF16": "bfloat16", "F32": "float32",
                                            "I32": "int32", "I64": "int64", "I8": "int8", "U8": "uint8",
                                            "F64": "float64"}[tensor.get_dtype()]), tuple(tensor.get_shape()))
    return out


def _accepts(kind: str, dtype: torch.dtype) -> bool:
    return dtype.is_floating_point if kind == "float" else dtype == getattr(torch, kind)


def _linear_tensors(name: str, module: nn.Linear, scheme: str | None, weights) -> dict[str, Expected]:
    n, k = module.out_features, module.in_features
    out = {}
    if scheme is None:
        out[f"{name}.weight"] = Expected("float", (n, k))
    else:
        groups = 1 if weights.strategy == "channel" else k // weights.group_size
        out[f"{name}.weight_packed"] = Expected("int32", (n, math.ceil(k * weights.num_bits / 32)))
        out[f"{name}.weight_scale"] = Expected("float", (n, groups))
        out[f"{name}.weight_shape"] = Expected("int64", (2,))
        if not weights.symmetric:
            out[f"{name}.weight_zero_point"] = Expected("int32", (math.ceil(n * weights.num_bits / 32), groups))
    if module.bias is not None:
        out[f"{name}.bias"] = Expected("float", (n,))
    return out


def _transforms(contract: Contract, model: nn.Module, tconfig, header: dict, problems: list[str]) -> None:
    from compressed_tensors.utils.match import is_match

    owners: dict[tuple[str, int], list[str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        for group, scheme in tconfig.config_groups.items():
            for args in scheme.apply:
                if not args.is_online() or not is_match(name, module, args.targets, args.ignore):
                    continue
                if args.location not in ("input", "output"):
                    problems.append(f"{name}: vLLM cannot apply a {args.location!r} transform to a linear")
                    continue
                size = scheme.head_dim or (module.in_features if args.location == "input" else module.out_features)
                tensor = f"{name}.{group}_{args.location}.weight"
                contract.transforms[name] = (group, scheme.type, size, tensor)
                owners.setdefault((group, size), []).append(tensor)
                if module.bias is not None:
                    problems.append(f"{name}: vLLM's transform method asserts bias is None, the linear has a bias")
                if scheme.type == "hadamard" and (size & (size - 1) or size > HADACORE_MAX):
                    problems.append(f"{name}: type hadamard runs HadaCore, which needs a power of two <= "
                                    f"{HADACORE_MAX}, not {size}")
    for (group, size), tensors in owners.items():
        present = [t for t in tensors if t in header]
        if not present:
            problems.append(f"no {group} transform tensor of size {size} (e.g. {tensors[0]}): vLLM would run on "
                            "uninitialised memory")
        for tensor in present:
            contract.tensors[tensor] = Expected("float", (size, size))


def check_vllm_contract(path: str | Path, *, check_values: bool = True) -> Contract:
    """The `Contract` of the checkpoint at ``path``; ValueError listing every tensor or config field vLLM would
    miss, refuse or not take. ``check_values``: also read each stored transform matrix and require ±1 entries
    (vLLM divides by sqrt(n) itself)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.transform import TransformConfig
    from compressed_tensors.utils.match import is_match

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{path}: quant_method is {qc.get('quant_method')!r}, not compressed-tensors")
    header = _header(path)
    model = _skeleton(config)
    contract, problems = Contract(), []
    groups = {}
    for group_name, group in (qc.get("config_groups") or {}).items():
        args = {key: QuantizationArgs.model_validate(group[key]) if group.get(key) else None
                for key in ("weights", "input_activations", "output_activations")}
        groups[group_name] = (group["targets"], args, group.get("format") or qc.get("format"))
    ignore = qc.get("ignore") or []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            if any(is_match(name, module, targets, ignore) for targets, _, _ in groups.values()):
                contract.notes.append(f"{name}: quantized embedding (vLLM's EmbeddingWNA16Int) is not covered here")
            else:
                contract.tensors[f"{name}.weight"] = Expected("float", tuple(module.weight.shape))
            continue
        if not isinstance(module, nn.Linear):
            if not list(module.children()):
                for param, tensor in module.named_parameters(recurse=False):
                    contract.tensors[f"{name}.{param}"] = Expected("float", tuple(tensor.shape))
            continue
        hits = [g for g, (targets, _, _) in groups.items() if is_match(name, module, targets, ignore)]
        if len(hits) > 1:
            problems.append(f"{name}: matches config groups {hits}")
            continue
        scheme, weights = None, None
        if hits:
            _, args, fmt = groups[hits[0]]
            weights = args["weights"]
            scheme = vllm_scheme(weights, args["input_activations"], args["output_activations"], fmt)
            if scheme is None:
                problems.append(f"{name}: group {hits[0]} selects no integer scheme this contract covers")
                continue
        contract.schemes[name] = scheme or "unquantized"
        contract.tensors.update(_linear_tensors(name, module, scheme, weights))
        if scheme is not None:
            contract.weight_shapes[f"{name}.weight_shape"] = (module.out_features, module.in_features)
    if qc.get("transform_config"):
        _transforms(contract, model, TransformConfig.model_validate(qc["transform_config"]), header, problems)
        if contract.transforms:
            contract.notes.append("online transforms: serve with tensor parallelism 1 (vLLM raises otherwise)")
    for name, spec in contract.tensors.items():
        if name not in header:
            problems.append(f"tensor {name} is missing ({spec.kind} {list(spec.shape)})")
            continue
        dtype, shape = header[name]
        if not _accepts(spec.kind, dtype) or shape != spec.shape:
            problems.append(f"tensor {name} is {dtype} {list(shape)}, vLLM creates {spec.kind} {list(spec.shape)}")
    extra = sorted(set(header) - set(contract.tensors))
    if extra:
        problems.append(f"tensor {extra[0]} ({len(extra)} in all) matches no parameter vLLM creates")
    if check_values and not problems:
        problems += _check_values(path, contract)
    act = (config.get("lsr") or {}).get("activation_quantization") or {}
    if act.get("clip_ratio", 1.0) != 1.0 or act.get("clip_ratios"):
        contract.notes.append("activation clip ratios (lsr section) have no compressed-tensors field: vLLM "
                              "quantizes activations with the plain absmax")
    if problems:
        raise ValueError(f"{path}: not loadable as vLLM expects:\n  " + "\n  ".join(problems))
    return contract


def _check_values(path: Path, contract: Contract) -> list[str]:
    problems = []
    wanted = {tensor for *_, tensor in contract.transforms.values()}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in set(handle.keys()) & (wanted | set(contract.weight_shapes)):
                value = handle.get_tensor(key)
                if key in wanted and not bool((value.float().abs() == 1).all()):
                    problems.append(f"tensor {key}: entries are not ±1 (vLLM divides by sqrt(n) itself)")
                if key in contract.weight_shapes and tuple(value.tolist()) != contract.weight_shapes[key]:
                    problems.append(f"tensor {key} is {value.tolist()}, the linear is "
                                    f"{list(contract.weight_shapes[key])}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print(__doc__.splitlines()[2].strip())
        return 2
    try:
        contract = check_vllm_contract(args[0])
    except ValueError as err:
        print(err)
        return 1
    counts: dict[str, int] = {}
    for scheme in contract.schemes.values():
        counts[scheme] = counts.get(scheme, 0) + 1
    print(f"{args[0]}: loadable as vLLM expects; linears: {counts}")
    for module, (group, kind, size, tensor) in list(contract.transforms.items())[:1]:
        print(f"online transform {group} ({kind}, n={size}) on {len(contract.transforms)} linears, e.g. {module}; "
              f"stored as {tensor}")
    for note in contract.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
