"""Decode speed with the embedding table resident vs its rows read from the store (--embed-rows disk), as a
ratio inside one process: one engine, its model's embed_tokens swapped between the resident table and a
store/rows.DiskEmbedding on the same backbone file, rounds alternating A/B so the machine's noise hits both.

    PYTHONPATH=. python scripts/embed_rows_ab.py STORE [--memory 4GiB] [--prompt-tokens 16] [--new-tokens 32]
                                                       [--rounds 3] [--threads 2]

Give a --memory that holds every expert after the first round (the warm-up, not counted), so both arms decode
without misses. Prints one line per round and a JSON line: decode tok/s per arm, disk/resident ratio, the
embedding lookup alone (µs per decode token) per arm, tokens equal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from moe_offload.runtime.load import load
from moe_offload.store.format import BACKBONE
from moe_offload.store.rows import KEY, DiskEmbedding
from moe_offload.workload import prompts_for


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("store")
    p.add_argument("--memory", default=None)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    engine = load(a.store, device="cpu", memory=a.memory)
    m = engine.model.model
    table = m.embed_tokens
    rows = DiskEmbedding(engine.path / BACKBONE, KEY, table.weight.dtype, engine.device)
    arms = {"resident": table, "disk": rows}
    ids = prompts_for(engine.args.vocab_size, a.prompt_tokens, 1)[0]
    speed, tokens = {k: [] for k in arms}, {}
    for r in range(a.rounds + 1):  # round 0: the warm-up (fills the expert cache)
        for name, module in (arms.items() if r % 2 == 0 else reversed(arms.items())):
            m.embed_tokens = module
            out = engine.generate(prompt_ids=ids, max_new_tokens=a.new_tokens, ignore_eos=True, temperature=0.0)
            tokens.setdefault(name, out.token_ids)
            if r:
                speed[name].append(out.stats["decode_tokens_per_s"])
                print(f"round {r} {name:8s} decode {out.stats['decode_tokens_per_s']:.2f} tok/s "
                      f"misses {out.stats.get('expert_misses')}", flush=True)
    med = {k: statistics.median(v) for k, v in speed.items()}
    lookup = {}  # one decode token's embedding alone: microseconds per call, 2000 random ids
    probe = [torch.tensor([[t]]) for t in prompts_for(engine.args.vocab_size, 2000, 1)[0]]
    for name, module in arms.items():
        t0 = time.perf_counter()
        for t in probe:
            module(t)
        lookup[name] = (time.perf_counter() - t0) / len(probe) * 1e6
    print(json.dumps({"decode_tok_s": med, "ratio_disk_over_resident": med["disk"] / med["resident"],
                      "embed_us_per_token": lookup, "tokens_equal": tokens["disk"] == tokens["resident"],
                      "table_bytes": table.weight.nbytes}))


if __name__ == "__main__":
    main()
