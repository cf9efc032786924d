"""Smoothing steps of the pipeline: statistics and guarded init of the log-scales, and folding them into the block."""

from __future__ import annotations

import math

import torch

from lsr.pipeline.runner import Block
from lsr.recipe import SmoothStep
from lsr.transforms.smooth import activation_basis, fold_scales, point_channels, smoothing_scales, weight_statistic

MAX_STAT_TOKENS = 1 << 16


class ActivationStatistics:
    """Per-channel max and quantile of |x| at smoothing points, gathered while the block computes its FP targets."""

    def __init__(self, points: tuple[str, ...], quantile: float, seed: int) -> None:
        self.points, self.quantile, self.seed = points, quantile, seed
        self.rows: dict[str, list[torch.Tensor]] = {}

    def observe(self, block: Block) -> list[tuple[str, object]]:
        self.rows = {p: [] for p in self.points}
        geometry = block.geometry

        def observer(point: str):
            def hook(_module, args):
                x = args[0].detach().float()
                self.rows[point].append(activation_basis(point, x.reshape(-1, x.shape[-1]), geometry).abs().cpu())
            return hook

        return [(geometry.points[p].observed, observer(p)) for p in self.points]

    def compute(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        act_max, act_quantile = {}, {}
        for point, chunks in self.rows.items():
            a = torch.cat(chunks)
            act_max[point] = a.amax(dim=0)
            if a.shape[0] > MAX_STAT_TOKENS:
                keep = torch.randperm(a.shape[0], generator=torch.Generator().manual_seed(self.seed))
                a = a[keep[:MAX_STAT_TOKENS]]
            k = max(1, min(a.shape[0], math.ceil(self.quantile * a.shape[0])))
            act_quantile[point] = a.kthvalue(k, dim=0).values
        self.rows = {}
        return act_max, act_quantile


class SmoothInit:
    """Initialise the block's log-scales from activation statistics (``s = a^α / w^(1-α)``), guarded."""

    def __init__(self, step: SmoothStep, seed: int = 0) -> None:
        self.step, self.seed = step, seed
        self.statistics = ActivationStatistics(step.points, step.quantile, seed)

    def observe(self, block: Block) -> list[tuple[str, object]]:
        return self.statistics.observe(block) if self.step.points else []

    def log_scales(self, block: Block, act_stat: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Log-scales from statistics, or all zero (s = 1) for None."""
        out = {}
        _, kv_heads, head_dim = block.pipeline.heads
        for point in self.step.points:
            if act_stat is None:
                n = point_channels(block.geometry.points[point], block.layer, kv_heads, head_dim)
                out[point] = torch.zeros(n)
                continue
            w = weight_statistic(point, block.base, block.geometry).cpu()
            out[point] = smoothing_scales(act_stat[point], w, self.step.alpha).log()
        return out

    @torch.no_grad()
    def on_block(self, block: Block) -> None:
        if not self.step.points:
            return
        act_max, act_quantile = self.statistics.compute()
        candidates = {"max": act_max}
        if self.step.statistic == "quantile":
            candidates = {"quantile": act_quantile, **(candidates if self.step.guard else {})}
        if self.step.guard:
            candidates["identity"] = None  # never start worse than the rotations alone
        scored = {}
        for name, stat in candidates.items():
            theta = self.log_scales(block, stat)
            scored[name] = (block.mse(block.params(theta)), theta)
        block.record.init = min(scored, key=lambda n: scored[n][0])
        mse, block.log_scales = scored[block.record.init]
        block.record.error_init = block.relative(mse)


class FoldScales:
    """Fold the block's (learned) smoothing scales into its weights, exactly."""

    def on_block(self, block: Block) -> None:
        if block.log_scales:
            fold_scales(block.layer, {p: t.exp() for p, t in block.log_scales.items()}, block.geometry)
            block._base = None
