"""W4A4 kernels vs the pure-torch reference.

Without CUDA the Triton kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set here before triton is
imported); with CUDA the same tests compile the real kernels and the CUDA-only tests (FP8 path) run too.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    _tl = sys.modules.get("triton.language")
    if _tl is not None and type(_tl.standard.max).__name__ != "InterpretedFunction":
        # triton was imported before this module (transformers, via conftest) with the interpreter off, and
        # @triton.jit decides at decoration time: re-import triton's Python side (its C extension stays loaded).
        for _name in [m for m in sys.modules if m.split(".")[0] == "triton" and not m.startswith("triton._C")]:
            del sys.modules[_name]
        for _name in ("lsr.kernels.hadamard_quant", "lsr.kernels.w4a4_gemm"):
            sys.modules.pop(_name, None)

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from lsr.hadamard import hadamard_matrix, hadamard_transform  # noqa: E402
from lsr.kernels import (  # noqa: E402
    BackendUnavailableError,
    available_backends,
    pack_int4,
    quantize_per_token_int4,
    resolve_backend,
    unpack_int4,
    w4a4_accumulate_reference,
    w4a4_linear,
    w4a4_matmul_reference,
)
from lsr.kernels import hadamard_quant as hq  # noqa: E402
from lsr.kernels import w4a4_gemm as wg  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
MS = (1, 5, 16, 33)
KS = (64, 384, 448)  # 2^6, 12·2^5, 28·2^4
NS = (32, 48)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand_q(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(-8, 8, shape, generator=_gen(seed), dtype=torch.int8)


def _ulp_close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to one unit in the last place of ``want``'s dtype (the interpreter truncates fp32->bf16)."""
    g, w = got.float(), want.float()
    ulp = torch.finfo(want.dtype).eps * w.abs().clamp_min(torch.finfo(want.dtype).tiny)
    return bool(((g - w).abs() <= ulp).all())


# ---------------------------------------------------------------- container


def test_pack_unpack_roundtrip_bit_exact():
    q = _rand_q((3, 5, 64), 0)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (3, 5, 32)
    assert torch.equal(unpack_int4(p), q)
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(16, 16)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)
    # layout: element 2j in the low nibble, 2j+1 in the high nibble, two's complement
    assert pack_int4(torch.tensor([[-8, 7], [-1, 0], [1, -2]], dtype=torch.int8)).flatten().tolist() == [
        0x78,
        0x0F,
        0xE1,
    ]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError):
        pack_int4(torch.full((2, 4), 8, dtype=torch.int8))
    with pytest.raises(TypeError):
        pack_int4(torch.zeros(2, 4, dtype=torch.int32))


# ---------------------------------------------------------------- reference


def test_reference_quant_rules():
    x = torch.tensor([[7.0, 0.5, 1.5, 2.5, -0.5, -3.5, 6.5, -7.0], [0.0] * 8])
    q, s = quantize_per_token_int4(x)
    assert s.tolist() == [1.0, 1.0]  # max|x|/7, and 1 for a zero token
    assert q[0].tolist() == [7, 0, 2, 2, 0, -4, 6, -7]  # half to even
    assert q[1].abs().sum() == 0
    x = torch.randn(4, 384, generator=_gen(1))
    qh, sh = quantize_per_token_int4(x, hadamard=True)
    q2, s2 = quantize_per_token_int4(hadamard_transform(x))
    assert torch.equal(qh, q2) and torch.equal(sh, s2)
    y = x @ hadamard_matrix(384)
    assert torch.allclose(sh, y.abs().amax(-1) / 7, rtol=1e-5)


def test_reference_matmul_exact():
    qa, qw = _rand_q((5, 448), 2), _rand_q((48, 448), 3)
    acc = w4a4_accumulate_reference(pack_int4(qa), qw)
    assert torch.equal(acc, (qa.long() @ qw.long().T).int())
    sa, sw = torch.rand(5, generator=_gen(4)), torch.rand(48, generator=_gen(5))
    y = w4a4_matmul_reference(qa, sa, pack_int4(qw), sw, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, (acc.float() * sa[:, None] * sw[None, :]).bfloat16())


# ---------------------------------------------------------------- fused Hadamard + quant


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", KS)
def test_quant_kernel_plain_bit_exact(K, dtype):
    for i, M in enumerate(MS):
        x = (torch.randn(M, K, generator=_gen(10 + i)) * 3).to(dtype)
        x[0, 3] = 0.0
        if M > 2:
            x[2] = 0.0  # zero token
        p, s = hq.quantize_int4(x.to(DEV), hadamard=False)
        q_ref, s_ref = quantize_per_token_int4(x)
        assert torch.equal(unpack_int4(p.cpu()), q_ref)
        assert torch.equal(s.cpu(), s_ref)
        planes, s2 = hq.quantize_int4(x.to(DEV), hadamard=False, out="planes")  # the GEMM's operand layout
        assert planes.dtype == torch.int8 and torch.equal(s2.cpu(), s_ref)
        assert torch.equal(planes.cpu(), torch.cat([q_ref[:, 0::2], q_ref[:, 1::2]], dim=1))


def test_quant_kernel_rounds_ties_to_even():
    ties = torch.arange(-7.5, 7.0, 1.0)  # every .5 in (-8, 7)
    x = torch.zeros(2, 64)
    x[:, : ties.numel()] = ties
    x[:, 0] = -7.0  # max|x| = 7: scale exactly 1, so x / scale keeps the exact .5 ties
    p, s = hq.quantize_int4(x.to(DEV), hadamard=False)
    q_ref, s_ref = quantize_per_token_int4(x)
    assert s_ref.tolist() == [1.0, 1.0]
    assert torch.equal(unpack_int4(p.cpu()), q_ref)
    assert q_ref[0, 1:15].tolist() == [-6, -6, -4, -4, -2, -2, 0, 0, 2, 2, 4, 4, 6, 6]


@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", KS)
def test_quant_kernel_hadamard_matches_reference(K, dtype, precision):
    """Float32 rounding inside the transform may flip a value sitting on a .5 boundary: rare, off by one."""
    total = same = 0
    for i, M in enumerate(MS):
        x = (torch.randn(M, K, generator=_gen(20 + i)) * 2).to(dtype)
        p, s = hq.quantize_int4(x.to(DEV), hadamard=True, precision=precision)
        q_ref, s_ref = quantize_per_token_int4(x, hadamard=True)
        planes = hq.quantize_int4(x.to(DEV), hadamard=True, precision=precision, out="planes")[0]
        assert torch.equal(planes.cpu(), wg.to_planes(p).cpu())  # same integers, GEMM layout
        d = (unpack_int4(p.cpu()).int() - q_ref.int()).abs()
        assert int(d.max()) <= 1
        total += d.numel()
        same += int((d == 0).sum())
        assert torch.allclose(s.cpu(), s_ref, rtol=1e-5 if precision == "exact" else 1e-4, atol=0)
    assert same / total >= 0.999


@pytest.mark.parametrize(
    ("K", "tile_max"),
    [(1792, 256), (4096, 256), (14336, None), (28672, None)],  # small K forced onto the chunked kernel; 8B/70B FFN
)
def test_quant_kernel_hadamard_chunked(K, tile_max, monkeypatch):
    """Rows wider than one tile: ``_hadamard_quant_chunked_kernel`` (N0 chunks, signs of H_N0 from bits)."""
    if tile_max is not None:
        monkeypatch.setattr(hq, "TILE_MAX", tile_max)
        monkeypatch.setattr(hq, "_PLANS", {})
    launch = hq.hadamard_launch(K, 3)
    assert launch.kernel == "_hadamard_quant_chunked_kernel" and launch.constexprs["N0"] > 1
    x = (torch.randn(3, K, generator=_gen(25)) * 2).bfloat16()
    x[1] = 0.0  # zero token: scale 1
    q_ref, s_ref = quantize_per_token_int4(x, hadamard=True)
    p, s = hq.quantize_int4(x.to(DEV), hadamard=True)
    d = (unpack_int4(p.cpu()).int() - q_ref.int()).abs()
    assert int(d.max()) <= 1 and float((d == 0).float().mean()) >= 0.999
    assert torch.allclose(s.cpu(), s_ref, rtol=1e-5, atol=0)
    planes = hq.quantize_int4(x.to(DEV), hadamard=True, out="planes")[0]
    assert torch.equal(planes.cpu(), wg.to_planes(p).cpu())
    f8 = hq.quantize_int4(x.to(DEV), hadamard=True, out="fp8")[0]
    assert torch.equal(f8.cpu().float(), unpack_int4(p.cpu()).float())


@pytest.mark.parametrize("K", [64, 256])  # 4^k: 1/sqrt(K) is a power of two, so the reference is exact too
def test_quant_kernel_hadamard_exact_on_exact_inputs(K):
    """Inputs whose transform is exactly representable: integers, and x = y·H for integer y with .5 ties."""
    x = torch.randint(-3, 4, (5, K), generator=_gen(30)).float()
    y = torch.randint(-6, 7, (3, K), generator=_gen(31)).float() * 2 + 1  # odd: y/2 is always a tie
    y[:, 1] = -14.0  # max|y| = 14: scale exactly 2
    xy = y @ hadamard_matrix(K)  # multiples of 1/sqrt(K): exact, and xy @ H == y exactly
    for inp in (x, xy, x.bfloat16()):
        p, s = hq.quantize_int4(inp.to(DEV), hadamard=True)
        q_ref, s_ref = quantize_per_token_int4(inp, hadamard=True)
        assert torch.equal(unpack_int4(p.cpu()), q_ref)
        assert torch.equal(s.cpu(), s_ref)
    q_ties = quantize_per_token_int4(xy, hadamard=True)[0]
    assert int((q_ties[:, 2:] % 2 != 0).sum()) == 0 and (q_ties[:, 1] == -7).all()  # y/2 ties -> even


def test_quant_kernel_fp8_output_and_torch_fallback():
    x = torch.randn(5, 384, generator=_gen(40)).bfloat16()
    q_ref, s_ref = quantize_per_token_int4(x, hadamard=True)
    f8, s = hq.quantize_int4(x.to(DEV), hadamard=True, out="fp8")
    assert f8.dtype == torch.float8_e4m3fn and f8.shape == x.shape
    assert (f8.cpu().float() - q_ref.float()).abs().max() <= 1
    assert torch.allclose(s.cpu(), s_ref, rtol=1e-5)
    # hadamard_impl="torch": lsr.hadamard then the plain kernel, bit-exact
    p, s = hq.quantize_int4(x.to(DEV), hadamard=True, hadamard_impl="torch")
    assert torch.equal(unpack_int4(p.cpu()), q_ref) and torch.equal(s.cpu(), s_ref)
    # K whose 2^k part is below 16 (12·4): the fused kernel falls back to the torch transform
    x = torch.randn(3, 48, generator=_gen(41))
    assert hq.hadamard_plan(48, DEV) is None
    p, s = hq.quantize_int4(x.to(DEV), hadamard=True)
    assert torch.equal(unpack_int4(p.cpu()), quantize_per_token_int4(x, hadamard=True)[0])


# ---------------------------------------------------------------- activation clip ratio

CLIPS = (1.0, 0.95, 0.9, 0.8, 0.55, 0.37)


def _outliers(M: int, K: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian tokens with a few large outliers: with a clip < 1 those clamp to -8 / 7."""
    x = torch.randn(M, K, generator=_gen(seed)) * 2
    x[:, 5] *= 9.0
    x[:, 11] *= -6.0
    if M > 2:
        x[2] = 0.0  # zero token: scale 1
    return x.to(dtype)


@pytest.mark.parametrize("hadamard", [False, True])
def test_reference_quant_clip_matches_fake_quantizer(hadamard):
    """Codes and scales bit-identical to ``lsr.quant.rtn.quantize`` (int4, per token, clip_ratio), clamps included."""
    from lsr.quant.rtn import QuantSpec, quantize

    x = _outliers(9, 384, 45)
    xf = hadamard_transform(x) if hadamard else x
    clamped = 0
    for clip in CLIPS:
        q, s = quantize_per_token_int4(x, hadamard=hadamard, clip_ratio=clip)
        q_fake, s_fake, _ = quantize(xf, QuantSpec(bits=4, granularity="token", clip_ratio=clip))
        assert torch.equal(q.float(), q_fake) and torch.equal(s, s_fake.squeeze(-1))
        clamped += int(((xf / s[:, None]).round().abs() > 8).sum())
    assert clamped > 0
    q1, s1 = quantize_per_token_int4(x, hadamard=hadamard)
    q2, s2 = quantize_per_token_int4(x, hadamard=hadamard, clip_ratio=1.0)
    assert torch.equal(q1, q2) and torch.equal(s1, s2)
    with pytest.raises(ValueError, match="clip_ratio"):
        quantize_per_token_int4(x, clip_ratio=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_kernel_plain_clip_bit_exact(dtype):
    for i, (M, K) in enumerate(((1, 64), (5, 448), (33, 64))):
        x = _outliers(M, K, 50 + i, dtype)
        for clip in (0.9, 0.55):
            q_ref, s_ref = quantize_per_token_int4(x, clip_ratio=clip)
            assert int((q_ref == -8).sum() + (q_ref == 7).sum()) > 0
            p, s = hq.quantize_int4(x.to(DEV), hadamard=False, clip_ratio=clip)
            assert torch.equal(unpack_int4(p.cpu()), q_ref) and torch.equal(s.cpu(), s_ref)
            planes = hq.quantize_int4(x.to(DEV), hadamard=False, out="planes", clip_ratio=clip)[0]
            assert torch.equal(planes.cpu(), torch.cat([q_ref[:, 0::2], q_ref[:, 1::2]], dim=1))
            f8 = hq.quantize_int4(x.to(DEV), hadamard=False, out="fp8", clip_ratio=clip)[0]
            assert torch.equal(f8.cpu().float(), q_ref.float())
    with pytest.raises(ValueError, match="clip_ratio"):
        hq.quantize_int4(x.to(DEV), hadamard=False, clip_ratio=1.5)


@pytest.mark.parametrize(("K", "tile_max"), [(384, None), (448, None), (1792, 256)])  # one tile; chunked
def test_quant_kernel_hadamard_clip_matches_reference(K, tile_max, monkeypatch):
    if tile_max is not None:
        monkeypatch.setattr(hq, "TILE_MAX", tile_max)
        monkeypatch.setattr(hq, "_PLANS", {})
    launch = hq.hadamard_launch(K, 5)
    assert (launch.kernel == "_hadamard_quant_chunked_kernel") == (tile_max is not None)
    x = _outliers(5, K, 60 + K, torch.bfloat16)
    total = same = 0
    for clip in (0.85, 0.5):
        q_ref, s_ref = quantize_per_token_int4(x, hadamard=True, clip_ratio=clip)
        assert int((q_ref == -8).sum() + (q_ref == 7).sum()) > 0
        p, s = hq.quantize_int4(x.to(DEV), hadamard=True, clip_ratio=clip)
        d = (unpack_int4(p.cpu()).int() - q_ref.int()).abs()
        assert int(d.max()) <= 1
        total += d.numel()
        same += int((d == 0).sum())
        assert torch.allclose(s.cpu(), s_ref, rtol=1e-5, atol=0)
        f8 = hq.quantize_int4(x.to(DEV), hadamard=True, out="fp8", clip_ratio=clip)[0]
        assert torch.equal(f8.cpu().float(), unpack_int4(p.cpu()).float())
    assert same / total >= 0.999


def test_quant_kernel_hadamard_clip_exact_on_exact_inputs():
    """An exactly representable transform (integer y, K = 4^k) with clip 0.5: the fused kernel is bit-exact too."""
    K = 64
    y = torch.randint(-20, 21, (5, K), generator=_gen(70)).float()
    y[:, 1] = 28.0  # max|y| = 28, clip 0.5: scale exactly 2, |y / 2| up to 14 clamps to 7 / -8
    xy = y @ hadamard_matrix(K)
    q_ref, s_ref = quantize_per_token_int4(xy, hadamard=True, clip_ratio=0.5)
    assert s_ref.tolist() == [2.0] * 5 and (q_ref[:, 1] == 7).all()
    p, s = hq.quantize_int4(xy.to(DEV), hadamard=True, clip_ratio=0.5)
    assert torch.equal(unpack_int4(p.cpu()), q_ref) and torch.equal(s.cpu(), s_ref)


@pytest.mark.parametrize("hadamard", [False, True])
def test_linear_act_clip(hadamard):
    K, N = 448, 48
    q_w, s_w = quantize_per_token_int4(torch.randn(N, K, generator=_gen(80)))
    pw, sw = pack_int4(q_w), s_w
    x = _outliers(5, K, 81)
    for clip in (1.0, 0.8):
        q, s = quantize_per_token_int4(x, hadamard, clip)
        ref = w4a4_linear(x, pw, sw, hadamard=hadamard, backend="reference", act_clip=clip)
        assert torch.equal(ref, w4a4_matmul_reference(q, s, q_w, s_w, x.dtype))
        got = w4a4_linear(x.to(DEV), pw.to(DEV), sw.to(DEV), hadamard=hadamard, backend="triton", act_clip=clip)
        if hadamard:
            assert (got.cpu() - ref).norm() / ref.norm() < 1e-2
        else:
            assert torch.equal(got.cpu(), ref)
    assert not torch.equal(ref, w4a4_linear(x, pw, sw, hadamard=hadamard, backend="reference"))


# ---------------------------------------------------------------- GEMMs


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("N", NS)
def test_gemm_exact(N, K):
    qw = _rand_q((N, K), 50)
    pw = pack_int4(qw).to(DEV)
    sw = (torch.rand(N, generator=_gen(51)) + 0.01).to(DEV)
    for i, M in enumerate(MS):
        qa = _rand_q((M, K), 60 + i)
        pa = pack_int4(qa).to(DEV)
        sa = (torch.rand(M, generator=_gen(70 + i)) + 0.01).to(DEV)
        acc = wg.w4a4_gemm(pa, sa, pw, sw, raw=True)
        assert acc.dtype == torch.int32
        assert torch.equal(acc.cpu(), w4a4_accumulate_reference(qa, qw))
        planes = torch.cat([qa[:, 0::2], qa[:, 1::2]], dim=1).to(DEV)  # the kernel's own operand layout
        assert torch.equal(wg.w4a4_gemm(planes, sa, pw, sw, raw=True).cpu(), acc.cpu())
        # ragged K tile (KH % 64 != 0 for K = 384, 448), N not a multiple of BLOCK_N
        acc2 = wg.w4a4_gemm(pa, sa, pw, sw, raw=True, config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_KH=64))
        assert torch.equal(acc2.cpu(), acc.cpu())
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            y = wg.w4a4_gemm(pa, sa, pw, sw, dt).cpu()
            ref = w4a4_matmul_reference(qa, sa.cpu(), qw, sw.cpu(), dt)
            assert y.dtype == dt
            assert torch.equal(y, ref) if dt != torch.bfloat16 else _ulp_close(y, ref)


def test_gemm_every_autotune_config_exact():
    """Each candidate autotune may pick, at a ragged shape (partial tiles on every side, KH % BLOCK_KH != 0)."""
    M, N, K = 37, 200, 704
    qa, qw = _rand_q((M, K), 52), _rand_q((N, K), 53)
    pa, pw = pack_int4(qa).to(DEV), pack_int4(qw).to(DEV)
    sa, sw = torch.ones(M, device=DEV), torch.ones(N, device=DEV)
    want = w4a4_accumulate_reference(qa, qw)
    for cfg in wg.gemm_configs():
        got = wg.w4a4_gemm(pa, sa, pw, sw, raw=True, config=dict(cfg.kwargs))
        assert torch.equal(got.cpu(), want), cfg


@pytest.mark.parametrize("split_k", [1, 3] if DEV == "cpu" else [1, 3, None])  # None: auto split (CUDA)
@pytest.mark.parametrize("impl", ["dp4a", "fma"])
@pytest.mark.parametrize("K", (*KS, 100))  # 100: K % 8 != 0, no int32-word view
def test_decode_exact(K, impl, split_k):
    N = 48
    qw = _rand_q((N, K), 80)
    pw, sw = pack_int4(qw).to(DEV), (torch.rand(N, generator=_gen(81)) + 0.01).to(DEV)
    if impl == "dp4a" and K % 8:
        with pytest.raises(ValueError, match="dp4a"):
            wg.w4a4_decode(pack_int4(_rand_q((1, K), 1)).to(DEV), torch.ones(1, device=DEV), pw, sw, impl=impl)
        impl = "auto"  # falls back to fma
    for M in (1, 2, 3, 5, 16):  # every padded-M tile: 1, 2, 4, 8, 16
        qa = _rand_q((M, K), 90 + M)
        pa, sa = pack_int4(qa).to(DEV), (torch.rand(M, generator=_gen(91)) + 0.01).to(DEV)
        acc = wg.w4a4_decode(pa, sa, pw, sw, raw=True, impl=impl, split_k=split_k)
        assert torch.equal(acc.cpu(), w4a4_accumulate_reference(qa, qw))
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            y = wg.w4a4_decode(pa, sa, pw, sw, dt, impl=impl, split_k=split_k).cpu()
            ref = w4a4_matmul_reference(qa, sa.cpu(), qw, sw.cpu(), dt)
            assert torch.equal(y, ref) if dt != torch.bfloat16 else _ulp_close(y, ref)
    with pytest.raises(ValueError):
        wg.w4a4_decode(pack_int4(_rand_q((17, K), 1)).to(DEV), torch.ones(17, device=DEV), pw, sw)


def test_widen_int4_to_fp8():
    p = pack_int4(_rand_q((20, 300), 100)).to(DEV)
    w8 = wg.widen_int4_to_fp8(p)
    assert w8.dtype == torch.float8_e4m3fn and w8.shape == (20, 300)
    assert torch.equal(w8.cpu().float(), unpack_int4(p.cpu()).float())


# ---------------------------------------------------------------- w4a4_linear


@pytest.mark.parametrize("hadamard", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_backends_agree(dtype, hadamard):
    K, N = 448, 48
    w = torch.randn(N, K, generator=_gen(110))
    q_w, s_w = quantize_per_token_int4(w)
    pw, sw = pack_int4(q_w).to(DEV), s_w.to(DEV)
    for shape in ((1, K), (5, K), (3, 11, K)):
        x = torch.randn(shape, generator=_gen(111 + len(shape))).to(dtype).to(DEV)
        ref = w4a4_linear(x, pw, sw, hadamard=hadamard, backend="reference")
        assert ref.shape == (*shape[:-1], N) and ref.dtype == dtype
        if DEV == "cpu":
            assert torch.equal(w4a4_linear(x, pw, sw, hadamard=hadamard, backend="auto"), ref)
        got = w4a4_linear(x, pw, sw, hadamard=hadamard, backend="triton")
        assert got.shape == ref.shape and got.dtype == dtype
        if hadamard:  # a rare off-by-one activation integer moves an output by ~1/7 of the token's scale
            rel = (got.float() - ref.float()).norm() / ref.float().norm()
            assert rel < 1e-2
        else:
            assert torch.equal(got, ref) if dtype != torch.bfloat16 else _ulp_close(got, ref)
    # the reference path is the convention: quantize, integer product, rescale
    x = torch.randn(4, K, generator=_gen(120)).to(dtype)
    q, s = quantize_per_token_int4(x, hadamard)
    y = w4a4_linear(x, pw.cpu(), sw.cpu(), hadamard=hadamard, backend="reference")
    assert torch.equal(y, w4a4_matmul_reference(q, s, q_w, s_w, dtype))
    # bias
    b = torch.randn(N, generator=_gen(121)).to(dtype)
    yb = w4a4_linear(x, pw.cpu(), sw.cpu(), hadamard=hadamard, backend="reference", bias=b)
    assert torch.equal(yb, y + b)


def test_backend_errors(monkeypatch):
    x = torch.randn(2, 64)
    pw, sw = pack_int4(_rand_q((32, 64), 130)), torch.ones(32)
    if not torch.cuda.is_available():
        assert "fp8" not in available_backends("cpu")
        with pytest.raises(BackendUnavailableError, match="fp8"):
            w4a4_linear(x, pw, sw, hadamard=False, backend="fp8")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
            w4a4_linear(x, pw, sw, hadamard=False, backend="triton")
        assert resolve_backend("auto", "cpu", 1) == "reference"
        assert available_backends("cpu") == ["reference"]
    with pytest.raises(ValueError, match="unknown backend"):
        w4a4_linear(x, pw, sw, hadamard=False, backend="int2")
    with pytest.raises(ValueError, match="packed_w"):
        w4a4_linear(x, pw[:, :16], sw, hadamard=False, backend="reference")


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, lsr.kernels as k\n"
        "x = torch.randn(3, 64); q, s = k.quantize_per_token_int4(torch.randn(32, 64))\n"
        "y = k.w4a4_linear(x, k.pack_int4(q), s, hadamard=True)\n"
        "assert y.shape == (3, 32)\n"
        "try:\n"
        "    k.w4a4_linear(x, k.pack_int4(q), s, hadamard=True, backend='triton')\n"
        "except k.BackendUnavailableError as e:\n"
        "    assert 'triton is not installed' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
        "assert 'triton' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ---------------------------------------------------------------- CUDA only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FP8 torch._scaled_mm needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_path_cuda(dtype):
    if "fp8" not in available_backends("cuda"):
        pytest.skip("no FP8 on this GPU")
    K, N, M = 14336 // 8, 256, 64
    qa, qw = _rand_q((M, K), 140), _rand_q((N, K), 141)
    a8 = qa.float().to(torch.float8_e4m3fn).cuda()
    w8 = wg.widen_int4_to_fp8(pack_int4(qw).cuda())
    ones_a, ones_w = torch.ones(M, device="cuda"), torch.ones(N, device="cuda")
    acc = wg.w4a4_fp8_matmul(a8, ones_a, w8, ones_w, torch.float32)
    assert torch.equal(acc.cpu(), w4a4_accumulate_reference(qa, qw).float())
    sa, sw = torch.rand(M, device="cuda") + 0.01, torch.rand(N, device="cuda") + 0.01
    y = wg.w4a4_fp8_matmul(a8, sa, w8, sw, dtype).cpu()
    ref = w4a4_matmul_reference(qa, sa.cpu(), qw, sw.cpu(), dtype)
    assert _ulp_close(y, ref)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    pw, swt = pack_int4(qw).cuda(), sw
    got = w4a4_linear(x, pw, swt, hadamard=True, backend="fp8")
    want = w4a4_linear(x, pw, swt, hadamard=True, backend="reference")
    assert (got.float() - want.float()).norm() / want.float().norm() < 1e-2
