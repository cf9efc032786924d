"""`QuantizedKVCache`: a transformers `Cache` that stores keys and values as integer codes, dequantized on read.

Per layer, keys and values (after R3) are held as ``uint8`` codes ``[batch, kv_heads, tokens, head_dim·bits/8]``
(2 or 4 bits packed low bits first, 8//bits codes a byte; other widths a byte each), float16 scales and uint8 zero
points ``[batch, kv_heads, tokens, groups]`` (no zero points when symmetric), quantized with `lsr.quant.kv` — the
quantizer of the fake-quant attention — so reads give the fake-quant values exactly. Every token is quantized, the
current ones included (no float residual window). `lsr.transforms.attention.QAttention` hands a cache with
``quantizes_kv`` its keys and values before quantization, with its spec; a layer asked with ``spec=None`` (KV16, or
quantizers off) stores floats.

    cache = QuantizedKVCache()
    model.generate(ids, past_key_values=cache, max_new_tokens=32)
    cache.bytes_per_token_per_layer()   # vs 2·kv_heads·head_dim·2 in bf16
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from lsr.quant.kv import SCALE_DTYPE, kv_dequantize, kv_quantize
from lsr.quant.rtn import QuantSpec


def codes_per_byte(bits: int) -> int:
    return 8 // bits if bits in (1, 2, 4) else 1


def pack_codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[..., n]`` (values < 2^bits) to uint8 ``[..., n / codes_per_byte]``, low bits first."""
    per = codes_per_byte(bits)
    u = u.to(torch.uint8)
    if per == 1:
        return u
    if u.shape[-1] % per:
        raise ValueError(f"{u.shape[-1]} codes do not fill whole bytes at {bits} bits")
    u = u.reshape(*u.shape[:-1], -1, per)
    out = u[..., 0].clone()
    for i in range(1, per):
        out |= u[..., i] << (bits * i)
    return out


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 codes ``[..., n]``."""
    per = codes_per_byte(bits)
    if per == 1:
        return packed
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)


class _Stored:
    """Codes, scales and zero points of one tensor (keys or values) of one layer, appended along tokens."""

    def __init__(self) -> None:
        self.parts: dict[str, torch.Tensor] = {}

    def append(self, x: torch.Tensor, spec: QuantSpec) -> None:
        q, scale, zero = kv_quantize(x.detach(), spec)
        new = {"codes": pack_codes((q - spec.qmin).reshape(x.shape), spec.bits),
               "scale": scale.reshape(*x.shape[:-1], -1).to(SCALE_DTYPE)}
        if zero is not None:
            new["zero"] = zero.reshape(*x.shape[:-1], -1).to(torch.uint8)
        self.parts = {k: torch.cat([self.parts[k], v], dim=-2) if self.parts else v for k, v in new.items()}

    def read(self, spec: QuantSpec, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        codes = unpack_codes(self.parts["codes"], spec.bits)[..., :head_dim].float() + spec.qmin
        groups = self.parts["scale"].shape[-1]
        q = codes.reshape(*codes.shape[:-1], groups, head_dim // groups)
        zero = self.parts.get("zero")
        return kv_dequantize(q, self.parts["scale"][..., None], None if zero is None else zero[..., None],
                             codes.shape, dtype)

    def map(self, fn) -> None:
        self.parts = {k: fn(v) for k, v in self.parts.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())


class QuantizedKVLayer(CacheLayerMixin):
    """One layer's quantized keys and values (floats when asked with ``spec=None``)."""

    is_sliding = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.spec: QuantSpec | None = None
        self.length = 0
        self.stored = (_Stored(), _Stored())

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype, self.head_dim = key_states.device, key_states.dtype, key_states.shape[-1]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, spec: QuantSpec | None = None,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values; return all of them, dequantized, in the keys' dtype."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.spec = spec
        elif spec != self.spec:
            raise ValueError(f"this cache holds keys/values quantized with {self.spec}; asked to add {spec}")
        self.length += key_states.shape[-2]
        if spec is None:
            self.keys = key_states if self.keys is None else torch.cat([self.keys, key_states], dim=-2)
            self.values = value_states if self.values is None else torch.cat([self.values, value_states], dim=-2)
            return self.keys, self.values
        for stored, x in zip(self.stored, (key_states, value_states), strict=True):
            stored.append(x, spec)
        keys, values = (s.read(spec, self.head_dim, key_states.dtype) for s in self.stored)
        return keys, values

    def _map(self, fn) -> None:
        for stored in self.stored:
            stored.map(fn)
        if self.keys is not None:
            self.keys, self.values = fn(self.keys), fn(self.values)

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        self.__init__()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Exact: every token is quantized on its own."""
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes the negative number of tokens to remove")
        if tokens_to_remove and self.is_initialized:
            self._map(lambda t: t[..., :tokens_to_remove, :])
            self.length += tokens_to_remove

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self._map(lambda t: t.to(self.device, non_blocking=True))

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, scales and zero points (or the float tensors)."""
        floats = 0 if self.keys is None else sum(t.numel() * t.element_size() for t in (self.keys, self.values))
        return floats + sum(s.nbytes for s in self.stored)


class QuantizedKVCache(Cache):
    """A cache of `QuantizedKVLayer`s, one per decoder layer, created as the layers first write to it."""

    quantizes_kv = True

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=QuantizedKVLayer)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def bytes_per_token_per_layer(self) -> float:
        """Bytes per cached token per layer per sequence (keys and values, scales and zero points included)."""
        layers = [layer for layer in self.layers if layer.is_initialized]
        if not layers:
            return 0.0
        tokens = layers[0].length * _batch(layers[0])
        return self.nbytes / len(layers) / max(tokens, 1)


def _batch(layer: QuantizedKVLayer) -> int:
    tensors = [layer.keys] if layer.keys is not None else list(layer.stored[0].parts.values())[:1]
    return tensors[0].shape[0] if tensors else 1


def bf16_bytes_per_token_per_layer(kv_heads: int, head_dim: int) -> int:
    """A bf16 cache: keys and values, 2 bytes each."""
    return 2 * kv_heads * head_dim * 2
