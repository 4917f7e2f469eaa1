"""Kernel timings on this machine: `python -m moe_offload.quant.bench [--n 14336 --k 4096 --threads 1]`.

Per bit width, for one N×K matrix: the kernel at M rows vs dequantise-to-bf16 + F.linear (what prefill and
CUDA do), the one-off cost of making the unit when an expert arrives (2/3-bit expansion, meta8 decode), and
the bytes stored vs held. Minimum of --reps runs after a warm-up; nothing is asserted.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from .hqq import quantize
from .kernels import PackedMatrix, make_linear


def best_ms(fn, reps: int) -> float:
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return 1e3 * min(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=14336)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rows", default="1,4,16,32,64,256")
    p.add_argument("--bits", default="4,3,2,8")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    N, K = a.n, a.k
    rows = [int(r) for r in a.rows.split(",")]
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.02
    Wb = W.to(torch.bfloat16)
    print(f"{N}x{K}, {a.threads} thread(s), torch {torch.__version__}, ms (min of {a.reps})")
    xs = {m: torch.randn(m, K, dtype=torch.bfloat16) for m in rows}
    dense = "  ".join(f"M={m}: {best_ms(lambda m=m: F.linear(xs[m], Wb), a.reps):.2f}" for m in rows)
    print(f"dense bf16 F.linear   {dense}")
    for bits in (int(b) for b in a.bits.split(",")):
        q = quantize(W, bits, 0 if bits == 8 else (32 if bits == 2 else 64), method="rtn")
        pm = PackedMatrix.from_quantized(q)
        stored = pm.packed.numel() + sum(t.numel() * t.element_size() for t in q.meta.values())
        lin = make_linear(pm, dense_rows=max(rows))  # the kernel at every M
        dense = make_linear(pm, "dense")  # dequantise + F.linear at every M
        arrive = best_ms(lambda: make_linear(pm), a.reps)
        deq = best_ms(lambda: lin.pm.dequantize(torch.bfloat16), a.reps)
        kern = "  ".join(f"M={m}: {best_ms(lambda m=m: lin(xs[m]), a.reps):.2f}" for m in rows)
        dq = "  ".join(f"M={m}: {best_ms(lambda m=m: dense(xs[m]), a.reps):.2f}" for m in rows)
        print(f"{bits}-bit {lin.kind:9s} kernel  {kern}")
        print(f"       dequant+F.linear {dq}")
        print(f"       dequantise->bf16 {deq:.1f}, unit on arrival {arrive:.1f}, "
              f"bytes stored {stored / 2**20:.1f} MiB, held {lin.nbytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
