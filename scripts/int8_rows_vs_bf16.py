"""One token through a Mixtral-width expert down matrix [4096, 14336]: 8-bit codes with one scale/offset per row
(the int8 kernel, what a Q6_K / Q5_K expert matrix could be stored as instead of bfloat16) against the bfloat16
GEMV it is stored as now (DenseLinear). Random weights; times per call, three rounds, ratios inside one run.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/int8_rows_vs_bf16.py
"""

from __future__ import annotations

import time

import torch

from moe_offload.quant.codec import DenseLinear
from moe_offload.quant.hqq import quantize
from moe_offload.quant.kernels import PackedMatrix, make_linear


def per_call(f, x, n: int = 20) -> float:
    f(x)
    f(x)
    t = time.perf_counter()
    for _ in range(n):
        f(x)
    return (time.perf_counter() - t) / n


def main() -> None:
    torch.manual_seed(0)
    N, K = 4096, 14336  # Mixtral's down [D, I]
    W = torch.randn(N, K) * 0.02
    i8 = make_linear(PackedMatrix.from_quantized(quantize(W, 8, 0, 16, "rtn")))
    bf = DenseLinear(W, torch.bfloat16)
    x = torch.randn(1, K, dtype=torch.bfloat16)
    for _ in range(3):
        a, b = per_call(i8, x), per_call(bf, x)
        print(f"{type(i8).__name__}: int8 rows {a * 1e3:.2f} ms, bf16 {b * 1e3:.2f} ms, int8/bf16 {a / b:.2f}")


if __name__ == "__main__":
    main()
