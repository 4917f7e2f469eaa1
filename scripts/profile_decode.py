"""Where a decode token's time goes: torch.profiler over N greedy decode steps of one store, ops grouped into
expert kernels, attention, routing, norms/elementwise and the rest; prefill profiled apart.

    PYTHONPATH=. python scripts/profile_decode.py STORE [--memory 4GiB] [--threads 2] [--prompt-tokens 16]
        [--new-tokens 8] [--dtype float16] [--top 15] [--preload auto|on|off]

Prints per phase (prefill, decode): wall ms per token, the profiler's self-CPU ms per token by group, and the
top ops by self CPU time. The groups are a reading aid: an op's name decides its group (GROUPS, first match).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

# op-name substring -> group (first match wins); what matches none is "other"
GROUPS = [
    ("native q4 expert", "expert kernel (native, fused)"), ("native q4 linear", "native 4-bit linear"),
    ("int4", "expert kernel (int4)"), ("_weight_int4pack_mm", "expert kernel (int4)"),
    ("convert_weight_to_int4pack", "int4 layout conversion"),
    ("scaled_dot_product", "attention"), ("softmax", "attention/routing softmax"),
    ("aten::mm", "matmul (dense)"), ("aten::addmm", "matmul (dense)"), ("aten::bmm", "matmul (dense)"),
    ("aten::linear", "matmul (dense)"), ("aten::matmul", "matmul (dense)"),
    ("topk", "routing"), ("sort", "routing"), ("unique", "routing"), ("index", "indexing"),
    ("aten::copy_", "copies/casts"), ("aten::cat", "copies/casts"), ("aten::to", "copies/casts"), ("_to_copy", "copies/casts"),
    ("rsqrt", "norm"), ("pow", "norm"), ("mean", "norm"),
    ("pread", "disk"), ("read", "disk"),
]


def label_native_calls() -> None:
    """The native kernel runs through ctypes, which the profiler does not see: wrap its two entry points in
    record_function so their time is an op of its own (a few µs of overhead per call while profiling)."""
    from torch.profiler import record_function

    from moe_offload.quant import codec, kernels

    fused, moe, call = codec.fused_expert, codec.fused_moe, kernels.NativeQ4Linear.__call__

    def fused_expert(gate_up, down, x):
        with record_function("native q4 expert"):
            return fused(gate_up, down, x)

    def fused_moe(experts, x, weights, each=False):
        with record_function("native q4 experts (one call a layer)"):
            return moe(experts, x, weights, each)

    def linear(self, x):
        with record_function("native q4 linear"):
            return call(self, x)

    codec.fused_expert, codec.fused_moe, kernels.NativeQ4Linear.__call__ = fused_expert, fused_moe, linear


def group(name: str) -> str:
    for key, g in GROUPS:
        if key in name:
            return g
    return "other"


def report(prof, tokens: int, wall: float, label: str, top: int) -> None:
    events = prof.key_averages()
    by: dict[str, float] = {}
    for e in events:
        by[group(e.key)] = by.get(group(e.key), 0.0) + e.self_cpu_time_total / 1e3
    total = sum(by.values())
    print(f"\n## {label}: {tokens} tokens, wall {1e3 * wall / tokens:.1f} ms/token, profiled self CPU "
          f"{total / tokens:.1f} ms/token, {sum(e.count for e in events) / tokens:.0f} ops/token")
    print("| group | self CPU ms / token | share |\n|---|---|---|")
    for g, ms in sorted(by.items(), key=lambda kv: -kv[1]):
        print(f"| {g} | {ms / tokens:.2f} | {100 * ms / total:.1f} % |")
    print(f"\ntop {top} ops by self CPU:\n")
    print(events.table(sort_by="self_cpu_time_total", row_limit=top))
    print(f"\ntop {top} ops by calls:\n")
    print(events.table(sort_by="count", row_limit=top))


def ops_by_line(engine, ids: list[int], tokens: int, top: int) -> None:
    """Count the torch ops of `tokens` decode steps by the innermost moe_offload frame that issued them."""
    import sys
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            f = sys._getframe(1)
            while f is not None and "moe_offload" not in f.f_code.co_filename:
                f = f.f_back
            where = f"{f.f_code.co_filename.rsplit('moe_offload/', 1)[-1]}:{f.f_lineno}" if f else "?"
            counts[(where, func.__name__)] += 1
            return func(*args, **(kwargs or {}))

    it = engine.stream_generate(prompt_ids=ids, max_new_tokens=tokens + 1, ignore_eos=True, temperature=0.0)
    next(it)
    with Count():
        for _ in it:
            pass
    total = sum(counts.values())
    print(f"\n## decode ops by calling line: {total / tokens:.0f} dispatched ops/token (views included)\n")
    print("| ops / token | line | op |\n|---|---|---|")
    for (where, op), n in counts.most_common(top):
        print(f"| {n / tokens:.1f} | {where} | {op} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--memory", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--preload", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--by-line", type=int, default=0, metavar="N",
                   help="also count a decode token's torch ops by the moe_offload source line that called them "
                        "(the N busiest lines; no timing)")
    a = p.parse_args()
    from moe_offload.runtime.load import load
    from moe_offload.utils import parse_size

    torch.set_num_threads(a.threads)
    label_native_calls()
    engine = load(a.store, device="cpu", dtype=a.dtype, memory=parse_size(a.memory), preload=a.preload)
    ids = list(range(3, 3 + a.prompt_tokens))
    engine.generate(prompt_ids=ids[:4], max_new_tokens=2, ignore_eos=True, temperature=0.0)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        it = engine.stream_generate(prompt_ids=ids, max_new_tokens=1, ignore_eos=True, temperature=0.0)
        for _ in it:
            pass
        pre = time.perf_counter() - t0
    report(prof, a.prompt_tokens, pre, "prefill", a.top)
    it = engine.stream_generate(prompt_ids=ids, max_new_tokens=a.new_tokens + 1, ignore_eos=True, temperature=0.0)
    next(it)  # prefill outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        last = None
        for r in it:
            last = r
        dec = time.perf_counter() - t0
    report(prof, a.new_tokens, dec, "decode", a.top)
    if a.by_line:
        ops_by_line(engine, ids, a.new_tokens, a.by_line)
    if last is not None:
        s = last.stats
        print(f"\nengine stats: decode {s.get('decode_tokens_per_s', 0):.2f} tok/s, hits {s.get('expert_hits')}, "
              f"misses {s.get('expert_misses')}, stall {s.get('stall_seconds', 0):.2f} s, resident weights "
              f"{s.get('resident_weight_bytes', 0) / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
