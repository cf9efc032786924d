"""Backend choice for the W4A4 linear: ``reference`` (torch, any device), ``triton``, ``fp8``, ``auto``."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from lsr.kernels.config import DECODE_MAX_M, FP8_MIN_M
from lsr.kernels.reference import quantize_per_token_int4, w4a4_matmul_reference

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "DECODE_MAX_M",
    "FP8_MIN_M",
    "available_backends",
    "resolve_backend",
    "w4a4_linear",
]

BACKENDS = ("auto", "reference", "triton", "fp8")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (no triton, no CUDA, no FP8 support)."""


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _fp8_capable(device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and hasattr(torch, "_scaled_mm")
        and hasattr(torch, "float8_e4m3fn")
        and torch.cuda.get_device_capability(device) >= (8, 9)
    )


def _why_not(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device``, else the reason."""
    if backend == "reference":
        return None
    if not _triton_importable():
        return "triton is not installed (pip install 'lsr[triton]')"
    if backend == "triton":
        if device.type == "cuda" or _interpret_mode():
            return None
        return f"tensors are on {device.type}: Triton kernels need CUDA (or TRITON_INTERPRET=1 set before import)"
    if backend == "fp8":
        if device.type != "cuda":
            return f"tensors are on {device.type}: torch._scaled_mm needs CUDA"
        if not _fp8_capable(device):
            return "this GPU/torch has no FP8 torch._scaled_mm (needs compute capability >= 8.9)"
        return None
    raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Concrete backends that can run on ``device`` (``auto`` picks among them)."""
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if _why_not(b, device) is None]


def resolve_backend(backend: str, device: torch.device | str, m: int, k: int = 0, n: int = 0) -> str:
    """The concrete backend for ``m`` tokens (``k`` in, ``n`` out features) on ``device``.

    Raises :class:`BackendUnavailableError` when an explicitly requested backend cannot run there.
    """
    device = torch.device(device)
    if backend == "auto":
        if device.type != "cuda" or not _triton_importable():
            return "reference"
        if m > DECODE_MAX_M and m >= FP8_MIN_M and k % 16 == 0 and n % 16 == 0 and _fp8_capable(device):
            return "fp8"
        return "triton"
    reason = _why_not(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"w4a4 backend {backend!r} is unavailable: {reason}")
    return backend


def w4a4_linear(
    x: torch.Tensor,
    packed_w: torch.Tensor,
    scale_w: torch.Tensor,
    *,
    hadamard: bool,
    backend: str = "auto",
    bias: torch.Tensor | None = None,
    hadamard_impl: str = "fused",
    precision: str = "exact",
    w_fp8: torch.Tensor | None = None,
    act_clip: float = 1.0,
) -> torch.Tensor:
    """``Q_a(x [@ H_K]) @ Q_w^T``, rescaled, in ``x.dtype``: the W4A4 replacement of ``x @ W^T (+ bias)``.

    ``x [..., K]`` (bf16/fp16/fp32); ``packed_w`` uint8 ``[N, K/2]`` (see :mod:`lsr.kernels`); ``scale_w``
    float32 ``[N]``. ``hadamard`` applies the online ``H_K`` of ``lsr.hadamard`` before quantizing (down_proj).
    ``backend``: ``reference`` | ``triton`` (decode kernel for M <= 16, int4 GEMM above) | ``fp8`` (cuBLAS FP8
    prefill) | ``auto`` (CUDA + triton: decode kernel for M <= 16, FP8 for M >= ``FP8_MIN_M`` where supported,
    else the Triton GEMM; otherwise reference). ``hadamard_impl``/``precision``: see
    :func:`lsr.kernels.hadamard_quant.quantize_int4` (Triton backends only). ``w_fp8``: the weights already
    widened by :func:`lsr.kernels.w4a4_gemm.widen_int4_to_fp8` (a load-time copy of N·K bytes, twice the packed
    weights) so the ``fp8`` backend skips widening them on every call; without it each call widens them.
    ``act_clip`` in (0, 1]: the activation clip ratio, ``scale_t = max|x_t| · act_clip / 7`` (1: the plain absmax).
    """
    K = x.shape[-1]
    if packed_w.dtype != torch.uint8 or packed_w.dim() != 2 or packed_w.shape[1] * 2 != K:
        raise ValueError(f"packed_w must be uint8 [N, K/2] with K={K}, got {packed_w.dtype} {tuple(packed_w.shape)}")
    N = packed_w.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    which = resolve_backend(backend, x.device, M, K, N)
    scale_w = scale_w.float().contiguous()
    if which == "reference":
        q, s = quantize_per_token_int4(x2, hadamard, act_clip)
        y = w4a4_matmul_reference(q, s, packed_w, scale_w, x.dtype)
    else:
        from lsr.kernels.hadamard_quant import quantize_int4

        if which == "triton":
            from lsr.kernels.w4a4_gemm import w4a4_decode, w4a4_gemm

            decode = M <= DECODE_MAX_M
            a, s = quantize_int4(
                x2, hadamard=hadamard, out="packed" if decode else "planes", hadamard_impl=hadamard_impl,
                precision=precision, clip_ratio=act_clip,
            )  # fmt: skip
            y = (w4a4_decode if decode else w4a4_gemm)(a, s, packed_w, scale_w, x.dtype)
        else:
            from lsr.kernels.w4a4_gemm import w4a4_fp8_matmul, widen_int4_to_fp8

            a8, s = quantize_int4(x2, hadamard=hadamard, out="fp8", hadamard_impl=hadamard_impl, precision=precision,
                                  clip_ratio=act_clip)
            w8 = w_fp8 if w_fp8 is not None else widen_int4_to_fp8(packed_w)
            y = w4a4_fp8_matmul(a8, s, w8, scale_w, x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, N)
