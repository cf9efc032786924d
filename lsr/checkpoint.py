"""The refined checkpoint: what the block pipeline produced, written atomically after every block.

    recipe.json               the resolved recipe (rebuilds the same model with `lsr.pipeline.apply_checkpoint`)
    lsr_state.json            model, run fingerprint, completed blocks, per-block records (written last)
    scales.safetensors        smoothing log-scales, keys "{block}.{point}"
    weights/block_{i}.safetensors   GPTQ / GPTAQ codes and scales of block i (RTN weights: recomputed from the recipe)

A killed run leaves a consistent checkpoint of its completed blocks and resumes at the next one.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lsr.quant.weights import QuantizedWeight
from lsr.recipe import Recipe

FORMAT_VERSION = 2
RECIPE_FILE = "recipe.json"
STATE_FILE = "lsr_state.json"
SCALES_FILE = "scales.safetensors"
WEIGHTS_DIR = "weights"


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename onto `path`: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def is_checkpoint(directory: str | Path) -> bool:
    return (Path(directory).expanduser() / STATE_FILE).is_file()


@dataclass
class Checkpoint:
    """A refined checkpoint read back (`load_checkpoint`)."""

    directory: Path
    recipe: Recipe
    state: dict
    log_scales: dict[str, torch.Tensor]

    @property
    def model(self) -> str:
        return self.state["model"]

    @property
    def completed_blocks(self) -> int:
        return int(self.state["completed_blocks"])

    @property
    def complete(self) -> bool:
        return self.completed_blocks == int(self.state["num_blocks"])

    def block_log_scales(self, index: int) -> dict[str, torch.Tensor]:
        prefix = f"{index}."
        return {k[len(prefix):]: v for k, v in self.log_scales.items() if k.startswith(prefix)}

    def block_weights(self, index: int) -> dict[str, QuantizedWeight] | None:
        """The stored codes of block `index` (GPTQ or GPTAQ), or None when the recipe's weights are RTN."""
        file = self.directory / WEIGHTS_DIR / f"block_{index:04d}.safetensors"
        if not file.is_file():
            if self.recipe.weights.uses_gptq:
                raise ValueError(f"{file} is missing: the checkpoint's GPTQ weights of block {index} are lost")
            return None
        tensors = load_file(file)
        names = {k.rpartition(".")[0] for k in tensors}
        return {n: QuantizedWeight(tensors[f"{n}.q"], tensors[f"{n}.scale"]) for n in sorted(names)}


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Read a refined checkpoint; clear errors for a missing, old or unreadable one."""
    directory = Path(directory).expanduser()
    paths = [directory / f for f in (STATE_FILE, RECIPE_FILE, SCALES_FILE)]
    if not all(p.is_file() for p in paths):
        needs = ", ".join(p.name for p in paths)
        raise FileNotFoundError(f"{directory} is not an lsr refined checkpoint (needs {needs})")
    try:
        state = json.loads(paths[0].read_text())
        recipe = Recipe.from_dict(json.loads(paths[1].read_text()))
        log_scales = load_file(paths[2])
    except Exception as err:  # noqa: BLE001 - re-raised with the path
        raise ValueError(f"cannot read the refined checkpoint in {directory}: {err}") from err
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: refined checkpoint format {state.get('format_version')!r}, this lsr reads "
                         f"{FORMAT_VERSION} (re-run `lsr fit`)")
    return Checkpoint(directory, recipe, state, log_scales)


class CheckpointWriter:
    """Writes a refined checkpoint block by block (the pipeline's ``on_block_end``)."""

    def __init__(self, directory: str | Path, recipe: Recipe, *, model: str, fingerprint: str, num_blocks: int,
                 log_scales: dict[str, torch.Tensor] | None = None, records: list[dict] | None = None) -> None:
        self.directory = Path(directory).expanduser()
        self.recipe, self.model, self.fingerprint, self.num_blocks = recipe, model, fingerprint, num_blocks
        self.log_scales = dict(log_scales or {})
        self.records = list(records or [])
        atomic_write(self.directory / RECIPE_FILE,
                     lambda p: Path(p).write_text(json.dumps(recipe.to_dict(), indent=2) + "\n"))

    def save_block(self, index: int, log_scales: dict[str, torch.Tensor], weights: dict[str, QuantizedWeight],
                   record: dict) -> None:
        """Add block `index` (its log-scales, GPTQ or GPTAQ codes when the recipe uses them, and its record)."""
        if self.recipe.weights.uses_gptq:
            tensors = {}
            for name, w in weights.items():
                tensors[f"{name}.q"], tensors[f"{name}.scale"] = w.q.contiguous(), w.scale.contiguous()
            atomic_write(self.directory / WEIGHTS_DIR / f"block_{index:04d}.safetensors",
                         lambda p: save_file(tensors, p))
        for point, theta in log_scales.items():
            self.log_scales[f"{index}.{point}"] = theta.detach().float().cpu().contiguous()
        self.records.append(record)
        scales = dict(self.log_scales) or {"_": torch.zeros(0)}  # safetensors needs at least one entry
        atomic_write(self.directory / SCALES_FILE, lambda p: save_file(scales, p))
        state = {"format_version": FORMAT_VERSION, "model": self.model, "fingerprint": self.fingerprint,
                 "completed_blocks": index + 1, "num_blocks": self.num_blocks, "records": self.records}
        atomic_write(self.directory / STATE_FILE, lambda p: Path(p).write_text(json.dumps(state, indent=2) + "\n"))
