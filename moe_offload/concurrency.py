"""`bench --concurrency 1,4,16`: N concurrent streams served one after another (a batch-1 queue, what the
server did) against N served together (one batch: each step fetches an expert once for every stream).

In this process, on our store, at each budget: wall time, tokens per second over all streams (prefill
included: every stream's prompt is part of the work), per-stream latency (submit to last token, all
submitted at t=0) and disk bytes read per generated token. Each row starts from a fresh engine (a cold
cache) after a one-token warm-up. EOS is ignored: every stream makes exactly --new-tokens tokens. The last
column is the share of a batch's greedy tokens equal to the queue's (16-bit kernels may round differently
at another batch size; float32 gives 100 %).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from .errors import UsageError
from .workload import budget_bytes, prompts_for


def run_streams(engine, prompts: list[list[int]], new_tokens: int, batched: bool) -> dict:
    """Every prompt generates `new_tokens` greedy tokens, queued one by one or as one batch."""
    reqs = [dict(prompt_ids=p, max_new_tokens=new_tokens, ignore_eos=True, temperature=0.0) for p in prompts]
    ends, read, tokens, out = [0.0] * len(reqs), 0, 0, [[] for _ in reqs]
    t0 = time.perf_counter()
    if batched:
        for i, r in engine.stream_generate_batch(reqs):
            if r.token is not None:
                out[i].append(r.token)
            if r.finish_reason is not None:
                ends[i] = time.perf_counter() - t0
                tokens += r.generation_tokens
                read += r.stats.get("bytes_read_disk", 0)  # since the previous stream of the batch ended
    else:
        for i, req in enumerate(reqs):
            r = engine.generate(**req)
            out[i] = r.token_ids
            ends[i] = time.perf_counter() - t0
            tokens += len(r.token_ids)
            read += r.stats.get("bytes_read_disk", 0)
    wall = time.perf_counter() - t0
    return {"streams": len(reqs), "mode": "batched" if batched else "queue", "wall_s": wall, "tokens": tokens,
            "tok_s": tokens / wall if wall > 0 else 0.0, "latency_p50_s": statistics.median(ends),
            "latency_max_s": max(ends), "bytes_read_per_token": read / tokens if tokens else 0.0,
            "token_ids": out}


def concurrency_rows(open_engine, levels: list[int], prompts: list[list[int]], new_tokens: int) -> list[dict]:
    """`open_engine()` -> a fresh engine; one queue row and one batched row per level."""
    rows, t0, total = [], time.perf_counter(), 2 * len(levels)
    for n in levels:
        for batched in (False, True):
            engine = open_engine()
            engine.generate(prompt_ids=prompts[0][:2], max_new_tokens=1, ignore_eos=True)  # warm-up
            row = run_streams(engine, prompts[:n], new_tokens, batched)
            if batched:  # 16-bit kernels may round differently at another batch size: count, never hide
                pairs = list(zip(sum(rows[-1]["token_ids"], []), sum(row["token_ids"], [])))
                row["same_tokens"] = sum(a == b for a, b in pairs) / len(pairs) if pairs else 1.0
            rows.append(row)
            left = (time.perf_counter() - t0) / len(rows) * (total - len(rows))  # rows grow with n: a floor
            print(f"bench: [{len(rows)}/{total}] {n} streams {row['mode']}: {row['tok_s']:.2f} tok/s, "
                  f"p50 latency {row['latency_p50_s']:.2f} s; ETA >= {left:.0f} s", file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| budget | streams | served | tok/s (all streams) | latency p50 (s) | latency max (s) "
           "| disk MiB / token | tokens as queued |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = f"{100 * r['same_tokens']:.1f} %" if "same_tokens" in r else "-"
        out.append(f"| {r['budget']} | {r['streams']} | {r['mode']} | {r['tok_s']:.2f} "
                   f"| {r['latency_p50_s']:.2f} | {r['latency_max_s']:.2f} "
                   f"| {r['bytes_read_per_token'] / 2**20:.3f} | {same} |")
    return "\n".join(out)


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--concurrency takes stream counts like 1,4,16, got {text!r}") from None
    if not levels or any(not 1 <= n <= 256 for n in levels):
        raise UsageError(f"--concurrency counts must be in 1..256, got {text!r}")
    return levels


def cmd_concurrency(a, prepare) -> int:
    """The bench's --concurrency mode (bench.py parses the shared flags: model, budgets, dtype, tokens, and
    passes `prepare`: a -> the prepared model, its store and sizes)."""
    import torch

    from .runtime.load import load

    levels = parse_levels(a.concurrency)
    torch.set_num_threads(a.threads)
    prep = prepare(a)
    sizes, store = prep["sizes"], prep["store"]
    prompts = prompts_for(prep["config"]["vocab_size"], a.prompt_tokens, max(levels))
    rows = []
    by_bits = {16: sizes, **prep.get("sizes_q", {})}
    for bits, pct in a.budgets:
        memory = budget_bytes(pct, by_bits[bits].backbone, by_bits[bits].experts)
        for row in concurrency_rows(lambda: load(store, dtype=a.dtype, memory=memory), levels, prompts,
                                    a.new_tokens):
            rows.append({"budget": f"{pct:g}%" if bits == 16 else f"q{bits} {pct:g}%", "memory": memory, **row})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    from .cpuinfo import describe

    (out / "concurrency.json").write_text(json.dumps({"command": a.command_line, "machine": prep.get("machine"),
                                                      "rows": rows}, indent=1))
    (out / "concurrency.md").write_text(f"`{a.command_line}`\n\nCPU: {describe(prep.get('machine') or {})}\n\n"
                                        f"{table}\n")
    print(table)
    print(f"wrote {out / 'concurrency.json'}, concurrency.md")
    return 0
