#!/usr/bin/env bash
# The prepared GPU measurement in one go: benchmarks/gpu_run.py (its docstring says what runs).
#
#   bash benchmarks/gpu_run.sh --out "$OUT"                                   # on the GPU machine
#   PYTHON=.venv/bin/python bash benchmarks/gpu_run.sh --size tiny --out /tmp/dry   # the CPU dry run
#
# PYTHON: the interpreter (default python3, the one holding jax[cuda], torch, transformers, peft).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_run.py "$@"
