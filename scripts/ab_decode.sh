#!/usr/bin/env bash
# Decode A/B of two trees of this repo on the bundled model, alternating runs (a noisy shared machine: read the
# medians side by side). usage: scripts/ab_decode.sh OLD_TREE NEW_TREE [ROUNDS] [-- extra generate flags]
# e.g. git worktree add /tmp/old 9961d92 && scripts/ab_decode.sh /tmp/old . 3 -- --memory 13MiB --prefetch lookahead
set -euo pipefail
old=$(cd "$1" && pwd); new=$(cd "$2" && pwd); rounds=${3:-3}; shift $(( $# < 3 ? $# : 3 ))
[ "${1:-}" = "--" ] && shift
py=${PYTHON:-$new/.venv/bin/python}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
model=$new/models/tiny-moe
for tree in "$old" "$new"; do  # each tree reads a store of its own format
  PYTHONPATH=$tree "$py" -m moe_offload.cli convert --model "$model" --out "$tmp/$(basename "$tree")-store" \
    >/dev/null 2>&1
done
echo "tree decode_tok/s prefill_tok/s expert_misses token_ids_hash"
for _ in $(seq "$rounds"); do
  for tree in "$old" "$new"; do
    src=$model; case " $* " in *" --memory "*) src=$tmp/$(basename "$tree")-store;; esac
    OMP_NUM_THREADS=1 PYTHONPATH=$tree "$py" -m moe_offload.cli generate --model "$src" "$@" \
      --prompt "def fibonacci(n):" --max-new-tokens 64 --ignore-eos --json 2>/dev/null | "$py" -c "
import json, sys, zlib
d = json.load(sys.stdin); s = d['stats']
print(sys.argv[1], round(s['decode_tokens_per_s'], 1), round(s['prefill_tokens_per_s'], 1),
      s.get('expert_misses', '-'), zlib.crc32(str(d['token_ids']).encode()))" "$(basename "$tree")"
  done
done
