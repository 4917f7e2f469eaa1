"""Wall time of a decode token split by section: each listed function is wrapped with a perf_counter, so the
figures are real wall time of the unprofiled engine (plus ~1 us of wrapper per call), not sampled.

    PYTHONPATH=. python scripts/decode_sections.py STORE [--threads 2] [--prompt-tokens 32] [--new-tokens 64]
        [--runs 4] [--preload on] [--memory 8GiB]

Runs one warm-up generation, then `--runs` prompts of `--prompt-tokens` each decoding `--new-tokens` tokens; prints
each run's decode tok/s, then for the last run ms per token, calls per token and us per call of every section.
Sections nest (attention and MoE contain the 4-bit linears, norms, RoPE, the one-query attention and the router),
so their times do not add up to the total. With two trees side by side (PYTHONPATH=OLD, then NEW) it is an A/B.
--memory: the engine under that budget (the expert cache's path, as `generate --memory` and the bench run it;
its lookups are the "expert cache fetch" section, its misses the "misses: ..." ones, waiting for reads
included, which each run's line also prints); unset: every expert resident, no cache.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

T: dict[str, float] = defaultdict(float)
N: dict[str, int] = defaultdict(int)


def wrap(owner, name: str, key: str | None = None) -> None:
    f, key = getattr(owner, name, None), key or name
    if f is None:
        return

    def timed(*a, **k):
        t = time.perf_counter()
        r = f(*a, **k)
        T[key] += time.perf_counter() - t
        N[key] += 1
        return r

    setattr(owner, name, timed)


STALLED = [0.0]  # the caches' stall seconds from before their counters were last zeroed
WAIT = "misses: waiting for reads (the cache's stall)"


def _stall(engine) -> float:
    """Seconds the expert caches' fetches have waited for reads so far (0 with every expert resident)."""
    caches = {id(c): c for _, m in engine.model.moe_blocks() if (c := getattr(m.experts, "cache", None))}
    return STALLED[0] + sum(c.stall for c in caches.values())


def _keep_stall(cache_cls) -> None:
    zero = cache_cls._zero

    def kept(self):
        STALLED[0] += getattr(self, "stall", 0.0)
        zero(self)

    cache_cls._zero = kept


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--preload", default="on", choices=["auto", "on", "off"])
    p.add_argument("--memory", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import moe_offload.experts as X
    import moe_offload.models.base as B
    import moe_offload.runtime.engine as R
    from moe_offload.quant import backbone, codec, kernels
    from moe_offload.runtime.load import load
    from moe_offload.store import cache

    wrap(B.CausalLM, "forward", "total (model forward)")
    wrap(B.CausalLM, "head", "lm_head + final norm")
    wrap(B.Attention, "attend", "attention (all of it)")
    wrap(B.MoE, "forward", "MoE block (all of it)")
    wrap(B.MoE, "router_logits", "router logits")
    wrap(codec, "fused_moe", "experts kernel (one call a layer)")
    wrap(kernels.NativeQ4Linear, "__call__", "4-bit linear kernel")
    wrap(B.RMSNorm, "forward", "RMSNorm")
    wrap(B, "apply_rope", "RoPE")
    wrap(B, "native_attend_one", "one-query attention, native")
    wrap(B, "attend_one", "one-query attention, torch")
    wrap(B.KVCache, "update", "KV cache write")
    wrap(cache.ExpertCache, "fetch", "expert cache fetch (all hits: the lookups; else the generator's setup)")
    _keep_stall(cache.ExpertCache)
    wrap(cache.ExpertCache, "_issue", "misses: starting their reads (buffers, submit)")
    wrap(cache.ExpertCache, "_land", "misses: a read joins the cache (unit, trim, policy)")
    wrap(codec, "fused_expert", "one expert alone (a miss as it lands)")
    wrap(cache.OffloadedExperts, "__call__", "experts behind the cache (all of it)")
    wrap(X, "_dispatch_one", "expert dispatch, one token (all of it)")
    wrap(backbone.QuantLinear, "forward", "4-bit linear module (wrapper + kernel)")
    wrap(B.DecoderLayer, "forward", "decoder layer (all of it)")
    wrap(R, "sample", "sampling")
    engine = load(a.store, device="cpu", preload=a.preload, memory=a.memory)
    for _, moe in engine.model.moe_blocks():  # a block's route is its own partial of a routing function
        wrap(moe, "route", "routing (softmax, top-k, renormalisation)")
    n = a.new_tokens
    engine.generate(prompt_ids=list(range(3, 3 + a.prompt_tokens)), max_new_tokens=n + 1, ignore_eos=True,
                    temperature=0.0)
    for i in range(a.runs):
        ids = list(range(3 + i + 1, 3 + i + 1 + a.prompt_tokens))
        it = engine.stream_generate(prompt_ids=ids, max_new_tokens=n + 1, ignore_eos=True, temperature=0.0)
        next(it)  # the prefill and first token, outside the sections
        T.clear(), N.clear()
        stall0 = _stall(engine)
        t0 = time.perf_counter()
        for _ in it:
            pass
        dt = time.perf_counter() - t0
        stall = T[WAIT] = _stall(engine) - stall0
        N[WAIT] = n
        print(f"run {i + 1}: decode {n / dt:.2f} tok/s ({1e3 * dt / n:.2f} ms/token"
              + (f", {1e3 * stall / n:.2f} of them waiting for reads)" if stall else ")"), flush=True)
    print(f"\nlast run, per decoded token ({a.threads} threads, prompt {a.prompt_tokens}, {n} tokens):")
    print("| section | ms / token | calls / token | us / call |\n|---|---|---|---|")
    for k in sorted(T, key=lambda k: -T[k]):
        print(f"| {k} | {1e3 * T[k] / n:.2f} | {N[k] / n:.1f} | {1e6 * T[k] / N[k]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
