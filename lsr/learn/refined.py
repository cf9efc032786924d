"""The refined checkpoint: learned scales (safetensors) + the resolved config (JSON), written atomically.

`apply_refined` turns an original HF model into the fake-quantized W4A4 model those scales describe, in one call.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lsr.learn.method import MethodConfig
from lsr.models.adapter import adapter_for
from lsr.quant.rtn import QuantSpec
from lsr.transforms.linear import set_quantizers
from lsr.transforms.prepare import to_qlinears
from lsr.transforms.rotate import rotate_model
from lsr.transforms.smooth import BlockGeometry, base_parameters, smoothed_parameters

SCALES_FILE = "scales.safetensors"
STATE_FILE = "lsr_state.json"


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def method_to_dict(method: MethodConfig) -> dict:
    return asdict(method)


def method_from_dict(data: dict) -> MethodConfig:
    data = dict(data)
    data["weight"] = QuantSpec(**data["weight"])
    data["act"] = QuantSpec(**data["act"])
    return MethodConfig(**data)


def save_refined(
    directory: str | Path, log_scales: dict[str, torch.Tensor], state: dict
) -> None:
    """Write ``scales.safetensors`` (keys ``"{block}.{point}"``, log-scales) and ``lsr_state.json``."""
    directory = Path(directory)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in log_scales.items()}
    _atomic_write(directory / SCALES_FILE, lambda p: save_file(tensors, p))
    _atomic_write(directory / STATE_FILE, lambda p: Path(p).write_text(json.dumps(state, indent=2)))


def load_refined(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a refined checkpoint; clear errors for a missing or unreadable one."""
    directory = Path(directory)
    state_path, scales_path = directory / STATE_FILE, directory / SCALES_FILE
    if not state_path.is_file() or not scales_path.is_file():
        raise FileNotFoundError(f"{directory} is not an lsr refined checkpoint (needs {STATE_FILE} and {SCALES_FILE})")
    try:
        state = json.loads(state_path.read_text())
        scales = load_file(scales_path)
    except Exception as err:  # noqa: BLE001 - re-raised with the path
        raise ValueError(f"cannot read the refined checkpoint in {directory}: {err}") from err
    return scales, state


def block_scales(log_scales: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    prefix = f"{index}."
    return {k[len(prefix):]: v.exp() for k, v in log_scales.items() if k.startswith(prefix)}


@torch.no_grad()
def fold_scales(layer: nn.Module, scales: dict[str, torch.Tensor], geometry: BlockGeometry) -> None:
    """Fold smoothing scales into one rotated decoder block's parameters (exact)."""
    device = layer.mlp.down_proj.weight.device
    params = smoothed_parameters(
        base_parameters(layer, geometry), {p: s.to(device) for p, s in scales.items()}, geometry
    )
    for name, p in layer.named_parameters():
        p.copy_(params[name])


@torch.no_grad()
def apply_refined(model: nn.Module, directory: str | Path, *, quantize: bool = True) -> nn.Module:
    """Rotate `model`, fold the checkpoint's learned scales and (optionally) switch on its fake quantizers."""
    log_scales, state = load_refined(directory)
    method = method_from_dict(state["method"])
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    if state["completed_blocks"] != len(layers):
        raise ValueError(
            f"{directory} holds {state['completed_blocks']} of {len(layers)} blocks: the run did not finish "
            "(resume it with the same `lsr fit` command)"
        )
    if method.rotate:
        rotate_model(model, seed=method.seed)
    to_qlinears(model)
    heads = adapter.head_dims(model)
    for index, layer in enumerate(layers):
        scales = block_scales(log_scales, index)
        if scales:
            fold_scales(layer, scales, BlockGeometry.of(layer, *heads))
    if quantize:
        for layer in layers:
            set_quantizers(layer, method.act, method.weight)
    return model
