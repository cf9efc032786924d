"""`QAttention`: the model's own attention with R3 and the KV-cache quantizer between RoPE and the cache.

Forward, as Hugging Face's LLaMA / Mistral / Qwen2 attention, plus two steps after RoPE::

    q, k, v = q_proj(x), k_proj(x), v_proj(x);  q, k = RoPE(q, k)
    q, k = q·H, k·H                  (r3: Hadamard of size head_dim; exact, q·kᵀ unchanged)
    k, v = Q_kv(k), Q_kv(v)          (kv_quant, while the model's quantizers are on: `set_quantizers`)
    k, v = cache.update(k, v)        (a cache with ``quantizes_kv`` quantizes itself: it gets k, v before Q_kv)
    o_proj(attention(q, k, v))

The module keeps its class's parameters and attributes (the instance's class becomes a subclass of its own), so
state-dict keys and HF's generation machinery are unchanged.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from lsr.hadamard import hadamard_transform
from lsr.models.adapter import adapter_for
from lsr.quant.kv import kv_fake_quantize
from lsr.quant.rtn import QuantSpec


class QAttention(nn.Module):
    """Mixin placed in front of an HF attention class (see `to_qattention`)."""

    r3: bool
    kv_quant: QuantSpec | None  # the recipe's key/value quantizer (fixed once prepared)
    kv_active: bool  # whether it runs now (the model's quantizers are on)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache=None, past_key_values=None, **kwargs
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = cache if cache is not None else past_key_values
        hf = sys.modules[self._hf_attention.__module__]
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = hf.apply_rotary_pos_emb(query, key, cos, sin)
        if self.r3:
            query, key = hadamard_transform(query), hadamard_transform(key)
        spec = self.kv_quant if self.kv_active else None
        if cache is not None and getattr(cache, "quantizes_kv", False):
            key, value = cache.update(key, value, self.layer_idx, spec=spec)
        else:
            if spec is not None:
                key, value = kv_fake_quantize(key, spec), kv_fake_quantize(value, spec)
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attention = hf.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                             hf.eager_attention_forward)
        window = getattr(self, "sliding_window", None) or getattr(self.config, "sliding_window", None)
        extra = {"sliding_window": window} if window is not None else {}
        out, weights = attention(self, query, key, value, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, **extra, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights

    def extra_repr(self) -> str:
        return f"r3={self.r3}, kv_quant={self.kv_quant}, kv_active={self.kv_active}"


@functools.cache
def _q_class(cls: type) -> type:
    return type(f"Q{cls.__name__}", (QAttention, cls), {"_hf_attention": cls})


def to_qattention(model: nn.Module, *, r3: bool, kv_quant: QuantSpec | None, active: bool = False) -> nn.Module:
    """Make every decoder block's attention a `QAttention` with R3 (`r3`) and the key/value quantizer `kv_quant`
    (running when `active`, or once `set_quantizers` turns the model's quantizers on); in place."""
    adapter = adapter_for(model)
    for layer in adapter.layers(model):
        attn = layer.get_submodule(adapter.mapping.attention)
        if not isinstance(attn, QAttention):
            attn.__class__ = _q_class(type(attn))
        attn.r3, attn.kv_quant, attn.kv_active = r3, kv_quant, active
    return model


def qattentions(module: nn.Module) -> list[QAttention]:
    return [m for m in module.modules() if isinstance(m, QAttention)]
