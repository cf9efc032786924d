"""Compile every Triton kernel variant of :mod:`lsr.kernels` for a CUDA target on the CPU (no GPU needed).

``python -m lsr.kernels.compile_check`` compiles each variant the launchers can pick (every GEMM autotune config,
every decode tile, the Hadamard+quant launch for each LLaMA-family K) with the installed Triton and its bundled
ptxas, then reads what the compiler reports: registers per thread, stack bytes (spills), shared memory, CTAs that
fit on one SM, key SASS instruction counts, and from the TTGIR whether a register value is written to shared
memory inside a ``scf.for`` loop (a widened operand taking a shared-memory round trip every K-step).

The kernels are found by the module-level variable names below; signatures mirror the launchers'. Runtime ints
and pointers are marked divisible by 16, as a launch with aligned LLaMA shapes specialises them. Used by
``tests/test_kernel_compile.py`` and ``scripts/bench_kernels.py --compile-report``. Needs a non-interpreted
Triton (``TRITON_INTERPRET`` unset or 0) at import time of the kernel modules.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["Variant", "Report", "variants", "compile_variant", "compile_all", "markdown", "main"]

# LLaMA-family activation widths: 3/8B hidden, 8B FFN (down_proj input), 70B hidden, 70B FFN.
HADAMARD_KS = (4096, 14336, 8192, 28672)
PLAIN_KS = (4096, 8192)
# H100 per-SM limits used for the occupancy estimate.
SM_REGS = 65536
SM_SMEM = 233472  # 228 KiB, of which 1 KiB per CTA is reserved by the driver
SM_MAX_WARPS = 64
SM_MAX_CTAS = 32


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled specialisation: ``module.kernel`` with these constexprs and launch options."""

    label: str
    module: str
    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    default: bool = True  # a launch lsr makes on its own (spill-free required); False: sweeps and overrides
    maxnreg: int | None = None  # register cap per thread (ptx .maxnreg), as the launcher passes it
    unhinted: tuple[str, ...] = ()  # runtime ints a launch does not specialise as divisible by 16


@dataclasses.dataclass
class Report:
    """What the compiler says about one :class:`Variant`."""

    variant: Variant
    error: str | None = None
    regs: int = -1
    stack: int = -1
    shared: int = -1
    ctas_per_sm: int = 0
    loop_smem_writes: int = -1  # register values stored to shared memory inside a loop (local_alloc/local_store)
    loop_async_copies: int = -1  # global -> shared async copies inside a loop (pipelined loads)
    loop_dots: int = -1
    sass: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def spills(self) -> bool:
        """Stack frame or local-memory traffic: registers spilled (or an array placed in local memory)."""
        return self.stack > 0 or any(op.split(".")[0] in ("LDL", "STL") for op in self.sass)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["variant"] = {"label": self.variant.label, "kernel": self.variant.kernel, "default": self.variant.default,
                        "num_warps": self.variant.num_warps, "num_stages": self.variant.num_stages,
                        "maxnreg": self.variant.maxnreg,
                        "constexprs": {k: str(v) for k, v in self.variant.constexprs.items()}}  # fmt: skip
        d["spills"] = self.spills
        return d


F32, U8, I8, BF16, I32, FP8 = "*fp32", "*u8", "*i8", "*bf16", "i32", "*fp8e4nv"


def variants() -> list[Variant]:
    """Every variant the launchers in :mod:`lsr.kernels` pick by default, plus the benchmark's sweep points."""
    from lsr.kernels import hadamard_quant as hq
    from lsr.kernels import w4a4_gemm as wg

    out: list[Variant] = []
    hq_sig = {"x_ptr": BF16, "out_ptr": U8, "scale_ptr": F32, "hm_ptr": BF16, "h1_ptr": BF16, "h2_ptr": BF16,
              "M": I32, "stride_xm": I32, "stride_om": I32, "norm": "fp32", "clip": "fp32"}  # fmt: skip
    for k in HADAMARD_KS:
        seen = set()
        for m in (1, 16, 8192):
            launch = hq.hadamard_launch(k, m)
            key = tuple(sorted(launch.constexprs.items())) + (launch.num_warps,)
            if key in seen:
                continue
            seen.add(key)
            chunked = launch.kernel == "_hadamard_quant_chunked_kernel"
            shape = f"n0={launch.constexprs['N0']} s{launch.num_stages}" if chunked else f"bm={launch.block_m}"
            for out_kind in hq.OUT_KINDS:
                const = dict(launch.constexprs, NSPLIT_IN=1, NSPLIT=3, OUT=out_kind, F32DOT=False)
                sig = dict(hq_sig, out_ptr=hq.OUT_PTR_TYPE[out_kind])
                if chunked:  # n_chunks: a runtime int (the loop's trip count), 8: not specialised as % 16
                    sig["n_chunks"] = I32
                label = f"hadamard_quant K={k} M={m} {out_kind} {shape} w{launch.num_warps}"
                if launch.maxnreg:
                    label += f" r{launch.maxnreg}"
                out.append(Variant(label, "hadamard_quant", launch.kernel, sig, const, launch.num_warps,
                                   launch.num_stages, maxnreg=launch.maxnreg,
                                   unhinted=("n_chunks",) if chunked else ()))  # fmt: skip
    q_sig = {"x_ptr": BF16, "out_ptr": U8, "scale_ptr": F32, "M": I32, "K": I32, "stride_xm": I32, "stride_om": I32,
             "clip": "fp32"}  # fmt: skip
    for k in PLAIN_KS:
        bm, kp, warps = hq.quant_launch(k, 8192)
        for out_kind in hq.OUT_KINDS:
            const = dict(BLOCK_M=bm, KP=kp, OUT=out_kind)
            sig = dict(q_sig, out_ptr=hq.OUT_PTR_TYPE[out_kind])
            out.append(Variant(f"quant (no H) K={k} {out_kind} bm={bm} w{warps}", "hadamard_quant", "_quant_kernel",
                               sig, const, warps, 1))  # fmt: skip
    g_sig = {"a_ptr": I8, "w_ptr": U8, "sa_ptr": F32, "sw_ptr": F32, "out_ptr": BF16, "M": I32, "N": I32, "KH": I32,
             "stride_am": I32, "stride_wn": I32, "stride_om": I32, "M_BUCKET": I32}  # fmt: skip
    for cfg in wg.gemm_configs():
        const = dict(cfg.kwargs, EVEN_K=True, RAW=False)
        kw = cfg.kwargs
        tile = f"n{kw['BLOCK_N']} m{kw['BLOCK_M']} kh{kw['BLOCK_KH']}"
        out.append(Variant(f"gemm {tile} w{cfg.num_warps} s{cfg.num_stages}", "w4a4_gemm", "_w4a4_gemm_kernel", g_sig,
                           const, cfg.num_warps, cfg.num_stages))  # fmt: skip
    d_sig = {"a_ptr": U8, "w_ptr": U8, "sa_ptr": F32, "sw_ptr": F32, "out_ptr": BF16, "ws_ptr": F32, "M": I32,
             "N": I32, "KH": I32, "stride_am": I32, "stride_wn": I32, "stride_om": I32, "CHUNKS": I32}  # fmt: skip
    d4_sig = {("KW" if k == "KH" else k): ("*i32" if k in ("a_ptr", "w_ptr") else v) for k, v in d_sig.items()}
    for bm in sorted(wg.DP4A_TILES):
        t = wg.decode_tile(bm, True)
        for split in (1, 2):
            const = dict(
                BLOCK_M=bm,
                BLOCK_N=t.block_n,
                BLOCK_KW=t.block_k,
                SPLIT_K=split,
                RAW=False,
                EMULATE=False,
                NUM_STAGES=t.num_stages,
            )
            out.append(Variant(f"decode dp4a M<={bm} {t.block_n}x{t.block_k}w split={split} w{t.num_warps} "
                               f"s{t.num_stages}", "w4a4_gemm", "_w4a4_decode_dp4a_kernel", d4_sig, const,
                               t.num_warps, t.num_stages))  # fmt: skip
    for bm in sorted(wg.FMA_TILES):
        t = wg.decode_tile(bm, False)
        const = dict(BLOCK_M=bm, BLOCK_N=t.block_n, BLOCK_KH=t.block_k, SPLIT_K=2, RAW=False, NUM_STAGES=t.num_stages)
        out.append(Variant(f"decode fma M<={bm} {t.block_n}x{t.block_k}B w{t.num_warps} s{t.num_stages}", "w4a4_gemm",
                           "_w4a4_decode_kernel", d_sig, const, t.num_warps, t.num_stages))  # fmt: skip
    e_sig = {"ws_ptr": F32, "sa_ptr": F32, "sw_ptr": F32, "out_ptr": BF16, "M": I32, "N": I32, "stride_om": I32}
    const = dict(SPLIT_K=8, BLOCK_MP=1, BLOCK_M=1, BLOCK_N=128, RAW=False)
    out.append(Variant("split-K epilogue", "w4a4_gemm", "_splitk_epilogue_kernel", e_sig, const, 4, 1))
    w_sig = {"p_ptr": U8, "out_ptr": FP8, "R": I32, "KH": I32}
    out.append(Variant("widen int4 -> fp8", "w4a4_gemm", "_widen_fp8_kernel", w_sig, dict(BLOCK_R=16, BLOCK_KH=128),
                       4, 1))  # fmt: skip
    return out


def _source(fn, sig: dict[str, str], const: dict[str, object], unhinted: tuple[str, ...] = ()):
    """An ``ASTSource`` for Triton >= 3.3 (``constexprs``, dict attrs) or 3.2 (``constants``, AttrsDescriptor)."""
    import inspect

    from triton.compiler import ASTSource

    hinted = [fn.arg_names.index(k) for k, v in sig.items() if v != "fp32" and k not in unhinted]
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
        full = {**sig, **{k: "constexpr" for k in const}}
        attrs = {(i,): [["tt.divisibility", 16]] for i in hinted}
        return ASTSource(fn=fn, signature=full, constexprs=const, attrs=attrs)
    from triton.backends.compiler import AttrsDescriptor  # triton 3.2

    full = {**sig, **{k: "constexpr" for k in const}}
    return ASTSource(fn=fn, signature=full, constants=const, attrs=AttrsDescriptor.from_hints({i: 16 for i in hinted}))


_SASS_OP = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)", re.M)
_WATCH = ("LDG", "LDGSTS", "STG", "LDL", "STL", "STS", "LDS", "LDSM", "IGMMA", "HGMMA", "QGMMA", "IMMA", "HMMA",
          "IDP", "FFMA", "WARPGROUP")  # fmt: skip


def _loop_ir_counts(ttgir: str) -> tuple[int, int, int]:
    """(register->shared writes, async global->shared copies, dots) inside ``scf.for`` bodies of the TTGIR."""
    depth, loop_depths = 0, []
    writes = copies = dots = 0
    for line in ttgir.splitlines():
        s = line.strip()
        if s.startswith("}"):
            depth -= 1
            while loop_depths and loop_depths[-1] > depth:
                loop_depths.pop()
        if loop_depths:
            if re.search(r"local_alloc %", s) or "local_store" in s:
                writes += 1
            if "async_copy_global_to_local" in s or "async_tma_copy" in s:
                copies += 1
            if re.search(r"\b(tt\.dot|ttng\.warp_group_dot|triton_nvidia_gpu\.warp_group_dot)\b(?!_wait)", s):
                dots += 1
        if s.endswith("{"):
            depth += 1
            if "scf.for" in s:
                loop_depths.append(depth)
    return writes, copies, dots


def _ctas_per_sm(regs: int, shared: int, warps: int) -> int:
    """CTAs per SM allowed by registers (allocated per warp in 256-register units), shared memory and warps."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (SM_REGS // per_warp) // warps if per_warp else SM_MAX_CTAS
    by_smem = SM_SMEM // (shared + 1024)
    return max(0, min(by_regs, by_smem, SM_MAX_WARPS // warps, SM_MAX_CTAS))


def compile_variant(v: Variant, arch: int = 90) -> Report:
    """Compile ``v`` for ``sm_<arch>`` and read registers, stack, shared memory, SASS and TTGIR loop facts."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    fn = getattr(importlib.import_module(f"lsr.kernels.{v.module}"), v.kernel)
    rep = Report(v)
    try:
        kern = triton.compile(
            _source(fn, v.signature, v.constexprs, v.unhinted), target=GPUTarget("cuda", arch, 32),
            options={"num_warps": v.num_warps, "num_stages": v.num_stages,
                     **({"maxnreg": v.maxnreg} if v.maxnreg else {})},
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - reported, the caller decides
        msg = str(e).strip().splitlines()
        rep.error = f"{type(e).__name__}: {' | '.join(msg[:3])[:400]}"
        return rep
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        Path(cubin).write_bytes(kern.asm["cubin"])
        res = subprocess.run([bindir / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([bindir / "cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", res), re.search(r"STACK:(\d+)", res)
    rep.regs = int(regs.group(1)) if regs else -1
    rep.stack = int(stack.group(1)) if stack else -1
    rep.shared = int(kern.metadata.shared)
    rep.ctas_per_sm = _ctas_per_sm(rep.regs, rep.shared, v.num_warps)
    rep.loop_smem_writes, rep.loop_async_copies, rep.loop_dots = _loop_ir_counts(kern.asm.get("ttgir", ""))
    ops = collections.Counter(m.group(1) + (m.group(2) or "") for m in _SASS_OP.finditer(sass))
    rep.sass = dict(sorted(ops.items()))
    return rep


def _compile_one(args: tuple[Variant, int]) -> Report:
    return compile_variant(*args)


def compile_all(arch: int = 90, match: str = "", jobs: int = 1) -> list[Report]:
    """Compile every :func:`variants` entry whose label contains ``match``, in ``jobs`` processes."""
    todo = [(v, arch) for v in variants() if match in v.label]
    if jobs <= 1:
        return [_compile_one(t) for t in todo]
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        return list(pool.map(_compile_one, todo))


def _sass_cell(rep: Report, op: str) -> str:
    n = sum(c for k, c in rep.sass.items() if k.split(".")[0] == op)
    return str(n) if n else ""


def markdown(reports: list[Report]) -> str:
    """One table row per variant: resources, loop facts from the TTGIR, and SASS op counts."""
    head = ["kernel", "regs", "stack", "smem B", "CTAs/SM", "loop smem writes", "loop async copies", *_WATCH]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in reports:
        if r.error:
            lines.append(f"| {r.variant.label} | compile failed: {r.error[:200]} |")
            continue
        cells = [r.variant.label, str(r.regs), str(r.stack), str(r.shared), str(r.ctas_per_sm),
                 str(r.loop_smem_writes), str(r.loop_async_copies), *(_sass_cell(r, op) for op in _WATCH)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability (90 = Hopper)")
    p.add_argument("--match", default="", help="only variants whose label contains this")
    p.add_argument("--json", default=None, help="also write the reports as JSON here")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compile processes")
    args = p.parse_args(argv)
    import triton

    reports = compile_all(args.arch, args.match, args.jobs)
    print(f"triton {triton.__version__}, sm_{args.arch}")
    print(markdown(reports))
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "arch": args.arch,
                                               "reports": [r.to_dict() for r in reports]}, indent=1))  # fmt: skip
    return 1 if any(r.error for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
