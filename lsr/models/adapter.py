"""Architecture mappings as data, and the adapter that reads a model through them.

A decoder family is one `ArchitectureMapping`: where embeddings, norms, layers and lm_head live, which linears read
and write the residual stream, which norm feeds which linears, the per-head rotation pair, the online-Hadamard
target, the smoothing points (producer -> consumers) and GPTQ's sequential groups. Every transform, the block
pipeline and the export go through these names; adding a family is adding an entry to `MAPPINGS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

PointKind = Literal["norm", "online_hadamard", "heads"]


@dataclass(frozen=True)
class SmoothingPoint:
    """Where a per-channel scale ``s`` is exact: the producer's output is divided by ``s``, the consumers' input
    columns multiplied by ``s``.

    ``kind``: ``norm`` (an RMSNorm weight absorbs 1/s, in the rotated basis), ``online_hadamard`` (a linear's output
    rows absorb 1/s before the consumer's online Hadamard), ``heads`` (per kv head, before the head-wise rotation R2).
    ``observed``: the module whose input the statistics are taken from.
    """

    kind: PointKind
    producer: str
    consumers: tuple[str, ...]

    @property
    def observed(self) -> str:
        return self.consumers[0]


@dataclass(frozen=True)
class ArchitectureMapping:
    """Module paths of one decoder family (relative to the model, or to one decoder block)."""

    embeddings: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    layers: str = "model.layers"
    rotary_embedding: str = "model.rotary_emb"
    # Inside one decoder block: the attention (R3 and the KV cache live in it), then the linears in data-flow order.
    attention: str = "self_attn"
    linears: tuple[str, ...] = (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    )
    norm_readers: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    )
    residual_writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    head_rotation: tuple[str, str] = ("self_attn.v_proj", "self_attn.o_proj")  # R2: (value producer, consumer)
    online_hadamard: str = "mlp.down_proj"  # R4
    smoothing_points: dict[str, SmoothingPoint] = field(default_factory=lambda: {
        "qkv": SmoothingPoint("norm", "input_layernorm",
                              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        "gateup": SmoothingPoint("norm", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        "down": SmoothingPoint("online_hadamard", "mlp.up_proj", ("mlp.down_proj",)),
        "vo": SmoothingPoint("heads", "self_attn.v_proj", ("self_attn.o_proj",)),
    })
    gptq_groups: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )

    @property
    def residual_readers(self) -> tuple[str, ...]:
        return tuple(name for _, readers in self.norm_readers for name in readers)


LLAMA = ArchitectureMapping()
# LLaMA 2/3, Mistral and Qwen2 share HF's module layout (Qwen2 adds q/k/v biases, which the transforms carry).
MAPPINGS: dict[str, ArchitectureMapping] = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA}
SUPPORTED_MODEL_TYPES = tuple(MAPPINGS)
SMOOTHING_POINTS = tuple(LLAMA.smoothing_points)
LINEAR_NAMES = tuple(name.rpartition(".")[2] for name in LLAMA.linears)


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Accessors for one model through its family's mapping."""

    model_type: str
    mapping: ArchitectureMapping

    def embeddings(self, model: nn.Module) -> nn.Embedding:
        return model.get_submodule(self.mapping.embeddings)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.mapping.final_norm)

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.get_submodule(self.mapping.lm_head)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.mapping.layers)

    def rotary_embedding(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.mapping.rotary_embedding)

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """``{"self_attn.q_proj": module, ...}`` of one decoder block, in data-flow order."""
        return {name: layer.get_submodule(name) for name in self.mapping.linears}

    def decoder_linears(self, model: nn.Module) -> dict[str, nn.Linear]:
        """``{"model.layers.{i}.self_attn.q_proj": module, ...}`` for every block, in data-flow order."""
        return {f"{self.mapping.layers}.{i}.{name}": module
                for i, layer in enumerate(self.layers(model)) for name, module in self.linears(layer).items()}

    def head_dims(self, model: nn.Module) -> tuple[int, int, int]:
        """(num_attention_heads, num_key_value_heads, head_dim)."""
        cfg = model.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return heads, kv_heads, head_dim


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """Return the adapter for `model`, or raise a ValueError naming the supported architectures."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MAPPINGS:
        raise ValueError(
            f"unsupported architecture {model_type!r}: lsr supports {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(LLaMA 2/3, Mistral, Qwen2 causal LMs)"
        )
    if getattr(model.config, "mlp_bias", False):
        raise ValueError("MLP biases are not supported (no LLaMA/Mistral/Qwen2 checkpoint uses them)")
    return ArchitectureAdapter(model_type, MAPPINGS[model_type])
