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

# Default launches that still spill, with why; the test fails when this set and the compiler disagree.
KNOWN_SPILLS = {
    # Issue 14 item 4, open: a 28672-wide row (32768 padded float32 values) does not fit in one CTA's registers
    # (32 warps: 64 regs per thread) with the 3-term bf16 split; needs the row staged through shared memory.
    "hadamard_quant K=28672",
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
    return data["reports"]


def _label(r: dict) -> str:
    return r["variant"]["label"]


def _known(label: str) -> bool:
    return any(label.startswith(k) for k in KNOWN_SPILLS)


def test_every_variant_compiles(reports):
    kernels = {r["variant"]["kernel"] for r in reports}
    assert {"_w4a4_gemm_kernel", "_w4a4_decode_dp4a_kernel", "_w4a4_decode_kernel", "_hadamard_quant_kernel",
            "_quant_kernel", "_splitk_epilogue_kernel", "_widen_fp8_kernel"} <= kernels  # fmt: skip
    failed = {_label(r): r["error"] for r in reports if r["error"]}
    assert not failed, failed
    assert all(r["regs"] > 0 and r["ctas_per_sm"] >= 1 for r in reports)  # resources read, launch fits an SM


def test_default_launches_do_not_spill(reports):
    spilling = {_label(r): (r["regs"], r["stack"]) for r in reports if r["variant"]["default"] and r["spills"]}
    unexpected = {k: v for k, v in spilling.items() if not _known(k)}
    assert not unexpected, f"register spills (regs, stack bytes): {unexpected}"
    fixed = {k for k in KNOWN_SPILLS if not any(lb.startswith(k) for lb in spilling)}
    assert not fixed, f"no longer spilling, remove from KNOWN_SPILLS: {fixed}"


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
