"""Quantizing rate at real widths: one expert of the given shape encoded by the 4-bit codec with each quantizer
(what `moe-offload quantize --quantizer hqq|rtn` does per expert), and the time that rate gives for the full
Mixtral-8x7B and Qwen3-30B-A3B on this machine.

    PYTHONPATH=. python scripts/quant_rate.py [--hidden 4096 --intermediate 14336] [--quantizers rtn,hqq]
"""

from __future__ import annotations

import argparse
import time

import torch

FULL = {  # routed experts and their (hidden, intermediate) as published
    "Mixtral-8x7B": (32 * 8, 4096, 14336),
    "Qwen3-30B-A3B": (48 * 128, 2048, 768),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--quantizers", default="rtn,hqq")
    p.add_argument("--bits", type=int, default=4)
    a = p.parse_args()
    from moe_offload.codecs import make_codec

    D, inter = a.hidden, a.intermediate
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(inter, D, generator=g, dtype=torch.bfloat16) * 0.02 for _ in range(2))
    down = torch.randn(D, inter, generator=g, dtype=torch.bfloat16) * 0.02
    src = 3 * D * inter * 2  # bf16 bytes of one expert
    print(f"one expert {D}x{inter} ({src / 2**20:.0f} MiB bf16), {torch.get_num_threads()} threads")
    for q in a.quantizers.split(","):
        codec = make_codec({"name": "hqq", "bits": a.bits, "quantizer": q})
        t0 = time.perf_counter()
        codec.encode(gate, up, down)
        dt = time.perf_counter() - t0
        rate = src / dt
        est = ", ".join(f"{name} {n * 3 * h * i * 2 / rate / 3600:.1f} h" for name, (n, h, i) in FULL.items())
        print(f"{q}: {dt:.1f} s per expert = {rate / 1e6:.1f} MB/s of bf16 weights; at that rate: {est}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
