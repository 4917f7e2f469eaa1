"""Native AVX2 4-bit kernel (quant/native, "native4") vs torch's int4pack (`_weight_int4pack_mm_for_cpu`),
one matrix at a time, at Mixtral-8x7B's and Qwen3-30B-A3B's expert widths.

    PYTHONPATH=. python scripts/native_q4_bench.py [--shapes 14336x4096,4096x14336,768x2048,2048x768]
        [--rows 1,4,16] [--threads 1,2] [--group 64] [--reps 15] [--overhead] [--json out.json]
    PYTHONPATH=. python scripts/native_q4_bench.py --errors [--shapes ...] [--rows 16]
    PYTHONPATH=. python scripts/native_q4_bench.py --experts [--experts-shapes 2048x768,4096x14336]
        [--rows 1,4] [--threads 1,2]
    PYTHONPATH=. python scripts/native_q4_bench.py --layer [--layer-shapes 2048x768x128x8,4096x14336x8x2]
        [--threads 1,2]
    PYTHONPATH=. python scripts/native_q4_bench.py --half [--shapes ...] [--cold 256] [--threads 1,2]
    PYTHONPATH=. python scripts/native_q4_bench.py --layer --isa [--layer-shapes ...] [--threads 1,2]
    PYTHONPATH=. python scripts/native_q4_bench.py --dequant [--shapes ...] [--threads 1,2]

Per shape (N×K, 4-bit codes, bf16 activations as the engine's compute dtype), rows M and threads: the median
ms per call of each system and GB/s of 4-bit code bytes (N·K/2 / time), and the median CPU ms per call (the
process's CPU time: what a call costs without the time it sat descheduled on a busy machine). The two systems
are interleaved call by call (the machine is shared and noisy), so the ratios torch/native of one row are
measured under the same load. --overhead adds a 32×64 matrix: the fixed cost per call (ctypes, activation
rounding, allocation).
--half: 16-bit weights (float16 and bfloat16), models.base.linear without the native kernel (F.linear, or its
fp32 upcast for 4+ rows of a CPU without half GEMMs) against the native GEMV (q4.c's h16_mm, what it runs up to
NATIVE_ROWS rows), GB/s of 16-bit weight bytes.
--experts: whole 4-bit SwiGLU experts (D×I: gate_up [2I, D], down [D, I]) as the engine decodes them, the
fused native call (q4.c's q4_expert, one parallel region) against the same unit unfused (two kernel calls and
the torch ops between), interleaved the same way.
The matrices are random (RTN, bf16 meta): the kernels' speed does not depend on the values.
--layer: one decode token through a MoE layer's experts (D×I×E×A: E resident, A routed per token, a fresh
route each call), expert by expert as the dispatch ran them against one native call for the token's experts
(q4.c's q4_moe).
--layer --isa: the same one-call token (q4_moe) through two builds of q4.c, AVX2 only against this CPU's additions
(native.isa_flags(): VNNI's one-instruction int8 dot), interleaved call by call; the outputs must be the same bits.
--dequant: PackedMatrix.dequantize to bf16 (what prefill's dense path does per chunk of rows) by q4.c's q4_dequant
against the torch ops it replaces, interleaved; GB/s of bf16 weights written.
--errors: instead of timings, each system's output error against the fp32 reference x @ W_deq^T (W_deq the
dequantised fp32 weights: what both kernels approximate) over --rows rows of Gaussian and of heavy-tailed
(Student-t, 3 dof) activations: relative Frobenius error, and the largest |error| over the reference's RMS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from moe_offload.quant.hqq import quantize
from moe_offload.quant.kernels import (
    NATIVE_LAYOUT,
    Int4Linear,
    NativeQ4Linear,
    PackedMatrix,
    host_layout,
    native_available,
)


def shape_list(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def bench(fns: dict, reps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and CPU seconds per call of each fn, interleaved call by call after a warm-up. CPU time is
    the process's (all its threads, spinning ones included): on a shared machine it leaves out the time the
    call spent descheduled, which wall time counts."""
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            c, t = time.process_time(), time.perf_counter()
            fn()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    med = lambda d: {k: statistics.median(v) for k, v in d.items()}  # noqa: E731
    return med(wall), med(cpu)


def errors(shapes: list[tuple[int, int]], M: int, group: int) -> int:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # (torch.distributions draws from the global generator)
    print(f"{'N x K':>12} {'x':>9} {'torch rel':>10} {'native rel':>10} {'torch max/rms':>13} "
          f"{'native max/rms':>14}")
    for N, K in shapes:
        q = quantize(torch.randn(N, K, generator=g), 4, group, 16, "rtn")
        lins = {"torch": Int4Linear(PackedMatrix.from_quantized(q, host_layout()), dense_rows=M),
                "native": NativeQ4Linear(PackedMatrix.from_quantized(q, NATIVE_LAYOUT), dense_rows=M)}
        W = q.dequantize()
        for name, x in (("gaussian", torch.randn(M, K, generator=g)),
                        ("student-t", torch.distributions.StudentT(3.0).sample((M, K)))):
            ref = x @ W.t()
            rms = ref.pow(2).mean().sqrt()
            e = {k: lin(x.to(torch.bfloat16)).float() - ref for k, lin in lins.items()}
            rel = {k: float(v.norm() / ref.norm()) for k, v in e.items()}
            mx = {k: float(v.abs().max() / rms) for k, v in e.items()}
            print(f"{N:>6}x{K:<5} {name:>9} {rel['torch']:>10.5f} {rel['native']:>10.5f} "
                  f"{mx['torch']:>13.4f} {mx['native']:>14.4f}", flush=True)
    return 0


def experts(shapes: list[tuple[int, int]], rows: list[int], threads: list[int], group: int, reps: int) -> int:
    from moe_offload.experts import ExpertShape
    from moe_offload.quant.codec import HQQCodec, expert_spec

    g = torch.Generator().manual_seed(0)
    print(f"{'D x I':>12} {'M':>3} {'thr':>3} {'unfused ms':>10} {'fused ms':>9} {'speed-up':>8} "
          f"{'unfused cpu':>11} {'fused cpu':>9}", flush=True)
    for D, I in shapes:
        codec = HQQCodec({**expert_spec(4, group, "rtn"), "layout": NATIVE_LAYOUT})
        w = [torch.randn(n, k, generator=g) * 0.02 for n, k in ((I, D), (I, D), (D, I))]
        unit = codec.decode(codec.encode(*w), ExpertShape(D, I), torch.bfloat16)
        del w
        if not unit.fused:
            print(f"{D}x{I}: no fused path here", file=sys.stderr)
            return 2

        def call(fused: bool, x):
            unit.fused = fused
            return unit(x)

        for M in rows:
            x = torch.randn(M, D, generator=g).to(torch.bfloat16)
            for t in threads:
                torch.set_num_threads(t)
                med, cpu = bench({"unfused": lambda: call(False, x), "fused": lambda: call(True, x)}, reps)
                print(f"{D:>6}x{I:<5} {M:>3} {t:>3} {1e3 * med['unfused']:>10.3f} {1e3 * med['fused']:>9.3f} "
                      f"{med['unfused'] / med['fused']:>7.2f}x {1e3 * cpu['unfused']:>11.3f} "
                      f"{1e3 * cpu['fused']:>9.3f}", flush=True)
    return 0


def layer(specs: list[tuple[int, ...]], threads: list[int], group: int, reps: int, isa: bool = False) -> int:
    """One decode token through a layer's A of E resident 4-bit experts (D x I x E x A), as the engine's
    dispatch runs it: expert by expert (each a fused call, weighted, summed in torch) against one native call
    for the A experts (q4.c's q4_moe). Each call routes to a fresh random A of the E experts, so at Qwen3's
    E = 128 the weights come from RAM as in decode. GB/s of the A experts' 4-bit bytes."""
    from moe_offload.experts import ExpertShape, LocalExperts
    from moe_offload.quant.codec import HQQCodec, QuantExpert, expert_spec

    from moe_offload.quant import native

    g = torch.Generator().manual_seed(0)
    run_group = QuantExpert.run_group
    names = ("avx2", "+" + ",".join(f.removeprefix("-m") for f in native.isa_flags())) if isa else (
        "per-expert", "one call")
    if isa:
        libs = {names[0]: native.lib(()), names[1]: native.lib()}
        if not native.isa_flags() or None in libs.values():
            print("this CPU adds nothing to the AVX2 build (or a build failed)", file=sys.stderr)
            return 2
    print(f"{'D x I x E x A':>18} {'thr':>3} {names[0] + ' ms':>13} {names[1] + ' ms':>13} {names[0] + ' GB/s':>15} "
          f"{names[1] + ' GB/s':>15} {'speed-up':>8}", flush=True)
    for D, I, E, A in specs:
        codec = HQQCodec({**expert_spec(4, group, "rtn"), "layout": NATIVE_LAYOUT})
        units = []
        for _ in range(E):
            w = [torch.randn(n, k, generator=g) * 0.02 for n, k in ((I, D), (I, D), (D, I))]
            units.append(codec.decode(codec.encode(*w), ExpertShape(D, I), torch.bfloat16))
        experts_ = LocalExperts(units)
        x = torch.randn(1, D, generator=g).to(torch.bfloat16)
        routes = [torch.randperm(E, generator=g)[:A][None] for _ in range(64)]
        w = torch.softmax(torch.randn(1, A, generator=g), -1).to(torch.bfloat16)
        turn = iter(range(1 << 30))

        def call(grouped: bool):
            QuantExpert.run_group = staticmethod(run_group if grouped else lambda *a, **k: None)
            return experts_(x, routes[next(turn) % len(routes)], w)

        def call_with(lib):  # every unit's gate_up carries the library q4_moe is called through
            for u in units:
                u.gate_up.lib = lib
            return experts_(x, routes[next(turn) % len(routes)], w)

        if isa:
            fns = {k: (lambda lib=lib: call_with(lib)) for k, lib in libs.items()}
            outs = []
            for lib in libs.values():
                turn = iter(range(1 << 30))  # the same route for both
                outs.append(call_with(lib))
            if not torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16)):
                print(f"{D}x{I}x{E}x{A}: the two builds give different bits", file=sys.stderr)
                return 1
            turn = iter(range(1 << 30))
        else:
            fns = {names[0]: lambda: call(False), names[1]: lambda: call(True)}
        nbytes = A * 3 * I * D / 2
        for t in threads:
            torch.set_num_threads(t)
            med, _ = bench(fns, reps)
            gb = {k: nbytes / v / 1e9 for k, v in med.items()}
            a, b = names
            print(f"{D:>5}x{I}x{E}x{A:<4} {t:>3} {1e3 * med[a]:>13.3f} {1e3 * med[b]:>13.3f} "
                  f"{gb[a]:>15.2f} {gb[b]:>15.2f} {med[a] / med[b]:>7.2f}x", flush=True)
    QuantExpert.run_group = staticmethod(run_group)
    return 0


def dequant(shapes, threads, group: int, reps: int) -> int:
    g = torch.Generator().manual_seed(0)
    print(f"{'N x K':>12} {'thr':>3} {'torch ms':>9} {'native ms':>9} {'torch GB/s':>10} {'native GB/s':>11} "
          f"{'speed-up':>8}", flush=True)
    for N, K in shapes:
        pm = PackedMatrix.from_quantized(quantize(torch.randn(N, K, generator=g), 4, group, 16, "rtn"), NATIVE_LAYOUT)
        ops = PackedMatrix(pm.packed, pm.sz, 4, N, K, pm.layout)
        ops._dequantize_native = lambda out, start: False  # the torch path
        assert pm._dequantize_native(torch.empty(1, K, dtype=torch.bfloat16), 0), "q4_dequant refused the matrix"
        for t in threads:
            torch.set_num_threads(t)
            med, _ = bench({"torch": lambda: ops.dequantize(torch.bfloat16),
                            "native": lambda: pm.dequantize(torch.bfloat16)}, reps)
            gb = {k: 2 * N * K / v / 1e9 for k, v in med.items()}
            print(f"{N:>6}x{K:<5} {t:>3} {1e3 * med['torch']:>9.2f} {1e3 * med['native']:>9.2f} {gb['torch']:>10.2f} "
                  f"{gb['native']:>11.2f} {med['torch'] / med['native']:>7.2f}x", flush=True)
    return 0


def half(shapes, rows, threads, reps: int, cold: int) -> int:
    from moe_offload.models import base
    from moe_offload.models.base import native_gemv

    def torch_path(x, w):  # what models.base.linear runs without the native kernel: F.linear, or fp32 upcast
        saved, base.NATIVE_ROWS = base.NATIVE_ROWS, 0
        try:
            return base.linear(x, w)
        finally:
            base.NATIVE_ROWS = saved

    g = torch.Generator().manual_seed(0)
    print(f"{'N x K':>12} {'dtype':>8} {'M':>3} {'thr':>3} {'torch GB/s':>10} {'native GB/s':>11} {'speed-up':>8}")
    for N, K in shapes:
        for dt in (torch.float16, torch.bfloat16):
            copies = max(1, (cold << 20) // (2 * N * K)) if cold else 1
            ws = [(torch.randn(N, K, generator=g) * 0.02).to(dt) for _ in range(copies)]
            for M in rows:
                if M > base.NATIVE_ROWS:
                    print(f"{N:>6}x{K:<5} {str(dt)[6:]:>8} {M:>3}: past NATIVE_ROWS ({base.NATIVE_ROWS}): torch's path")
                    continue
                x = torch.randn(M, K, generator=g).to(dt)
                for t in threads:
                    torch.set_num_threads(t)
                    med, _ = bench({"torch": lambda: [torch_path(x, w) for w in ws],
                                    "native": lambda: [native_gemv(x, w) for w in ws]}, reps)
                    gb = {k: 2 * N * K * copies / v / 1e9 for k, v in med.items()}
                    print(f"{N:>6}x{K:<5} {str(dt)[6:]:>8} {M:>3} {t:>3} {gb['torch']:>10.2f} {gb['native']:>11.2f} "
                          f"{med['torch'] / med['native']:>7.2f}x", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="14336x4096,4096x14336,768x2048,2048x768")
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--errors", action="store_true")
    ap.add_argument("--experts", action="store_true")
    ap.add_argument("--half", action="store_true")
    ap.add_argument("--baseline", choices=["torch", "r64", "r64t", "avx2"], default="torch",
                    help="what the native kernel (this machine's layout, r64i) is compared with: torch's int4pack, "
                         "or the native kernel over r64 (row-major tiles, meta [G, N, 2]) or r64t (row-major "
                         "tiles, meta in tiles), or avx2: over r64i, built without this CPU's additions (VNNI)")
    ap.add_argument("--cold", type=int, default=0, metavar="MIB",
                    help="cycle each system over copies of the matrix filling MIB MiB, so every call reads its "
                         "weights from RAM, not cache (decode's case)")
    ap.add_argument("--experts-shapes", default="2048x768,4096x14336")
    ap.add_argument("--layer", action="store_true")
    ap.add_argument("--dequant", action="store_true")
    ap.add_argument("--isa", action="store_true", help="with --layer: the AVX2 build against this CPU's additions")
    ap.add_argument("--layer-shapes", default="2048x768x128x8,4096x14336x8x2", help="D x I x E x A, comma-separated")
    a = ap.parse_args(argv)
    if not native_available() or host_layout() is None:
        print("needs both the native kernel (a C compiler, AVX2+FMA) and torch's int4pack kernel",
              file=sys.stderr)
        return 2
    if a.half:
        return half(shape_list(a.shapes), [int(r) for r in a.rows.split(",")], [int(t) for t in a.threads.split(",")],
                    a.reps, a.cold)
    if a.experts:
        return experts(shape_list(a.experts_shapes), [int(r) for r in a.rows.split(",")],
                       [int(t) for t in a.threads.split(",")], a.group, a.reps)
    if a.dequant:
        return dequant(shape_list(a.shapes), [int(t) for t in a.threads.split(",")], a.group, a.reps)
    if a.layer:
        return layer(shape_list(a.layer_shapes), [int(t) for t in a.threads.split(",")], a.group, a.reps, a.isa)
    if a.errors:
        return errors(shape_list(a.shapes), int(a.rows.split(",")[-1]), a.group)
    shapes = shape_list(a.shapes) + ([(32, 64)] if a.overhead else [])
    rows = [int(r) for r in a.rows.split(",")]
    threads = [int(t) for t in a.threads.split(",")]
    before = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    out = []
    if a.baseline != "torch":
        print(f"baseline: the native kernel over {a.baseline} (columns 'torch'); 'native': over {NATIVE_LAYOUT}"
              + (f"; each call on weights cycled over {a.cold} MiB (cold)" if a.cold else ""))
    print(f"{'N x K':>12} {'M':>3} {'thr':>3} {'torch ms':>9} {'native ms':>9} {'torch GB/s':>10} "
          f"{'native GB/s':>11} {'speed-up':>8} {'torch cpu':>9} {'native cpu':>9} {'cpu ×':>8}", flush=True)
    for N, K in shapes:
        q = quantize(torch.randn(N, K, generator=g), 4, a.group, 16, "rtn")

        def make(kind, q=q):
            if kind == "torch":
                return Int4Linear(PackedMatrix.from_quantized(q, host_layout()), dense_rows=max(rows))
            layout = NATIVE_LAYOUT if kind == "avx2" else kind
            pm = PackedMatrix.from_quantized(q, layout)
            lin = NativeQ4Linear(PackedMatrix(pm.packed.clone(), pm.sz.clone(), 4, N, K, pm.layout),
                                 dense_rows=max(rows), layout=layout)
            if kind == "avx2":  # the same kernel built without this CPU's additions (native.isa_flags())
                from moe_offload.quant import native

                lin.call = native.lib(()).q4_call
            return lin

        copies = max(1, (a.cold << 20) // (N * K // 2)) if a.cold else 1
        # (the column says torch; with --baseline r64 / r64t it is the native kernel over that layout)
        sets = {"torch": [make(a.baseline) for _ in range(copies)],
                "native": [make(NATIVE_LAYOUT) for _ in range(copies)]}
        del q
        nbytes = N * K // 2
        for M in rows:
            x = torch.randn(M, K, generator=g).to(torch.bfloat16)
            for t in threads:
                torch.set_num_threads(t)
                def cycle(lins):
                    for lin in lins:
                        lin(x)

                med, cpu = bench({k: (lambda lins=lins: cycle(lins)) for k, lins in sets.items()}, a.reps)
                med = {k: v / copies for k, v in med.items()}
                cpu = {k: v / copies for k, v in cpu.items()}
                r = {"N": N, "K": K, "M": M, "threads": t, "group": a.group,
                     **{f"{k}_ms": 1e3 * v for k, v in med.items()},
                     **{f"{k}_gbps": nbytes / v / 1e9 for k, v in med.items()},
                     "speedup": med["torch"] / med["native"],
                     **{f"{k}_cpu_ms": 1e3 * v for k, v in cpu.items()},
                     "cpu_speedup": cpu["torch"] / max(cpu["native"], 1e-9)}
                out.append(r)
                print(f"{N:>6}x{K:<5} {M:>3} {t:>3} {r['torch_ms']:>9.3f} {r['native_ms']:>9.3f} "
                      f"{r['torch_gbps']:>10.2f} {r['native_gbps']:>11.2f} {r['speedup']:>7.2f}x "
                      f"{r['torch_cpu_ms']:>9.3f} {r['native_cpu_ms']:>9.3f} {r['cpu_speedup']:>7.2f}x",
                      flush=True)
    torch.set_num_threads(before)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
