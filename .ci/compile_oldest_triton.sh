#!/usr/bin/env bash
# CI: compile every Triton kernel variant for sm_90 (CPU only, Triton's bundled ptxas) with the OLDEST Triton that
# pyproject.toml supports. Runs inside the CI venv (torch, lsr installed) with that Triton put first on PYTHONPATH;
# the venv's own (newest) Triton is covered by the regular test run.
set -euo pipefail
cd "$(dirname "$0")/.."
OLDEST_TRITON="${OLDEST_TRITON:-3.6.0}"  # keep in step with "triton>=3.6" in pyproject.toml
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
pip install -q --no-deps --target "$tmp/site" "triton==${OLDEST_TRITON}"
export PYTHONPATH="$tmp/site${PYTHONPATH:+:$PYTHONPATH}"
python -c "import triton; print('triton', triton.__version__, 'from', triton.__file__)"
TRITON_CACHE_DIR="$tmp/triton-cache" python -m pytest -q -p no:cacheprovider tests/test_kernel_compile.py
