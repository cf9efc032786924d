"""A recipe: the ordered steps that turn a float model into a W4A4 model, as small typed configs.

    rotate -> smooth (statistics and init) -> learn -> quantize weights (rtn | gptq | gptaq); activations per token;
    optionally the KV cache (R3 on queries and keys, keys and values quantized per token per head)

A step set to ``None`` is not run. Presets (quarot, smoothrot, quantile, lsr and their ``-gptq`` and ``-gptaq``
variants) are named recipes, defined once in `PRESETS` and resolved by name with overrides (`Recipe.from_name`,
litgpt's ``Config.from_name`` idea); the resolved recipe is saved beside every refined checkpoint and export
(`Recipe.to_dict` / `Recipe.from_dict`). Every value is checked when the config is built: a bad one raises a
ValueError naming the field, the value and what is accepted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal

from lsr.models.adapter import SMOOTHING_POINTS
from lsr.quant.rtn import QuantSpec


def _check(ok: bool, name: str, value: Any, accepted: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: expected {accepted}")


def _one_of(name: str, value: Any, choices: tuple) -> None:
    _check(value in choices, name, value, "one of " + ", ".join(map(repr, choices)))


@dataclass(frozen=True)
class RotateStep:
    """Fold the norms, then Hadamard rotations R1 (residual, random signs), R2 (per head), R4 (online, down_proj).
    R3 (online, queries and keys after RoPE) belongs to the KV cache: `KVCacheStep.r3`.

    Args:
        seed: seed of R1's random signs.
        r4: ``full``: one Hadamard of down_proj's whole input, ``H_m ⊗ S_2^k`` (m > 1 for sizes such as 14336 =
            7·2^11: a dense n × n product in vLLM); ``block-diagonal``: ``I_m ⊗ H_2^k`` with 2^k the largest power
            of two dividing n, applied to each run of 2^k channels (vLLM's fast HadaCore kernel; mixes fewer
            channels). The two are the same for a power-of-two n.
    """

    seed: int = 0
    r4: Literal["full", "block-diagonal"] = "full"

    def __post_init__(self) -> None:
        _one_of("rotate.r4", self.r4, ("full", "block-diagonal"))


@dataclass(frozen=True)
class SmoothStep:
    """Per-channel smoothing scales before the rotations, initialised from activation statistics.

    Args:
        points: smoothing points of the architecture mapping (LLaMA: down, qkv, gateup, vo).
        statistic: ``max`` (SmoothRot) or ``quantile`` of |x_j| over the calibration tokens.
        quantile: the quantile p when ``statistic`` is ``quantile``.
        alpha: migration strength in ``s = a^α / w^(1-α)``.
        guard: per block, score the statistic's init, the max init and no scaling (s = 1) on the quantized block
            error and start from the best (massive first-token activations make a low quantile far too small in some
            blocks, and after the rotations some points need no scaling).
    """

    points: tuple[str, ...] = ("down", "qkv", "gateup", "vo")
    statistic: Literal["max", "quantile"] = "quantile"
    quantile: float = 0.999
    alpha: float = 0.5
    guard: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "points", tuple(self.points))
        for point in self.points:
            _one_of("smooth.points", point, SMOOTHING_POINTS)
        _check(len(set(self.points)) == len(self.points), "smooth.points", list(self.points), "no repeated point")
        _one_of("smooth.statistic", self.statistic, ("max", "quantile"))
        _check(0.0 < self.quantile <= 1.0, "smooth.quantile", self.quantile, "a number in (0, 1]")
        _check(0.0 <= self.alpha <= 1.0, "smooth.alpha", self.alpha, "a number in [0, 1]")


@dataclass(frozen=True)
class LearnStep:
    """Train the smoothing log-scales and clip ratios block by block so the quantized block reproduces its float
    outputs.

    Args:
        epochs: passes over the calibration windows per block.
        lr: learning rate of the log-scales.
        weights: the weight quantizer in the loop: ``rtn`` (the RTN quantizer the export uses, with the learned
            weight clips) or ``float`` (weights unquantized, activations quantized: learn for a GPTQ weight step).
        scales: learn the smoothing log-scales (off: they stay at their init; only the clips learn).
        act_clip: learn one activation clip ratio per quantizer (per group of linears reading the same input),
            ``sigmoid(logit)``, from the recipe's ``activations.clip_ratio``.
        weight_clip: learn one clip ratio per weight output channel, ``sigmoid(logit)``, from the MSE-searched clip
            (``weights: rtn`` only: with float weights there is no weight quantizer to clip); a GPTQ weight step then
            keeps them as its scales.
        clip_lr: learning rate of the clip logits.
        optimizer: ``adam`` or ``adamw``.
        weight_decay: AdamW weight decay.
        schedule: learning-rate schedule over a block's steps: ``constant`` or ``cosine`` (to zero).
        loss: ``mse`` of the block outputs, or ``relative`` (``‖Yq − Y‖² / ‖Y‖²`` per batch).
        linear_loss: weight of a second term, the mean over the block's linears of each one's own relative output
            error on the inputs it receives (``‖Q_a(x)Q_w(W)ᵀ − xWᵀ‖² / ‖xWᵀ‖²``, seed-004's per-layer objective),
            added to the block loss in the block loss's units (0: off). It trades block error for per-linear error
            (README "Results"); the state kept after each epoch is still the best on the block error.
        band: the log-scales stay within ``θ₀ ± band`` of their init.
        batch_size: calibration windows per optimisation step.
    """

    epochs: int = 2
    lr: float = 1e-2
    weights: Literal["rtn", "float"] = "rtn"
    scales: bool = True
    act_clip: bool = True
    weight_clip: bool = True
    clip_lr: float = 5e-2
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine"] = "constant"
    loss: Literal["mse", "relative"] = "mse"
    linear_loss: float = 0.0
    band: float = 1.0
    batch_size: int = 1

    def __post_init__(self) -> None:
        _check(isinstance(self.epochs, int) and self.epochs >= 1, "learn.epochs", self.epochs, "an int >= 1")
        _check(self.lr > 0, "learn.lr", self.lr, "a positive number")
        _one_of("learn.weights", self.weights, ("rtn", "float"))
        _check(self.clip_lr > 0, "learn.clip_lr", self.clip_lr, "a positive number")
        _check(self.scales or self.act_clip or self.learns_weight_clip, "learn", "nothing to learn",
               "at least one of scales, act_clip, weight_clip (with weights: rtn)")
        _one_of("learn.optimizer", self.optimizer, ("adam", "adamw"))
        _check(self.weight_decay >= 0, "learn.weight_decay", self.weight_decay, "a number >= 0")
        _one_of("learn.schedule", self.schedule, ("constant", "cosine"))
        _one_of("learn.loss", self.loss, ("mse", "relative"))
        _check(self.linear_loss >= 0, "learn.linear_loss", self.linear_loss, "a number >= 0")
        _check(self.band > 0, "learn.band", self.band, "a positive number")
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, "learn.batch_size", self.batch_size,
               "an int >= 1")

    @property
    def learns_weight_clip(self) -> bool:
        return self.weight_clip and self.weights == "rtn"


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ settings, for ``gptq`` and ``gptaq`` (see `lsr.quant.gptq.gptq_quantize` and `asymmetric_target`).

    Args:
        damp: relative diagonal damping of the Hessian (× mean diag H).
        act_order: quantize columns by descending Hessian diagonal.
        block_size: lazy-batch width.
        group_size: quantize in groups of this many input channels (``None``: one scale per output channel). Groups
            work for fake quantization; the INT4 export holds one scale per output channel and refuses groups.
        true_sequential: within a block quantize the mapping's GPTQ groups in order (q/k/v, o, gate/up, down),
            re-running the block in between so each linear's Hessian comes from inputs after the quantized ones.
        alpha: ``gptaq`` only: strength of the asymmetric correction towards the float model's outputs, GPTQ of
            ``W* = W + α·W·ΔX X̃ᵀ (H̃ + λI)⁻¹`` (0: plain GPTQ; 1: exactly ``min ‖Q X̃ − W X‖²`` on the calibration
            tokens). W* is a regression fitted on the calibration tokens, so α = 1 can overfit a small calibration
            set: on held-out synthetic layers and tiny models α = 1 was best from about 8-16 calibration tokens per
            input channel (as with 128 windows of 2048 tokens) but worse than plain GPTQ at 1-2, while 0.5 kept most
            of the gain at 32 and lost nothing from about 4 up. The default config has about 3-7 (8 windows of 512
            tokens), hence 0.5; raise it towards 1 for large calibration sets. GPTAQ's own default 0.25 belongs to
            its masked column-wise update (see `asymmetric_target`), which corrects less per unit α.
    """

    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    group_size: int | None = None
    true_sequential: bool = True
    alpha: float = 0.5

    def __post_init__(self) -> None:
        _check(self.damp > 0, "weights.gptq.damp", self.damp, "a positive number")
        _check(self.alpha >= 0, "weights.gptq.alpha", self.alpha, "a number >= 0")
        _check(self.block_size >= 1, "weights.gptq.block_size", self.block_size, "an int >= 1")
        _check(self.group_size is None or self.group_size >= 1, "weights.gptq.group_size", self.group_size,
               "null or an int >= 1")


def _default_weight_spec() -> QuantSpec:
    return QuantSpec(bits=4, granularity="channel", clip_search=True)


@dataclass(frozen=True)
class WeightStep:
    """Quantize the decoder linears' weights.

    Args:
        method: ``rtn`` (round to nearest), ``gptq`` (second-order error feedback, on the inputs the quantized
            prefix of the model produces, activation quantization on: ``min ‖(Q − W) X̃‖²``) or ``gptaq`` (GPTAQ /
            GPTQv2's asymmetric calibration: the same, towards the float model's outputs, ``min ‖Q X̃ − W X‖²`` with
            ``X`` the linear's inputs in the float model; strength ``gptq.alpha``).
        spec: the weight quantizer (default: 4 bit symmetric per output channel, MSE-searched clip ratio).
        gptq: GPTQ options (``method: gptq`` or ``gptaq``).
    """

    method: Literal["rtn", "gptq", "gptaq"] = "rtn"
    spec: QuantSpec = field(default_factory=_default_weight_spec)
    gptq: GPTQOptions = field(default_factory=GPTQOptions)

    def __post_init__(self) -> None:
        _one_of("weights.method", self.method, ("rtn", "gptq", "gptaq"))
        if isinstance(self.spec, dict):
            object.__setattr__(self, "spec", QuantSpec(**self.spec))
        if isinstance(self.gptq, dict):
            object.__setattr__(self, "gptq", GPTQOptions(**self.gptq))

    @property
    def uses_gptq(self) -> bool:
        """A GPTQ variant (``gptq`` or ``gptaq``): calibrated, codes stored in checkpoints, GPTQ options apply."""
        return self.method in ("gptq", "gptaq")

    @property
    def effective_spec(self) -> QuantSpec:
        """The spec GPTQ and RTN quantize with (GPTQ's group size applied, for gptq and gptaq)."""
        if self.uses_gptq and self.gptq.group_size is not None:
            s = self.spec
            return QuantSpec(s.bits, s.symmetric, "group", self.gptq.group_size, s.clip_ratio)
        return self.spec


@dataclass(frozen=True)
class KVCacheStep:
    """The KV cache (QuaRot): R3 on queries and keys after RoPE, then keys and values quantized per token per head.

    Runs inside the attention of the fake-quant model (block pipeline, learning, GPTQ inputs and perplexity see it);
    the INT4 export records it and its runtime stores the codes (`lsr.export.kv_cache.QuantizedKVCache`).

    Args:
        bits: 4 or 8 (any of 2-8), or 16 for a float cache (R3 alone; exact).
        symmetric: ``False`` (QuaRot): ``scale = clip·(max − min) / (2^b − 1)`` with a uint zero point, the range
            widened to hold 0; ``True``: ``scale = clip·max|x| / (2^(b-1) − 1)``.
        group_size: ``None``: one scale (and zero point) per token per head, over head_dim values; else per group of
            this many values inside a head (a divisor of head_dim).
        clip_ratio: the range is shrunk by this factor before rounding (QuaRot runs 0.95 for KV4).
        r3: online Hadamard of size head_dim on queries and keys after RoPE (exact: ``q·k`` unchanged); it spreads
            the keys' outlier channels before they are quantized. Values are already rotated per head by R2.
    """

    bits: int = 4
    symmetric: bool = False
    group_size: int | None = None
    clip_ratio: float = 0.95
    r3: bool = True

    def __post_init__(self) -> None:
        _check(isinstance(self.bits, int) and (2 <= self.bits <= 8 or self.bits == 16), "kv_cache.bits", self.bits,
               "an int in [2, 8], or 16 (float cache)")
        _check(self.group_size is None or (isinstance(self.group_size, int) and self.group_size >= 1),
               "kv_cache.group_size", self.group_size, "null (per head) or an int >= 1")
        _check(0.0 < self.clip_ratio <= 1.0, "kv_cache.clip_ratio", self.clip_ratio, "a number in (0, 1]")
        for name in ("symmetric", "r3"):
            _check(isinstance(getattr(self, name), bool), f"kv_cache.{name}", getattr(self, name), "true or false")

    @property
    def quantizes(self) -> bool:
        return self.bits <= 8

    def spec(self, head_dim: int) -> QuantSpec | None:
        """The quantizer of keys and values (``[..., head_dim]``), or None for a float cache."""
        if not self.quantizes:
            return None
        group = self.group_size or head_dim
        if head_dim % group:
            raise ValueError(f"kv_cache.group_size={group} does not divide head_dim {head_dim}")
        granularity = "token" if group == head_dim else "group"
        return QuantSpec(self.bits, self.symmetric, granularity, group, self.clip_ratio)

    @property
    def label(self) -> str:
        """``KV4``, ``KV8``, ``KV16`` (R3 noted when off)."""
        return f"KV{self.bits}" + ("" if self.r3 else " (no R3)")


def _default_act_spec() -> QuantSpec:
    return QuantSpec(bits=4, granularity="token", clip_ratio=0.9)  # QuaRot's activation clip


@dataclass(frozen=True)
class Recipe:
    """The steps of one W4A4 method, in the order they run. ``None`` skips a step.

    Args:
        name: the preset this recipe was resolved from (a label for reports; ``custom`` otherwise).
        rotate: Hadamard rotations (QuaRot).
        smooth: smoothing scales before the rotations (SmoothRot; needs ``rotate``).
        learn: blockwise learning of the smoothing log-scales (needs ``smooth``).
        weights: weight quantization.
        activations: the activation quantizer on every decoder linear's input (per token; clip 0.9 of the token's
            absmax by default, as QuaRot runs it; learned per quantizer from there with ``learn.act_clip``).
        inputs: block inputs for learning and GPTQ: from the ``quantized`` prefix of the model, or the ``fp`` chain.
        kv_cache: R3 and the KV-cache quantizer (``None``: float cache, no R3, as before this step existed).
    """

    name: str = "custom"
    rotate: RotateStep | None = field(default_factory=RotateStep)
    smooth: SmoothStep | None = None
    learn: LearnStep | None = None
    weights: WeightStep = field(default_factory=WeightStep)
    activations: QuantSpec = field(default_factory=_default_act_spec)
    inputs: Literal["quantized", "fp"] = "quantized"
    kv_cache: KVCacheStep | None = None

    def __post_init__(self) -> None:
        for name, kind in (("rotate", RotateStep), ("smooth", SmoothStep), ("learn", LearnStep),
                           ("weights", WeightStep), ("activations", QuantSpec), ("kv_cache", KVCacheStep)):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, kind(**value))
        _one_of("inputs", self.inputs, ("quantized", "fp"))
        if self.smooth is not None and self.smooth.points and self.rotate is None:
            raise ValueError("smooth needs rotate: the smoothing points act before the rotations")
        if self.learn is not None and (self.smooth is None or not self.smooth.points):
            raise ValueError("learn trains the smoothing scales: it needs a smooth step with at least one point")

    @property
    def stores_weight_codes(self) -> bool:
        """Whether the weights are more than RTN of the folded weights (GPTQ, learned weight clips): then a refined
        checkpoint stores their codes."""
        return self.weights.method != "rtn" or (self.learn is not None and self.learn.learns_weight_clip)

    @property
    def seed(self) -> int:
        return self.rotate.seed if self.rotate is not None else 0

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Recipe:
        """A preset by name, with overrides (nested steps as dicts merge into the preset's)."""
        if name not in PRESETS:
            raise ValueError(f"recipe {name!r} is not a preset: choose one of {', '.join(PRESETS)}")
        return merge(PRESETS[name], overrides)

    def to_dict(self) -> dict:
        """Plain data (recipe.json, exports, run fingerprints); without ``kv_cache`` when there is none, so recipes
        without one read, write and fingerprint as they did before the step existed."""
        data = asdict(self)
        if data["smooth"] is not None:
            data["smooth"]["points"] = list(data["smooth"]["points"])
        if data["kv_cache"] is None:
            del data["kv_cache"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        """Inverse of `to_dict`; unknown keys are refused with their names."""
        return _build(cls, data, "")


STEP_TYPES: dict[str, type] = {"rotate": RotateStep, "smooth": SmoothStep, "learn": LearnStep, "weights": WeightStep,
                               "activations": QuantSpec, "spec": QuantSpec, "gptq": GPTQOptions,
                               "kv_cache": KVCacheStep}


def _build(kind: type, data: Any, prefix: str) -> Any:
    if data is None or not is_dataclass(kind) or not isinstance(data, dict):
        return data
    known = {f.name: f for f in fields(kind)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown recipe field {prefix}{unknown[0]!r}; {kind.__name__} has {', '.join(known)}")
    values = {k: _build(STEP_TYPES.get(k, type(None)), v, f"{prefix}{k}.") for k, v in data.items()}
    if kind is QuantSpec:
        try:
            return kind(**values)
        except ValueError as err:
            raise ValueError(f"recipe.{prefix.rstrip('.')}: {err}") from None
    return kind(**values)


def merge(base: Any, overrides: dict) -> Any:
    """`base` (a dataclass) with `overrides` applied; a dict override of a dataclass field merges recursively, a
    dict for a step that is ``None`` in `base` starts from that step's defaults."""
    if not overrides:
        return base
    known = {f.name for f in fields(base)}
    changes = {}
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"unknown recipe field {key!r}; {type(base).__name__} has {', '.join(sorted(known))}")
        current = getattr(base, key)
        if isinstance(value, dict):
            start = current if current is not None else STEP_TYPES[key]()
            value = merge(start, value)
        changes[key] = value
    return replace(base, **changes)


_LSR_SMOOTH = SmoothStep()
PRESETS: dict[str, Recipe] = {
    "quarot": Recipe(name="quarot"),
    "smoothrot": Recipe(name="smoothrot", smooth=SmoothStep(points=("down",), statistic="max", guard=False)),
    "quantile": Recipe(name="quantile", smooth=_LSR_SMOOTH),
    "lsr": Recipe(name="lsr", smooth=_LSR_SMOOTH, learn=LearnStep()),
}
for _name in list(PRESETS):
    for _method in ("gptq", "gptaq"):
        # Before a GPTQ weight step, learning keeps the weights in float (SpinQuant, OSTQuant): scales learned
        # against RTN weights do not carry over to GPTQ's.
        _learn = PRESETS[_name].learn and replace(PRESETS[_name].learn, weights="float")
        PRESETS[f"{_name}-{_method}"] = replace(PRESETS[_name], name=f"{_name}-{_method}", learn=_learn,
                                                weights=WeightStep(method=_method))
del _name, _method, _learn
