"""What `quantize` spends per expert outside the codec's arithmetic: one expert (gate, up [I, D], down [D, I],
random bf16) encoded as `quantize` encodes it (the codec, then its error check: quant.codec.encode_checked),
with glibc's default allocator and inside utils.reuse_freed_memory (every allocation from the heap, freed memory
kept), in blocks of --reps: default, reused, default. Per encode: wall, user and system seconds, minor page faults, bf16 MB/s.

    PYTHONPATH=. python scripts/quant_heap.py [--shape 4096x14336] [--bits 4] [--quantizer rtn] [--threads 2]
        [--reps 3]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from moe_offload.experts import ExpertShape
from moe_offload.quant.codec import HQQCodec, encode_checked, expert_spec
from moe_offload.utils import reuse_freed_memory


def usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="4096x14336", help="D x I")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--quantizer", default="rtn", choices=["rtn", "hqq"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    D, I = (int(v) for v in a.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    w = [(torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16) for n, k in ((I, D), (I, D), (D, I))]
    codec, shape = HQQCodec(expert_spec(a.bits, 64, a.quantizer)), ExpertShape(D, I)
    print(f"expert {D}x{I}, {a.bits}-bit {a.quantizer}, {a.threads} threads; {3 * D * I * 2 / 1e6:.0f} MB of bf16")
    print(f"{'allocator':>14} {'rep':>3} {'wall s':>7} {'user s':>7} {'sys s':>7} {'faults':>9} {'MB/s':>6}")
    # blocks, not alternation: the heap's pages are reused from the second encode inside one context on (as
    # in `quantize`, which holds it for the whole run); the default runs before and after show drift
    for name in ("glibc default", "heap reused", "glibc default"):
        with reuse_freed_memory() if name == "heap reused" else _Nothing():
            for rep in range(a.reps):
                u0, s0, f0 = usage()
                t0 = time.perf_counter()
                encode_checked(codec, *w, act=shape)
                t = time.perf_counter() - t0
                u1, s1, f1 = usage()
                print(f"{name:>14} {rep:>3} {t:>7.2f} {u1 - u0:>7.2f} {s1 - s0:>7.2f} {f1 - f0:>9} "
                      f"{3 * D * I * 2 / t / 1e6:>6.0f}", flush=True)
    return 0


class _Nothing:
    def __enter__(self):
        return False

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    raise SystemExit(main())
