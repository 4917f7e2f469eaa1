"""Peak RSS a prefill-sized call of one quantized matrix adds (M rows > the kernel's dense_rows: dequantise +
GEMM), at Mixtral's gate_up shape by default. Prints the peak RSS growth over the call and its time.

    PYTHONPATH=. python scripts/prefill_transient.py [--n 28672 --k 4096 --rows 256 --dtype float32]
"""

from __future__ import annotations

import argparse
import time

import torch

from moe_offload.quant.hqq import quantize
from moe_offload.quant.kernels import PackedMatrix, make_linear
from moe_offload.utils import proc_status_bytes, reset_peak_rss


def status(key: str) -> float:
    """/proc/self/status `key` in MiB (VmRSS, VmHWM)."""
    return proc_status_bytes(key) / 2**20


def reset_peak() -> float:
    """VmHWM := VmRSS; returns that RSS in MiB."""
    return reset_peak_rss() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=28672)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args()
    torch.set_num_threads(1)
    W = torch.randn(a.n, a.k, generator=torch.Generator().manual_seed(0)) * 0.02
    pm = PackedMatrix.from_quantized(quantize(W, 4, 64, method="rtn"))
    del W
    lin = make_linear(pm, "dense")
    x = torch.randn(a.rows, a.k, dtype=getattr(torch, a.dtype))
    lin(x[:1])  # warm up (kernels, thread pools)
    base = reset_peak()
    t0 = time.perf_counter()
    y = lin(x)
    dt = time.perf_counter() - t0
    grew = status("VmHWM") - base
    print(f"{a.n}x{a.k} 4-bit, {a.rows} rows {a.dtype}: peak RSS +{grew:.0f} MiB over the call "
          f"(weights {pm.packed.numel() / 2**20:.0f} MiB packed, "
          f"output {y.numel() * y.element_size() / 2**20:.0f} MiB), "
          f"{dt * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
