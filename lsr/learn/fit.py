"""`quantize_` (the Python entry point) and `fit` (the refined-checkpoint run behind ``lsr fit``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lsr.checkpoint import CheckpointWriter, is_checkpoint, load_checkpoint
from lsr.data.config import DataConfig
from lsr.learn.block import LearnScales
from lsr.learn.report import TensorBoardReport, write_report
from lsr.models.adapter import adapter_for
from lsr.models.loading import ModelConfig, load_model
from lsr.pipeline.apply import QuantizedModel, apply_checkpoint, apply_recipe
from lsr.recipe import Recipe


def device_for(trainer: dict | None) -> torch.device:
    """The device the block pipeline runs on, from the Trainer's accelerator setting."""
    accelerator = str((trainer or {}).get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError(f"trainer.accelerator={accelerator!r} but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def quantize_(
    model: nn.Module, recipe: Recipe | str, calibration: torch.Tensor | None = None, *, batch_size: int = 4,
    trainer: dict | None = None, logger: Any = None, log=print, **hooks: Any,
) -> QuantizedModel:
    """Apply `recipe` (a `Recipe` or a preset name) to `model` in place; returns the model and its int codes.

    `calibration`: ``[n, seq_len]`` token windows (needed by smoothing, learning and GPTQ). `trainer`: keyword
    arguments of the per-block `lightning.Trainer` when the recipe learns. Other keywords go to
    `lsr.pipeline.apply_recipe` (``writer``, ``resume``, ``on_block_end``).
    """
    recipe = Recipe.from_name(recipe) if isinstance(recipe, str) else recipe
    learner = None
    if recipe.learn is not None:
        learner = LearnScales(recipe.learn, seed=recipe.seed, trainer=trainer, logger=logger)
    return apply_recipe(model, recipe, calibration, learner=learner, device=device_for(trainer),
                        batch_size=batch_size, log=log, **hooks)


def run_fingerprint(model: str, recipe: Recipe, data: DataConfig, batch_size: int, trainer: dict | None) -> str:
    """What must match for a killed run to resume: model, recipe, calibration data, batch size, and the trainer's
    plain settings (precision, clipping, limits; objects such as callbacks are left out)."""
    calibration = {k: getattr(data, k) for k in ("source", "seq_len", "num_calibration", "seed")}
    plain = {k: v for k, v in (trainer or {}).items() if isinstance(v, (str, int, float, bool, type(None)))}
    blob = json.dumps({"model": model, "recipe": recipe.to_dict(), "data": calibration, "batch_size": batch_size,
                       "trainer": plain}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fit(
    model: ModelConfig, recipe: Recipe, data: DataConfig, output_dir: str | Path, *, batch_size: int = 4,
    trainer: dict | None = None, log_dir: str = "lightning_logs", linear_errors: bool = True,
) -> tuple[QuantizedModel, Any]:
    """Apply `recipe` to `model` over `data`'s calibration windows, writing a refined checkpoint in `output_dir`
    after every block (a killed run resumes at the next block; a finished one is reused), per-block errors to
    TensorBoard under `log_dir` (per-linear errors too with `linear_errors`) and a report beside the checkpoint.
    Returns the result and the tokenizer."""
    output_dir = Path(output_dir).expanduser()
    lm, tokenizer = load_model(model.name, dtype=model.torch_dtype)
    fingerprint = run_fingerprint(model.name, recipe, data, batch_size, trainer)
    resume = None
    if is_checkpoint(output_dir):
        resume = load_checkpoint(output_dir)
        if resume.state.get("fingerprint") != fingerprint:
            raise ValueError(f"{output_dir} holds a run with a different model, recipe, data or trainer; choose "
                             "another output_dir (or delete it to start over)")
        if resume.complete:
            print(f"{output_dir}: finished run found, reusing it")
            return apply_checkpoint(lm, resume), tokenizer
        print(f"resuming {output_dir}: {resume.completed_blocks}/{resume.state['num_blocks']} blocks done")
    elif output_dir.exists() and any(output_dir.iterdir()):
        raise ValueError(f"{output_dir} exists and is not an lsr refined checkpoint: choose another output_dir")
    windows = data.calibration_windows(tokenizer)
    num_blocks = len(adapter_for(lm).layers(lm))
    writer = CheckpointWriter(output_dir, recipe, model=model.name, fingerprint=fingerprint, num_blocks=num_blocks,
                              log_scales=resume.log_scales if resume else None,
                              records=resume.state["records"] if resume else None)
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(log_dir, name=recipe.name, default_hp_metric=False)
    logger.log_hyperparams({"recipe": json.dumps(recipe.to_dict()), "model": model.name, "data": data.describe()})
    report = TensorBoardReport(logger)
    print(f"{recipe.name}: {num_blocks} blocks, {data.describe()}; TensorBoard: {logger.log_dir}")
    result = quantize_(lm, recipe, windows, batch_size=batch_size, trainer=trainer, logger=logger, writer=writer,
                       resume=resume, on_block_end=report, linear_errors=linear_errors)
    logger.finalize("success")
    write_report(result.records, output_dir, recipe.name)
    return result, tokenizer
