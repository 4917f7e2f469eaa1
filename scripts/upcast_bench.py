"""One expert of a real layer width (default Mixtral-8x7B's: D 4096, I 14336) on M rows: its 16-bit GEMMs as
they are (F.linear in bf16/fp16) against models.base.linear's fp32 path with the weights converted a block at
a time, for several block sizes. Reports the best of --reps of each, in CPU seconds of this process
(time.process_time), which a loaded machine disturbs less than wall time; rounds alternate the variants.

    python scripts/upcast_bench.py --rows 1,2,4,6,8,16,64,256 --blocks 4,16,64
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from moe_offload.models import base


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--rows", default="1,4,8,16,64,256")
    p.add_argument("--blocks", default="4,16,64", help="MiB of fp32 weights converted at a time")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dt, D, I = getattr(torch, a.dtype), a.hidden, a.intermediate
    g = torch.Generator().manual_seed(0)
    gate_up = torch.empty(2 * I, D, dtype=dt).normal_(0, 0.02, generator=g)
    down = torch.empty(D, I, dtype=dt).normal_(0, 0.02, generator=g)

    def expert(lin, x):
        gu, up = lin(x, gate_up).chunk(2, dim=-1)
        return lin(F.silu(gu) * up, down)

    def upcast_with(mib):
        def lin(x, w):
            base.UPCAST_ROWS, base.UPCAST_BLOCK = 1, mib << 18
            return base.linear(x, w)
        return lin

    variants = {a.dtype: F.linear, **{f"fp32/{m}MiB": upcast_with(int(m)) for m in a.blocks.split(",")}}
    print(f"ms of CPU per expert call, D={D} I={I} {a.dtype}, {a.threads} thread(s), best of {a.reps}")
    print("rows " + " ".join(f"{k:>12}" for k in variants))
    for M in (int(r) for r in a.rows.split(",")):
        x = torch.randn(M, D, generator=g).to(dt)
        best = {k: float("inf") for k in variants}
        for _ in range(a.reps):
            for k, lin in variants.items():
                t0 = time.process_time()
                expert(lin, x)
                best[k] = min(best[k], time.process_time() - t0)
        print(f"{M:4d} " + " ".join(f"{1e3 * best[k]:12.0f}" for k in variants), flush=True)


if __name__ == "__main__":
    main()
