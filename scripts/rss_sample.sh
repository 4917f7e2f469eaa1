#!/bin/bash
# Any command's memory by kind, sampled every 0.5 s from /proc/PID/status (VmRSS, RssAnon, RssFile, RssShmem in
# MiB, one line per sample), then the peak of each. RssFile is mapped files (page cache: reclaimable, e.g. a
# safetensors checkpoint being read); RssAnon is what the process really holds. From the repository root:
#     scripts/rss_sample.sh OUT.rss CMD [ARGS...]
OUT=$1; shift
"$@" &
P=$!
: > "$OUT"
while kill -0 $P 2>/dev/null; do
  s=$(grep -E '^(VmRSS|RssAnon|RssFile|RssShmem)' /proc/$P/status 2>/dev/null | awk '{printf "%s %d ", $1, $2 / 1024}')
  [ -n "$s" ] && echo "$(date +%s.%N | cut -c1-14) $s" >> "$OUT"
  sleep 0.5
done
wait $P
rc=$?
for k in VmRSS RssAnon RssFile RssShmem; do
  awk -v k="$k:" '{for (i = 1; i < NF; i++) if ($i == k && $(i + 1) > m) m = $(i + 1)} END {printf "peak %s %d MiB\n", k, m}' "$OUT"
done
exit $rc
