"""Every Triton kernel variant compiles for sm_90 with the installed Triton, on the CPU (no GPU needed).

The compile runs in a subprocess with ``TRITON_INTERPRET=0`` (this test session runs the kernels under the
interpreter, whose ``@triton.jit`` objects cannot be compiled) through :mod:`lsr.kernels.compile_check`, which
reads registers, stack (spills) and shared memory from ptxas' output and loop facts from the TTGIR.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

# Default launches that still spill, with why, and the Triton versions below which they do (None: every version);
# the test fails when this table and the compiler disagree.
KNOWN_SPILLS: dict[str, tuple[int, int] | None] = {
    # The chunked Hadamard+quant (issue 14 item 4) holds a 64-value float32 accumulator per thread under a
    # 128-register cap; Triton 3.3's code for the chunk's dots needs a few more: 24-48 bytes of stack.
    # Spill-free from 3.6 on (3.6.0 and 3.9.0 checked), which is why pyproject asks for triton>=3.6.
    "hadamard_quant K=14336": (3, 6),
    "hadamard_quant K=28672": (3, 6),
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("compile") / "reports.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, "-m", "lsr.kernels.compile_check", "--arch", "90", "--json", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if not out.exists():
        pytest.fail(f"compile_check produced no report (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    data = json.loads(out.read_text())
    print(f"triton {data['triton']}, sm_{data['arch']}: {len(data['reports'])} variants")
    for r in data["reports"]:
        r["triton"] = data["triton"]
    return data["reports"]


def _label(r: dict) -> str:
    return r["variant"]["label"]


def _version(v: str) -> tuple[int, int]:
    major, minor = v.split(".")[:2]
    return int(major), int(minor)


def _known_here(triton_version: str) -> set[str]:
    """The KNOWN_SPILLS entries that apply to this Triton version."""
    v = _version(triton_version)
    return {k for k, below in KNOWN_SPILLS.items() if below is None or v < below}


def test_every_variant_compiles(reports):
    kernels = {r["variant"]["kernel"] for r in reports}
    assert {"_w4a4_gemm_kernel", "_w4a4_decode_dp4a_kernel", "_w4a4_decode_kernel", "_hadamard_quant_kernel",
            "_hadamard_quant_chunked_kernel", "_quant_kernel", "_splitk_epilogue_kernel",
            "_widen_fp8_kernel"} <= kernels  # fmt: skip
    failed = {_label(r): r["error"] for r in reports if r["error"]}
    assert not failed, failed
    assert all(r["regs"] > 0 and r["ctas_per_sm"] >= 1 for r in reports)  # resources read, launch fits an SM


def test_default_launches_do_not_spill(reports):
    known = _known_here(reports[0]["triton"])
    spilling = {_label(r): (r["regs"], r["stack"]) for r in reports if r["variant"]["default"] and r["spills"]}
    unexpected = {k: v for k, v in spilling.items() if not any(k.startswith(p) for p in known)}
    assert not unexpected, f"register spills (regs, stack bytes): {unexpected}"
    fixed = {k for k in known if not any(lb.startswith(k) for lb in spilling)}
    assert not fixed, f"no longer spilling on triton {reports[0]['triton']}, update KNOWN_SPILLS: {fixed}"


def test_hadamard_quant_occupancy(reports):
    """Issue 14 item 4: the 8B FFN width (K = 14336) leaves room for two programs per SM."""
    rows = [r for r in reports if _label(r).startswith("hadamard_quant K=14336")]
    assert rows
    for r in rows:
        assert r["ctas_per_sm"] >= 2, (_label(r), r["regs"], r["shared"])


def test_gemm_widened_weights_stay_in_registers(reports):
    """Mixed-input GEMM: no register->shared write in the K loop, pipelined async loads, int8 wgmma (IGMMA)."""
    gemm = [r for r in reports if r["variant"]["kernel"] == "_w4a4_gemm_kernel"]
    assert len(gemm) >= 8
    for r in gemm:
        assert r["loop_smem_writes"] == 0, _label(r)
        assert r["loop_async_copies"] >= 2, _label(r)
        assert r["loop_dots"] == 2, _label(r)
        assert any(op.startswith("IGMMA") for op in r["sass"]), (_label(r), sorted(r["sass"]))


def test_decode_dp4a_pipelined(reports):
    dp4a = [r for r in reports if r["variant"]["kernel"] == "_w4a4_decode_dp4a_kernel"]
    assert dp4a
    for r in dp4a:
        assert r["loop_async_copies"] >= 1, _label(r)  # weight chunks prefetched with cp.async
        assert any(op.startswith("IDP") for op in r["sass"]), _label(r)
