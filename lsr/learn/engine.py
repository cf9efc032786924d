"""Blockwise smoothing-scale calibration, framework-free: Lightning drives it, scripts can call it directly.

For decoder block l: targets ``Y_l = Block_l^FP(X_l^FP)``; statistics of |x| at each smoothing point on X_l^FP;
log-scales initialised from them; optionally trained so that the fake-quantized block reproduces Y_l; then folded
into the block's weights (exactly) and the inputs of block l+1 computed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lsr.hadamard import hadamard_transform
from lsr.learn.method import MethodConfig
from lsr.learn.refined import fold_scales
from lsr.metrics import LayerError
from lsr.models.adapter import adapter_for
from lsr.quant.rtn import fake_quantize
from lsr.transforms.linear import QLinear, set_quantizers
from lsr.transforms.prepare import to_qlinears
from lsr.transforms.rotate import rotate_model
from lsr.transforms.smooth import (
    BlockGeometry,
    activation_basis,
    base_parameters,
    point_channels,
    smoothed_parameters,
    smoothing_scales,
    weight_statistic,
)

STAT_HOOKS = {"qkv": "self_attn.q_proj", "gateup": "mlp.gate_proj", "vo": "self_attn.o_proj", "down": "mlp.down_proj"}
MAX_STAT_TOKENS = 1 << 16


@dataclass
class BlockResult:
    """What happened to one block (for logs and reports)."""

    index: int
    init: str
    loss_init: float
    loss_final: float
    linear_error_before: dict[str, float] = field(default_factory=dict)
    linear_error_after: dict[str, float] = field(default_factory=dict)
    stopped_on_nonfinite: bool = False


class BlockwiseEngine(nn.Module):
    """Holds the model, the calibration activations and one log-scale ParameterDict per block."""

    def __init__(
        self,
        model: nn.Module,
        method: MethodConfig,
        windows: torch.Tensor,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 4,
    ) -> None:
        super().__init__()
        self.method, self.device, self.batch_size = method, torch.device(device), batch_size
        self.adapter = adapter_for(model)
        if method.rotate:
            rotate_model(model, seed=method.seed)
        to_qlinears(model)
        self._model = [model]  # not a submodule: its weights are not part of this module's state
        self.heads = self.adapter.head_dims(model)
        layers = self.adapter.layers(model)
        self.log_scales = nn.ModuleList(
            nn.ParameterDict(
                {p: nn.Parameter(torch.zeros(self._channels(p, layer))) for p in method.points}
            )
            for layer in layers
        )
        for p in self.log_scales.parameters():
            p.requires_grad_(False)
        self.theta0 = torch.zeros(0)
        with torch.no_grad():
            embed = self.adapter.embeddings(model)
            self.x_fp = torch.cat([embed(w[None].to(embed.weight.device)) for w in windows]).cpu()
        self.x_q = self.x_fp.clone() if method.inputs == "quantized" else None
        positions = torch.arange(windows.shape[1])[None]
        cos, sin = self.adapter.rotary_embedding(model)(self.x_fp[:1], positions)
        self.position_embeddings = (cos.to(self.device), sin.to(self.device))
        self.results: list[BlockResult] = []
        self.block: int | None = None

    # ----------------------------------------------------------------- helpers
    @property
    def model(self) -> nn.Module:
        return self._model[0]

    @property
    def num_blocks(self) -> int:
        return len(self.log_scales)

    @property
    def num_samples(self) -> int:
        return self.x_fp.shape[0]

    def _channels(self, point: str, layer: nn.Module) -> int:
        _, kv_heads, head_dim = self.heads
        return point_channels(point, layer, kv_heads, head_dim)

    def layer(self, index: int) -> nn.Module:
        return self.adapter.layers(self.model)[index]

    def inputs(self) -> torch.Tensor:
        return self.x_q if self.x_q is not None else self.x_fp

    def _run(
        self, params: dict[str, torch.Tensor] | None, x: torch.Tensor, quantized: bool, weights_ready: bool = False
    ) -> torch.Tensor:
        """Block forward; ``quantized`` switches on Q_a and Q_w (Q_w skipped when ``weights_ready``)."""
        layer = self.layer(self.block)
        m = self.method
        weight = None if weights_ready else m.weight
        if weight is not None and torch.is_grad_enabled() and weight.clip_search:
            # Training steps: the clip-ratio search (16 candidate quantizations of every weight per step) would
            # cost several times the block itself, so gradients use a fixed clip of 1; scoring, the choice of the
            # best scales and everything after learning use the searched clip.
            weight = replace(weight, clip_search=False)
        set_quantizers(layer, m.act if quantized else None, weight if quantized else None)
        try:
            kwargs = {"position_embeddings": self.position_embeddings, "attention_mask": None}
            if params is None:
                return layer(x, **kwargs)
            return functional_call(layer, params, (x,), kwargs)
        finally:
            set_quantizers(layer, None, None)

    def _batches(self, order: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        order = torch.arange(self.num_samples) if order is None else order
        yield from order.split(self.batch_size)

    def scales(self, index: int) -> dict[str, torch.Tensor]:
        return {p: theta.exp() for p, theta in self.log_scales[index].items()}

    def params(self, index: int) -> dict[str, torch.Tensor]:
        scales = {p: s.to(self.device) for p, s in self.scales(index).items()}
        return smoothed_parameters(self.base, scales, self.geometry)

    # ----------------------------------------------------------------- block lifecycle
    @torch.no_grad()
    def _load_block(self, index: int) -> None:
        """Move block `index` to the device and compute its FP targets."""
        self.block = index
        layer = self.layer(index).to(self.device)
        self.geometry = BlockGeometry.of(layer, *self.heads)
        self.base = base_parameters(layer, self.geometry)
        self.targets = torch.cat(
            [self._run(None, self.x_fp[b].to(self.device), False).cpu() for b in self._batches()]
        )

    @torch.no_grad()
    def replay_block(self, index: int, log_scales: dict[str, torch.Tensor]) -> None:
        """Re-apply a finished block's saved log-scales (resume): same folding and next inputs as the first run."""
        self._load_block(index)
        for point, theta in self.log_scales[index].items():
            theta.copy_(log_scales[f"{index}.{point}"])
        self.best_loss, self.best_theta = math.nan, self._theta_copy(index)
        self.results.append(BlockResult(index, "resumed", math.nan, math.nan))
        self.finish_block()

    @torch.no_grad()
    def begin_block(self, index: int) -> None:
        """Load block `index`, compute its statistics and initialise its scales (guarded quantile or max)."""
        self._load_block(index)
        init = "none"
        if self.method.points:
            act_max, act_quantile = self._statistics()
            candidates = {"max": act_max}
            if self.method.statistic == "quantile":
                candidates = {"quantile": act_quantile, **(candidates if self.method.guard else {})}
            if self.method.guard:
                candidates["identity"] = None  # never start worse than the rotations alone
            scored = {}
            for name, stat in candidates.items():
                self._set_theta(index, stat)
                scored[name] = self.evaluate()
            init = min(scored, key=scored.get)
            self._set_theta(index, candidates[init])
        thetas = [t.detach().clone().flatten() for t in self.log_scales[index].values()]
        self.theta0 = torch.cat(thetas) if thetas else torch.zeros(0)
        loss = self.evaluate()
        self.best_loss, self.best_theta = loss, self._theta_copy(index)
        self.results.append(BlockResult(index, init, loss, loss, self.linear_errors(self.params(index))))
        for p in self.log_scales[index].values():
            p.requires_grad_(self.method.learn)

    def _set_theta(self, index: int, act_stat: dict[str, torch.Tensor] | None) -> None:
        """Log-scales from activation statistics (SmoothQuant formula), or all zero (s = 1) for None."""
        for point, theta in self.log_scales[index].items():
            if act_stat is None:
                theta.zero_()
                continue
            w = weight_statistic(point, self.base, self.geometry).cpu()
            theta.copy_(smoothing_scales(act_stat[point], w, self.method.alpha).log())

    def _theta_copy(self, index: int) -> dict[str, torch.Tensor]:
        return {p: t.detach().clone() for p, t in self.log_scales[index].items()}

    def _statistics(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per-channel max and quantile of |x| at each smoothing point, on the FP inputs of the block."""
        layer = self.layer(self.block)
        rows: dict[str, list[torch.Tensor]] = {p: [] for p in self.method.points}
        handles = []
        for point in self.method.points:
            module = layer.get_submodule(STAT_HOOKS[point])

            def hook(_module, args, point=point):
                x = args[0].detach().float()
                rows[point].append(activation_basis(point, x.reshape(-1, x.shape[-1]), self.geometry).abs().cpu())

            handles.append(module.register_forward_pre_hook(hook))
        try:
            for b in self._batches():
                self._run(None, self.x_fp[b].to(self.device), False)
        finally:
            for h in handles:
                h.remove()
        act_max, act_quantile = {}, {}
        for point, chunks in rows.items():
            a = torch.cat(chunks)
            act_max[point] = a.amax(dim=0)
            if a.shape[0] > MAX_STAT_TOKENS:
                keep = torch.randperm(a.shape[0], generator=torch.Generator().manual_seed(self.method.seed))
                a = a[keep[:MAX_STAT_TOKENS]]
            k = max(1, min(a.shape[0], math.ceil(self.method.quantile * a.shape[0])))
            act_quantile[point] = a.kthvalue(k, dim=0).values
        return act_max, act_quantile

    def batch_loss(self, sample_index: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """MSE of the fake-quantized block against its FP targets on some calibration samples.

        ``params``: pre-quantized parameters (from `quantized_params`) to reuse across batches.
        """
        x = self.inputs()[sample_index].to(self.device)
        y = self.targets[sample_index].to(self.device)
        if params is None:
            return F.mse_loss(self._run(self.params(self.block), x, True), y)
        return F.mse_loss(self._run(params, x, True, weights_ready=True), y)

    @torch.no_grad()
    def quantized_params(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`params` with every linear weight replaced by ``Q_w(W)`` (computed once, reused for many batches)."""
        out = dict(params)
        for name, module in self.layer(self.block).named_modules():
            if isinstance(module, QLinear):
                out[f"{name}.weight"] = fake_quantize(params[f"{name}.weight"], self.method.weight)
        return out

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over all calibration samples with the current scales."""
        params = self.quantized_params(self.params(self.block))
        total = sum(self.batch_loss(b, params).item() * len(b) for b in self._batches())
        return total / self.num_samples

    @torch.no_grad()
    def project(self) -> None:
        """Keep the log-scales within ``θ₀ ± band``."""
        thetas = list(self.log_scales[self.block].values())
        if not thetas:
            return
        flat = torch.cat([t.flatten() for t in thetas])
        flat = torch.maximum(torch.minimum(flat, self.theta0 + self.method.band), self.theta0 - self.method.band)
        for t, chunk in zip(thetas, flat.split([t.numel() for t in thetas]), strict=True):
            t.copy_(chunk.view_as(t))

    @torch.no_grad()
    def end_epoch(self) -> float:
        """Score the whole calibration set; remember the best scales. Returns the loss."""
        loss = self.evaluate()
        if math.isfinite(loss) and loss < self.best_loss:
            self.best_loss, self.best_theta = loss, self._theta_copy(self.block)
        return loss

    @torch.no_grad()
    def restore_best(self, reason: str | None = None) -> None:
        if reason:
            warnings.warn(f"block {self.block}: {reason}; restoring its last good scales", stacklevel=2)
            self.results[-1].stopped_on_nonfinite = True
        for p, t in self.log_scales[self.block].items():
            t.copy_(self.best_theta[p])

    @torch.no_grad()
    def finish_block(self) -> BlockResult:
        """Fold the best scales into the block, compute the next block's inputs, move the block off the device."""
        index = self.block
        self.restore_best()
        layer = self.layer(index)
        params = self.params(index)
        result = self.results[-1]
        result.loss_final = self.best_loss
        result.linear_error_after = self.linear_errors(params)
        fold_scales(layer, self.scales(index), self.geometry)
        for p in self.log_scales[index].values():
            p.requires_grad_(False)
        if self.x_q is not None:
            self.x_q = torch.cat([self._run(None, self.x_q[b].to(self.device), True).cpu() for b in self._batches()])
        self.x_fp = self.targets
        layer.to("cpu")
        self.block, self.base, self.targets = None, None, None
        return result

    @torch.no_grad()
    def linear_errors(self, params: dict[str, torch.Tensor]) -> dict[str, float]:
        """Per linear: mean over tokens of ``‖xWᵀ − Q_a(x)Q_w(W)ᵀ‖² / ‖xWᵀ‖²`` on the block's FP inputs."""
        layer = self.layer(self.block)
        quantized = self.quantized_params(params)
        errors: dict[str, LayerError] = {}
        handles = []
        for name, module in layer.named_modules():
            if isinstance(module, QLinear):
                errors[name] = LayerError()

                def hook(mod, args, output, name=name):
                    x = hadamard_transform(args[0]) if mod.online_hadamard else args[0]
                    approx = F.linear(fake_quantize(x, self.method.act), quantized[f"{name}.weight"])
                    errors[name].update(F.linear(x, mod.weight), approx)

                handles.append(module.register_forward_hook(hook))
        try:
            for b in self._batches():
                self._run(params, self.x_fp[b].to(self.device), False)
        finally:
            for h in handles:
                h.remove()
        return {name.split(".")[-1]: metric.compute().item() for name, metric in errors.items()}

    # ----------------------------------------------------------------- whole model, no learning
    def run(self, on_block_end=None) -> list[BlockResult]:
        """Calibrate every block without Lightning (used when ``method.learn`` is off)."""
        for index in range(self.num_blocks):
            self.begin_block(index)
            result = self.finish_block()
            if on_block_end is not None:
                on_block_end(result)
        return self.results

