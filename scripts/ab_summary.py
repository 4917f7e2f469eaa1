"""Markdown table of scripts/ab_profile.sh output (JSON lines on stdin or in files): per tree and thread
count, the median over rounds of each part of a decode token and of the prefill (ms), and new/old ratios.

    scripts/ab_profile.sh /tmp/old . 2 -- --shape qwen3 --prefill 512 | tee ab.jsonl
    python scripts/ab_summary.py ab.jsonl
"""

from __future__ import annotations

import fileinput
import json
import statistics
from collections import defaultdict

PARTS = ("experts", "attention", "routing", "lm_head", "other", "total")


def main():
    runs = defaultdict(list)  # (tree, threads) -> rows
    trees = []
    for line in fileinput.input():
        if line.startswith("{"):
            d = json.loads(line)
            runs[d["tree"], d["threads"]].append(d)
            if d["tree"] not in trees:
                trees.append(d["tree"])
    print("| step | tree | threads | rounds | " + " | ".join(PARTS) + " | tok/s | ops (top-level) |")
    print("|" + "---|" * (len(PARTS) + 6))
    for step, key, rate in (("decode", "decode_ms_per_token", "decode_tok_s"),
                            ("prefill", "prefill_ms", "prefill_tok_s")):
        for (tree, th), rows in sorted(runs.items(), key=lambda kv: (kv[0][1], trees.index(kv[0][0]))):
            med = {p: statistics.median(r[key][p] for r in rows) for p in PARTS}
            ops = rows[0].get("decode_ops_per_token") if step == "decode" else rows[0].get("prefill_ops")
            ops = f"{ops['aten_ops']} ({ops['top_level_ops']})" if ops else "-"
            tok_s = statistics.median(r[rate] for r in rows)
            print(f"| {step} | {tree} | {th} | {len(rows)} | " + " | ".join(f"{med[p]:.1f}" for p in PARTS)
                  + f" | {tok_s:.2f} | {ops} |")
    if len(trees) == 2:
        old, new = trees
        for th in sorted({t for _, t in runs}):
            if (old, th) in runs and (new, th) in runs:
                for step, key in (("decode", "decode_ms_per_token"), ("prefill", "prefill_ms")):
                    # ratio inside each round (the machine's load changes between rounds), then the median
                    pairs = zip(runs[old, th], runs[new, th])
                    r = statistics.median(a[key]["total"] / b[key]["total"] for a, b in pairs)
                    print(f"\n{step}, {th} thread(s): {new} is {r:.2f}x as fast as {old} "
                          "(median of per-round ratios)", end="")
        print()


if __name__ == "__main__":
    main()
