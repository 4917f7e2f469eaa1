"""One-query attention: SDPA against models.base.attend_one (two matmuls + softmax in fp32), per call, in CPU
microseconds of this process (time.process_time), 1 thread, for the bundled model's and Mixtral's head shapes.

    python scripts/attn_bench.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from moe_offload.models.base import attend_one, one_query_pays


def per_call_us(f, n: int = 500) -> float:
    f()
    t0 = time.process_time()
    for _ in range(n):
        f()
    return (time.process_time() - t0) / n * 1e6


def main():
    torch.set_num_threads(1)
    print("dtype H K Hd S  sdpa_us one_us  one_query_pays")
    for dt in (torch.bfloat16, torch.float32):
        for H, K, Hd, S in ((8, 4, 32, 40), (8, 4, 32, 500), (32, 8, 128, 64), (32, 8, 128, 512)):
            q = torch.randn(1, H, 1, Hd).to(dt)
            k, v = torch.randn(1, K, S, Hd).to(dt), torch.randn(1, K, S, Hd).to(dt)
            a = per_call_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=K != H))
            b = per_call_us(lambda: attend_one(q, k, v, None, None))
            print(f"{str(dt)[6:]} {H} {K} {Hd} {S} {a:.0f} {b:.0f} {one_query_pays(q, k)}", flush=True)


if __name__ == "__main__":
    main()
