#!/usr/bin/env bash
# OpenMP wait settings A/B on one decode workload, each setting in a fresh process, settings alternated round by
# round (a noisy shared machine: read them side by side). moe_offload/__init__.py sets the default before torch
# loads libgomp; a user's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins, which is how each setting is tried here.
# usage: scripts/omp_wait_ab.sh [--hogs N] [--rounds R] spec BENCH_CHILD_SPEC.json
#        scripts/omp_wait_ab.sh [--hogs N] [--rounds R] generate GENERATE_ARGS...   (moe-offload generate --json)
#   --hogs N: N busy loops run beside it (a machine shared with other jobs)
# prints: setting, decode tok/s of each measured run, CPU cores the decode used (spec mode); "default" is neither
# variable set (what moe_offload/__init__.py picks then: GOMP_SPINCOUNT=10000, or PASSIVE when other tasks run)
set -euo pipefail
hogs=0; rounds=2
while [ "${1:-}" = "--hogs" ] || [ "${1:-}" = "--rounds" ]; do
  [ "$1" = "--hogs" ] && hogs=$2; [ "$1" = "--rounds" ] && rounds=$2; shift 2
done
mode=$1; shift
py=${PYTHON:-.venv/bin/python}
pids=()
for _ in $(seq "$hogs"); do (while :; do :; done) & pids+=($!); done
trap '[ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null || true' EXIT
out=$(mktemp)
settings=("default" "OMP_WAIT_POLICY=PASSIVE" "GOMP_SPINCOUNT=1000" "GOMP_SPINCOUNT=10000" "GOMP_SPINCOUNT=100000" "GOMP_SPINCOUNT=300000")
echo "hogs=$hogs"
for _ in $(seq "$rounds"); do
  for s in "${settings[@]}"; do
    set_env=("$s"); [ "$s" = default ] && set_env=(-u OMP_WAIT_POLICY -u GOMP_SPINCOUNT)
    if [ "$mode" = spec ]; then
      env "${set_env[@]}" PYTHONPATH=. "$py" -m moe_offload.bench --child "$1" "$out"
      r=$("$py" -c "import json,sys; d=json.load(open(sys.argv[1])); rs=d['runs']
print([round(r['decode_tok_s'], 1) for r in rs], round(sum(r['decode_cpu_s'] for r in rs) / sum(r['decode_s'] for r in rs), 2))" "$out")
    else
      r=$(env "${set_env[@]}" PYTHONPATH=. "$py" -m moe_offload.cli generate "$@" --json 2>/dev/null | "$py" -c "import json,sys
print(round(json.load(sys.stdin)['stats']['decode_tokens_per_s'], 1))")
    fi
    echo "$s $r"
  done
done
rm -f "$out"
