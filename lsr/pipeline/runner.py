"""The one sequential block pipeline: every step that needs calibration activations runs through it.

The calibration windows are embedded once; blocks are visited in order. For block l the pipeline moves it to the
device (every other block stays on CPU), computes its float targets ``Y_l = Block_l(X_l^FP)``, hands a `Block` to
each hook in turn (statistics and init, learning, folding, weight quantization, per-linear error), then advances:
``X_{l+1}^FP = Y_l`` and, when kept, the quantized-prefix inputs ``X_{l+1}^Q = Block_l^Q(X_l^Q)`` (activation
quantization on, the block's final weights). The block's final relative error is the distance to ``Y_l`` of the
quantized block's outputs on the inputs learning and GPTQ used: ``X_l^Q`` when kept, else ``X_l^FP``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from torch.func import functional_call

from lsr.models.adapter import adapter_for
from lsr.quant.rtn import QuantSpec, fake_quantize
from lsr.quant.weights import QuantizedWeight
from lsr.transforms.linear import QLinear, set_quantizers
from lsr.transforms.smooth import BlockGeometry, base_parameters, smoothed_parameters


@dataclass
class BlockRecord:
    """What happened to one block (reports, TensorBoard, the refined checkpoint's state)."""

    index: int
    init: str = "none"
    error_init: float = math.nan  # relative block error ‖Yq − Y‖² / ‖Y‖² after the smoothing init
    error_learned: float = math.nan  # the same after learning (RTN weights of the learned scales)
    error_final: float = math.nan  # with the block's final weights, on the inputs learning and GPTQ used
    linear_error_init: dict[str, float] = field(default_factory=dict)
    linear_error_final: dict[str, float] = field(default_factory=dict)
    stopped_on_nonfinite: bool = False
    seconds: float = 0.0


class BlockHook(Protocol):
    """One step of a recipe, applied to each block in turn.

    A hook may also define ``observe(block) -> [(module path, forward pre-hook)]``: those hooks watch the pass that
    computes the block's FP targets (statistics at no extra forward pass).
    """

    def on_block(self, block: Block) -> None: ...


class Block:
    """One decoder block during the walk: its module (on the device), inputs, targets and per-step state."""

    def __init__(self, pipeline: BlockPipeline, index: int) -> None:
        self.pipeline, self.index = pipeline, index
        self.device = pipeline.device
        self.layer = pipeline.layers[index].to(self.device)
        self.mapping = pipeline.adapter.mapping
        self.act, self.weight_spec = pipeline.act, pipeline.weight
        self.x_fp, self.x_q = pipeline.x_fp, pipeline.x_q
        self.record = BlockRecord(index)
        self.log_scales: dict[str, torch.Tensor] = {}  # smoothing log-scales (CPU), until folded
        self.weight_clips: dict[str, torch.Tensor] = {}  # learned per-row weight clips ``[out, 1]`` for RTN
        self.weights: dict[str, QuantizedWeight] = {}  # set by the weight step; keys are paths inside the block
        self.float_params: dict[str, torch.Tensor] | None = None  # the float parameters the weight step quantized
        self._geometry: BlockGeometry | None = None
        self._base: dict[str, torch.Tensor] | None = None
        self.targets = torch.empty(0)
        self.target_power = math.nan

    @torch.no_grad()
    def compute_targets(self, observers: Sequence[tuple[str, Callable]] = ()) -> None:
        """``Y = Block(X^FP)`` over all samples, with `observers` (forward pre-hooks) watching."""
        with self.hooked(observers):
            self.targets = self.run_all(self.x_fp, quantized=False)
        self.target_power = float(self.targets.double().pow(2).mean())

    # ------------------------------------------------------------------ shapes and parameters
    @property
    def num_samples(self) -> int:
        return self.x_fp.shape[0]

    @property
    def inputs(self) -> torch.Tensor:
        """The inputs learning and GPTQ use: the quantized prefix's when kept, else the FP chain's."""
        return self.x_q if self.x_q is not None else self.x_fp

    @property
    def geometry(self) -> BlockGeometry:
        if self._geometry is None:
            self._geometry = BlockGeometry.of(self.layer, self.mapping, *self.pipeline.heads)
        return self._geometry

    @property
    def base(self) -> dict[str, torch.Tensor]:
        """Detached copies of the block's parameters before smoothing (see `smoothed_parameters`)."""
        if self._base is None:
            self._base = base_parameters(self.layer, self.geometry)
        return self._base

    @property
    def weights_final(self) -> bool:
        return bool(self.weights)

    def params(self, log_scales: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
        """The block's parameters smoothed with ``exp(log_scales)`` (default: the block's own), or None if none."""
        log_scales = self.log_scales if log_scales is None else log_scales
        if not log_scales:
            return None
        scales = {p: t.to(self.device).exp() for p, t in log_scales.items()}
        return smoothed_parameters(self.base, scales, self.geometry)

    @torch.no_grad()
    def quantized_params(self, params: dict[str, torch.Tensor] | None,
                         weight_clips: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """`params` (or the block's own) with every linear weight replaced by its RTN value ``Q_w(W)`` (with the
        block's learned weight clips, or `weight_clips`)."""
        clips = self.weight_clips if weight_clips is None else weight_clips
        out = dict(params) if params is not None else {n: p for n, p in self.layer.named_parameters()}
        for name, module in self.layer.named_modules():
            if isinstance(module, QLinear):
                clip = clips.get(name)
                out[f"{name}.weight"] = fake_quantize(out[f"{name}.weight"], self.weight_spec,
                                                      None if clip is None else clip.to(self.device))
        return out

    def act_clips(self) -> dict[str, torch.Tensor]:
        """The activation clip ratio of each linear that has a learned one (the QLinears hold them)."""
        linears = {name: self.layer.get_submodule(name) for name in self.mapping.linears}
        return {name: m.act_clip for name, m in linears.items() if getattr(m, "act_clip", None) is not None}

    def set_act_clips(self, clips: dict[str, torch.Tensor]) -> None:
        """Give the linears their activation clip ratios (detached scalars, kept by the model from now on)."""
        for name, clip in clips.items():
            self.layer.get_submodule(name).act_clip = clip.detach().to(self.device).reshape(())

    # ------------------------------------------------------------------ running the block
    def batches(self, order: torch.Tensor | None = None, batch_size: int | None = None) -> Iterator[torch.Tensor]:
        order = torch.arange(self.num_samples) if order is None else order
        yield from order.split(batch_size or self.pipeline.batch_size)

    def forward(
        self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None, *, quantized: bool,
        weights_ready: bool = False, act_clips: dict[str, torch.Tensor] | None = None,
        weight_clips: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The block on `x` (on the device). ``quantized``: activation quantization on, and the weights quantized with
        the pipeline's RTN spec unless they are final (`weights`) or already quantized in `params`
        (``weights_ready``; also how float weights are asked for). `act_clips` / `weight_clips` (per linear, may
        carry gradients) stand in for the linears' own clips during this call. Under autograd the RTN clip search
        is replaced by a fixed clip of 1 (the search would cost several times the block per step)."""
        weight = None
        if quantized and not (weights_ready or self.weights_final):
            weight = self.weight_spec
            if torch.is_grad_enabled() and weight.clip_search:
                weight = QuantSpec(weight.bits, weight.symmetric, weight.granularity, weight.group_size)
        set_quantizers(self.layer, self.act if quantized else None, weight)
        linears = {name: m for name in self.mapping.linears
                   if isinstance(m := self.layer.get_submodule(name), QLinear)}
        saved = {name: (m.act_clip, m.weight_clip) for name, m in linears.items()}
        for name, m in linears.items():
            if act_clips is not None and name in act_clips:
                m.act_clip = act_clips[name]
            if weight is not None:
                m.weight_clip = (weight_clips if weight_clips is not None else self.weight_clips).get(name)
                if m.weight_clip is not None:
                    m.weight_clip = m.weight_clip.to(self.device)
        try:
            kwargs = {"position_embeddings": self.pipeline.position_embeddings, "attention_mask": None}
            out = self.layer(x, **kwargs) if params is None else functional_call(self.layer, params, (x,), kwargs)
        finally:
            set_quantizers(self.layer, None, None)
            for name, m in linears.items():
                m.act_clip, m.weight_clip = saved[name]
        return out[0] if isinstance(out, tuple) else out

    def run_all(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None, *, quantized: bool,
                weights_ready: bool = False) -> torch.Tensor:
        """`forward` over all samples of `x` (CPU), batch by batch; the result on CPU."""
        return torch.cat([
            self.forward(x[b].to(self.device), params, quantized=quantized, weights_ready=weights_ready).cpu()
            for b in self.batches()
        ])

    @torch.no_grad()
    def mse(self, params: dict[str, torch.Tensor] | None = None, *, float_weights: bool = False,
            act_clips: dict[str, torch.Tensor] | None = None,
            weight_clips: dict[str, torch.Tensor] | None = None) -> float:
        """Mean squared error of the quantized block (RTN weights of `params`, float weights with `float_weights`,
        or the final weights) on `inputs` against the FP targets, over all samples; clips as in `forward`."""
        ready = not self.weights_final
        if ready and not float_weights:
            params = self.quantized_params(params, weight_clips)
        total = 0.0
        for b in self.batches():
            y = self.forward(self.inputs[b].to(self.device), params, quantized=True, weights_ready=ready,
                             act_clips=act_clips)
            total += torch.nn.functional.mse_loss(y, self.targets[b].to(self.device)).item() * len(b)
        return total / self.num_samples

    def relative(self, mse: float) -> float:
        """``‖Yq − Y‖² / ‖Y‖²`` from a mean squared error against the targets."""
        return mse / max(self.target_power, 1e-30)

    def hooked(self, hooks: dict[str, Callable] | Sequence[tuple[str, Callable]]) -> _Hooks:
        """Context manager registering forward pre-hooks ``(module path in the block, fn(module, args))``."""
        return _Hooks(self.layer, list(hooks.items()) if isinstance(hooks, dict) else list(hooks))


class _Hooks:
    def __init__(self, layer: nn.Module, hooks: list[tuple[str, Callable]]) -> None:
        self.layer, self.hooks, self.handles = layer, hooks, []

    def __enter__(self) -> _Hooks:
        for name, fn in self.hooks:
            self.handles.append(self.layer.get_submodule(name).register_forward_pre_hook(fn))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


class BlockPipeline:
    """Walks the decoder blocks of a (rotated, QLinear) model over calibration windows.

    Args:
        model: the causal LM; its blocks are moved to `device` one at a time and back to CPU.
        windows: ``[n, seq_len]`` calibration token ids.
        act: the activation quantizer (every decoder linear's input).
        weight: the RTN weight quantizer used to score blocks before their final weights exist.
        device: where the current block runs.
        batch_size: windows per forward pass.
        keep_quantized_inputs: also carry the quantized prefix's inputs ``X^Q`` (learning, GPTQ, final errors).
        log: progress lines (one per block); None for silence.
    """

    def __init__(
        self, model: nn.Module, windows: torch.Tensor, *, act: QuantSpec, weight: QuantSpec,
        device: str | torch.device = "cpu", batch_size: int = 4, keep_quantized_inputs: bool = True,
        log: Callable[[str], None] | None = print,
    ) -> None:
        if windows.dim() != 2 or windows.shape[0] < 1:
            raise ValueError(f"calibration windows must be [n >= 1, seq_len], got {tuple(windows.shape)}")
        self.model, self.act, self.weight = model, act, weight
        self.device, self.batch_size, self.log = torch.device(device), batch_size, log
        self.adapter = adapter_for(model)
        self.layers = self.adapter.layers(model)
        self.heads = self.adapter.head_dims(model)
        with torch.no_grad():
            embed = self.adapter.embeddings(model)
            self.x_fp = torch.cat([embed(w[None].to(embed.weight.device)) for w in windows]).float().cpu()
            positions = torch.arange(windows.shape[1])[None]
            cos, sin = self.adapter.rotary_embedding(model)(self.x_fp[:1], positions)
        self.position_embeddings = (cos.to(self.device), sin.to(self.device))
        self.x_q = self.x_fp.clone() if keep_quantized_inputs else None
        self.records: list[BlockRecord] = []

    @property
    def num_blocks(self) -> int:
        return len(self.layers)

    def open_block(self, index: int, hooks: Sequence[BlockHook] = ()) -> Block:
        """Block `index` on the device with its FP targets computed, the hooks' observers watching."""
        block = Block(self, index)
        block.compute_targets([o for hook in hooks if hasattr(hook, "observe") for o in hook.observe(block)])
        return block

    @torch.no_grad()
    def advance(self, block: Block) -> None:
        """Next block's inputs from this one's outputs; the block goes back to CPU."""
        out = block.run_all(self.x_q if self.x_q is not None else self.x_fp, quantized=True)
        block.record.error_final = block.relative((out - block.targets).double().pow(2).mean().item())
        if self.x_q is not None:
            self.x_q = out
        self.x_fp = block.targets
        block.layer.to("cpu")

    def run(self, hooks: Sequence[BlockHook], *, replay: Sequence[BlockHook] = (), replay_blocks: int = 0,
            on_block_end: Callable[[Block], None] | None = None) -> list[BlockRecord]:
        """Apply `hooks` to every block in order; the first `replay_blocks` get the `replay` hooks instead (resume)."""
        for index in range(self.num_blocks):
            start = time.perf_counter()
            steps = replay if index < replay_blocks else hooks
            block = self.open_block(index, steps)
            for hook in steps:
                hook.on_block(block)
            self.advance(block)
            block.record.seconds = time.perf_counter() - start
            self.records.append(block.record)
            if self.log is not None:
                r = block.record
                what = "replayed" if index < replay_blocks else f"init {r.init}"
                self.log(f"block {index + 1}/{self.num_blocks}: {what}, relative error {r.error_init:.4g} -> "
                         f"{r.error_final:.4g} ({r.seconds:.1f}s)")
            if on_block_end is not None:
                on_block_end(block)
        set_quantizers(self.model, self.act, None)
        return self.records
