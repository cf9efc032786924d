"""One config object describes a method; quarot, smoothrot, quantile and lsr are presets of it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from lsr.quant.rtn import QuantSpec

SMOOTHING_POINTS = ("down", "qkv", "gateup", "vo")


@dataclass
class MethodConfig:
    """Everything that distinguishes one W4A4 method from another.

    Args:
        name: label used in reports.
        rotate: apply the Hadamard rotations R1, R2, R4 (QuaRot).
        points: smoothing points (subset of ``down``, ``qkv``, ``gateup``, ``vo``); empty = no smoothing.
        statistic: ``max`` (SmoothRot) or ``quantile`` (lsr) of |x_j| over calibration tokens.
        quantile: the quantile p used when ``statistic == "quantile"``.
        alpha: migration strength in ``s = a^α / w^(1-α)``.
        guard: score the quantized block error of the quantile init, the max init and no scaling (s = 1), per
            block, and start from the best (massive first-token activations make a low quantile far too small in
            some blocks, and after the rotation some points need no scaling).
        learn: train the log-scales block by block.
        epochs: epochs per block when learning.
        lr: Adam learning rate on the log-scales.
        band: log-scales stay within ``θ₀ ± band``.
        inputs: block inputs for learning come from the ``quantized`` blocks before it or the ``fp`` chain.
        weight: weight quantizer (per output channel, MSE-searched clip ratio as in QuaRot's RTN).
        act: activation quantizer (per token, every linear input).
        seed: rotation and data-order seed.
    """

    name: str = "lsr"
    rotate: bool = True
    points: list[str] = field(default_factory=lambda: ["down", "qkv", "gateup", "vo"])
    statistic: Literal["max", "quantile"] = "quantile"
    quantile: float = 0.999
    alpha: float = 0.5
    guard: bool = True
    learn: bool = True
    epochs: int = 4
    lr: float = 1e-2
    band: float = 1.0
    inputs: Literal["quantized", "fp"] = "quantized"
    weight: QuantSpec = field(default_factory=lambda: QuantSpec(bits=4, granularity="channel", clip_search=True))
    act: QuantSpec = field(default_factory=lambda: QuantSpec(bits=4, granularity="token"))
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.points) - set(SMOOTHING_POINTS)
        if unknown:
            raise ValueError(f"unknown smoothing points {sorted(unknown)}; choose from {SMOOTHING_POINTS}")
        if self.statistic not in ("max", "quantile"):
            raise ValueError(f"statistic must be 'max' or 'quantile', got {self.statistic!r}")
        if not 0.0 < self.quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {self.quantile}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.inputs not in ("quantized", "fp"):
            raise ValueError(f"inputs must be 'quantized' or 'fp', got {self.inputs!r}")
        if self.epochs < 0 or self.lr <= 0 or self.band <= 0:
            raise ValueError("epochs must be >= 0, lr and band > 0")
        if self.points and not self.rotate:
            raise ValueError("smoothing points act before the rotations: they need rotate=True")
        if isinstance(self.weight, dict):
            self.weight = QuantSpec(**self.weight)
        if isinstance(self.act, dict):
            self.act = QuantSpec(**self.act)


PRESETS: dict[str, MethodConfig] = {
    "quarot": MethodConfig(name="quarot", points=[], learn=False),
    "smoothrot": MethodConfig(name="smoothrot", points=["down"], statistic="max", guard=False, learn=False),
    "quantile": MethodConfig(name="quantile", learn=False),
    "lsr": MethodConfig(name="lsr"),
}


def preset(name: str, **overrides) -> MethodConfig:
    """A copy of a named preset, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; presets: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)
