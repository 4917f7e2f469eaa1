"""The error each GGUF tensor type picks up on its way into our store, against gguf's own dequantization.

    PYTHONPATH=. python scripts/gguf_errors.py [--rows 1024] [--cols 4096]

Per type: the weights one expert matrix computes with after import (the "gguf" codec's q4/q8 units, or the
dense store dtype) against `gguf.quants.dequantize` of the same blocks: max |error| / max |w|, and the
relative Frobenius error; and, for the types quantized here, the type's own error against the Gaussian
matrix it was quantized from (what the import's error adds to). Types the gguf package can quantize are quantized from a Gaussian matrix; the
K-quants it cannot write are random valid blocks (random bytes, fixed fp16 super-block scales).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import gguf
from gguf.quants import dequantize, quantize
from moe_offload.experts import ExpertShape
from moe_offload.quant.ggml import KEPT, GGUFCodec

T = gguf.GGMLQuantizationType
QUANTIZABLE = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4"]
RANDOM_BLOCKS = {"Q2_K": 80, "Q3_K": 108, "Q4_K": 0, "Q5_K": 0, "Q6_K": 208}  # type: byte offset of its fp16 d
WITH_DMIN = ("Q2_K", "Q4_K", "Q5_K")  # an fp16 dmin right after d


def blocks_for(name: str, W: np.ndarray, rng) -> np.ndarray:
    if name in QUANTIZABLE:
        return quantize(W, T[name])
    bs, ts = gguf.GGML_QUANT_SIZES[T[name]]
    N, K = W.shape
    b = rng.integers(0, 256, (N, K // bs, ts), dtype=np.uint8)
    d = RANDOM_BLOCKS[name]
    b[..., d:d + 2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    if name in WITH_DMIN:
        b[..., d + 2:d + 4] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)
    return b.reshape(N, -1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(a.seed)
    N, K = a.rows, a.cols
    W = (0.02 * rng.standard_normal((N, K))).astype(np.float32)
    print(f"{N}x{K} matrix, Gaussian std 0.02 (quantizable types) or random blocks (K-quants)")
    print(f"{'type':7} {'kept as':9} {'max|err|/max|w|':>16} {'rel. Frobenius':>15} {'type itself vs W':>17}")
    for name in [*QUANTIZABLE, *RANDOM_BLOCKS]:
        blk = blocks_for(name, W, rng)
        ref = dequantize(blk, T[name])
        own = f"{np.linalg.norm(ref - W) / np.linalg.norm(W):17.2e}" if name in QUANTIZABLE else ""
        for fmt in ([KEPT[name]] if name in KEPT else ["bfloat16", "float16"]):
            shape = ExpertShape(K, N // 2)  # the matrix as gate_up [2I, D] of one expert; down unused
            codec = GGUFCodec({"gate_up": fmt, "down": "float32"})
            half = N // 2
            if fmt in ("q4", "q8"):
                parts = {"gate": (name, blk[:half]), "up": (name, blk[half:])}
            else:
                parts = {"gate": ("F32", ref[:half]), "up": ("F32", ref[half:])}
            parts["down"] = ("F32", np.zeros((K, half), np.float32))
            ours = codec.dequantize(codec.encode_blocks(shape, parts), shape)[0].numpy()
            err = np.abs(ours - ref)
            rel = float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))
            print(f"{name:7} {fmt:9} {err.max() / np.abs(ref).max():16.2e} {rel:15.2e} {own}")


if __name__ == "__main__":
    main()
