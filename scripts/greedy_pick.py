"""Greedy decoding's pick over a vocabulary of logits: torch.argmax against max(0).indices (the same index:
the first of equal maxima, a NaN's if any), the median us per call, interleaved.

    PYTHONPATH=. python scripts/greedy_pick.py [--vocab 151936,32000] [--threads 1,2] [--reps 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", default="151936,32000")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=300)
    a = p.parse_args()
    fns = {"argmax": lambda x: int(torch.argmax(x)), "max(0).indices": lambda x: int(x.max(0).indices)}
    print(f"{'vocab':>7} {'thr':>3} {'argmax us':>10} {'max(0) us':>10} {'ratio':>6}")
    for V in map(int, a.vocab.split(",")):
        x = torch.randn(V, generator=torch.Generator().manual_seed(0))
        assert len({f(x) for f in fns.values()}) == 1
        for t in map(int, a.threads.split(",")):
            torch.set_num_threads(t)
            ts = {k: [] for k in fns}
            for _ in range(a.reps):
                for k, f in fns.items():
                    t0 = time.perf_counter()
                    f(x)
                    ts[k].append(time.perf_counter() - t0)
            m = {k: 1e6 * statistics.median(v) for k, v in ts.items()}
            print(f"{V:>7} {t:>3} {m['argmax']:>10.1f} {m['max(0).indices']:>10.1f} "
                  f"{m['argmax'] / m['max(0).indices']:>5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
