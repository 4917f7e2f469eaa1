"""The expert dispatch's Python cost per MoE layer call, with the kernel stubbed out: one layer of a store under a
budget (the expert cache's path, as the bench runs it), the same token's routing called N times in a row, so the
interpreter's code and data stay in the CPU caches (in decode each kernel streams megabytes through them between
two calls, and the same Python runs slower: compare decode_sections' "expert dispatch" minus "experts kernel").

    PYTHONPATH=. python scripts/dispatch_overhead.py STORE [--memory 8GiB] [--calls 2000] [--top 12]

Prints us per call, then cProfile's top functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--memory", default="8GiB")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args()
    from moe_offload.quant import codec
    from moe_offload.runtime.load import load

    engine = load(a.store, device="cpu", preload="on", memory=a.memory)
    _, moe = engine.model.moe_blocks()[0]
    h = torch.randn(1, engine.model.args.hidden_size, generator=torch.Generator().manual_seed(0)).to(engine.dtype)
    idx, w = moe.route(moe.router_logits(h))
    w = w.to(h.dtype)
    codec.fused_moe = lambda experts, x, weights, each=False: x.new_zeros(len(experts) if each else 1, x.shape[-1])
    for _ in range(100):
        moe.experts(h, idx, w)
    t = time.perf_counter()
    for _ in range(a.calls):
        moe.experts(h, idx, w)
    print(f"dispatch of one token's {idx.shape[1]} experts, kernel stubbed: "
          f"{1e6 * (time.perf_counter() - t) / a.calls:.1f} us a call ({a.calls} calls in a row)")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(a.calls):
        moe.experts(h, idx, w)
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(a.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
