"""`moe-offload prefetch-report`: hit rate and decode speed of each prefetch mode at a few budgets, next to
Belady-OPT's hit rate on the very routing trace the runs produced (the paper's Figure 2, with numbers).

Each (budget, mode) run starts cold in a fresh engine on the same prompt with EOS disabled; the trace of the
no-prefetch run is replayed through the cache policy (a cross-check of the live counters) and through OPT.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..args import add_model_args
from ..errors import UsageError
from ..runtime.engine import is_store
from ..routes import RouteLog, hooked
from ..runtime.load import load
from ..store.policies import belady_opt, replay
from .predictors import Shadow


def run_one(store: Path, memory: int, mode: str, prompt: list[int], new_tokens: int, policy: str,
            dtype, depth: int) -> tuple[dict, list]:
    engine = load(store, dtype=dtype, memory=memory, cache_policy=policy, prefetch=mode, prefetch_depth=depth)
    log = RouteLog()
    with hooked(engine.model, log):
        r = engine.generate(prompt_ids=prompt, max_new_tokens=new_tokens, ignore_eos=True)
    trace = [[(layer, e) for e in torch.unique(idx).tolist()] for layer, idx, _ in log.calls]  # needed, per call
    cache = engine.expert_cache
    sizes = {k: cache.foot[k].load for k in cache.entries}
    cache.close()
    return r.stats, trace, sizes, cache.capacity


def add_args(p):
    add_model_args(p)
    p.add_argument("--text", required=True, help="text file: the first part trains the shadow router, the prompt "
                                                 "is taken after it")
    p.add_argument("--budgets", default="25,50", help="expert cache sizes, percent of all expert bytes")
    p.add_argument("--modes", default="none,lookahead,shadow", help="prefetch modes to compare")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run")
    p.add_argument("--calibration-tokens", type=int, default=6000,
                   help="tokens of --text that train the shadow router")
    p.add_argument("--json-out", default=None, help="also write the rows as JSON here")


def run(a) -> int:
    from ..profile import record

    store = Path(a.model or "")
    if not is_store(store):
        raise UsageError("prefetch-report needs --model STORE (an expert store; see `moe-offload convert`)")
    text = Path(a.text)
    if not text.is_file():
        raise UsageError(f"--text {text}: no such file")
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    full = load(store, dtype=a.dtype)
    ids = full.tokenizer.encode(text.read_text(errors="replace"), add_special_tokens=False)
    calib, rest = ids[: a.calibration_tokens], ids[a.calibration_tokens:]
    if len(rest) < a.prompt_tokens or len(calib) < 256:
        raise UsageError(f"--text has {len(ids)} tokens: too few for calibration + a {a.prompt_tokens}-token prompt")
    prompt = rest[: a.prompt_tokens]
    if "shadow" in modes or "auto" in modes:
        rec = record(full, calib)
        Shadow.train(rec.hidden, rec.chosen, rec.n_experts, depth=max(2, a.prefetch_depth or 1),
                     m=full.model.top_k).save(store / "shadow_router.safetensors")
        print(f"shadow router trained on {rec.tokens} calibration tokens -> {store / 'shadow_router.safetensors'}",
              file=sys.stderr)
    backbone, experts = full.info["backbone_bytes"], full.info["expert_bytes"]
    n_layers = max(L for L, _ in full.model.moe_blocks()) + 1
    rows = []
    policy = a.cache_policy or "lru"
    for pct in [int(x) for x in a.budgets.split(",")]:
        memory = backbone + experts * pct // 100
        opt = live_check = None
        for mode in modes:
            stats, trace, sizes, capacity = run_one(store, memory, mode, prompt, a.new_tokens, policy, a.dtype,
                                                    a.prefetch_depth or 1)
            if mode == "none":
                opt = belady_opt(trace, sizes, capacity, n_layers, full.model.n_experts)
                live_check = replay(trace, sizes, capacity, policy, n_layers, full.model.n_experts)
            rows.append({"budget_pct": pct, "memory": memory, "mode": mode, "hit_rate": stats["hit_rate"],
                         "decode_tokens_per_s": stats["decode_tokens_per_s"], "stall_seconds": stats["stall_seconds"],
                         "bytes_read_disk": stats["bytes_read_disk"],
                         "prefetch_recall": stats.get("prefetch_recall"),
                         "prefetch_precision": stats.get("prefetch_precision"),
                         "prefetch_issued": stats.get("prefetch_issued"), "prefetch_used": stats.get("prefetch_used"),
                         "opt_hit_rate": opt.hit_rate if opt else None,
                         "policy_replay_hit_rate": live_check.hit_rate if live_check else None})
    print(f"| budget | prefetch | hit rate | OPT hit rate | {policy} replay | recall | precision | decode tok/s | "
          "stall s | MiB read |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = (lambda v, p=3: "–" if v is None else f"{v:.{p}f}")
        print(f"| {r['budget_pct']} % | {r['mode']} | {f(r['hit_rate'])} | {f(r['opt_hit_rate'])} | "
              f"{f(r['policy_replay_hit_rate'])} | {f(r['prefetch_recall'])} | {f(r['prefetch_precision'])} | "
              f"{f(r['decode_tokens_per_s'], 1)} | {f(r['stall_seconds'], 2)} | {r['bytes_read_disk'] / 2**20:.1f} |")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rows, indent=1))
    return 0
