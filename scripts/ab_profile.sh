#!/usr/bin/env bash
# A/B of two trees with scripts/profile_step.py (real layer widths, random weights), alternating runs: the
# machine is noisy, so read the rounds side by side. usage: scripts/ab_profile.sh OLD_TREE NEW_TREE [ROUNDS]
# [-- profile_step flags], e.g. scripts/ab_profile.sh /tmp/old . 2 -- --shape qwen3 --prefill 512
# (git archive <commit> | tar -x -C /tmp/old makes OLD_TREE). One JSON line per (tree, threads).
set -euo pipefail
old=$(cd "$1" && pwd); new=$(cd "$2" && pwd); rounds=${3:-2}; shift $(( $# < 3 ? $# : 3 ))
[ "${1:-}" = "--" ] && shift
py=${PYTHON:-$new/.venv/bin/python}
script=$new/scripts/profile_step.py  # the same script measures both trees
for r in $(seq "$rounds"); do
  for tree in "$old" "$new"; do
    PYTHONPATH=$tree "$py" "$script" "$@" 2>/dev/null | grep '^{"threads"' | "$py" -c "
import json, sys
for line in sys.stdin:
    d = json.loads(line); d = {'tree': sys.argv[1], 'round': int(sys.argv[2]), **d}
    print(json.dumps(d), flush=True)" "$(basename "$tree")" "$r"
  done
done
