"""W4A4 runtime: int4 container, per-token activation quantization, integer GEMMs, backend choice.

Conventions (the exporter and the CPU reference path rely on them):

* int4 values are symmetric signed integers in [-8, 7].
* **Packed container**: ``uint8 [rows, K // 2]`` (K even, last dim contiguous); byte ``j`` holds element ``2j`` in
  its low nibble and element ``2j + 1`` in its high nibble, each as 4-bit two's complement
  (``pack_int4`` / ``unpack_int4``). Weights are stored as ``q_w`` packed ``[N, K/2]`` with float32 per output
  channel scales ``scale_w [N]``; activations use the same container per token.
* **Activation quantization** (per token, at run time): optionally ``x <- x @ H_K`` with
  ``H_K = lsr.hadamard.hadamard_matrix(K)`` (down_proj), computed in float32; ``scale_t = (max|x_t| · clip) / 7``
  in float32 (``clip`` in (0, 1], default 1: the plain absmax; 1 where the scale is 0, as for an all-zero token);
  ``q = clamp(round_half_to_even(x / scale_t), -8, 7)``.
* **Output**: ``y[m, n] = ((Σ_k q_a[m,k]·q_w[n,k]) · scale_t[m]) · scale_w[n]``: exact integer sums (float32 is
  exact for K <= 262144), rescaled in float32 in that order, cast to the activation dtype.

Entry point: :func:`w4a4_linear` with backends ``reference`` (pure torch, any device), ``triton`` (fused
Hadamard+quant kernel, then a split-K GEMV for M <= 16 or a tensor-core int4 GEMM), ``fp8`` (cuBLAS FP8 on
widened operands, CUDA, prefill) and ``auto``. Importing this package never imports triton; the Triton modules
(``lsr.kernels.hadamard_quant``, ``lsr.kernels.w4a4_gemm``) load on first use.
"""

from lsr.kernels.backend import (
    BACKENDS,
    DECODE_MAX_M,
    FP8_MIN_M,
    BackendUnavailableError,
    available_backends,
    resolve_backend,
    w4a4_linear,
)
from lsr.kernels.reference import (
    pack_int4,
    quantize_per_token_int4,
    quantize_weight_int4,
    unpack_int4,
    w4a4_accumulate_reference,
    w4a4_matmul_reference,
)

__all__ = [
    "BACKENDS",
    "DECODE_MAX_M",
    "FP8_MIN_M",
    "BackendUnavailableError",
    "available_backends",
    "resolve_backend",
    "w4a4_linear",
    "pack_int4",
    "unpack_int4",
    "quantize_per_token_int4",
    "quantize_weight_int4",
    "w4a4_accumulate_reference",
    "w4a4_matmul_reference",
]
