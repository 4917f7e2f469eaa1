#!/usr/bin/env bash
# End-to-end decode A/B of the 4-bit expert kernels on one model: torch's int4pack (MOE_OFFLOAD_NATIVE=0, store
# written in its order) vs the native kernel (store written in r64), alternating runs on a noisy shared machine:
# read the medians side by side. Same tokens expected only up to the activation rounding (docs/perf.md).
# usage: scripts/native_q4_ab.sh [MODEL] [ROUNDS] [-- extra generate flags]
#   e.g. scripts/native_q4_ab.sh models/tiny-moe 5 -- --memory 60% --threads 2
set -euo pipefail
model=${1:-models/tiny-moe}; rounds=${2:-5}; shift $(( $# < 2 ? $# : 2 ))
[ "${1:-}" = "--" ] && shift
py=${PYTHON:-.venv/bin/python}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for n in 0 1; do
  MOE_OFFLOAD_NATIVE=$n PYTHONPATH=. "$py" -m moe_offload.cli quantize --model "$model" --out "$tmp/q4-$n" \
    --expert-bits 4 --quiet >/dev/null
done
echo "kernel decode_tok/s prefill_tok/s token_ids_hash"
for _ in $(seq "$rounds"); do
  for n in 0 1; do
    MOE_OFFLOAD_NATIVE=$n PYTHONPATH=. "$py" -m moe_offload.cli generate --model "$tmp/q4-$n" "$@" \
      --prompt "def fibonacci(n):" --max-new-tokens 64 --ignore-eos --json 2>/dev/null | "$py" -c "
import json, sys, zlib
d = json.load(sys.stdin); s = d['stats']
print(sys.argv[1], round(s['decode_tokens_per_s'], 1), round(s['prefill_tokens_per_s'], 1),
      zlib.crc32(str(d['token_ids']).encode()))" "$([ "$n" = 1 ] && echo native4 || echo int4pack)"
  done
done
