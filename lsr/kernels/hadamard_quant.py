"""Fused online Hadamard + per-token int4 quantization + packing (Triton).

One program handles ``BLOCK_M`` tokens and reads each once. For ``K = m·2^k`` the row is viewed as a tile
``[m, n1, n2]`` (``n = n1·n2 = 2^k``; ``m`` padded to a power of two with zero rows) and ``x @ (H_m ⊗ H_n)`` is
done as one small matrix product per axis, since for a Kronecker product each axis gets its own factor and the
Sylvester ``H_n = H_{n1} ⊗ H_{n2}``. The factors are the unnormalised ±1 matrices from ``lsr.hadamard`` (exact
in bf16), the products run on the tensor cores in bf16 with float32 accumulation, and the float32 operand of each
stage is split into 3 (``precision="exact"``) or 2 (``"fast"``) bf16 terms, which keeps 24 (16) mantissa bits: the
result equals a float32 Hadamard up to float32 rounding. The normalisation ``1/sqrt(K)`` only enters the scale.
Rows wider than one tile (padded width > ``TILE_MAX``: K = 14336, 28672) go to a chunked kernel, one row per
program, still read once: ``H_n = H_{n0} ⊗ H_{n1} ⊗ H_{n2}``, each of the n0 chunks is transformed on the tensor
cores and added with ±1 signs into a row-wide float32 accumulator, so only one chunk's dot operands are live.

Quantization then matches :func:`lsr.kernels.reference.quantize_per_token_int4`: ``scale = (max|y|·clip)/7``
(``clip``: a runtime float32 clip ratio, 1 for the plain absmax; 1 where the scale is 0),
``q = clamp(rint(y / scale), -8, 7)`` with IEEE division and round-half-to-even done by hand (exact on .5 ties, and
identical under ``TRITON_INTERPRET=1``). Without a Hadamard the integers and scales are bit-exact. With one, float32
rounding in the transform differs from the reference's, so a value that lands within ~1e-6 of a .5 boundary can
round the other way: off by exactly 1, rarely (tests require >= 99.9 % exact).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = [
    "HadamardPlan",
    "Launch",
    "OUT_KINDS",
    "fht_hadamard",
    "hadamard_launch",
    "hadamard_plan",
    "interpreting",
    "plan_dims",
    "quant_launch",
    "quantize_int4",
]


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _rint(x):
    """Round half to even, exact for |x| < 2^23 (what torch.round does)."""
    f = tl.math.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.math.floor(0.5 * f)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _dot_pm1(v, h, NSPLIT: tl.constexpr, F32DOT: tl.constexpr):
    """``v @ h`` for float32 ``v`` and a ±1 bf16 ``h``: ``v`` split into NSPLIT bf16 terms (8 bits each).

    F32DOT (interpreter only, whose bf16 dot is not implemented) feeds the same bf16 terms to a float32 dot.
    """
    hi = v.to(tl.bfloat16)
    if F32DOT:
        hf = h.to(tl.float32)
        acc = tl.dot(hi.to(tl.float32), hf, input_precision="ieee")
    else:
        acc = tl.dot(hi, h, out_dtype=tl.float32)
    if NSPLIT >= 2:
        r = v - hi.to(tl.float32)
        mid = r.to(tl.bfloat16)
        if F32DOT:
            acc = tl.dot(mid.to(tl.float32), hf, acc, input_precision="ieee")
        else:
            acc = tl.dot(mid, h, acc)
        if NSPLIT >= 3:
            lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
            if F32DOT:
                acc = tl.dot(lo.to(tl.float32), hf, acc, input_precision="ieee")
            else:
                acc = tl.dot(lo, h, acc)
    return acc


@triton.jit
def _load_square(ptr, S: tl.constexpr):
    i = tl.arange(0, S)
    return tl.load(ptr + i[:, None] * S + i[None, :])


@triton.jit
def _hadamard_tile(y, hm_ptr, h1_ptr, h2_ptr, BLOCK_M: tl.constexpr, MP: tl.constexpr, N1: tl.constexpr,
                   N2: tl.constexpr, NSPLIT_IN: tl.constexpr, NSPLIT: tl.constexpr, F32DOT: tl.constexpr):
    """``y [BM, MP, N1, N2]`` (float32) times ``H_MP ⊗ H_N1 ⊗ H_N2`` along its last three axes, same shape."""
    # axis n2 (first: its input is the raw activation, exact in bf16 when x is bf16)
    h2 = _load_square(h2_ptr, N2)
    y = tl.reshape(_dot_pm1(tl.reshape(y, (BLOCK_M * MP * N1, N2)), h2, NSPLIT_IN, F32DOT), (BLOCK_M, MP, N1, N2))
    if N1 > 1:  # axis n1
        h1 = _load_square(h1_ptr, N1)
        y = tl.permute(y, (0, 1, 3, 2))  # [BM, MP, N2, N1]
        y = tl.reshape(_dot_pm1(tl.reshape(y, (BLOCK_M * MP * N2, N1)), h1, NSPLIT, F32DOT), (BLOCK_M, MP, N2, N1))
        if MP > 1:  # axis m (H_m zero-padded to MP)
            hm = _load_square(hm_ptr, MP)
            y = tl.permute(y, (0, 2, 3, 1))  # [BM, N2, N1, MP]
            y = tl.reshape(_dot_pm1(tl.reshape(y, (BLOCK_M * N2 * N1, MP)), hm, NSPLIT, F32DOT), (BLOCK_M, N2, N1, MP))
            y = tl.permute(y, (0, 3, 2, 1))  # back to [BM, MP, N1, N2]
        else:
            y = tl.permute(y, (0, 1, 3, 2))
    else:
        if MP > 1:
            hm = _load_square(hm_ptr, MP)
            y = tl.permute(y, (0, 2, 3, 1))  # [BM, N1, N2, MP]
            y = tl.reshape(_dot_pm1(tl.reshape(y, (BLOCK_M * N1 * N2, MP)), hm, NSPLIT, F32DOT), (BLOCK_M, N1, N2, MP))
            y = tl.permute(y, (0, 3, 1, 2))
    return y


@triton.jit
def _hadamard_quant_kernel(
    x_ptr, out_ptr, scale_ptr, hm_ptr, h1_ptr, h2_ptr,
    M, stride_xm, stride_om, norm, clip,
    BLOCK_M: tl.constexpr, MM: tl.constexpr, MP: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
    NSPLIT_IN: tl.constexpr, NSPLIT: tl.constexpr, OUT: tl.constexpr, F32DOT: tl.constexpr,
):  # fmt: skip
    """Rows that fit one program's registers: ``BLOCK_M`` whole rows as one ``[BM, MP, N1, N2]`` tile."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    a = tl.arange(0, MP)
    j1 = tl.arange(0, N1)
    j2 = tl.arange(0, N2)
    col = a[:, None, None] * (N1 * N2) + j1[None, :, None] * N2 + j2[None, None, :]  # [MP, N1, N2]
    row_off = rows.to(tl.int64)[:, None, None, None]
    mask = (rows < M)[:, None, None, None] & (a < MM)[None, :, None, None]
    y = tl.load(x_ptr + row_off * stride_xm + col[None], mask=mask, other=0.0).to(tl.float32)
    y = _hadamard_tile(y, hm_ptr, h1_ptr, h2_ptr, BLOCK_M, MP, N1, N2, NSPLIT_IN, NSPLIT, F32DOT)

    amax = tl.max(tl.reshape(tl.abs(y), (BLOCK_M, MP * N1 * N2)), axis=1)
    s = tl.math.div_rn(amax * clip, tl.full(amax.shape, 7.0, tl.float32))
    safe = tl.where(s == 0.0, 1.0, s)
    tl.store(scale_ptr + rows, tl.where(s == 0.0, 1.0, s * norm), mask=rows < M)
    den = tl.broadcast_to(safe[:, None, None, None], (BLOCK_M, MP, N1, N2))
    q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(y, den)), -8.0), 7.0)
    if OUT == "fp8":  # via bf16 (exact for these integers): half the registers of the float32 tile
        tl.store(out_ptr + row_off * stride_om + col[None], q.to(tl.bfloat16).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # even / odd K indices, split as int8 (a quarter of the registers of int32 halves)
        lo, hi = tl.split(tl.reshape(q.to(tl.int8), (BLOCK_M, MP, N1, N2 // 2, 2)))
        jh = tl.arange(0, N2 // 2)
        colh = a[:, None, None] * (N1 * N2 // 2) + j1[None, :, None] * (N2 // 2) + jh[None, None, :]
        if OUT == "packed":
            byte = ((lo & 15) | (hi << 4)).to(tl.uint8, bitcast=True)
            tl.store(out_ptr + row_off * stride_om + colh[None], byte, mask=mask)
        else:  # "planes": int8, even K indices in the first half of the row, odd ones in the second
            tl.store(out_ptr + row_off * stride_om + colh[None], lo, mask=mask)
            tl.store(out_ptr + row_off * stride_om + (MM * N1 * N2 // 2) + colh[None], hi, mask=mask)


@triton.jit
def _hadamard_quant_chunked_kernel(
    x_ptr, out_ptr, scale_ptr, hm_ptr, h1_ptr, h2_ptr,
    M, stride_xm, stride_om, norm, clip, n_chunks,
    MM: tl.constexpr, MP: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
    NSPLIT_IN: tl.constexpr, NSPLIT: tl.constexpr, OUT: tl.constexpr, F32DOT: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """One row wider than a program's registers hold as a whole dot tile: ``H_K = H_m ⊗ H_N0 ⊗ H_N1 ⊗ H_N2``.

    The row is read once, in N0 chunks ``x[:, c, :, :]`` (a ``[MP, N1, N2]`` tile; loads pipelined across chunks).
    Each chunk gets ``H_m ⊗ H_N1 ⊗ H_N2`` on the tensor cores, then is added with the signs of row ``c`` of
    ``H_N0`` into the ``[N0, MP·N1·N2]`` float32 accumulator (N0 adds per value): only the accumulator and one
    chunk's dot operands are live, instead of dot operands as wide as the row.
    """
    row = tl.program_id(0)
    CH: tl.constexpr = MP * N1 * N2
    a = tl.arange(0, MP)
    j1 = tl.arange(0, N1)
    j2 = tl.arange(0, N2)
    b0 = tl.arange(0, N0)
    colc = a[:, None, None] * (N0 * N1 * N2) + j1[None, :, None] * N2 + j2[None, None, :]  # [MP, N1, N2]
    cmask = tl.broadcast_to((a < MM)[:, None, None], (MP, N1, N2))
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    acc = tl.zeros((N0, CH), dtype=tl.float32)
    for c in tl.range(0, n_chunks, num_stages=NUM_STAGES):  # n_chunks == N0 at run time: ptxas keeps the loop
        y = tl.load(x_row + c * (N1 * N2) + colc, mask=cmask, other=0.0).to(tl.float32)
        y = _hadamard_tile(y[None], hm_ptr, h1_ptr, h2_ptr, 1, MP, N1, N2, NSPLIT_IN, NSPLIT, F32DOT)
        # row c of the Sylvester H_N0: H[c, b] = (-1)^popcount(c & b)
        p = c & b0
        p = p ^ (p >> 16)
        p = p ^ (p >> 8)
        p = p ^ (p >> 4)
        p = p ^ (p >> 2)
        p = p ^ (p >> 1)
        y = tl.broadcast_to(tl.reshape(y, (1, CH)), (N0, CH))
        acc += tl.where((p & 1)[:, None] != 0, -y, y)

    amax = tl.max(tl.max(tl.abs(acc), axis=1), axis=0)
    s = tl.math.div_rn(amax * clip, 7.0)
    safe = tl.where(s == 0.0, 1.0, s)
    tl.store(scale_ptr + row, tl.where(s == 0.0, 1.0, s * norm))
    q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(acc, tl.full((N0, CH), 0.0, tl.float32) + safe)), -8.0), 7.0)
    out_row = out_ptr + row.to(tl.int64) * stride_om
    if OUT == "fp8":
        col = b0[:, None] * (N1 * N2) + tl.reshape(colc, (CH,))[None, :]
        mask = tl.broadcast_to(tl.reshape(cmask, (CH,))[None, :], (N0, CH))
        tl.store(out_row + col, q.to(tl.bfloat16).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        lo, hi = tl.split(tl.reshape(q.to(tl.int8), (N0, CH // 2, 2)))
        jh = tl.arange(0, N2 // 2)
        colh = a[:, None, None] * (N0 * N1 * N2 // 2) + j1[None, :, None] * (N2 // 2) + jh[None, None, :]
        colh = b0[:, None] * (N1 * N2 // 2) + tl.reshape(colh, (CH // 2,))[None, :]
        hmask = tl.broadcast_to(tl.reshape(tl.broadcast_to((a < MM)[:, None, None], (MP, N1, N2 // 2)),
                                           (CH // 2,))[None, :], (N0, CH // 2))  # fmt: skip
        if OUT == "packed":
            byte = ((lo & 15) | (hi << 4)).to(tl.uint8, bitcast=True)
            tl.store(out_row + colh, byte, mask=hmask)
        else:  # "planes"
            tl.store(out_row + colh, lo, mask=hmask)
            tl.store(out_row + (MM * N0 * N1 * N2 // 2) + colh, hi, mask=hmask)


@triton.jit
def _quant_kernel(
    x_ptr, out_ptr, scale_ptr, M, K, stride_xm, stride_om, clip,
    BLOCK_M: tl.constexpr, KP: tl.constexpr, OUT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, KP)
    row_off = rows.to(tl.int64)[:, None]
    rmask = (rows < M)[:, None]
    x = tl.load(x_ptr + row_off * stride_xm + cols[None, :], mask=rmask & (cols < K)[None, :], other=0.0)
    x = x.to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    s = tl.math.div_rn(amax * clip, tl.full(amax.shape, 7.0, tl.float32))
    safe = tl.where(s == 0.0, 1.0, s)
    tl.store(scale_ptr + rows, safe, mask=rows < M)
    q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(x, tl.broadcast_to(safe[:, None], (BLOCK_M, KP)))), -8.0), 7.0)
    kmask = rmask & (cols < K)[None, :]
    if OUT == "fp8":
        tl.store(out_ptr + row_off * stride_om + cols[None, :], q.to(out_ptr.dtype.element_ty), mask=kmask)
    else:
        lo, hi = tl.split(tl.reshape(q.to(tl.int32), (BLOCK_M, KP // 2, 2)))
        ch = tl.arange(0, KP // 2)
        hmask = rmask & (ch < K // 2)[None, :]
        if OUT == "packed":
            byte = ((lo & 15) | ((hi & 15) << 4)).to(tl.uint8)
            tl.store(out_ptr + row_off * stride_om + ch[None, :], byte, mask=hmask)
        else:  # "planes"
            tl.store(out_ptr + row_off * stride_om + ch[None, :], lo.to(tl.int8), mask=hmask)
            tl.store(out_ptr + row_off * stride_om + K // 2 + ch[None, :], hi.to(tl.int8), mask=hmask)


@dataclass(frozen=True)
class HadamardPlan:
    """How the fused kernels factor ``H_K = H_m ⊗ H_{n0} ⊗ H_{n1} ⊗ H_{n2}`` (unnormalised ±1 factors; ``hm``,
    ``h1``, ``h2`` bf16 for the tensor cores; ``h0``, float32, is the Sylvester matrix whose signs the chunked kernel
    computes from bits, kept for checks; ``n0 == 1``: one tile)."""

    k: int
    m: int
    mp: int
    n0: int
    n1: int
    n2: int
    norm: float
    hm: torch.Tensor
    h0: torch.Tensor
    h1: torch.Tensor
    h2: torch.Tensor


_PLANS: dict[tuple[int, str], HadamardPlan | None] = {}
# A row of at most TILE_MAX padded float32 values is one dot tile (``_hadamard_quant_kernel``); a wider one goes
# through ``_hadamard_quant_chunked_kernel`` in N_CHUNKS chunks, with ACC_PER_THREAD accumulator values per thread
# under a cap of CHUNKED_MAXNREG registers (K = 14336: 8 warps, 2 programs per SM; 28672: 16 warps, 1).
TILE_MAX = 8192
N_CHUNKS = 8
ACC_PER_THREAD = 64
CHUNKED_MAXNREG = 128


def _pm1(n: int) -> torch.Tensor:
    from lsr.hadamard import hadamard_matrix

    h = (hadamard_matrix(n, dtype=torch.float64) * math.sqrt(n)).round()
    if not bool((h.abs() == 1).all()):
        raise RuntimeError(f"lsr.hadamard.hadamard_matrix({n}) * sqrt({n}) is not a ±1 matrix")
    return h


def _check_kron(K: int, hm: torch.Tensor, h0: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor) -> None:
    """Compare a few rows of ``H_m ⊗ H_{n0} ⊗ H_{n1} ⊗ H_{n2} / sqrt(K)`` with ``lsr.hadamard.hadamard_transform``."""
    from lsr.hadamard import hadamard_transform

    m, n0, n1, n2 = hm.shape[0], h0.shape[0], h1.shape[0], h2.shape[0]
    n = n0 * n1 * n2
    probes = sorted({r for r in (0, 1, n2 - 1, n2, n1 * n2, n - 1, n, K - 1, (K * 7) // 13, (K * 5) // 11) if r < K})
    eye = torch.zeros(len(probes), K, dtype=torch.float32)
    eye[torch.arange(len(probes)), torch.tensor(probes)] = 1.0
    got = hadamard_transform(eye).double()
    for i, r in enumerate(probes):
        a, b = divmod(r, n)
        b0, b = divmod(b, n1 * n2)
        b1, b2 = divmod(b, n2)
        want = torch.kron(torch.kron(torch.kron(hm[a], h0[b0]), h1[b1]), h2[b2]) / math.sqrt(K)
        if not torch.allclose(got[i], want, atol=1e-5):
            raise RuntimeError(
                f"lsr.hadamard's H_{K} is not H_{m} ⊗ H_{n} (Sylvester) in the order the fused kernel assumes"
            )


def _split_pow2(n: int) -> tuple[int, int]:
    """``(n1, n2)`` with ``n1 * n2 == n`` for one dot tile: ``n2 = n`` up to 128, else about ``sqrt(n)`` each."""
    if n <= 128:
        return 1, n
    k = n.bit_length() - 1
    n2 = 2 ** ((k + 1) // 2)
    return n // n2, n2


def plan_dims(K: int) -> tuple[int, int, int, int, int] | None:
    """``(m, mp, n0, n1, n2)`` of the fused kernels' ``H_K = H_m ⊗ H_{n0} ⊗ H_{n1} ⊗ H_{n2}`` (``mp``: m padded
    to a power of two; ``n0 > 1``: the chunked kernel), or None if they cannot do this K (2^k < 16)."""
    from lsr.hadamard import decompose

    m, k = decompose(K)
    n = 2**k
    if n < 16:
        return None
    mp = 1 if m == 1 else triton.next_power_of_2(max(m, 16))
    n0 = 1
    if mp * n > TILE_MAX:
        # a chunk's first dot needs >= 16 rows (mp·n1 >= 16: n1 >= 16 when mp == 1) and n2 >= 16
        n0 = max(1, min(N_CHUNKS, n // (256 if mp == 1 else 16)))
    n1, n2 = _split_pow2(n // n0)
    return m, mp, n0, n1, n2


def hadamard_plan(K: int, device: torch.device | str) -> HadamardPlan | None:
    """The fused kernels' factorisation of ``H_K`` on ``device``; None if they cannot do this K (2^k < 16)."""
    key = (K, str(torch.device(device)))
    if key in _PLANS:
        return _PLANS[key]
    dims = plan_dims(K)
    plan = None
    if dims is not None:
        m, mp, n0, n1, n2 = dims
        one = torch.ones(1, 1, dtype=torch.float64)
        hm = _pm1(m) if m > 1 else one
        h0 = _pm1(n0) if n0 > 1 else one
        h1 = _pm1(n1) if n1 > 1 else one
        h2 = _pm1(n2)
        _check_kron(K, hm, h0, h1, h2)
        b = torch.arange(n0)
        parity = torch.zeros(n0, n0, dtype=torch.int64)
        for bit in range(max(1, n0.bit_length())):
            parity ^= ((b[:, None] & b[None, :]) >> bit) & 1
        if not torch.equal(h0, (1 - 2 * parity).double()):  # the chunked kernel computes these signs from bits
            raise RuntimeError(f"lsr.hadamard's H_{n0} is not the Sylvester matrix in natural order")
        hm_pad = torch.zeros(mp, mp, dtype=torch.float64)
        hm_pad[:m, :m] = hm

        def dev(t: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
            return t.to(device=device, dtype=dtype).contiguous()

        plan = HadamardPlan(K, m, mp, n0, n1, n2, 1.0 / math.sqrt(K), dev(hm_pad), dev(h0, torch.float32), dev(h1),
                            dev(h2))  # fmt: skip
    _PLANS[key] = plan
    return plan


@dataclass(frozen=True)
class Launch:
    """Kernel, constexprs, ``num_warps`` and ``num_stages`` of one launch of a fused Hadamard+quant kernel."""

    kernel: str  # "_hadamard_quant_kernel" (BLOCK_M rows per program) or "_hadamard_quant_chunked_kernel" (one row)
    constexprs: dict
    num_warps: int
    num_stages: int = 1
    maxnreg: int | None = None  # register cap per thread (ptx .maxnreg): sets how many programs share an SM

    @property
    def block_m(self) -> int:
        return self.constexprs.get("BLOCK_M", 1)


def hadamard_launch(K: int, M: int, block_m: int | None = None, num_warps: int | None = None) -> Launch:
    """The fused Hadamard+quant launch for ``M`` tokens of width ``K`` (kernel, shape constexprs, warps).

    ``block_m`` applies to the one-tile kernel only (the chunked one takes one row per program).
    """
    dims = plan_dims(K)
    if dims is None:
        raise ValueError(f"the fused kernel cannot do K={K}")
    m, mp, n0, n1, n2 = dims
    elems = mp * n0 * n1 * n2
    if n0 > 1:
        warps = num_warps or max(4, min(32, elems // (32 * ACC_PER_THREAD)))
        const = dict(MM=m, MP=mp, N0=n0, N1=n1, N2=n2, NUM_STAGES=2)
        cap = min(CHUNKED_MAXNREG, 65536 // (32 * warps)) if elems // (32 * warps) <= ACC_PER_THREAD else None
        return Launch("_hadamard_quant_chunked_kernel", const, warps, 2, cap)
    need = max(1, 16 // (mp * n1))  # tl.dot needs >= 16 rows in the first stage
    bm = max(need, block_m or min(triton.next_power_of_2(M), max(1, TILE_MAX // elems)))
    total = bm * elems
    warps = num_warps or _hq_warps(total)
    return Launch("_hadamard_quant_kernel", dict(BLOCK_M=bm, MM=m, MP=mp, N1=n1, N2=n2), warps)


def _hq_warps(total: int) -> int:
    """Warps for a program holding ``total`` float32 values: <= 32 values per thread keeps it spill-free."""
    return max(4, min(32, total // (32 * 32)))


def quant_launch(K: int, M: int, block_m: int | None = None, num_warps: int | None = None) -> tuple[int, int, int]:
    """``(block_m, padded K, warps)`` of the plain (no Hadamard) quantization kernel."""
    kp = triton.next_power_of_2(K)
    bm = block_m or max(1, min(triton.next_power_of_2(M), 64, 8192 // kp))
    warps = num_warps or (4 if bm * kp <= 4096 else 8)
    return bm, kp, warps


OUT_KINDS = ("packed", "planes", "fp8")
OUT_PTR_TYPE = {"packed": "*u8", "planes": "*i8", "fp8": "*fp8e4nv"}


_NSPLIT = {"exact": 3, "fast": 2}
_FHT_OK: dict[tuple[int, str], object] = {}


def fht_hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x @ H_K`` in float32 through the optional ``fast_hadamard_transform`` package (CUDA only).

    Its ``H_12/20/28/40`` need not be ``lsr.hadamard``'s: the first use per K compares a few rows and raises if
    they differ (the offline rotation folded into the weights must be the same matrix).
    """
    if not x.is_cuda:
        raise RuntimeError("fast_hadamard_transform runs on CUDA tensors only")
    try:
        import fast_hadamard_transform as fht
        from fast_hadamard_transform import fast_hadamard_transform_interface as fhti
    except ImportError as e:  # pragma: no cover - optional extra
        raise RuntimeError("hadamard_impl='fht' needs the optional fast-hadamard-transform package") from e
    from lsr.hadamard import decompose, hadamard_transform

    K = x.shape[-1]
    key = (K, str(x.device))
    fn = _FHT_OK.get(key)
    if fn is None:
        m, _ = decompose(K)
        fn = fht.hadamard_transform if m == 1 else getattr(fhti, f"hadamard_transform_{m}N", None)
        if fn is None:
            raise RuntimeError(f"fast_hadamard_transform has no {m}·2^k transform (K={K})")
        probe = torch.randn(4, K, device=x.device, dtype=torch.float32)
        ref = hadamard_transform(probe.cpu()).to(x.device)
        if not torch.allclose(fn(probe, 1.0 / math.sqrt(K)), ref, atol=1e-3, rtol=1e-3):
            raise RuntimeError(f"fast_hadamard_transform's H_{K} differs from lsr.hadamard's")
        _FHT_OK[key] = fn
    return fn(x.float().contiguous(), 1.0 / math.sqrt(K))


def quantize_int4(
    x: torch.Tensor,
    *,
    hadamard: bool,
    out: str = "packed",
    precision: str = "exact",
    hadamard_impl: str = "fused",
    block_m: int | None = None,
    num_warps: int | None = None,
    clip_ratio: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int4 quantization of ``x [M, K]`` (bf16/fp16/fp32), optionally after ``x @ H_K``.

    ``out="packed"`` returns the uint8 ``[M, K/2]`` container, ``out="planes"`` int8 ``[M, K]`` with the even K
    indices in the first half of each row and the odd ones in the second (the tensor-core GEMM's activation
    operand), ``out="fp8"`` the integers in K order as float8_e4m3fn ``[M, K]`` (the ``torch._scaled_mm`` path);
    plus float32 scales ``[M]``. ``hadamard_impl``: ``"fused"``
    (this kernel; falls back to ``"torch"`` for K whose 2^k part is < 16), ``"torch"`` (``lsr.hadamard`` in
    float32, then the plain kernel), ``"fht"`` (``fast_hadamard_transform`` in float32, then the plain kernel).
    ``block_m`` (tokens per program, a power of two) and ``num_warps`` override the heuristics (benchmark sweeps).
    ``clip_ratio`` in (0, 1]: ``scale = max|y| · clip_ratio / 7`` (codes clamped to [-8, 7]), the fake quantizer's.
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_int4 expects [M, K], got {tuple(x.shape)}")
    if out not in OUT_KINDS:
        raise ValueError(f"out must be one of {OUT_KINDS}, got {out!r}")
    if precision not in _NSPLIT:
        raise ValueError(f"precision must be one of {tuple(_NSPLIT)}, got {precision!r}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    clip = float(clip_ratio)
    M, K = x.shape
    if K % 2:
        raise ValueError(f"K must be even for int4 packing, got {K}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out == "packed":
        q = torch.empty(M, K // 2, dtype=torch.uint8, device=x.device)
    else:
        q = torch.empty(M, K, dtype=torch.int8 if out == "planes" else torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return q, scale
    plan = hadamard_plan(K, x.device) if hadamard and hadamard_impl == "fused" else None
    if hadamard and plan is None:
        if hadamard_impl == "fht":
            x = fht_hadamard(x)
        elif hadamard_impl in ("fused", "torch"):
            from lsr.hadamard import hadamard_transform

            x = hadamard_transform(x.float())
        else:
            raise ValueError(f"hadamard_impl must be 'fused', 'torch' or 'fht', got {hadamard_impl!r}")
    if plan is None:
        bm, kp, warps = quant_launch(K, M, block_m, num_warps)
        _quant_kernel[(triton.cdiv(M, bm),)](
            x, q, scale, M, K, x.stride(0), q.stride(0), clip, BLOCK_M=bm, KP=kp, OUT=out, num_warps=warps
        )  # fmt: skip
        return q, scale
    ns = _NSPLIT[precision]
    ns_in = {torch.bfloat16: 1, torch.float16: 2}.get(x.dtype, ns)
    launch = hadamard_launch(K, M, block_m, num_warps)
    common = dict(NSPLIT_IN=min(ns_in, ns), NSPLIT=ns, OUT=out, F32DOT=interpreting(), num_warps=launch.num_warps,
                  **launch.constexprs)  # fmt: skip
    if launch.kernel == "_hadamard_quant_chunked_kernel":
        _hadamard_quant_chunked_kernel[(M,)](
            x, q, scale, plan.hm, plan.h1, plan.h2, M, x.stride(0), q.stride(0), plan.norm, clip, plan.n0,
            num_stages=launch.num_stages, maxnreg=launch.maxnreg, **common,
        )  # fmt: skip
    else:
        _hadamard_quant_kernel[(triton.cdiv(M, launch.block_m),)](
            x, q, scale, plan.hm, plan.h1, plan.h2, M, x.stride(0), q.stride(0), plan.norm, clip, **common
        )  # fmt: skip
    return q, scale
