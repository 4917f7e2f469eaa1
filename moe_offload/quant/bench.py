"""Kernel timings and quantizer errors on this machine.

    python -m moe_offload.quant.bench [--n 14336 --k 4096 --threads 1]     kernels
    python -m moe_offload.quant.bench --errors                              RTN / HQQ errors, bits/weight
    python -m moe_offload.quant.bench --lowrank [--store S --layer L]       bits vs bits + rank, equal bytes

Kernels, per bit width, for one N×K matrix: the kernel at M rows vs dequantise-to-bf16 + F.linear (what
prefill and CUDA do), the one-off cost of making the unit when an expert arrives (2/3-bit expansion, meta8
decode), and the bytes stored vs held. Minimum of --reps runs after a warm-up; nothing is asserted.
Errors: relative Frobenius error of RTN, HQQ (zero only, as the paper) and HQQ with the scale refit (our
default) on 1024×4096 Gaussian and Student-t(3) matrices, with the bits/weight of each codec; the time to
quantize one 14336×4096 matrix.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .hqq import quantize, rel_error
from .kernels import PackedMatrix, make_linear, write_layout


def best_ms(fn, reps: int) -> float:
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return 1e3 * min(out)


def errors() -> None:
    from ..experts import ExpertShape
    from .codec import HQQCodec

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # torch.distributions draws from the global generator
    mats = {"gaussian": torch.randn(1024, 4096, generator=g),
            "student-t3": torch.distributions.StudentT(3.0).sample((1024, 4096))}
    shape = ExpertShape(4096, 14336)
    print(f"{'bits':>4} {'group':>5} {'bits/w':>7} {'matrix':>10} {'rtn':>7} {'hqq':>7} {'hqq+s':>7}")
    for bits, group in ((2, 16), (2, 32), (3, 64), (4, 64), (4, 128), (8, 0)):
        bpw = 8 * HQQCodec({"bits": bits, "group_size": group}).nbytes(shape) / (3 * 4096 * 14336)
        for name, W in mats.items():
            e = [rel_error(W, quantize(W, bits, group, method=m, opt_scale=s).dequantize())
                 for m, s in (("rtn", False), ("hqq", False), ("hqq", True))]
            print(f"{bits:>4} {group:>5} {bpw:>7.3f} {name:>10} " + " ".join(f"{x:>7.4f}" for x in e))
    W = torch.randn(14336, 4096, generator=g) * 0.02
    for method in ("rtn", "hqq"):
        t = time.perf_counter()
        quantize(W, 4, 64, method=method)
        print(f"quantize 14336x4096 4-bit g64 {method}: {time.perf_counter() - t:.1f} s "
              f"({torch.get_num_threads()} thread(s))")


def lowrank_table(store: str | None = None, layer: int = 0, expert: int = 0) -> None:
    """Error and bytes of b bits vs b bits + rank r for one expert (a random one, or one of an HF folder);
    `hull` marks the options the mixed plan could ever pick (mixed.hull)."""
    from . import mixed

    g = torch.Generator().manual_seed(0)
    if store is None:
        D, I = 512, 384
        gate, up, down = (torch.randn(*s, generator=g) * 0.02 for s in ((I, D), (I, D), (D, I)))
        name = f"random expert D={D} I={I}"
    else:
        from ..checkpoint import SafetensorsFolder, expert_tensors, read_config

        cfg = read_config(Path(store))
        p = expert_tensors(SafetensorsFolder(store), cfg["model_type"], layer, expert)
        gate, up, down = p["gate"].float(), p["up"].float(), p["down"].float()
        I, D = gate.shape
        name = f"{store} layer {layer} expert {expert}"
    specs = [{"name": "hqq", "bits": b} for b in (2, 3, 4, 8)]
    ranks = [r for r in (8, 16, 32) if r < min(D, I) // 2]
    specs += [{"name": "hqq", "bits": b, "rank": r} for b in (2, 3) for r in ranks]
    opts = mixed.error_curve(gate, up, down, specs)
    hull = {o.label for o in mixed.hull(opts)}
    print(f"{name}: relative Frobenius error")
    for o in sorted(opts, key=lambda o: o.nbytes):
        print(f"  {o.label:8s} {o.nbytes:9d} B  err {o.err:.4f}  {'hull' if o.label in hull else ''}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=14336)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rows", default="1,4,16,32,64,256")
    p.add_argument("--bits", default="4,3,2,8")
    p.add_argument("--errors", action="store_true", help="print quantizer errors instead of timings")
    p.add_argument("--lowrank", action="store_true", help="print bits vs bits + rank at equal bytes")
    p.add_argument("--store", default=None, help="with --lowrank: a Hugging Face folder to take it from")
    p.add_argument("--layer", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.errors:
        return errors()
    if a.lowrank:
        return lowrank_table(a.store, a.layer)
    N, K = a.n, a.k
    rows = [int(r) for r in a.rows.split(",")]
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.02
    Wb = W.to(torch.bfloat16)
    print(f"{N}x{K}, {a.threads} thread(s), torch {torch.__version__}, ms (min of {a.reps})")
    xs = {m: torch.randn(m, K, dtype=torch.bfloat16) for m in rows}
    dense = "  ".join(f"M={m}: {best_ms(lambda m=m: F.linear(xs[m], Wb), a.reps):.2f}" for m in rows)
    print(f"dense bf16 F.linear   {dense}")
    for bits in (int(b) for b in a.bits.split(",")):
        q = quantize(W, bits, 0 if bits == 8 else (32 if bits == 2 else 64), method="rtn")
        pm = PackedMatrix.from_quantized(q, write_layout())  # as quantize stores it: this CPU's order
        stored = pm.packed.numel() + sum(t.numel() * t.element_size() for t in q.meta.values())
        lin = make_linear(pm, dense_rows=max(rows))  # the kernel at every M
        dense = make_linear(pm, "dense")  # dequantise + F.linear at every M
        arrive = best_ms(lambda: make_linear(pm), a.reps)
        deq = best_ms(lambda: lin.pm.dequantize(torch.bfloat16), a.reps)
        kern = "  ".join(f"M={m}: {best_ms(lambda m=m: lin(xs[m]), a.reps):.2f}" for m in rows)
        dq = "  ".join(f"M={m}: {best_ms(lambda m=m: dense(xs[m]), a.reps):.2f}" for m in rows)
        print(f"{bits}-bit {lin.kind:9s} kernel  {kern}")
        print(f"       dequant+F.linear {dq}")
        print(f"       dequantise->bf16 {deq:.1f}, unit on arrival {arrive:.1f}, "
              f"bytes stored {stored / 2**20:.1f} MiB, held {lin.nbytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
