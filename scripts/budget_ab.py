"""One store at several --memory budgets, no cgroup, alternating in fresh processes: decode tokens/s of a 16-token
greedy continuation of a 16-token prompt (after a warm-up generation) and the cache's counters (hits, misses,
evictions, stall, bytes read, capacity, resident weights). Separates what a budget does to the engine from what
a bench's cgroup (budget + 512 MiB, page cache counted) does to the process.

    PYTHONPATH=. python scripts/budget_ab.py STORE 2142MiB 1494MiB [--rounds 2] [--threads 2] [--embed-rows auto]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from moe_offload.runtime.load import load
e = load(sys.argv[1], device="cpu", memory=sys.argv[2], embed_rows=sys.argv[4], ctx_size=40)
ids = list(range(1, 17))
e.generate(prompt_ids=ids[:4], max_new_tokens=2, ignore_eos=True, temperature=0.0)
r = e.generate(prompt_ids=ids, max_new_tokens=16, ignore_eos=True, temperature=0.0)
st = r.stats
keys = ("decode_tokens_per_s", "expert_hits", "expert_misses", "evictions", "stall_seconds", "bytes_read_disk",
        "cache_capacity_bytes", "resident_weight_bytes")
print(json.dumps({k: round(st[k], 3) if isinstance(st.get(k), float) else st.get(k) for k in keys}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store")
    ap.add_argument("memory", nargs="+")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--embed-rows", default="auto")
    a = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    for r in range(a.rounds):
        for mem in a.memory:
            out = subprocess.run([sys.executable, "-c", CHILD, a.store, mem, str(a.threads), a.embed_rows],
                                 capture_output=True, text=True, env=env)
            line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"failed: {out.stderr[-300:]}"
            print(f"round {r} --memory {mem}: {line}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
