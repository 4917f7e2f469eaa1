"""`moe-offload eval`: perplexity and speed of one model, or a table comparing several (Python: evaluate(),
compare()).

    moe-offload eval --model M --text FILE
    moe-offload eval --compare A B C --text FILE [--memory 2GiB]

Perplexity: Engine.perplexity over non-overlapping windows of --window tokens (the first --max-tokens of the
text, encoded by each model's own tokenizer). Scoring speed: scored tokens / seconds of that pass (prefill
throughput). Decode speed: --gen-tokens greedy tokens with EOS ignored, from the engine's own stats.
Offloaded (a store, or --memory): the expert cache's hit rate while scoring and while decoding.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

from .args import add_model_args, load_engine
from .errors import UsageError
from .progress import Progress, add_quiet_arg
from .utils import parse_size


def _counting(engine, progress: Progress):
    """Count the tokens of every engine.logits call (what perplexity runs per window) on `progress`."""
    inner = engine.logits

    def logits(ids, *args, **kw):
        out = inner(ids, *args, **kw)
        progress.update(len(ids))
        return out

    return logits


def evaluate(engine, text: str, max_tokens: int = 4096, window: int = 256, gen_tokens: int = 32,
             progress: Progress | None = None) -> dict:
    """One model: perplexity, scoring tok/s, decode tok/s, weight bytes; offloaded: the hit rates."""
    if engine.tokenizer is None:
        raise UsageError(f"{engine.path}: no tokenizer to encode the text")
    ids = engine.tokenizer.encode(text)[:max_tokens]
    window = min(window, engine.context_length)
    if len(ids) < 2:
        raise UsageError("the text is shorter than 2 tokens")
    engine.perplexity(ids[: min(len(ids), 16)], window)  # warm-up: caches, kernels, first-touch pages
    stats = engine.expert_stats
    if stats is not None:
        stats(reset=True)
    if progress is not None:
        progress.start(len(ids) - 1)
        engine.logits = _counting(engine, progress)  # shadows the method on this instance only
    t0 = time.perf_counter()
    try:
        ppl, n = engine.perplexity(ids, window)
    finally:
        engine.__dict__.pop("logits", None)
    dt = time.perf_counter() - t0
    if progress is not None:
        progress.close()
    row = {"model": str(engine.path), "perplexity": ppl, "tokens": n,
           "score_tokens_per_s": n / dt if dt else 0.0, "expert_bytes": engine.info.get("expert_bytes"),
           "backbone_bytes": engine.info.get("backbone_bytes")}
    if stats is not None:
        s = stats()
        row["score_hit_rate"] = s["hit_rate"] if s["expert_hits"] + s["expert_misses"] else None
    if gen_tokens > 0:
        r = engine.generate(prompt_ids=ids[:8], max_new_tokens=gen_tokens, ignore_eos=True, temperature=0.0)
        row["decode_tokens_per_s"] = r.stats["decode_tokens_per_s"]
        row.update({k: r.stats[k] for k in ("hit_rate", "bytes_read_disk") if k in r.stats})
    return row


def compare(models: list, text: str, max_tokens: int = 4096, window: int = 256, gen_tokens: int = 32,
            load: Callable | None = None, quiet: bool = True) -> list[dict]:
    """evaluate() each model in turn, one engine alive at a time: rows in the order of `models`. A model is an
    engine, or what `load` (default moe_offload.load) opens: a folder or store path."""
    if load is None:
        from . import load
    rows = []
    for i, m in enumerate(models):
        engine = m if hasattr(m, "perplexity") else load(m)
        desc = "eval" + (f" {i + 1}/{len(models)} {m}" if len(models) > 1 else "")
        bar = Progress(desc, unit="tokens", quiet=quiet)
        rows.append(evaluate(engine, text, max_tokens, window, gen_tokens, bar))
        del engine
    return rows


TEXT_BYTES_PER_TOKEN = 32  # far more than any tokenizer's average: the first max_tokens tokens lie within


def read_text(path: Path, limit: int) -> str:
    """The first `limit` bytes of a UTF-8 text file (cut at a character boundary); a binary or non-UTF-8
    file is refused in one line. Bounded because tokenizing costs far more memory than the text itself."""
    if not path.is_file():
        raise UsageError(f"--text {path}: no such file")
    with open(path, "rb") as f:
        data = f.read(limit)
    if b"\0" in data:
        raise UsageError(f"--text {path}: a binary file (NUL bytes), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.reason != "unexpected end of data":  # not merely a character cut by the limit
            raise UsageError(f"--text {path}: not UTF-8 text (byte {e.start})") from None
        return data[: e.start].decode("utf-8")


def format_table(rows: list[dict]) -> str:
    def gib(n):
        return f"{n / 2**20:.1f}" if isinstance(n, (int, float)) else "-"

    def rate(v):
        return f"{v:.3f}" if isinstance(v, float) else "-"

    # hit rates: the expert cache's while scoring and while decoding; "-" when every expert is resident
    lines = [f"{'model':<40} {'ppl':>9} {'tokens':>7} {'score tok/s':>11} {'decode tok/s':>12} "
             f"{'score hit':>9} {'decode hit':>10} {'experts MiB':>11} {'backbone MiB':>12}"]
    for r in rows:
        name = r["model"] if len(r["model"]) <= 40 else "…" + r["model"][-39:]
        lines.append(f"{name:<40} {r['perplexity']:>9.3f} {r['tokens']:>7} {r['score_tokens_per_s']:>11.1f} "
                     f"{r.get('decode_tokens_per_s', 0.0):>12.2f} {rate(r.get('score_hit_rate')):>9} "
                     f"{rate(r.get('hit_rate')):>10} {gib(r['expert_bytes']):>11} "
                     f"{gib(r['backbone_bytes']):>12}")
    return "\n".join(lines)


def add_args(p):
    add_model_args(p)
    p.add_argument("--compare", nargs="+", default=None, metavar="MODEL", help="models or stores to compare")
    p.add_argument("--text", required=True, help="evaluation text file (UTF-8)")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens of --text to score at most")
    p.add_argument("--max-text-bytes", default="8MiB",
                   help="read at most this much of --text (the tokens scored need ~32 bytes each at most)")
    p.add_argument("--window", type=int, default=256, help="perplexity window in tokens")
    p.add_argument("--gen-tokens", type=int, default=32,
                   help="greedy tokens timed for decode speed (0: skip)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    add_quiet_arg(p)


def run(a) -> int:
    limit = parse_size(a.max_text_bytes)
    if limit <= 0:
        raise UsageError(f"--max-text-bytes must be positive, got {a.max_text_bytes}")
    text = read_text(Path(a.text), min(limit, TEXT_BYTES_PER_TOKEN * max(a.max_tokens, 1)))

    def load(model):  # the other flags as given
        return load_engine(argparse.Namespace(**{**vars(a), "model": model}))

    rows = compare(a.compare or [a.model], text, a.max_tokens, a.window, a.gen_tokens, load, a.quiet)
    if a.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(format_table(rows))
    return 0


# ---- the same GGUF in llama.cpp (scripts/gguf_llamacpp_ppl.py) ---------------------------------------------

def llamacpp_logits(path: str, window: int, threads: int | None = None):
    """A function ids -> logits [T, V] float32 numpy of llama.cpp (llama-cpp-python) running the GGUF at `path`
    on its CPU backend, each call a fresh sequence (its KV cache cleared), no BOS added."""
    try:
        import llama_cpp
    except ImportError as e:
        raise UsageError(f"comparing with llama.cpp needs llama-cpp-python: pip install llama-cpp-python "
                         f"({e})") from None
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=window, n_batch=window, n_ubatch=window, logits_all=True,
                          n_threads=threads, n_gpu_layers=0, verbose=False)

    def logits(ids: list[int]):
        llm.reset()  # n_tokens = 0: eval() drops the cache past it and starts at position 0
        llm.eval(list(ids))
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    return logits


def compare_llamacpp(engine, path: str, ids: list[int], window: int = 256, threads: int | None = None) -> dict:
    """Our perplexity and llama.cpp's on the same GGUF, the same token ids and the same non-overlapping windows
    (Engine.perplexity's), and the share of scored positions where both pick the same top-1 token."""
    import numpy as np
    import torch

    theirs = llamacpp_logits(path, window, threads)
    nll = {"ours": 0.0, "llamacpp": 0.0}
    n = same = 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        if len(chunk) < 2:
            break
        target = torch.tensor(chunk[1:])
        for name, lg in (("ours", engine.logits(chunk[:-1]).float().cpu()),
                         ("llamacpp", torch.from_numpy(theirs(chunk[:-1])))):
            nll[name] += float(torch.nn.functional.cross_entropy(lg.double(), target, reduction="sum"))
            top = lg.argmax(-1)
            if name == "ours":
                ours_top = top
            else:
                same += int((top == ours_top).sum())
        n += len(chunk) - 1
    ppl = {k: float(np.exp(v / max(n, 1))) for k, v in nll.items()}
    return {"model": str(path), "tokens": n, "window": window, "ppl_ours": ppl["ours"],
            "ppl_llamacpp": ppl["llamacpp"], "ppl_ratio": ppl["ours"] / ppl["llamacpp"],
            "top1_agreement": same / max(n, 1)}
