#!/usr/bin/env python
"""Benchmark lsr's W4A4 kernels on a CUDA GPU (written for one H100) against bf16 cuBLAS and FP8 row-wise.

Default run (LLaMA-3-8B linear shapes N×K ∈ {4096×4096, 14336×4096, 4096×14336}, M ∈ {1, 16, 128, 2048, 8192}):

* ``bf16``           torch ``x @ w.T`` (cuBLAS), the baseline of every ratio
* ``fp8``            ``torch._scaled_mm`` FP8 e4m3 with row-wise scales, ``use_fast_accum=True`` (the peer to beat;
                     GEMM only, operands already FP8)
* ``fp8_act_quant``  the FP8 peer's own row-wise activation quantization alone
* ``fp8_with_act_quant``  the peer as a user runs it: activation quantization + GEMM (compare with ``lsr_H_*``)
* ``lsr_fp8_prewidened``  lsr's FP8 path with weights widened once beforehand (a load-time FP8 copy)
* ``lsr_gemm``       lsr W4A4 product alone on packed int4 operands (decode kernel for M <= 16, else Triton GEMM)
* ``lsr_decode_fma`` / ``lsr_decode_split1``  (M <= 16) the decode kernel with float32 FMA instead of dp4a / no split-K
* ``lsr_tc_gemm``    the Triton tensor-core GEMM at every M (for the decode-kernel crossover)
* ``lsr_fp8_gemm``   lsr's FP8 path alone: widen packed weights to FP8 + ``_scaled_mm`` with exact accumulation
* ``lsr_H_triton``   ``w4a4_linear(hadamard=True, backend="triton")``: fused Hadamard+quant kernel, then the GEMM
* ``lsr_H_fp8``      ``w4a4_linear(hadamard=True, backend="fp8")`` (M > 16)
* ``lsr_H_auto``     ``w4a4_linear(hadamard=True, backend="auto")``

then the Hadamard+quant kernel alone at M = 8192, K ∈ {4096, 14336, 28672}, against the copy bound (activation read
once, int4 + scales written once, at the device-to-device copy bandwidth measured here), with a small (block_m,
num_warps) sweep (num_warps only for the chunked kernel of wide rows). Times are medians of
``triton.testing.do_bench`` over CUDA-graph replays of one call per input set, rotating enough sets to spill the
50 MB L2. Results print as markdown and go to ``--out`` as JSON.

``--compile-report`` runs ``python -m lsr.kernels.compile_check``: every kernel variant compiled for sm_90 with
Triton's bundled ptxas; registers, stack (spills), shared memory, CTAs/SM, shared-memory writes in loops, SASS op
counts. No GPU needed. The end-to-end model benchmark is ``scripts/bench_e2e.py``; shared timing helpers live in
``scripts/_bench_utils.py``.

Everything else needs CUDA; on a machine without it, it says so and exits.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from _bench_utils import (
    add_common_args,
    bench,
    compile_report,
    copy_bandwidth,
    device_meta,
    n_sets,
    require_cuda,
    save_json,
)

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))  # (N, K): q/o-like, gate/up, down
MS = (1, 16, 128, 2048, 8192)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, "kernels_h100.json")
    p.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated token counts M")
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="comma-separated NxK")
    p.add_argument("--quant-ks", default="4096,14336,28672", help="K values for the Hadamard+quant-alone section")
    p.add_argument("--quant-m", type=int, default=8192)
    p.add_argument("--skip-checks", action="store_true", help="skip the exactness checks before timing")
    p.add_argument("--no-gemm", action="store_true", help="skip the GEMM table")
    p.add_argument("--no-quant", action="store_true", help="skip the Hadamard+quant section")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- GEMM table


def _fp8_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = x.float().abs().amax(-1).clamp_min(1e-12) / 448.0
    return (x.float() / s[:, None]).to(torch.float8_e4m3fn), s


def _gemm_methods(
    w: torch.Tensor, w8: torch.Tensor, sw8: torch.Tensor, pw: torch.Tensor, sw: torch.Tensor, m: int
) -> dict[str, tuple[Callable[[int], object], int]]:
    """The timed calls for one (N, K, M): ``name -> (call(i) on input set i, number of sets)``."""
    from lsr.kernels import quantize_weight_int4, w4a4_linear
    from lsr.kernels.hadamard_quant import quantize_int4
    from lsr.kernels.w4a4_gemm import w4a4_decode, w4a4_fp8_matmul, w4a4_gemm, widen_int4_to_fp8

    n, k = w.shape
    ns = n_sets(n * k // 2 + m * k * 2)
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(ns)]
    n_w = n_sets(n * k * 2 + m * k * 2)
    ws_bf16 = [w] + [torch.randn_like(w) for _ in range(n_w - 1)]
    n_w8 = n_sets(n * k + m * k)
    ws8 = [(w8, sw8)] + [_fp8_rowwise(torch.randn_like(w)) for _ in range(n_w8 - 1)]
    xs8 = [_fp8_rowwise(xs[i % ns]) for i in range(n_w8)]
    pws = [(pw, sw)] + [quantize_weight_int4(torch.randn_like(w)) for _ in range(ns - 1)]
    pas = [quantize_int4(xi, hadamard=False, out="packed" if m <= 16 else "planes") for xi in xs]
    pls = [quantize_int4(xi, hadamard=False, out="planes") for xi in xs]  # the tensor-core GEMM's operand
    qa8 = [quantize_int4(xi, hadamard=False, out="fp8") for xi in xs]
    pws8 = [widen_int4_to_fp8(p) for p, _ in pws]  # widened once, as a load-time FP8 copy would be
    small = w4a4_decode if m <= 16 else w4a4_gemm

    def fp8_peer(i: int) -> torch.Tensor:
        (xa, sa), (wb, sb) = xs8[i], ws8[i]
        return torch._scaled_mm(xa, wb.t(), scale_a=sa.view(-1, 1), scale_b=sb.view(1, -1),
                                out_dtype=torch.bfloat16, use_fast_accum=True)  # fmt: skip

    def fp8_peer_with_quant(i: int) -> torch.Tensor:  # the peer as a user runs it: quantize x, then the GEMM
        xa, sa = _fp8_rowwise(xs[i % ns])
        wb, sb = ws8[i]
        return torch._scaled_mm(xa, wb.t(), scale_a=sa.view(-1, 1), scale_b=sb.view(1, -1),
                                out_dtype=torch.bfloat16, use_fast_accum=True)  # fmt: skip

    methods: dict[str, tuple[Callable[[int], object], int]] = {
        "bf16": (lambda i: xs[i % ns] @ ws_bf16[i].T, n_w),
        "fp8": (fp8_peer, n_w8),
        "fp8_act_quant": (lambda i: _fp8_rowwise(xs[i % ns]), ns),
        "fp8_with_act_quant": (fp8_peer_with_quant, n_w8),
        "lsr_gemm": (lambda i: small(pas[i][0], pas[i][1], *pws[i], torch.bfloat16), ns),
        "lsr_tc_gemm": (lambda i: w4a4_gemm(pls[i][0], pls[i][1], *pws[i], torch.bfloat16), ns),
        "lsr_fp8_prewidened": (lambda i: w4a4_fp8_matmul(qa8[i][0], qa8[i][1], pws8[i], pws[i][1]), ns),
        "lsr_fp8_gemm": (
            lambda i: w4a4_fp8_matmul(qa8[i][0], qa8[i][1], widen_int4_to_fp8(pws[i][0]), pws[i][1]),
            ns,
        ),
        "lsr_H_triton": (lambda i: w4a4_linear(xs[i], *pws[i], hadamard=True, backend="triton"), ns),
        "lsr_H_auto": (lambda i: w4a4_linear(xs[i], *pws[i], hadamard=True, backend="auto"), ns),
    }
    if m <= 16:  # decode-kernel variants: float32 FMA instead of dp4a, and no split-K
        methods["lsr_decode_fma"] = (
            lambda i: w4a4_decode(pas[i][0], pas[i][1], *pws[i], torch.bfloat16, impl="fma"),
            ns,
        )
        methods["lsr_decode_split1"] = (
            lambda i: w4a4_decode(pas[i][0], pas[i][1], *pws[i], torch.bfloat16, split_k=1),
            ns,
        )
    if m > 16:
        methods["lsr_H_fp8"] = (lambda i: w4a4_linear(xs[i], *pws[i], hadamard=True, backend="fp8"), ns)
    return methods


def _min_bytes(method: str, m: int, n: int, k: int) -> int:
    """Fewest bytes ``method`` must move (weights, activations and output once each): achieved GB/s = this / time.

    Weight bytes: bf16 2·N·K, FP8 N·K, packed int4 N·K/2 (``lsr_fp8_gemm`` also writes and reads an FP8 copy).
    """
    out = 2 * m * n
    if method == "bf16":
        return 2 * n * k + 2 * m * k + out
    if method == "fp8_act_quant":
        return 2 * m * k + m * k + 4 * m
    if method in ("fp8", "lsr_fp8_prewidened"):
        return n * k + m * k + out
    if method == "fp8_with_act_quant":
        return n * k + 2 * m * k + out
    if method == "lsr_fp8_gemm":
        return n * k // 2 + 2 * n * k + m * k + out
    if method.startswith("lsr_H"):
        return n * k // 2 + 2 * m * k + out
    return n * k // 2 + (m * k // 2 if m <= 16 else m * k) + out  # packed (decode) or int8-plane activations


def _check(c: dict, name: str, fn: Callable[[], object]) -> None:
    """``c[name] = fn()``, or the error: a failing check is recorded, never aborts the run."""
    try:
        c[name] = fn()
    except Exception as e:  # noqa: BLE001
        c[name] = f"error: {type(e).__name__}: {e}"


def _checks(x: torch.Tensor, pw: torch.Tensor, sw: torch.Tensor, n: int, k: int, m: int) -> dict:
    """Exactness at a real shape: the default paths, every GEMM autotune config, FP8 sums, the fused H+quant."""
    from lsr.kernels import w4a4_accumulate_reference, w4a4_matmul_reference
    from lsr.kernels.hadamard_quant import quantize_int4
    from lsr.kernels.reference import quantize_per_token_int4, unpack_int4
    from lsr.kernels.w4a4_gemm import gemm_configs, w4a4_decode, w4a4_fp8_matmul, w4a4_gemm, widen_int4_to_fp8

    c: dict = {"N": n, "K": k, "M": m}
    qa, sa = quantize_per_token_int4(x, hadamard=False)
    ref = w4a4_matmul_reference(qa, sa, pw, sw, torch.bfloat16)
    ref_acc = w4a4_accumulate_reference(qa, pw)
    pa = quantize_int4(x, hadamard=False)[0]
    planes = quantize_int4(x, hadamard=False, out="planes")[0]
    if m <= 16:
        for impl in ("dp4a", "fma"):
            _check(c, f"decode_{impl}_exact",
                   lambda impl=impl: bool(torch.equal(w4a4_decode(pa, sa, pw, sw, raw=True, impl=impl), ref_acc)))
    default_gemm = w4a4_decode if m <= 16 else w4a4_gemm
    a_default = pa if m <= 16 else planes
    _check(c, "lsr_gemm_bf16_equal",
           lambda: bool(torch.equal(default_gemm(a_default, sa, pw, sw, torch.bfloat16), ref)))
    for cfg in gemm_configs():  # autotune only ever runs the fastest: check each one here
        kw = cfg.kwargs
        name = f"gemm_exact n{kw['BLOCK_N']} m{kw['BLOCK_M']} kh{kw['BLOCK_KH']} w{cfg.num_warps} s{cfg.num_stages}"
        conf = dict(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        _check(c, name, lambda conf=conf: bool(torch.equal(w4a4_gemm(planes, sa, pw, sw, raw=True, config=conf),
                                                           ref_acc)))  # fmt: skip
    a8, w8x = qa.float().to(torch.float8_e4m3fn), widen_int4_to_fp8(pw)
    one_a, one_w = torch.ones_like(sa), torch.ones_like(sw)
    _check(c, "fp8_path_exact_int_sums",
           lambda: bool(torch.equal(w4a4_fp8_matmul(a8, one_a, w8x, one_w, torch.float32), ref_acc.float())))
    _check(c, "fp8_path_bf16_equal_frac",
           lambda: float((w4a4_fp8_matmul(a8, sa, w8x, sw, torch.bfloat16) == ref).float().mean()))  # fmt: skip

    def hadamard() -> dict:
        ph, sh = quantize_int4(x, hadamard=True)
        qh, shr = quantize_per_token_int4(x, hadamard=True)
        d = (unpack_int4(ph).int() - qh.int()).abs()
        return {"mismatch_frac": float((d > 0).float().mean()), "max_diff": int(d.max()),
                "scale_max_rel": float(((sh - shr).abs() / shr).max())}  # fmt: skip

    _check(c, "hadamard_quant", hadamard)
    bad = [key for key, v in c.items() if v is False or (isinstance(v, str) and v.startswith("error"))]
    print(f"check N={n} K={k} M={m}: {'all exact' if not bad else 'FAILED ' + ', '.join(bad)}", flush=True)
    return c


def bench_gemm(args: argparse.Namespace, results: dict) -> None:
    from lsr.kernels import quantize_weight_int4

    ms_list = [int(m) for m in args.ms.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = results.setdefault("gemm", [])
    checks = results.setdefault("checks", [])
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        pw, sw = quantize_weight_int4(w)
        w8, sw8 = _fp8_rowwise(w)
        for m in ms_list:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            if not args.skip_checks:
                checks.append(_checks(x, pw, sw, n, k, m))
            methods = _gemm_methods(w, w8, sw8, pw, sw, m)
            times: dict[str, float] = {}
            for name, (call, nsets) in methods.items():
                try:
                    t, mode = bench(call, nsets, args.warmup_ms, args.rep_ms)
                except Exception as e:  # noqa: BLE001 - keep the table going, record the failure
                    print(f"  {name} N={n} K={k} M={m} failed: {type(e).__name__}: {e}", file=sys.stderr)
                    rows.append({"N": n, "K": k, "M": m, "method": name, "error": f"{type(e).__name__}: {e}"})
                    continue
                times[name] = t
                rows.append({"N": n, "K": k, "M": m, "method": name, "ms": t, "timing": mode, "sets": nsets,
                             "tflops": 2 * m * n * k / (t * 1e-3) / 1e12,
                             "GBps": _min_bytes(name, m, n, k) / (t * 1e-3) / 1e9})  # fmt: skip
            for r in rows:
                if r.get("N") == n and r.get("K") == k and r.get("M") == m and "ms" in r:
                    r["x_bf16"] = times["bf16"] / r["ms"] if "bf16" in times else None
                    r["x_fp8"] = times["fp8"] / r["ms"] if "fp8" in times else None
            line = "  ".join(f"{a}={b * 1e3:.1f}us" for a, b in times.items())
            print(f"N={n} K={k} M={m}: {line}", flush=True)
            del methods
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- quant alone


def _quant_variants(xs: list[torch.Tensor]) -> dict[str, Callable[[int], object]]:
    from lsr.kernels.hadamard_quant import hadamard_launch, quantize_int4
    from lsr.kernels.reference import quantize_per_token_int4

    dst = [torch.empty_like(xi) for xi in xs]
    variants: dict[str, Callable[[int], object]] = {
        "copy_x (read+write bf16 x)": lambda i: dst[i].copy_(xs[i]),
        "lsr plain quant (no H)": lambda i: quantize_int4(xs[i], hadamard=False),
        "lsr fused H+quant exact": lambda i: quantize_int4(xs[i], hadamard=True),
        "lsr fused H+quant fast": lambda i: quantize_int4(xs[i], hadamard=True, precision="fast"),
        "torch H (lsr.hadamard) + lsr quant": lambda i: quantize_int4(xs[i], hadamard=True, hadamard_impl="torch"),
        "torch reference H+quant (unfused)": lambda i: quantize_per_token_int4(xs[i], hadamard=True),
    }
    try:
        import fast_hadamard_transform  # noqa: F401

        variants["fht + lsr quant"] = lambda i: quantize_int4(xs[i], hadamard=True, hadamard_impl="fht")
    except ImportError:
        pass
    k = xs[0].shape[1]
    if hadamard_launch(k, xs[0].shape[0]).kernel == "_hadamard_quant_chunked_kernel":  # one row per program
        grid = [(None, w) for w in (8, 16, 32)]
    else:
        grid = [(bm, w) for bm in (1, 2, 4, 8) for w in (4, 8, 16)]
    for bm, warps in grid:
        variants[f"sweep fused H+quant bm={bm} warps={warps}"] = lambda i, bm=bm, warps=warps: quantize_int4(
            xs[i], hadamard=True, block_m=bm, num_warps=warps
        )
    return variants


def bench_quant(args: argparse.Namespace, results: dict) -> None:
    bw = results["meta"]["copy_bandwidth_GBps"] * 1e9
    rows = results.setdefault("quant", [])
    m = args.quant_m
    for k in (int(v) for v in args.quant_ks.split(",")):
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets(m * k * 2))]
        ns = len(xs)
        moved = m * k * 2 + m * k // 2 + m * 4
        bound_ms = moved / bw * 1e3
        variants = _quant_variants(xs)
        for name, call in variants.items():
            try:
                t, mode = bench(call, ns, args.warmup_ms, args.rep_ms)
            except Exception as e:  # noqa: BLE001
                print(f"  {name} K={k} failed: {type(e).__name__}: {e}", file=sys.stderr)
                rows.append({"M": m, "K": k, "variant": name, "error": f"{type(e).__name__}: {e}"})
                continue
            rows.append({"M": m, "K": k, "variant": name, "ms": t, "timing": mode, "bound_ms": bound_ms,
                         "x_bound": t / bound_ms})  # fmt: skip
            print(f"quant M={m} K={k} {name}: {t * 1e3:.1f}us ({t / bound_ms:.2f}x copy bound)", flush=True)
        del xs, variants
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- report


def _markdown(results: dict) -> str:
    lines = []
    gemm = [r for r in results.get("gemm", []) if "ms" in r]
    if gemm:
        methods = list(dict.fromkeys(r["method"] for r in gemm))
        lines.append("| N×K | M | " + " | ".join(methods) + " |")
        lines.append("|---|---|" + "---|" * len(methods))
        for key in dict.fromkeys((r["N"], r["K"], r["M"]) for r in gemm):
            by = {r["method"]: r for r in gemm if (r["N"], r["K"], r["M"]) == key}
            cells = []
            for mth in methods:
                r = by.get(mth)
                if r is None:
                    cells.append("–")
                elif mth == "bf16":
                    cells.append(f"{r['ms'] * 1e3:.1f} µs")
                else:
                    cells.append(f"{r['ms'] * 1e3:.1f} µs ({r['x_bf16']:.2f}× bf16, {r['x_fp8']:.2f}× fp8)")
            lines.append(f"| {key[0]}×{key[1]} | {key[2]} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("(ratios are speedups: bf16 time / method time, fp8 time / method time)")
        lines.append("")
    quant = [r for r in results.get("quant", []) if "ms" in r]
    if quant:
        lines.append("| M | K | variant | time | × copy bound |")
        lines.append("|---|---|---|---|---|")
        for r in quant:
            if r["variant"].startswith("sweep"):
                continue
            lines.append(f"| {r['M']} | {r['K']} | {r['variant']} | {r['ms'] * 1e3:.1f} µs | {r['x_bound']:.2f} |")
        for k in dict.fromkeys(r["K"] for r in quant):
            sweep = [r for r in quant if r["K"] == k and r["variant"].startswith("sweep")]
            if sweep:
                best = min(sweep, key=lambda r: r["ms"])
                lines.append(f"| {best['M']} | {k} | best of {best['variant']} | {best['ms'] * 1e3:.1f} µs | "
                             f"{best['x_bound']:.2f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compile_report:
        return compile_report(args)
    if not require_cuda("bench_kernels.py"):
        return 2
    from lsr.kernels import FP8_MIN_M

    results: dict = {"meta": device_meta()}
    results["meta"]["FP8_MIN_M"] = FP8_MIN_M
    results["meta"]["copy_bandwidth_GBps"] = copy_bandwidth(args.warmup_ms, args.rep_ms) / 1e9
    print(f"# {results['meta']['device']}: copy bandwidth {results['meta']['copy_bandwidth_GBps']:.0f} GB/s",
          flush=True)  # fmt: skip
    try:
        if not args.no_gemm:
            bench_gemm(args, results)
            save_json(args.out, results)
        if not args.no_quant:
            bench_quant(args, results)
    finally:
        save_json(args.out, results)
    print()
    print(_markdown(results))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
