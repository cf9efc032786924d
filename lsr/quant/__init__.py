"""Quantizers: round-to-nearest with a straight-through gradient, and GPTQ."""

from lsr.quant.gptq import HessianAccumulator, gptq_fake_quantize, gptq_quantize
from lsr.quant.rtn import QuantSpec, dequantize, fake_quantize, quantize
from lsr.quant.weights import QuantizedWeight

__all__ = [
    "HessianAccumulator",
    "QuantSpec",
    "QuantizedWeight",
    "dequantize",
    "fake_quantize",
    "gptq_fake_quantize",
    "gptq_quantize",
    "quantize",
]
