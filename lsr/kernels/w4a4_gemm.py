"""W4A4 matrix products on packed int4 operands (Triton), and the FP8 ``torch._scaled_mm`` prefill path.

All paths compute the exact integer sums ``Σ_k q_a[m,k]·q_w[n,k]`` and rescale in float32 as
``(acc · scale_a[m]) · scale_w[n]`` before casting, like :func:`lsr.kernels.reference.w4a4_matmul_reference`.

What the H100 measurements in the shared docs/gpu.md say (LLaMA-3-8B shapes, ratios over bf16 cuBLAS):

* Hopper has no int4 MMA; int8 and FP8 tensor cores both peak at 2× bf16.
* A plain Triton int8×int8→int32 GEMM (128×256×128 tiles, grouped launch) reached 1.20–1.38×; a persistent TMA
  variant 1.13–1.32×: both well short of cuBLAS FP8 (1.64–2.01× with fast accumulation).
* Packed int4 widened to int8 inside the GEMM loop (what :func:`w4a4_gemm` does) fell to 0.65–0.73× at
  M >= 2048 (the widening sits on the MMA's path: B must go registers → shared memory before ``wgmma``), but gave
  1.6× at M = 1–16 for 14336×4096, where reading a quarter of bf16's bytes wins.
* Int4 values are exact in FP8 e4m3, and cuBLAS FP8 with ``use_fast_accum=False`` returned exact integer sums up
  to K = 14336 at 1.44–1.61×; fast accumulation was off by up to 41 at K = 14336, so it is not used.

Hence: decode (M <= 16) → :func:`w4a4_decode` (GEMV-style, split-K, weights read once, 4-way integer dot products
``dp4a`` on the CUDA cores); prefill → the FP8 path (:func:`w4a4_fp8_matmul`, weights widened to FP8 once per call);
in between → :func:`w4a4_gemm`. The crossover (``backend.FP8_MIN_M``) is a guess until ``scripts/bench_kernels.py``
has run on an H100. ``python scripts/bench_kernels.py --compile-report`` shows registers, spills and SASS per
variant without a GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lsr.kernels.config import DECODE_MAX_M
from lsr.kernels.hadamard_quant import interpreting
from lsr.kernels.reference import unpack_int4

__all__ = [
    "DECODE_MAX_M",
    "DecodeTile",
    "decode_tile",
    "gemm_configs",
    "to_planes",
    "w4a4_decode",
    "w4a4_fp8_matmul",
    "w4a4_gemm",
    "widen_int4_to_fp8",
]


@triton.jit
def _widen(p):
    """uint8 packed [R, C] -> (int8 low nibbles = even elements, int8 high nibbles = odd elements)."""
    s = p.to(tl.int8, bitcast=True)
    return (s << 4) >> 4, s >> 4


@triton.jit
def _w4a4_gemm_kernel(
    a_ptr, w_ptr, sa_ptr, sw_ptr, out_ptr,
    M, N, KH, stride_am, stride_wn, stride_om, M_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, RAW: tl.constexpr,
):  # fmt: skip
    """Tiles of ``out[M, N]`` computed transposed, ``out^T = W · A^T``, walking K 2·BLOCK_KH values per step.

    Mixed-input layout: the packed int4 weight tile is widened in registers and is the dot's first operand (on
    Hopper the register operand of ``wgmma``), the activations are int8 planes (``[M, K]``, even K indices in the
    first K/2 bytes of a row, odd ones in the second) whose tiles go from global to shared memory and straight
    into the dot. A byte holds an even and an odd K index, so a K-step is two int8 dots: W_lo·A_even + W_hi·A_odd.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n  # grouped launch: GROUP_M token tiles share each weight tile while it is in L2
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M  # wrapped rows/cols: loads stay in bounds, stores masked
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rk = tl.arange(0, BLOCK_KH)
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]  # [BLOCK_N, BLOCK_KH] packed bytes
    a_ptrs = a_ptr + rm.to(tl.int64)[None, :] * stride_am + rk[:, None]  # [BLOCK_KH, BLOCK_M], even-K plane
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    for k in range(0, tl.cdiv(KH, BLOCK_KH)):
        if EVEN_K:
            w = tl.load(w_ptrs)
            a_lo = tl.load(a_ptrs)
            a_hi = tl.load(a_ptrs + KH)
        else:
            kmask = rk < KH - k * BLOCK_KH
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0)
            a_lo = tl.load(a_ptrs, mask=kmask[:, None], other=0)
            a_hi = tl.load(a_ptrs + KH, mask=kmask[:, None], other=0)
        w_lo, w_hi = _widen(w)
        acc = tl.dot(w_lo, a_lo, acc, out_dtype=tl.int32)
        acc = tl.dot(w_hi, a_hi, acc, out_dtype=tl.int32)
        w_ptrs += BLOCK_KH
        a_ptrs += BLOCK_KH

    om = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    on = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    omask = (on < N)[:, None] & (om < M)[None, :]
    o_ptrs = out_ptr + om.to(tl.int64)[None, :] * stride_om + on[:, None]
    if RAW:
        tl.store(o_ptrs, acc, mask=omask)
    else:
        sa = tl.load(sa_ptr + om, mask=om < M, other=0.0)
        sw = tl.load(sw_ptr + on, mask=on < N, other=0.0)
        y = acc.to(tl.float32) * sa[None, :] * sw[:, None]  # (acc·s_a)·s_w, the reference's order
        tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=omask)


def _even_k(args: dict) -> bool:
    return args["KH"] % args["BLOCK_KH"] == 0


_gemm = triton.heuristics({"EVEN_K": _even_k})(_w4a4_gemm_kernel)

# (BLOCK_N weight rows, BLOCK_M tokens, BLOCK_KH bytes = 2·BLOCK_KH K values, warps, stages). BLOCK_N is the
# wgmma M side (64 rows per warpgroup), BLOCK_M its N side (8..256), so small-M prefill keeps a full 64-row MMA.
GEMM_TILES = (
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 128, 8, 3),
    (128, 64, 128, 4, 4),
    (64, 128, 128, 4, 4),
    (128, 32, 128, 4, 5),  # small-M prefill chunks (17..128 tokens)
    (64, 32, 128, 4, 5),
    (128, 16, 128, 4, 5),
)


def gemm_configs() -> list[triton.Config]:
    """The autotune candidates (every one is compiled for sm_90 by ``tests/test_kernel_compile.py``)."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_KH": bkh, "GROUP_M": 8}, num_warps=w, num_stages=st)
        for bn, bm, bkh, w, st in GEMM_TILES
    ]


@functools.lru_cache(maxsize=1)
def _gemm_tuned():
    # keyed on a power-of-two bucket of M so that varying prompt lengths do not each re-tune
    return triton.autotune(configs=gemm_configs(), key=["M_BUCKET", "N", "KH"])(_gemm)


def to_planes(p: torch.Tensor) -> torch.Tensor:
    """Packed uint8 ``[R, K/2]`` -> the GEMM's int8 planes ``[R, K]`` (even K indices first, then odd ones)."""
    s = p.view(torch.int8)
    return torch.cat([(s << 4) >> 4, s >> 4], dim=1)


def _check_operands(a: torch.Tensor, sa: torch.Tensor, w: torch.Tensor, sw: torch.Tensor) -> tuple[int, int, int]:
    if a.dtype != torch.uint8 or w.dtype != torch.uint8:
        raise TypeError(f"packed int4 operands must be uint8, got {a.dtype} and {w.dtype}")
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"shape mismatch: activations {tuple(a.shape)}, weights {tuple(w.shape)} (packed)")
    M, KH = a.shape
    N = w.shape[0]
    if sa.shape != (M,) or sw.shape != (N,):
        raise ValueError(f"scales must be [M]={M} and [N]={N}, got {tuple(sa.shape)} and {tuple(sw.shape)}")
    if sa.dtype != torch.float32 or sw.dtype != torch.float32:
        raise TypeError("scales must be float32")
    if a.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("packed operands need a contiguous last dim")
    return M, N, KH


def w4a4_gemm(
    a: torch.Tensor,
    scale_a: torch.Tensor,
    w: torch.Tensor,
    scale_w: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    raw: bool = False,
    config: dict | None = None,
) -> torch.Tensor:
    """Tensor-core W4A4 GEMM: activations ``a``, packed ``w [N, K/2]`` -> ``out [M, N]`` in ``out_dtype``.

    ``a`` is int8 planes ``[M, K]`` (``quantize_int4(..., out="planes")``, what the kernel reads) or packed uint8
    ``[M, K/2]`` (converted with :func:`to_planes` first, one extra pass). ``raw=True`` returns the int32
    accumulators instead (test hook). ``config`` fixes ``BLOCK_M/BLOCK_N/BLOCK_KH/GROUP_M`` (and optionally
    ``num_warps``, ``num_stages``) instead of autotuning; the interpreter always uses a small fixed config.
    """
    if a.dtype == torch.uint8:
        M, N, KH = _check_operands(a, scale_a, w, scale_w)
        a = to_planes(a)
    else:
        if a.dtype != torch.int8 or a.dim() != 2 or a.shape[1] != 2 * w.shape[1]:
            raise ValueError(f"activations must be int8 planes [M, K] or packed uint8 [M, K/2], got {a.dtype} "
                             f"{tuple(a.shape)} for packed weights {tuple(w.shape)}")  # fmt: skip
        M, N, KH = _check_operands(a[:, : w.shape[1]].view(torch.uint8), scale_a, w, scale_w)
    out = torch.empty(M, N, dtype=torch.int32 if raw else out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if KH == 0:
        return out.zero_()
    m_bucket = min(triton.next_power_of_2(M), 8192)
    args = (a, w, scale_a, scale_w, out, M, N, KH, a.stride(0), w.stride(0), out.stride(0), m_bucket)
    if config is None and interpreting():
        config = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_KH": 32, "GROUP_M": 4}
    if config is not None:
        cfg = dict(config)
        cfg.setdefault("GROUP_M", 8)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _gemm[grid](*args, RAW=raw, **cfg)
    else:

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        _gemm_tuned()[grid](*args, RAW=raw)
    return out


@triton.jit
def _load_decode_chunk(a_ptr, w_ptr, rm, rn, mmask, nmask, kk, K_LIMIT, stride_am, stride_wn):
    """One K chunk of the decode kernels: activations ``[BLOCK_M, len(kk)]`` and weights ``[BLOCK_N, len(kk)]``
    (bytes or int32 words, zero past ``K_LIMIT``, N and M)."""
    kmask = kk < K_LIMIT
    w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * stride_wn + kk[None, :], mask=nmask[:, None] & kmask[None, :],
                other=0)  # fmt: skip
    a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0)
    return a, w


@triton.jit
def _w4a4_decode_kernel(
    a_ptr, w_ptr, sa_ptr, sw_ptr, out_ptr, ws_ptr,
    M, N, KH, stride_am, stride_wn, stride_om, CHUNKS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr, SPLIT_K: tl.constexpr,
    RAW: tl.constexpr, NUM_STAGES: tl.constexpr = 1,
):  # fmt: skip
    """GEMV-style: program (n-block, k-split) reads its weight slab once, all M <= 16 tokens at a time.

    Products of widened values accumulate in float32 on the CUDA cores: every partial sum is an integer below
    2^24, so the sums (and the split-K partials' sum) are exact.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_KH)
    nmask = rn < N
    mmask = rm < M
    acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KH), dtype=tl.float32)  # reduced over k once, after the loop
    k0 = pid_k * CHUNKS * BLOCK_KH
    for c in tl.range(0, CHUNKS, num_stages=NUM_STAGES):  # loads of later chunks in flight (cp.async)
        a, w = _load_decode_chunk(a_ptr, w_ptr, rm, rn, mmask, nmask, k0 + c * BLOCK_KH + rk, KH, stride_am, stride_wn)
        w_lo, w_hi = _widen(w)
        a_lo, a_hi = _widen(a)
        w_lo = w_lo.to(tl.float32)
        w_hi = w_hi.to(tl.float32)
        a_lo = a_lo.to(tl.float32)
        a_hi = a_hi.to(tl.float32)
        acc3 += a_lo[:, None, :] * w_lo[None, :, :] + a_hi[:, None, :] * w_hi[None, :, :]
    acc = tl.sum(acc3, axis=2)
    omask = mmask[:, None] & nmask[None, :]
    if SPLIT_K == 1:
        o_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
        if RAW:
            tl.store(o_ptrs, acc.to(tl.int32), mask=omask)
        else:
            sa = tl.load(sa_ptr + rm, mask=mmask, other=0.0)
            sw = tl.load(sw_ptr + rn, mask=nmask, other=0.0)
            y = acc * sa[:, None] * sw[None, :]
            tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(ws_ptr + (pid_k * BLOCK_M + rm[:, None]) * N + rn[None, :], acc, mask=omask)


_NIB = tl.constexpr(0x0F0F0F0F)  # the low nibble of every byte of an int32 word
_BIAS8 = tl.constexpr(0x08080808)
_SEXT = tl.constexpr(0x78787878)
_FLIP = tl.constexpr(0x80808080 - 2**32)  # as int32


@triton.jit
def _dp4a(a, b, c, EMULATE: tl.constexpr):
    """``c + Σ_j a.s8[j] · b.u8[j]`` over the 4 bytes of int32 words (PTX ``dp4a.s32.u32``; emulated in the
    interpreter, which cannot run inline PTX)."""
    if EMULATE:
        r = c + ((a << 24) >> 24) * (b & 255)
        r += ((a << 16) >> 24) * ((b >> 8) & 255)
        r += ((a << 8) >> 24) * ((b >> 16) & 255)
        r += (a >> 24) * ((b >> 24) & 255)
        return r
    else:
        return tl.inline_asm_elementwise(
            "dp4a.s32.u32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1
        )


@triton.jit
def _w4a4_decode_dp4a_kernel(
    a_ptr, w_ptr, sa_ptr, sw_ptr, out_ptr, ws_ptr,
    M, N, KW, stride_am, stride_wn, stride_om, CHUNKS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, SPLIT_K: tl.constexpr,
    RAW: tl.constexpr, EMULATE: tl.constexpr, NUM_STAGES: tl.constexpr = 1,
):  # fmt: skip
    """Decode product on int32 words (8 int4 values each) with 4-way integer dot products (``dp4a``).

    Weights are widened with one mask+xor per 4 values to unsigned bytes ``v + 8`` in [0, 15]; activations to
    signed bytes (amortised over BLOCK_N). ``Σ (v_w + 8)·a - 8·Σ a = Σ v_w·a``, all in int32: exact.
    Per weight word: 3 integer ops + 2 dp4a per token (the float32 FMA kernel needs ~16 ops + 8 FMA per token).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_KW)
    nmask = rn < N
    mmask = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KW), dtype=tl.int32)
    asum = tl.zeros((BLOCK_M, BLOCK_KW), dtype=tl.int32)
    ones = tl.full((BLOCK_M, BLOCK_KW), 0x01010101, tl.int32)
    k0 = pid_k * CHUNKS * BLOCK_KW
    for c in tl.range(0, CHUNKS, num_stages=NUM_STAGES):  # loads of later chunks in flight (cp.async)
        a, w = _load_decode_chunk(a_ptr, w_ptr, rm, rn, mmask, nmask, k0 + c * BLOCK_KW + rk, KW, stride_am, stride_wn)
        w_lo = (w & _NIB) ^ _BIAS8
        w_hi = ((w >> 4) & _NIB) ^ _BIAS8
        a_lo = (((a & _NIB) ^ _BIAS8) + _SEXT) ^ _FLIP  # per byte: nibble -> sign-extended int8, no carries
        a_hi = ((((a >> 4) & _NIB) ^ _BIAS8) + _SEXT) ^ _FLIP
        acc = _dp4a(a_lo[:, None, :], w_lo[None, :, :], acc, EMULATE)
        acc = _dp4a(a_hi[:, None, :], w_hi[None, :, :], acc, EMULATE)
        asum = _dp4a(a_hi, ones, _dp4a(a_lo, ones, asum, EMULATE), EMULATE)
    tot = tl.sum(acc, axis=2) - 8 * tl.sum(asum, axis=1)[:, None]
    omask = mmask[:, None] & nmask[None, :]
    if SPLIT_K == 1:
        o_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
        if RAW:
            tl.store(o_ptrs, tot, mask=omask)
        else:
            sa = tl.load(sa_ptr + rm, mask=mmask, other=0.0)
            sw = tl.load(sw_ptr + rn, mask=nmask, other=0.0)
            y = tot.to(tl.float32) * sa[:, None] * sw[None, :]
            tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(ws_ptr + (pid_k * BLOCK_M + rm[:, None]) * N + rn[None, :], tot.to(tl.float32), mask=omask)


@dataclass(frozen=True)
class DecodeTile:
    """Decode launch per padded M: ``block_k`` is bytes (fma kernel) or int32 words (dp4a kernel)."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


# Each tile holds BLOCK_M·BLOCK_N·BLOCK_K accumulators (<= 32 per thread at 4 warps): no spills for sm_90
# (tests/test_kernel_compile.py checks every entry).
FMA_TILES = {1: DecodeTile(32, 128), 2: DecodeTile(32, 64), 4: DecodeTile(16, 64), 8: DecodeTile(16, 32),
             16: DecodeTile(16, 16)}  # fmt: skip
DP4A_TILES = {1: DecodeTile(64, 32), 2: DecodeTile(64, 16), 4: DecodeTile(32, 32), 8: DecodeTile(16, 32),
              16: DecodeTile(16, 16)}  # fmt: skip


def decode_tile(bm: int, dp4a: bool) -> DecodeTile:
    """The decode tile for ``bm`` (M padded to a power of two, <= DECODE_MAX_M) tokens."""
    return (DP4A_TILES if dp4a else FMA_TILES)[bm]


@triton.jit
def _splitk_epilogue_kernel(
    ws_ptr, sa_ptr, sw_ptr, out_ptr, M, N, stride_om,
    SPLIT_K: tl.constexpr, BLOCK_MP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RAW: tl.constexpr,
):  # fmt: skip
    """Sum the SPLIT_K float32 partials (exact integers, fixed order) and rescale like the reference."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, SPLIT_K):
        acc += tl.load(ws_ptr + (s * BLOCK_MP + rm[:, None]) * N + rn[None, :], mask=mask, other=0.0)
    o_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    if RAW:
        tl.store(o_ptrs, acc.to(tl.int32), mask=mask)
    else:
        sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
        sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
        tl.store(o_ptrs, (acc * sa[:, None] * sw[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _word_view(t: torch.Tensor) -> torch.Tensor | None:
    """uint8 [R, K/2] as int32 [R, K/8] (8 int4 per word), or None when the layout does not allow it."""
    if t.shape[1] % 4 or t.stride(0) % 4 or t.storage_offset() % 4 or t.stride(1) != 1:
        return None
    return t.view(torch.int32)


def w4a4_decode(
    a: torch.Tensor,
    scale_a: torch.Tensor,
    w: torch.Tensor,
    scale_w: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    raw: bool = False,
    impl: str = "auto",
    split_k: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """W4A4 product for M <= 16 tokens (decode), no ``tl.dot``; same contract as :func:`w4a4_gemm`.

    ``impl``: ``"dp4a"`` (int32 words, 4-way integer dot products; needs K % 8 == 0), ``"fma"`` (widened values,
    float32 FMA; integer sums below 2^24 are exact), ``"auto"`` (dp4a where possible). ``split_k`` (default: enough
    k-splits for ~4 programs per SM) splits K across programs that store float32 partial sums (exact integers) to a
    workspace; a second launch adds them in a fixed order and rescales in the reference's float32 order.
    ``block_n``/``block_k`` override the tile (``block_k`` in bytes for fma, in int32 words for dp4a).
    """
    M, N, KH = _check_operands(a, scale_a, w, scale_w)
    if M > DECODE_MAX_M:
        raise ValueError(f"w4a4_decode handles M <= {DECODE_MAX_M}, got {M}; use w4a4_gemm")
    if impl not in ("auto", "dp4a", "fma"):
        raise ValueError(f"impl must be 'auto', 'dp4a' or 'fma', got {impl!r}")
    if M == 0 or N == 0 or KH == 0:
        return torch.zeros(M, N, dtype=torch.int32 if raw else out_dtype, device=a.device)
    aw, ww = (_word_view(a), _word_view(w)) if impl != "fma" else (None, None)
    use_dp4a = aw is not None and ww is not None
    if impl == "dp4a" and not use_dp4a:
        raise ValueError("impl='dp4a' needs K % 8 == 0 and 4-byte aligned rows")
    bm = triton.next_power_of_2(M)
    tile = decode_tile(bm, use_dp4a)
    bn, bk = block_n or tile.block_n, block_k or tile.block_k
    ka = KH // 4 if use_dp4a else KH
    n_blocks = triton.cdiv(N, bn)
    chunks = triton.cdiv(ka, bk)
    if split_k is None:
        target = 4 * _sm_count(a.device.index or 0) if a.is_cuda else 1
        split_k = max(1, min(chunks, target // n_blocks))
    per = triton.cdiv(chunks, max(1, split_k))
    split_k = triton.cdiv(chunks, per)
    out = torch.empty(M, N, dtype=torch.int32 if raw else out_dtype, device=a.device)
    # split-K partials [split_k, BLOCK_M, N]: plain stores, then one epilogue launch (no zero fill, no atomics)
    ws = out if split_k == 1 else torch.empty(split_k, bm, N, dtype=torch.float32, device=a.device)
    grid = (n_blocks, split_k)
    if use_dp4a:
        _w4a4_decode_dp4a_kernel[grid](
            aw, ww, scale_a, scale_w, out, ws, M, N, ka, aw.stride(0), ww.stride(0), out.stride(0), per,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_KW=bk, SPLIT_K=split_k, RAW=raw, EMULATE=interpreting(),
            NUM_STAGES=tile.num_stages, num_warps=tile.num_warps,
        )  # fmt: skip
    else:
        _w4a4_decode_kernel[grid](
            a, w, scale_a, scale_w, out, ws, M, N, KH, a.stride(0), w.stride(0), out.stride(0), per,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_KH=bk, SPLIT_K=split_k, RAW=raw, NUM_STAGES=tile.num_stages,
            num_warps=tile.num_warps,
        )  # fmt: skip
    if split_k > 1:
        bmo, bno = min(bm, 16), 128
        _splitk_epilogue_kernel[(triton.cdiv(M, bmo), triton.cdiv(N, bno))](
            ws, scale_a, scale_w, out, M, N, out.stride(0),
            SPLIT_K=split_k, BLOCK_MP=bm, BLOCK_M=bmo, BLOCK_N=bno, RAW=raw, num_warps=4,
        )  # fmt: skip
    return out


@triton.jit
def _widen_fp8_kernel(p_ptr, out_ptr, R, KH, BLOCK_R: tl.constexpr, BLOCK_KH: tl.constexpr):
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ck = tl.program_id(1) * BLOCK_KH + tl.arange(0, BLOCK_KH)
    mask = (rr < R)[:, None] & (ck < KH)[None, :]
    p = tl.load(p_ptr + rr.to(tl.int64)[:, None] * KH + ck[None, :], mask=mask, other=0)
    lo, hi = _widen(p)
    v = tl.reshape(tl.join(lo, hi), (BLOCK_R, 2 * BLOCK_KH)).to(tl.float32)  # interleave back to K order
    c2 = tl.program_id(1) * 2 * BLOCK_KH + tl.arange(0, 2 * BLOCK_KH)
    omask = (rr < R)[:, None] & (c2 < 2 * KH)[None, :]
    tl.store(
        out_ptr + rr.to(tl.int64)[:, None] * (2 * KH) + c2[None, :],
        v.to(out_ptr.dtype.element_ty),
        mask=omask,
    )


def widen_int4_to_fp8(p: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed uint8 ``[R, K/2]`` -> float8_e4m3fn ``[R, K]`` holding the same integers (exact in e4m3).

    One Triton pass on CUDA (or under the interpreter); pure torch otherwise. ``out`` may be a reused scratch.
    """
    if p.dtype != torch.uint8 or p.dim() != 2:
        raise TypeError(f"expected packed uint8 [R, K/2], got {p.dtype} {tuple(p.shape)}")
    R, KH = p.shape
    if not (p.is_cuda or interpreting()):
        v = unpack_int4(p).float().to(torch.float8_e4m3fn)
        return v if out is None else out.copy_(v)
    p = p.contiguous()
    if out is None:
        out = torch.empty(R, 2 * KH, dtype=torch.float8_e4m3fn, device=p.device)
    if R and KH:
        br, bkh = 16, 128
        _widen_fp8_kernel[(triton.cdiv(R, br), triton.cdiv(KH, bkh))](p, out, R, KH, BLOCK_R=br, BLOCK_KH=bkh)
    return out


_ROWWISE_OK: dict[str, bool] = {}


def w4a4_fp8_matmul(
    a_fp8: torch.Tensor,
    scale_a: torch.Tensor,
    w_fp8: torch.Tensor,
    scale_w: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """cuBLAS FP8 GEMM on int4-valued e4m3 operands with exact (non-fast) accumulation; CUDA only.

    bf16 output uses ``torch._scaled_mm``'s row-wise scales (epilogue ``acc·s_a·s_w`` inside cuBLAS: the integer
    sums are exact, the rescale may differ from the reference's float32 order by one float32 rounding before the
    bf16 cast). Other dtypes (or a torch without row-wise scaling) take float32 integer sums and the reference
    epilogue in torch.
    """
    if not a_fp8.is_cuda:
        raise RuntimeError("the fp8 path needs CUDA tensors")
    M, K = a_fp8.shape
    N = w_fp8.shape[0]
    if K % 16 or N % 16:
        raise ValueError(f"torch._scaled_mm needs K and N divisible by 16, got K={K}, N={N}")
    dev = str(a_fp8.device)
    if out_dtype == torch.bfloat16 and _ROWWISE_OK.get(dev, True):
        try:
            return torch._scaled_mm(
                a_fp8, w_fp8.t(), scale_a=scale_a.view(M, 1), scale_b=scale_w.view(1, N), out_dtype=torch.bfloat16,
                use_fast_accum=False,
            )  # fmt: skip
        except RuntimeError:
            _ROWWISE_OK[dev] = False
    one = torch.ones((), dtype=torch.float32, device=a_fp8.device)
    acc = torch._scaled_mm(a_fp8, w_fp8.t(), scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=False)
    return (acc * scale_a.unsqueeze(1) * scale_w.unsqueeze(0)).to(out_dtype)
