"""Text generation with any lsr model (FP, fake-quant, loaded INT4), streamed, timed, with the KV cache measured.

    report = generate(model, tokenizer, "What is a KV cache?", max_new_tokens=64)
    print(report.summary())

The prompt goes through the tokenizer's chat template when it has one. A model whose attention quantizes its keys and
values (an INT4 export with a ``kv_cache`` entry, a fake-quant model with a ``kv_cache`` step) generates with a
`QuantizedKVCache` (codes + scales stored); any other with transformers' `DynamicCache`. The cache is measured after
generation: bytes per token per layer, against a bf16 cache of the same shape.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, TextStreamer

from lsr.export.kv_cache import QuantizedKVCache, bf16_bytes_per_token_per_layer
from lsr.models.adapter import adapter_for
from lsr.transforms.attention import qattentions


class TimedStreamer(TextStreamer):
    """transformers' TextStreamer (prints as tokens arrive), recording when each new token arrived."""

    def __init__(self, tokenizer, *, echo: bool = True, **decode_kwargs) -> None:
        super().__init__(tokenizer, skip_prompt=True, **decode_kwargs)
        self.echo, self.times = echo, []

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:
            self.times.append(time.perf_counter())
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.echo:
            super().on_finalized_text(text, stream_end)


@dataclass
class GenerationReport:
    """What one generation produced and cost."""

    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float  # prompt (prefill) to last token
    first_token_seconds: float  # prefill and the first new token
    cache: str  # the cache class
    cache_bytes_per_token_per_layer: float
    bf16_bytes_per_token_per_layer: int

    @property
    def decode_tokens_per_second(self) -> float:
        """New tokens after the first, per second of decoding (the prefill left out)."""
        decode = self.seconds - self.first_token_seconds
        return (self.new_tokens - 1) / decode if self.new_tokens > 1 and decode > 0 else float("nan")

    @property
    def cache_ratio(self) -> float:
        return self.cache_bytes_per_token_per_layer / self.bf16_bytes_per_token_per_layer

    def summary(self) -> str:
        return (f"{self.new_tokens} new tokens after a {self.prompt_tokens}-token prompt in {self.seconds:.2f}s: "
                f"{self.new_tokens / self.seconds:.1f} tokens/s overall, {self.decode_tokens_per_second:.1f} tokens/s "
                f"decoding (first token {self.first_token_seconds:.2f}s)\n"
                f"KV cache ({self.cache}): {self.cache_bytes_per_token_per_layer:.1f} bytes per token per layer, "
                f"bf16: {self.bf16_bytes_per_token_per_layer} ({self.cache_ratio:.3f}x)")


def quantizes_kv(model: nn.Module) -> bool:
    return any(a.kv_quant is not None and a.kv_active for a in qattentions(model))


def new_cache(model: nn.Module) -> QuantizedKVCache | DynamicCache:
    """A `QuantizedKVCache` for a model whose attention quantizes keys and values, else a `DynamicCache`."""
    return QuantizedKVCache() if quantizes_kv(model) else DynamicCache(config=model.config)


def cache_bytes_per_token_per_layer(cache: QuantizedKVCache | DynamicCache) -> float:
    """Bytes held per token per layer per sequence (a DynamicCache: its float keys and values)."""
    if isinstance(cache, QuantizedKVCache):
        return cache.bytes_per_token_per_layer()
    layers = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None and layer.keys.numel()]
    if not layers:
        return 0.0
    total = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
    batch, _, tokens, _ = layers[0].keys.shape
    return total / len(layers) / (batch * tokens)


def prompt_ids(tokenizer, prompt: str, *, chat: bool = True) -> torch.Tensor:
    """``[1, n]`` token ids of `prompt`, through the chat template (user turn, generation prompt) when the tokenizer
    has one and `chat`."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, *, max_new_tokens: int = 64, chat: bool = True,
             temperature: float = 0.0, echo: bool = True, device: str | torch.device = "cpu",
             generation_config=None) -> GenerationReport:
    """Generate from `prompt` (greedy, or sampled at `temperature` > 0), printing tokens as they come (`echo`)."""
    ids = prompt_ids(tokenizer, prompt, chat=chat).to(device)
    cache = new_cache(model)
    streamer = TimedStreamer(tokenizer, echo=echo, skip_special_tokens=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=max_new_tokens,
                         streamer=streamer, pad_token_id=pad, generation_config=generation_config, **sampling)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    _, kv_heads, head_dim = adapter_for(model).head_dims(model)
    first = streamer.times[0] - start if streamer.times else seconds
    return GenerationReport(tokenizer.decode(new, skip_special_tokens=True), ids.shape[1], int(new.numel()), seconds,
                            first, type(cache).__name__, cache_bytes_per_token_per_layer(cache),
                            bf16_bytes_per_token_per_layer(kv_heads, head_dim))
