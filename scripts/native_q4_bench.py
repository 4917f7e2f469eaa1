"""Native AVX2 4-bit kernel (quant/native, "native4") vs torch's int4pack (`_weight_int4pack_mm_for_cpu`),
one matrix at a time, at Mixtral-8x7B's and Qwen3-30B-A3B's expert widths.

    PYTHONPATH=. python scripts/native_q4_bench.py [--shapes 14336x4096,4096x14336,768x2048,2048x768]
        [--rows 1,4,16] [--threads 1,2] [--group 64] [--reps 15] [--overhead] [--json out.json]

Per shape (N×K, 4-bit codes, bf16 activations as the engine's compute dtype), rows M and threads: the median
ms per call of each system and GB/s of 4-bit code bytes (N·K/2 / time). The two systems are interleaved call
by call (the machine is shared and noisy), so the ratio torch/native of one row is measured under the same
load. --overhead adds a 32×64 matrix: the fixed cost per call (ctypes, activation rounding, allocation).
The matrices are random (RTN, bf16 meta): the kernels' speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from moe_offload.quant.hqq import quantize
from moe_offload.quant.kernels import NATIVE_LAYOUT, Int4Linear, NativeQ4Linear, PackedMatrix, host_layout, native_available


def shape_list(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def bench(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds per call of each fn, interleaved call by call after a warm-up."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="14336x4096,4096x14336,768x2048,2048x768")
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if not native_available() or host_layout() is None:
        print("needs both the native kernel (a C compiler, AVX2+FMA) and torch's int4pack kernel", file=sys.stderr)
        return 2
    shapes = shape_list(a.shapes) + ([(32, 64)] if a.overhead else [])
    rows = [int(r) for r in a.rows.split(",")]
    threads = [int(t) for t in a.threads.split(",")]
    before = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    out = []
    print(f"{'N x K':>12} {'M':>3} {'thr':>3} {'torch ms':>9} {'native ms':>9} {'torch GB/s':>10} "
          f"{'native GB/s':>11} {'speed-up':>8}", flush=True)
    for N, K in shapes:
        q = quantize(torch.randn(N, K, generator=g), 4, a.group, 16, "rtn")
        lins = {"torch": Int4Linear(PackedMatrix.from_quantized(q, host_layout()), dense_rows=max(rows)),
                "native": NativeQ4Linear(PackedMatrix.from_quantized(q, NATIVE_LAYOUT), dense_rows=max(rows))}
        del q
        nbytes = N * K // 2
        for M in rows:
            x = torch.randn(M, K, generator=g).to(torch.bfloat16)
            for t in threads:
                torch.set_num_threads(t)
                med = bench({k: (lambda lin=lin: lin(x)) for k, lin in lins.items()}, a.reps)
                r = {"N": N, "K": K, "M": M, "threads": t, "group": a.group,
                     **{f"{k}_ms": 1e3 * v for k, v in med.items()},
                     **{f"{k}_gbps": nbytes / v / 1e9 for k, v in med.items()},
                     "speedup": med["torch"] / med["native"]}
                out.append(r)
                print(f"{N:>6}x{K:<5} {M:>3} {t:>3} {r['torch_ms']:>9.3f} {r['native_ms']:>9.3f} "
                      f"{r['torch_gbps']:>10.2f} {r['native_gbps']:>11.2f} {r['speedup']:>7.2f}x", flush=True)
    torch.set_num_threads(before)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
