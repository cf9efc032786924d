"""One architecture adapter: where norms, attention, MLP, embeddings and lm_head live.

LLaMA 2/3, Mistral and Qwen2 share HF's module layout (Qwen2 adds q/k/v biases), so one adapter covers them;
anything else is refused with the list of what is supported.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# Names of the linears inside one decoder block, in data-flow order.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class BlockLinears:
    """The modules of one decoder block that lsr transforms."""

    input_norm: nn.Module
    post_attention_norm: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear

    def linears(self) -> dict[str, nn.Linear]:
        return {name: getattr(self, name) for name in LINEAR_NAMES}


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Accessors for a LLaMA-family causal LM (`model.model.layers[i].self_attn/mlp`)."""

    model_type: str

    def embeddings(self, model: nn.Module) -> nn.Embedding:
        return model.model.embed_tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.lm_head

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def rotary_embedding(self, model: nn.Module) -> nn.Module:
        return model.model.rotary_emb

    def block(self, layer: nn.Module) -> BlockLinears:
        attn, mlp = layer.self_attn, layer.mlp
        return BlockLinears(
            input_norm=layer.input_layernorm,
            post_attention_norm=layer.post_attention_layernorm,
            q_proj=attn.q_proj,
            k_proj=attn.k_proj,
            v_proj=attn.v_proj,
            o_proj=attn.o_proj,
            gate_proj=mlp.gate_proj,
            up_proj=mlp.up_proj,
            down_proj=mlp.down_proj,
        )

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
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported architecture {model_type!r}: lsr supports {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(LLaMA 2/3, Mistral, Qwen2 causal LMs)"
        )
    if getattr(model.config, "mlp_bias", False):
        raise ValueError("MLP biases are not supported (no LLaMA/Mistral/Qwen2 checkpoint uses them)")
    return ArchitectureAdapter(model_type)
