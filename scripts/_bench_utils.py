"""Shared helpers of the GPU benchmark scripts (``bench_kernels.py``, ``bench_e2e.py``).

Importable without CUDA (torch only; triton is imported inside the timing functions), so the scripts' ``--help``
and ``--compile-report`` work on a CPU machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

L2_BYTES = 50 * 2**20  # H100 L2; rotation sets are sized to exceed a few times this


def default_out(name: str) -> str:
    """``$OUT/<name>`` when ``$OUT`` is set (what comes back from the GPU machine), else ``benchmarks/<name>``."""
    out_dir = os.environ.get("OUT")
    return str(Path(out_dir) / name) if out_dir else f"benchmarks/{name}"


def add_common_args(p: argparse.ArgumentParser, out_name: str) -> None:
    """``--out``, ``--warmup-ms``, ``--rep-ms``, ``--compile-report``, ``--arch``."""
    p.add_argument("--out", default=default_out(out_name),
                   help=f"JSON output path (default: $OUT/{out_name} when $OUT is set, which is what comes\n"
                        f"back from the GPU machine; else benchmarks/{out_name})")  # fmt: skip
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=200.0)
    p.add_argument("--compile-report", action="store_true",
                   help="compile the kernels for --arch with ptxas and print registers, spills, SASS op counts\n"
                        "(no GPU needed; lsr.kernels.compile_check)")  # fmt: skip
    p.add_argument("--arch", type=int, default=90, help="--compile-report: compute capability (90 = Hopper)")


def compile_report(args: argparse.Namespace) -> int:
    """Every kernel variant compiled for ``sm_<arch>`` with ptxas (no GPU needed): :mod:`lsr.kernels.compile_check`."""
    from lsr.kernels import compile_check

    return compile_check.main(["--arch", str(args.arch)])


def require_cuda(script: str) -> bool:
    """True if CUDA is there; else say why there is nothing to measure."""
    if torch.cuda.is_available():
        return True
    print(f"{script} measures GPU kernels and needs CUDA; torch.cuda.is_available() is False here, so there is "
          "nothing to measure. Run it on the GPU machine (--compile-report works without one).",
          file=sys.stderr)  # fmt: skip
    return False


def device_meta() -> dict:
    """Device, versions, time and argv for the JSON header."""
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:],
    }  # fmt: skip


def save_json(path: str | Path, results: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


def bench(call: Callable[[int], object], n_sets: int, warmup_ms: float, rep_ms: float) -> tuple[float, str]:
    """Median ms of one ``call(i)``: a CUDA graph replays ``call(0..n_sets-1)``; eager loop if capture fails."""
    import triton

    for i in range(n_sets):  # compile / autotune / lazy init outside the graph
        call(i)
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in range(n_sets):
                call(i)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(g):
            for i in range(n_sets):
                call(i)
        ms = triton.testing.do_bench(g.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        return ms / n_sets, "graph"
    except Exception as e:  # noqa: BLE001 - report and fall back
        print(f"  (CUDA graph capture failed: {type(e).__name__}: {e}; timing eagerly)", file=sys.stderr)
        torch.cuda.synchronize()

        def loop() -> None:
            for i in range(n_sets):
                call(i)

        ms = triton.testing.do_bench(loop, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        return ms / n_sets, "eager"


def n_sets(bytes_per_set: int) -> int:
    """Input sets to rotate so that one pass over them is a few times the L2."""
    return max(1, min(16, math.ceil(3 * L2_BYTES / max(bytes_per_set, 1))))


def copy_bandwidth(warmup_ms: float, rep_ms: float) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted) on a 1 GiB buffer."""
    import triton

    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)
