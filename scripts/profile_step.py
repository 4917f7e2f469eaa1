"""Where a forward step spends its time at real layer widths: a random model with Mixtral-8x7B's or
Qwen3-30B-A3B's exact layer shapes (and vocabulary), few layers, all experts resident in 16 bits.

Per decode token (after a prompt of --prefill tokens) and for the prefill itself: wall time split into expert
kernels, attention, routing (MoE block minus experts), lm_head (+ final norm), other (embedding, norms, RoPE
tables, residuals); and the aten op count (all ops, and top-level ops) from torch.profiler. The steps are
called like Batch.step calls them (a Packed batch of one sequence), so run the script with PYTHONPATH set to
another tree to A/B two versions of the code on the same weights (same seed):

    PYTHONPATH=/work/main python scripts/profile_step.py --shape mixtral --threads 1,2
    PYTHONPATH=$PWD       python scripts/profile_step.py --shape mixtral --threads 1,2

Shapes: mixtral (hidden 4096, 8 experts of 14336, top-2, vocab 32000; ~3.4 GB bf16 per layer incl. embedding
and lm_head), qwen3 (hidden 2048, 128 experts of 768, top-8, vocab 151936; ~2.5 GB bf16). Nothing is written
to disk: the weights are drawn from a fixed seed in this process.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

SHAPES = {
    "mixtral": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_local_experts=8,
                    num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6),
    "qwen3": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                  moe_intermediate_size=768, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                  num_experts=128, num_local_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                  rms_norm_eps=1e-6, rope_theta=1e6),
}


def build_random(shape: str, layers: int, dtype: torch.dtype, max_pos: int, seed: int = 0):
    """A model with random weights (std 0.02, norms 1) and every expert resident as a dense unit."""
    from moe_offload.experts import LocalExperts, expert_unit
    from moe_offload.models import build

    config = dict(SHAPES[shape], num_hidden_layers=layers, max_position_embeddings=max_pos)
    with torch.device("meta"):
        args, model = build(config)
    g = torch.Generator().manual_seed(seed)

    def rand(*s):
        return torch.empty(*s, dtype=dtype).normal_(0.0, 0.02, generator=g)

    state = {}
    for k, t in model.state_dict().items():
        state[k] = torch.ones(t.shape, dtype=dtype) if "norm" in k else rand(*t.shape)
    model.load_state_dict(state, assign=True, strict=True)
    model.init_rope(torch.device("cpu"))
    D, I = model.expert_shape.hidden, model.expert_shape.intermediate
    for _, moe in model.moe_blocks():
        moe.experts = LocalExperts([expert_unit(model.expert_shape, rand(I, D), rand(I, D), rand(D, I))
                                    for _ in range(model.n_experts)])
    return args, model.eval()


class Timers:
    """Wall time per part, accumulated by hooks and wrappers around the model's pieces."""

    def __init__(self):
        self.t = defaultdict(float)
        self.start = {}

    def pre(self, name):
        def hook(*_):
            self.start[name] = time.perf_counter()
        return hook

    def post(self, name):
        def hook(*_):
            self.t[name] += time.perf_counter() - self.start.pop(name)
        return hook

    def wrap(self, name, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.t[name] += time.perf_counter() - t0
        return timed


class TimedExperts:
    def __init__(self, inner, timers: Timers):
        self.inner, self.timers = inner, timers

    def __call__(self, *a):
        t0 = time.perf_counter()
        y = self.inner(*a)
        self.timers.t["experts"] += time.perf_counter() - t0
        return y


def instrument(model) -> Timers:
    tm = Timers()
    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(tm.pre("attention"))
        layer.self_attn.register_forward_hook(tm.post("attention"))
        layer.ffn.register_forward_pre_hook(tm.pre("moe"))
        layer.ffn.register_forward_hook(tm.post("moe"))
    for _, moe in model.moe_blocks():
        moe.experts = TimedExperts(moe.experts, tm)
    model.head = tm.wrap("lm_head", model.head)
    return tm


def split(tm: Timers, total: float, steps: int) -> dict:
    """ms per step: experts, attention, routing, lm_head, other."""
    t = dict(tm.t)
    parts = {"experts": t.get("experts", 0.0), "attention": t.get("attention", 0.0),
             "routing": t.get("moe", 0.0) - t.get("experts", 0.0), "lm_head": t.get("lm_head", 0.0)}
    parts["other"] = total - sum(parts.values())
    out = {k: round(1e3 * v / steps, 2) for k, v in parts.items()}
    out["total"] = round(1e3 * total / steps, 2)
    return out


def op_counts(fn) -> dict:
    """aten ops of one call of `fn`: all of them, and the top-level ones (not called by another op)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ev = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in ev if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return {"aten_ops": len(ev), "top_level_ops": len(top)}


def run(args_ns, model, threads: int) -> dict:
    from moe_offload.models.base import Packed

    torch.set_num_threads(threads)
    P, N = args_ns.prefill, args_ns.decode
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.args.vocab_size, (1, P), generator=g)
    dtype = next(model.parameters()).dtype
    tm = model._timers

    def fresh_cache():
        return [(c,) for c in model.make_cache(1, P + N + 8, dtype, torch.device("cpu"))]

    def prefill(cache):
        return model(prompt, Packed((0,), (P,)), cache)[0]

    def step(cache, tok, pos):
        return model(tok, Packed((pos,), (1,)), cache)[0]

    res = {"threads": threads}
    with torch.inference_mode():
        cache = fresh_cache()
        tm.t.clear()
        t0 = time.perf_counter()
        logits = prefill(cache)
        res["prefill_ms"] = split(tm, time.perf_counter() - t0, 1)
        res["prefill_tok_s"] = round(P / (res["prefill_ms"]["total"] / 1e3), 2)
        toks = []
        tok = logits[-1].argmax().view(1, 1)
        step(cache, tok, P)  # warm-up step (not timed)
        tm.t.clear()
        t0 = time.perf_counter()
        for i in range(N):
            logits = step(cache, tok, P + 1 + i)
            tok = logits[-1].argmax().view(1, 1)
            toks.append(int(tok))
        res["decode_ms_per_token"] = split(tm, time.perf_counter() - t0, N)
        res["decode_tok_s"] = round(1e3 / res["decode_ms_per_token"]["total"], 2)
        res["decode_ops_per_token"] = op_counts(lambda: step(cache, tok, P + 1 + N))
        if args_ns.prefill_ops:
            res["prefill_ops"] = op_counts(lambda: prefill(fresh_cache()))
        res["tokens"] = toks
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="mixtral")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--prefill", type=int, default=128, help="prompt tokens (the decode attends to them too)")
    p.add_argument("--decode", type=int, default=8, help="decode steps timed")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--prefill-ops", action="store_true", help="count the prefill's ops (one more prefill)")
    a = p.parse_args()
    t0 = time.perf_counter()
    _, model = build_random(a.shape, a.layers, getattr(torch, a.dtype), max_pos=a.prefill + a.decode + 64)
    model._timers = instrument(model)
    print(json.dumps({"shape": a.shape, "layers": a.layers, "dtype": a.dtype, "prefill_tokens": a.prefill,
                      "build_s": round(time.perf_counter() - t0, 1)}), flush=True)
    for th in [int(x) for x in a.threads.split(",")]:
        print(json.dumps(run(a, model, th)), flush=True)


if __name__ == "__main__":
    main()
