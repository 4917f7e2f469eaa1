"""Load time and the first requests' latency of one store: what a server's first user waits for.

    PYTHONPATH=. python scripts/first_request.py STORE [--threads 2] [--requests 3]

Prints the load's wall time, then each request's (a 4-token prompt, one new token) wall time. A first request
slower than the next ones pays for work the load left undone (kernels built on first use, lazy conversions).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--requests", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from moe_offload.runtime.load import load

    t = time.perf_counter()
    engine = load(a.store, device="cpu", preload="on")
    print(f"load {time.perf_counter() - t:.2f} s")
    for i in range(a.requests):
        t = time.perf_counter()
        engine.generate(prompt_ids=[3, 4, 5, 6], max_new_tokens=1, ignore_eos=True, temperature=0.0)
        print(f"request {i + 1}: {time.perf_counter() - t:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
