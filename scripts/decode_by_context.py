"""Decode time per token after a short and a long prompt, one process: a store loaded once (preloaded), a
warm-up generation, then for each prompt length a greedy continuation of 16 tokens timed token by token.
Shows how much decode slows with the context (the one-query attention over the KV cache) apart from the
machine's moment.

    PYTHONPATH=. python scripts/decode_by_context.py STORE [--threads 1] [--lengths 16,512] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import time

import torch

from moe_offload.runtime.load import load


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lengths", default="16,512")
    ap.add_argument("--new-tokens", type=int, default=16)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    lengths = [int(n) for n in a.lengths.split(",")]
    e = load(a.store, device="cpu", preload="on", ctx_size=max(lengths) + a.new_tokens + 8)
    e.generate(prompt_ids=[1, 2, 3, 4], max_new_tokens=2, ignore_eos=True, temperature=0.0)
    for n in lengths:
        ids = [(i * 7) % 1000 + 1 for i in range(n)]
        it = e.stream_generate(prompt_ids=ids, max_new_tokens=a.new_tokens + 1, ignore_eos=True, temperature=0.0)
        next(it)  # the prompt's prefill and its first token
        ts = [time.perf_counter()]
        for _ in range(a.new_tokens):
            next(it)
            ts.append(time.perf_counter())
        d = [1e3 * (b - x) for x, b in zip(ts, ts[1:])]
        print(f"prompt {n}: {sum(d) / len(d):.1f} ms/token mean over {len(d)} "
              f"(min {min(d):.1f}, max {max(d):.1f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
