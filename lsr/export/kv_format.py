"""How an export records R3 and the KV-cache quantizer, and how the loader reads them back.

compressed-tensors' schema holds both: ``kv_cache_scheme`` (int, dynamic, ``group`` strategy with one group per head
or per group inside a head, float16 scales, uint8 zero points) and an ``R3`` transform scheme at the attention's
``q_attn`` and ``k_cache`` locations (type ``hadamard`` when head_dim is a power of two, lsr's matrix then; else
``lsr-hadamard``, see `lsr.export.format.r4_transform_config`). The ``lsr`` section's ``kv_cache`` entry is what lsr's
loader reads: bits, symmetric, group_size, clip_ratio, r3 and head_dim. An export with one is format 5; without, it
stays format 4 (readable by earlier lsr).
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme
from torch import nn

from lsr.export import format as fmt
from lsr.hadamard import decompose
from lsr.quant.kv import SCALE_DTYPE
from lsr.quant.rtn import QuantSpec
from lsr.recipe import KVCacheStep
from lsr.transforms.attention import to_qattention

FORMAT_VERSION = 5  # 4 + the kv_cache entry
ATTENTION_TARGETS = ["re:.*self_attn$"]
KV_QUANT = {
    "where": "keys after RoPE and R3, values (after R2, in v_proj's weights), per token per head (or per group "
             "inside a head), before the cache; every token, the current ones included",
    "asymmetric_quantizer": "lo = clip·min(x, 0), hi = clip·max(x, 0), scale = fp16((hi − lo) / (2^b − 1)), "
                  "zero = round(−lo / scale) in uint8, q = clamp(round(x / scale) + zero, 0, 2^b − 1)",
    "symmetric_quantizer": "scale = fp16(clip·max|x| / (2^(b-1) − 1)), "
                           "q = clamp(round(x / scale), −2^(b-1), 2^(b-1) − 1)",
    "rounding": "half to even; a zero scale reads as 1",
    "dequantize": "(q − zero) · scale",
}


def kv_section(step: KVCacheStep | None, head_dim: int) -> dict | None:
    """The ``lsr.kv_cache`` entry of config.json (None without a kv_cache step)."""
    if step is None:
        return None
    spec = step.spec(head_dim)  # checks the group size
    section = {**KV_QUANT, "bits": step.bits, "symmetric": step.symmetric,
               "group_size": spec.group_size if spec else None, "clip_ratio": step.clip_ratio, "r3": step.r3,
               "head_dim": head_dim, "scale_dtype": "float16", "zero_point_dtype": None if step.symmetric else "uint8"}
    if step.r3:
        m, k = decompose(head_dim)
        section["r3_hadamard"] = {"size": head_dim, "m": m, "k": k, "location": "queries and keys after RoPE"}
    return section


def kv_cache_scheme(step: KVCacheStep | None, head_dim: int) -> dict | None:
    """compressed-tensors' ``kv_cache_scheme`` (None for a float cache)."""
    spec = step.spec(head_dim) if step is not None else None
    if spec is None:
        return None
    args = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy="group",
                            group_size=spec.group_size, dynamic=True, scale_dtype=SCALE_DTYPE,
                            zp_dtype=None if spec.symmetric else torch.uint8)
    return args.model_dump(mode="json")


def r3_transform_scheme(head_dim: int) -> TransformScheme:
    """R3 in compressed-tensors' transform schema: online at the attention's query and key-cache locations."""
    m, _ = decompose(head_dim)
    return TransformScheme(type="hadamard" if m == 1 else "lsr-hadamard", head_dim=head_dim, apply=[
        TransformArgs(targets=list(ATTENTION_TARGETS), location="q_attn"),
        TransformArgs(targets=list(ATTENTION_TARGETS), location="k_cache"),
    ])


def transform_config(r4_size: int, r3_head_dim: int | None, r4_block: int | None = None) -> TransformConfig:
    """The export's ``transform_config``: the online R4 on `r4_size` channels (block-diagonal with `r4_block`), plus
    R3 where `r3_head_dim` is given."""
    transforms = fmt.r4_transform_config(r4_size, r4_block)
    if r3_head_dim is not None:
        transforms.config_groups["R3"] = r3_transform_scheme(r3_head_dim)
    return transforms


def read_kv_section(entry: dict, head_dim: int) -> tuple[bool, QuantSpec | None]:
    """(r3, key/value quantizer) of a ``lsr.kv_cache`` entry; ValueError naming what does not fit this model."""
    if entry.get("head_dim") != head_dim:
        raise ValueError(f"config.json: lsr.kv_cache.head_dim is {entry.get('head_dim')!r}, the model's is {head_dim}")
    try:
        step = KVCacheStep(bits=entry["bits"], symmetric=entry["symmetric"], group_size=entry["group_size"],
                           clip_ratio=entry["clip_ratio"], r3=entry["r3"])
        spec = step.spec(head_dim)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"config.json: lsr.kv_cache is not readable: {err}") from err
    if step.r3:
        r3 = entry.get("r3_hadamard") or {}
        if (r3.get("m"), r3.get("k")) != decompose(head_dim):
            raise ValueError(f"config.json: R3 was H_{head_dim} as (m, k) = ({r3.get('m')}, {r3.get('k')}); this lsr "
                             f"builds {decompose(head_dim)}")
    return step.r3, spec


def attach_kv(model: nn.Module, kv: tuple[bool, QuantSpec | None] | None) -> nn.Module:
    """Give a loaded model the export's R3 and KV quantizer (`read_kv_section`'s result; always on: the runtime
    quantizes); no-op for None (an export without a ``kv_cache`` entry)."""
    if kv is not None:
        r3, spec = kv
        to_qattention(model, r3=r3, kv_quant=spec, active=True)
    return model
