#!/usr/bin/env bash
# CI: compile every Triton kernel variant for sm_90 (CPU only, Triton's bundled ptxas) with the OLDEST Triton that
# pyproject.toml supports, in a throwaway virtual environment. CI's own venv covers the newest one.
set -euo pipefail
cd "$(dirname "$0")/.."
OLDEST_TRITON="${OLDEST_TRITON:-3.3.1}"  # keep in step with "triton>=3.3" in pyproject.toml
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
. "$tmp/venv/bin/activate"
pip install -q --upgrade pip
# torch==2.13.0 is the CPU build here (a bare `torch` resolves a multi-GB CUDA build); lsr imports torch.
pip install -q torch==2.13.0 && pip install -q -e ".[dev]" "triton==${OLDEST_TRITON}"
python -c "import triton; print('triton', triton.__version__)"
TRITON_CACHE_DIR="$tmp/triton-cache" python -m pytest -q -p no:cacheprovider tests/test_kernel_compile.py
