#!/bin/bash
# One bench worker (the process `moe-offload bench` starts per row) run from its spec without a cgroup, with its
# memory sampled every 0.5 s from /proc/PID/status: VmRSS, RssAnon, RssFile, RssShmem in MiB, one line per sample.
# Shows what a row that the cgroup OOM-kills would have needed. From the repository root:
#     scripts/bench_child_rss.sh docs/bench/RUN/runs/TAG.spec.json OUT_PREFIX [python] [threads]
# writes OUT_PREFIX.result.json (the worker's result: peak_rss_bytes, resident_weight_bytes per run),
# OUT_PREFIX.rss (the samples) and OUT_PREFIX.log.
SPEC=$1 OUT=$2 PY=${3:-python} T=${4:-2}
PYTHONPATH=$PWD OMP_NUM_THREADS=$T scripts/rss_sample.sh "$OUT.rss" "$PY" -m moe_offload.bench --child "$SPEC" \
  "$OUT.result.json" > "$OUT.log" 2>&1  # the sampler prints each kind's peak into the log
echo "exit $?" >> "$OUT.log"
tail -1 "$OUT.rss"
