"""Blockwise learning with Lightning: one `BlockModule` per decoder block, fitted by its own `Trainer`.

The module wraps the block (frozen) and what it learns: smoothing log-scales, one activation clip per quantizer and
one weight clip per output channel (``sigmoid(logit)``, their own learning rate). A batch is ``(X, Y)`` (the block's
inputs from the quantized prefix or the FP chain, and its FP outputs). The loss is the MSE (or relative error) of the
quantized block against ``Y`` — with the export's RTN weight quantizer in the loop, or float weights when a GPTQ step
follows (``learn.weights``), plus optionally each linear's own relative error (``learn.linear_loss``); gradients
reach the parameters through the straight-through quantizers. The optimizer, LR schedule, gradient clipping,
precision, callbacks, loggers and progress bar are Lightning's own. After every epoch the whole calibration set is
scored and the best state so far is kept.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lsr.pipeline.runner import Block
from lsr.quant.rtn import best_clip
from lsr.recipe import LearnStep
from lsr.transforms.linear import QLinear, qlinears


class EpochSampler(Sampler[int]):
    """A seeded permutation of the calibration windows, new each epoch (Lightning calls `set_epoch`)."""

    def __init__(self, n: int, seed: int, block: int) -> None:
        self.n, self.seed, self.block, self.epoch = n, seed, block, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.block * 1_009 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-4, CLIP_INIT_MAX)
    return torch.log(p) - torch.log1p(-p)


CLIP_INIT_MAX = 0.995  # sigmoid(logit) never reaches 1: a clip of 1 starts just below it


class BlockModule(L.LightningModule):
    """One decoder block and what it learns: smoothing log-scales, activation clips per quantizer (one per group of
    linears reading the same input) and weight clips per output channel, both as ``sigmoid(logit)``."""

    def __init__(self, block: Block, step: LearnStep, *, act_clip: float = 1.0, step_offset: int = 0) -> None:
        super().__init__()
        self.block = block.layer.requires_grad_(False)
        self.__dict__["walk"] = block  # the pipeline's view of this block (targets, inputs, quantizers): not a module
        self.step_cfg = step
        self.step_offset = step_offset
        self.float_weights = step.weights == "float"
        # An OrderedDict keeps the points' order (a plain dict would be sorted by ParameterDict).
        self.log_scales = nn.ParameterDict(OrderedDict(
            (p, nn.Parameter(t.detach().clone(), requires_grad=step.scales)) for p, t in block.log_scales.items()))
        self.register_buffer("theta0", torch.cat([t.detach().flatten() for t in self.log_scales.values()]))
        self.groups = block.mapping.gptq_groups  # linears that read one input share one activation quantizer
        self.act_logits = nn.ParameterDict()
        if step.act_clip:
            for i, _ in enumerate(self.groups):
                self.act_logits[str(i)] = nn.Parameter(_logit(torch.tensor(float(act_clip))))
        self.weight_logits = nn.ParameterDict()
        if step.learns_weight_clip:
            params = block.params(block.log_scales) or dict(block.layer.named_parameters())
            for name in block.mapping.linears:
                start = best_clip(params[f"{name}.weight"].detach().float(), block.weight_spec)
                self.weight_logits[name.replace(".", "/")] = nn.Parameter(_logit(start).to(block.device))
        self.best = self.current()
        init = block.record.error_init * block.target_power
        self.best_mse = init if math.isfinite(init) and not self.float_weights and not self.act_logits \
            and not self.weight_logits else self.score()
        self.stopped_on_nonfinite = False

    # ------------------------------------------------------------------ the learned quantities
    def clips(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(activation clip per linear, weight clip ``[out, 1]`` per linear), differentiable."""
        act = {name: torch.sigmoid(self.act_logits[str(i)])
               for i, names in enumerate(self.groups) for name in names if str(i) in self.act_logits}
        weight = {key.replace("/", "."): torch.sigmoid(t) for key, t in self.weight_logits.items()}
        return act, weight

    def current(self) -> dict[str, torch.Tensor]:
        """A detached copy of everything learned (``scale/…``, ``act/…``, ``weight/…``)."""
        out = {f"scale/{p}": t.detach().clone() for p, t in self.log_scales.items()}
        out |= {f"act/{k}": t.detach().clone() for k, t in self.act_logits.items()}
        out |= {f"weight/{k}": t.detach().clone() for k, t in self.weight_logits.items()}
        return out

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        for prefix, params in (("scale/", self.log_scales), ("act/", self.act_logits), ("weight/", self.weight_logits)):
            for k, t in params.items():
                t.copy_(state[prefix + k])

    @torch.no_grad()
    def score(self) -> float:
        """MSE of the quantized block, as learning sees it, over all calibration windows."""
        act, weight = self.clips()
        return self.walk.mse(self.walk.params(dict(self.log_scales)), float_weights=self.float_weights,
                             act_clips=act, weight_clips=weight)

    def learned(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The best (log-scales, activation clips, weight clips), detached, on CPU."""
        self.load(self.best)
        act, weight = self.clips()
        return ({p: t.detach().cpu() for p, t in self.log_scales.items()},
                {n: t.detach().cpu() for n, t in act.items()}, {n: t.detach().cpu() for n, t in weight.items()})

    # ------------------------------------------------------------------ training
    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(training loss, relative error) of the quantized block on one batch."""
        walk = self.walk
        act, weight = self.clips()
        linear_errors: list[torch.Tensor] = []
        with self._linear_errors(linear_errors):
            out = walk.forward(x, walk.params(dict(self.log_scales)), quantized=True,
                               weights_ready=self.float_weights, act_clips=act, weight_clips=weight)
        power = y.pow(2).mean().clamp_min(1e-30)
        mse = F.mse_loss(out, y)
        relative = mse / power
        loss = relative if self.step_cfg.loss == "relative" else mse
        if linear_errors:
            loss = loss + self.step_cfg.linear_loss * torch.stack(linear_errors).mean() * (
                1.0 if self.step_cfg.loss == "relative" else power)
        return loss, relative

    @contextmanager
    def _linear_errors(self, errors: list[torch.Tensor]):
        """With ``linear_loss``, collect each linear's relative output error against its float product on the same
        input (the float product detached: it is the linear's own target)."""
        if not self.step_cfg.linear_loss:
            yield
            return

        def hook(mod: QLinear, args: tuple, output: torch.Tensor) -> None:
            with torch.no_grad():
                reference = F.linear(mod.rotate_input(args[0]), mod.weight, mod.bias)
            errors.append((output - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30))

        handles = [m.register_forward_hook(hook) for m in qlinears(self.block)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        loss, relative = self._loss(x, y)
        if not torch.isfinite(loss):
            self.restore_best(f"non-finite loss {loss.item()}")
            self.trainer.should_stop = True
            return None
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log_dict({"train/relative_error": relative.detach(), "train/lr": lr,
                       "step": float(self.step_offset + self.global_step)}, on_step=True, on_epoch=False,
                      prog_bar=False, batch_size=x.shape[0])
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, logger=False,
                 batch_size=x.shape[0])
        return loss

    @torch.no_grad()
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Keep the log-scales within ``θ₀ ± band``."""
        thetas = list(self.log_scales.values())
        if not thetas:
            return
        flat = torch.cat([t.flatten() for t in thetas])
        band = self.step_cfg.band
        flat = torch.maximum(torch.minimum(flat, self.theta0 + band), self.theta0 - band)
        for t, chunk in zip(thetas, flat.split([t.numel() for t in thetas]), strict=True):
            t.copy_(chunk.view_as(t))

    @torch.no_grad()
    def on_train_epoch_end(self) -> None:
        """Score all calibration windows; remember the best learned state."""
        if self.stopped_on_nonfinite:
            return
        mse = self.score()
        if math.isfinite(mse) and mse < self.best_mse:
            self.best_mse, self.best = mse, self.current()

    @torch.no_grad()
    def restore_best(self, reason: str) -> None:
        warnings.warn(f"block {self.walk.index}: {reason}; restoring its last good scales", stacklevel=2)
        self.stopped_on_nonfinite = True
        self.load(self.best)

    def configure_optimizers(self):
        cfg = self.step_cfg
        groups = []
        if cfg.scales and len(self.log_scales):
            groups.append({"params": list(self.log_scales.parameters()), "lr": cfg.lr})
        clips = [*self.act_logits.parameters(), *self.weight_logits.parameters()]
        if clips:
            groups.append({"params": clips, "lr": cfg.clip_lr})
        if cfg.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.Adam(groups)
        if cfg.schedule == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@contextmanager
def _quiet_lightning():
    """Lightning announces its accelerators at every Trainer: once per block is noise."""
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class LearnScales:
    """The learning step as a pipeline hook: a Trainer fits each block's `BlockModule`.

    Args:
        step: the recipe's learn step.
        seed: data-order seed.
        trainer: keyword arguments of `lightning.Trainer` (accelerator, precision, gradient_clip_val, callbacks,
            enable_progress_bar, limit_train_batches, ...); ``max_epochs`` comes from ``step.epochs``.
        logger: a Lightning logger shared by all blocks (steps continue across blocks), or None.
    """

    def __init__(self, step: LearnStep, *, seed: int = 0, trainer: dict | None = None, logger: Any = None) -> None:
        self.step, self.seed, self.logger = step, seed, logger
        self.trainer_kwargs = dict(trainer or {})
        for key in ("max_epochs", "logger", "max_steps"):
            if key in self.trainer_kwargs:
                raise ValueError(f"trainer.{key} is set by lsr (learn.epochs, the run's logger); remove it")
        self.global_step = 0

    def on_block(self, block: Block) -> None:
        module = BlockModule(block, self.step, act_clip=block.act.clip_ratio, step_offset=self.global_step)
        loader = DataLoader(TensorDataset(block.inputs, block.targets), batch_size=self.step.batch_size,
                            sampler=EpochSampler(block.num_samples, self.seed, block.index))
        kwargs = {"enable_checkpointing": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                  "limit_val_batches": 0, "enable_progress_bar": False, **self.trainer_kwargs}
        with _quiet_lightning(), warnings.catch_warnings():
            for message in (".*does not have many workers.*", ".*returned `None`.*", ".*in eval mode.*",
                            ".*LeafSpec.*", ".*log_every_n_steps.*"):
                warnings.filterwarnings("ignore", message=message)
            trainer = L.Trainer(max_epochs=self.step.epochs, logger=self.logger or False, **kwargs)
            trainer.fit(module, train_dataloaders=loader)
        block.layer.to(block.device)  # the strategy's teardown moves the module to CPU
        self.global_step += trainer.global_step
        block.log_scales, act_clips, block.weight_clips = module.learned()
        block.set_act_clips(act_clips)
        block.record.stopped_on_nonfinite = module.stopped_on_nonfinite
        block.record.error_learned = block.relative(module.best_mse if not module.float_weights else block.mse())
