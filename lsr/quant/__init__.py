"""Quantizers: round-to-nearest with a straight-through gradient, and GPTQ."""

from lsr.quant.gptq import (
    CrossAccumulator,
    HessianAccumulator,
    asymmetric_target,
    gptq_fake_quantize,
    gptq_quantize,
)
from lsr.quant.rtn import QuantSpec, dequantize, fake_quantize, quantize
from lsr.quant.weights import QuantizedWeight

__all__ = [
    "CrossAccumulator",
    "HessianAccumulator",
    "QuantSpec",
    "QuantizedWeight",
    "asymmetric_target",
    "dequantize",
    "fake_quantize",
    "gptq_fake_quantize",
    "gptq_quantize",
    "quantize",
]
