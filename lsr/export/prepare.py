"""From a source (refined checkpoint, model name or in-memory model) to a rotated, smoothed model and int4 weights.

`prepare_export` is what `export_model` writes; `fake_quant_twin` turns the same model into the fake-quantized model
with exactly those weights (the reference the INT4 runtime must reproduce).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lsr.export.config import ExportConfig
from lsr.learn.method import MethodConfig, preset
from lsr.learn.refined import STATE_FILE, apply_refined, load_refined, method_from_dict
from lsr.models.adapter import LINEAR_NAMES, adapter_for
from lsr.quant.rtn import QuantSpec, quantize
from lsr.transforms.linear import QLinear, set_quantizers
from lsr.transforms.prepare import to_qlinears
from lsr.transforms.rotate import rotate_model

log = logging.getLogger(__name__)


@dataclass
class QuantizedWeight:
    """One linear's symmetric integer weight: codes ``q`` (int8 ``[N, K]``) and float32 scales ``scale`` ``[N, G]``
    (``G = 1``: one scale per output channel, the export's layout; ``G > 1``: contiguous groups of ``K / G``)."""

    q: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, shape: torch.Size) -> QuantizedWeight:
        """From `lsr.quant.rtn.quantize` / `gptq_quantize` output (grouped layout, symmetric)."""
        rows = shape[0]
        scale = scale.reshape(1, 1).expand(rows, 1) if scale.numel() == 1 else scale.reshape(rows, -1)
        return cls(q.reshape(shape).to(torch.int8), scale.float().contiguous())

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.q.shape
        groups = self.scale.shape[1]
        return (self.q.float().reshape(rows, groups, cols // groups) * self.scale[..., None]).reshape(rows, cols)


@dataclass
class PreparedModel:
    """A rotated + smoothed float model (QLinears, no quantizers on) and the int4 weights of its decoder linears."""

    model: nn.Module
    method: MethodConfig
    tokenizer: object | None
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    source: dict = field(default_factory=dict)


def is_refined_dir(source: str | Path) -> bool:
    return (Path(source).expanduser() / STATE_FILE).is_file()


def decoder_linears(model: nn.Module) -> dict[str, QLinear]:
    """``{"model.layers.{i}.self_attn.q_proj": module, ...}`` for the decoder-block linears, in data-flow order."""
    adapter = adapter_for(model)
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for layer in adapter.layers(model):
        for linear in adapter.block(layer).linears().values():
            out[names[id(linear)]] = linear
    return out


def check_weight_spec(spec: QuantSpec, *, for_export: bool) -> None:
    """The runtime holds symmetric int4 with one scale per output channel: refuse anything else at export."""
    if not for_export:
        return
    if spec.bits != 4 or not spec.symmetric or spec.granularity not in ("channel", "token"):
        raise ValueError(
            f"the INT4 export stores symmetric 4-bit weights with one scale per output channel; the method's weight "
            f"quantizer is {spec} (groups, asymmetric or other bit widths work for fake quantization only)"
        )


def load_source(
    source: str | nn.Module, config: ExportConfig, *, refined: str | Path | None = None, tokenizer=None,
    calibration: torch.Tensor | None = None,
) -> PreparedModel:
    """Load `source` and apply the rotations and smoothing scales of the method, in place, without quantizers.

    `source`: a refined checkpoint directory (``lsr fit`` output), a model name / directory, or an original
    (untransformed) in-memory model. `refined` applies a refined checkpoint to a model given by name or object;
    otherwise a plain model gets the preset ``config.method`` (presets that calibrate scales without learning use
    `calibration` windows or ``config.data``).
    """
    from lsr.models import load_model

    info: dict = {}
    if isinstance(source, (str, Path)) and refined is None and is_refined_dir(source):
        refined = source
        _, state = load_refined(refined)
        source = state["model"]
    if isinstance(source, (str, Path)):
        info["model"] = str(source)
        model, tokenizer = load_model(str(source))
    else:
        model = source
        info["model"] = getattr(model.config, "_name_or_path", "") or type(model).__name__
    model.eval()
    if refined is not None:
        _, state = load_refined(refined)
        method = method_from_dict(state["method"])
        apply_refined(model, refined, quantize=False)
        info["refined"] = str(refined)
    else:
        method = preset(config.method)
        if method.learn:
            raise ValueError(
                f"method {config.method!r} learns its scales: run `lsr fit` and export the refined checkpoint "
                "(or use a preset that needs no learning: quarot, smoothrot, quantile)"
            )
        if method.points:
            from lsr.learn.engine import BlockwiseEngine

            windows = calibration if calibration is not None else calibration_windows(tokenizer, config)
            BlockwiseEngine(model, method, windows, batch_size=config.data.batch_size).run()
            info["calibrated"] = True
        elif method.rotate:
            rotate_model(model, seed=method.seed)
        to_qlinears(model)
    info["method"] = method.name
    if hasattr(model.config, "lsr_rotation"):
        del model.config.lsr_rotation
    return PreparedModel(model, method, tokenizer, source=info)


def calibration_windows(tokenizer, config: ExportConfig) -> torch.Tensor:
    """``[num_calibration, seq_len]`` calibration windows of ``config.data``."""
    if tokenizer is None:
        raise ValueError("calibration needs a tokenizer or explicit calibration windows")
    from lsr.data.module import LsrDataModule

    d = config.data
    dm = LsrDataModule(tokenizer, source=d.source, seq_len=d.seq_len, num_calibration=d.num_calibration, seed=d.seed)
    return dm.calibration_windows()


def weight_spec(method: MethodConfig, config: ExportConfig) -> QuantSpec:
    """The method's weight quantizer, with GPTQ's group size applied when one is set."""
    spec = method.weight
    if config.weight_quantizer == "gptq" and config.gptq.group_size is not None:
        spec = QuantSpec(spec.bits, spec.symmetric, "group", config.gptq.group_size, spec.clip_ratio)
    return spec


@torch.no_grad()
def rtn_weights(model: nn.Module, spec: QuantSpec) -> dict[str, QuantizedWeight]:
    """Round-to-nearest int4 codes and per-channel scales of every decoder linear (the fake quantizer's own)."""
    out = {}
    for name, linear in decoder_linears(model).items():
        weight = linear.weight.detach().float()
        q, scale, zero = quantize(weight, spec)
        if zero is not None:
            raise ValueError("asymmetric weights are not supported by the export")
        out[name] = QuantizedWeight.from_codes(q, scale, weight.shape)
    return out


def quantize_weights(
    prepared: PreparedModel, config: ExportConfig, *, calibration: torch.Tensor | None = None,
    for_export: bool = True,
) -> dict[str, QuantizedWeight]:
    """Quantize the decoder linears with ``config.weight_quantizer``; stores and returns ``prepared.weights``.

    GPTQ runs the calibration windows block by block (see `lsr.export.calibrate`) and leaves each linear's weight
    replaced by its dequantized value; RTN leaves the float weights untouched.
    """
    spec = weight_spec(prepared.method, config)
    check_weight_spec(spec, for_export=for_export)
    if config.weight_quantizer == "rtn":
        prepared.weights = rtn_weights(prepared.model, spec)
    else:
        from lsr.export.calibrate import gptq_weights

        windows = calibration if calibration is not None else calibration_windows(prepared.tokenizer, config)
        prepared.weights = gptq_weights(
            prepared.model, prepared.method, windows, spec, config.gptq, batch_size=config.data.batch_size
        )
    return prepared.weights


@torch.no_grad()
def fake_quant_twin(prepared: PreparedModel, config: ExportConfig | None = None) -> nn.Module:
    """Turn ``prepared.model`` (in place) into its fake-quantized W4A4 twin: each decoder linear's weight becomes its
    dequantized int4 weight and its input is fake-quantized with ``method.act`` (after the online Hadamard).

    With `config`, the embedding and lm_head also take the values the export stores (``storage_dtype`` rounding, or
    int8 per row with ``embeddings_8bit``), so the twin computes what the INT4 directory holds, in float.
    """
    model = prepared.model
    if not prepared.weights:
        raise ValueError("no quantized weights: call quantize_weights first")
    for name, linear in decoder_linears(model).items():
        linear.weight.copy_(prepared.weights[name].dequantize().reshape(linear.weight.shape))
    if config is not None:
        adapter = adapter_for(model)
        for module in (adapter.embeddings(model), adapter.lm_head(model)):
            w = module.weight
            if config.embeddings_8bit:
                q, scale, _ = quantize(w.float(), QuantSpec(bits=8, granularity="channel"))
                w.copy_(q * scale)
            else:
                w.copy_(w.to(getattr(torch, config.storage_dtype)).to(w.dtype))
    for layer in adapter_for(model).layers(model):
        set_quantizers(layer, prepared.method.act, None)
    return model


__all__ = [
    "LINEAR_NAMES",
    "PreparedModel",
    "QuantizedWeight",
    "calibration_windows",
    "decoder_linears",
    "fake_quant_twin",
    "load_source",
    "quantize_weights",
    "rtn_weights",
]
