"""`moe-offload eval`: perplexity and speed of one model, or a table comparing several.

    moe-offload eval --model M --text FILE
    moe-offload eval --compare A B C --text FILE [--memory 2GiB]

Perplexity: Engine.perplexity over non-overlapping windows of --window tokens (the first --max-tokens of the
text, encoded by each model's own tokenizer). Scoring speed: scored tokens / seconds of that pass (prefill
throughput). Decode speed: --gen-tokens greedy tokens with EOS ignored, from the engine's own stats.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .cli import add_model_args, command, load_engine
from .errors import UsageError


def evaluate(engine, text: str, max_tokens: int = 4096, window: int = 256, gen_tokens: int = 32) -> dict:
    """One model: perplexity, scoring tok/s, decode tok/s, weight bytes."""
    if engine.tokenizer is None:
        raise UsageError(f"{engine.path}: no tokenizer to encode the text")
    ids = engine.tokenizer.encode(text)[:max_tokens]
    window = min(window, engine.context_length)
    if len(ids) < 2:
        raise UsageError("the text is shorter than 2 tokens")
    engine.perplexity(ids[: min(len(ids), 16)], window)  # warm-up: caches, kernels, first-touch pages
    t0 = time.perf_counter()
    ppl, n = engine.perplexity(ids, window)
    dt = time.perf_counter() - t0
    row = {"model": str(engine.path), "perplexity": ppl, "tokens": n,
           "score_tokens_per_s": n / dt if dt else 0.0, "expert_bytes": engine.info.get("expert_bytes"),
           "backbone_bytes": engine.info.get("backbone_bytes")}
    if gen_tokens > 0:
        r = engine.generate(prompt_ids=ids[:8], max_new_tokens=gen_tokens, ignore_eos=True, temperature=0.0)
        row["decode_tokens_per_s"] = r.stats["decode_tokens_per_s"]
        row.update({k: r.stats[k] for k in ("hit_rate", "bytes_read_disk") if k in r.stats})
    return row


def format_table(rows: list[dict]) -> str:
    def gib(n):
        return f"{n / 2**20:.1f}" if isinstance(n, (int, float)) else "-"

    lines = [f"{'model':<40} {'ppl':>9} {'tokens':>7} {'score tok/s':>11} {'decode tok/s':>12} "
             f"{'experts MiB':>11} {'backbone MiB':>12}"]
    for r in rows:
        name = r["model"] if len(r["model"]) <= 40 else "…" + r["model"][-39:]
        lines.append(f"{name:<40} {r['perplexity']:>9.3f} {r['tokens']:>7} {r['score_tokens_per_s']:>11.1f} "
                     f"{r.get('decode_tokens_per_s', 0.0):>12.2f} {gib(r['expert_bytes']):>11} "
                     f"{gib(r['backbone_bytes']):>12}")
    return "\n".join(lines)


def _add_eval(p):
    add_model_args(p)
    p.add_argument("--compare", nargs="+", default=None, metavar="MODEL", help="models or stores to compare")
    p.add_argument("--text", required=True, help="evaluation text file")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens of --text to score at most")
    p.add_argument("--window", type=int, default=256, help="perplexity window in tokens")
    p.add_argument("--gen-tokens", type=int, default=32,
                   help="greedy tokens timed for decode speed (0: skip)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines")


@command("eval", "perplexity and tok/s of a model, or a comparison table of several", _add_eval)
def cmd_eval(a) -> int:
    path = Path(a.text)
    if not path.is_file():
        raise UsageError(f"--text {path}: no such file")
    text = path.read_text(errors="replace")
    models = a.compare or [a.model]
    rows = []
    for m in models:
        engine = load_engine(argparse.Namespace(**{**vars(a), "model": m}))
        rows.append(evaluate(engine, text, a.max_tokens, a.window, a.gen_tokens))
        del engine
    if a.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(format_table(rows))
    return 0
