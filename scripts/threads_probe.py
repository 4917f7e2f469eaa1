"""What one parallel region costs on this machine now: a few small ops at 1 thread and at N threads (ms per
call, wall time). On an oversubscribed machine an op that torch runs on 2 threads waits for a descheduled
thread, so multi-thread profiles measure the scheduler; run this next to scripts/profile_step.py.

    python scripts/threads_probe.py --threads 1,2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def ms(f, n: int = 20) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return round((time.perf_counter() - t0) / n * 1e3, 2)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2")
    a = p.parse_args()
    w = (torch.randn(1536, 2048) * 0.02).bfloat16()  # a Qwen3-30B-A3B expert's gate_up
    wf, x = w.float(), torch.randn(32, 2048)
    xb = x.bfloat16()
    for th in (int(t) for t in a.threads.split(",")):
        torch.set_num_threads(th)
        cast_x, cast_w = ms(lambda: xb.float()), ms(lambda: w.float())
        gemm32, gemm16 = ms(lambda: F.linear(x, wf)), ms(lambda: F.linear(xb, w))
        print(f"threads {th}: x[32,2048].float() {cast_x} ms, w.float() {cast_w} ms, fp32 GEMM {gemm32} ms, "
              f"bf16 GEMM {gemm16} ms", flush=True)


if __name__ == "__main__":
    main()
