"""Quantizers: round-to-nearest with a straight-through gradient, and GPTQ."""

from lsr.quant.rtn import QuantSpec, dequantize, fake_quantize, quantize

__all__ = ["QuantSpec", "dequantize", "fake_quantize", "quantize"]
