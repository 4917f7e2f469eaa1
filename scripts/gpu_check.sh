#!/usr/bin/env bash
# Issue 20's GPU check in one command (docs/gpu.md): the CUDA tests, the bench at Mixtral's layer widths
# against transformers + accelerate, and the 12 GB card's plan scaled to these layers; every result into OUTDIR.
#   scripts/gpu_check.sh OUTDIR [--cpu-smoke] [--work DIR] [--layers N]
# Needs torch (with CUDA), transformers and accelerate; the repo is used in place (PYTHONPATH, no install).
# PYTHON picks the interpreter (default python3).
set -u
if [ $# -lt 1 ] || [ -z "$1" ] || [ "${1#-}" != "$1" ]; then
    echo "usage: scripts/gpu_check.sh OUTDIR [--cpu-smoke] [--work DIR] [--layers N]" >&2
    exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" "$root/scripts/gpu_check.py" "$@"
