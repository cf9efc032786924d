"""Constants shared by the backend choice and the Triton kernels (no imports, so neither imports the other)."""

from __future__ import annotations

__all__ = ["DECODE_MAX_M", "FP8_MIN_M"]

DECODE_MAX_M = 16  # M <= this: the split-K GEMV kernel (decode reads the weights once, no tensor cores)
# M >= this (CUDA, FP8-capable, backend="auto"): cuBLAS FP8 on widened operands instead of the Triton int4 GEMM.
# Provisional: set it from benchmarks/kernels_h100.json once scripts/bench_kernels.py has run on an H100.
FP8_MIN_M = 512
