"""Mixed precision under a byte budget: a codec per expert minimising Σ freq·err subject to Σ bytes <= budget.

Each expert has options (codec spec, bytes, err): err is its relative error (error_curve: Frobenius over its
three matrices, or output error on calibration inputs), or the absolute routing-weighted squared output error
on its calibration tokens. freq is how often the router picks it (routing_stats.json, normalised per layer;
uniform when absent); allocate() takes any per-expert weight in its place (quantize --plan-error out/nll:
the calibration row scale, times a measured per-layer sensitivity for nll). The allocator is the classic
greedy on each expert's lower convex hull of (bytes, err) — the Lagrangian solution of this multiple-choice
knapsack: start every expert at its cheapest option, then repeatedly take the upgrade step with the largest
freq·Δerr / Δbytes; a step that does not fit is dropped (that expert stays where it is) and the rest go on.
Properties (tested): never above the budget; identical convex curves with uniform statistics give a uniform
assignment at any budget equal to a uniform assignment's bytes; a hotter expert never gets a cheaper option
than a colder one with the same curve.

routing_stats.json, either of
    {"layers": {"<layer>": {"counts": [c_0, ..., c_{E-1}]}, ...}, ...}     (the profiler's file)
    {"<layer>": [c_0, ..., c_{E-1}], ...}
counts are activations per expert; a layer without stats counts as uniform.
"""

from __future__ import annotations

import heapq
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import MoeError

Key = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class Option:
    spec: dict  # codec spec, as stored in the manifest
    nbytes: int
    err: float

    @property
    def label(self) -> str:
        s = self.spec
        if s.get("name") != "hqq":
            return s.get("dtype", s.get("name", "?"))
        from .codec import DEFAULT_GROUP

        g = s.get("group_size", DEFAULT_GROUP.get(s["bits"]))
        return (f"{s['bits']}b" + (f"g{g}" if g != DEFAULT_GROUP.get(s["bits"]) else "")
                + (f"+r{s['rank']}" if s.get("rank") else ""))


def load_stats(src: str | os.PathLike | dict | None) -> dict[int, list[float]]:
    """routing_stats.json (path or parsed) -> {layer: counts}."""
    if src is None:
        return {}
    if not isinstance(src, dict):
        try:
            with open(src) as f:
                src = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise MoeError(f"routing stats {src}: {e}") from None
    layers = src.get("layers", src)
    out = {}
    try:
        for k, v in layers.items():
            counts = v["counts"] if isinstance(v, dict) else v
            out[int(k)] = [float(c) for c in counts]
    except (AttributeError, KeyError, TypeError, ValueError):
        raise MoeError("routing stats: expected {'layers': {layer: {'counts': [...]}}} or {layer: [...]}") \
            from None
    return out


def frequencies(stats: dict[int, list[float]], keys: list[Key]) -> dict[Key, float]:
    """Per-layer normalised activation frequency; uniform for layers without stats (or all-zero counts)."""
    per_layer: dict[int, list[int]] = {}
    for layer, e in keys:
        per_layer.setdefault(layer, []).append(e)
    out = {}
    for layer, experts in per_layer.items():
        counts = stats.get(layer)
        if counts is not None and max(experts) >= len(counts):
            raise MoeError(f"routing stats: layer {layer} has {len(counts)} experts, the model more")
        total = sum(counts[e] for e in experts) if counts else 0.0
        for e in experts:
            out[layer, e] = counts[e] / total if total > 0 else 1.0 / len(experts)
    return out


def hull(options: list[Option]) -> list[Option]:
    """Lower convex hull of (bytes, err), cheapest first; dominated options dropped."""
    pts = []
    for o in sorted(options, key=lambda o: (o.nbytes, o.err)):
        if pts and o.err >= pts[-1].err:
            continue  # costs more, not better
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]  # drop b if it lies on or above the chord a -> o
            if (b.err - a.err) * (o.nbytes - a.nbytes) >= (o.err - a.err) * (b.nbytes - a.nbytes):
                pts.pop()
            else:
                break
        pts.append(o)
    return pts


def allocate(options: dict[Key, list[Option]], freq: dict[Key, float], budget: int) -> dict[Key, Option]:
    """The plan: one option per expert, Σ nbytes <= budget (see the module docstring)."""
    hulls = {k: hull(v) for k, v in options.items()}
    choice = {k: 0 for k in hulls}
    used = sum(h[0].nbytes for h in hulls.values())
    if used > budget:
        raise MoeError(f"budget {budget} bytes is below the smallest plan ({used} bytes)")

    def push(heap, k):
        h, i = hulls[k], choice[k]
        if i + 1 < len(h):
            gain = freq.get(k, 0.0) * (h[i].err - h[i + 1].err) / (h[i + 1].nbytes - h[i].nbytes)
            heapq.heappush(heap, (-gain, i, k))  # ties: lower level first, then key order

    heap: list = []
    for k in sorted(hulls):
        push(heap, k)
    while heap:
        _, i, k = heapq.heappop(heap)
        step = hulls[k][i + 1].nbytes - hulls[k][i].nbytes
        if used + step > budget:
            continue  # does not fit: this expert stays here
        used += step
        choice[k] = i + 1
        push(heap, k)
    return {k: hulls[k][i] for k, i in choice.items()}


def best_per_group(options: dict, budget: int) -> dict:
    """Exact multiple-choice knapsack over few groups: one Option per key, Σ nbytes <= budget, least Σ err.
    Merges the keys one by one keeping only the Pareto set of (bytes, err) partial plans."""
    front = [(0, 0.0, ())]  # (bytes, err, chosen indices)
    keys = sorted(options)
    for k in keys:
        merged = sorted((b + o.nbytes, e + o.err, ch + (i,)) for b, e, ch in front
                        for i, o in enumerate(options[k]) if b + o.nbytes <= budget)
        front = []
        for t in merged:  # keep a plan only if it is better than every cheaper one
            if not front or t[1] < front[-1][1]:
                front.append(t)
        if not front:
            raise MoeError(f"budget {budget} bytes is below the smallest plan")
    best = min(front, key=lambda t: (t[1], t[0]))
    return {k: options[k][i] for k, i in zip(keys, best[2])}


def uniform(options: dict[Key, list[Option]], label: str) -> dict[Key, Option]:
    return {k: next(o for o in v if o.label == label) for k, v in options.items()}


def objective(plan: dict[Key, Option], freq: dict[Key, float]) -> float:
    return sum(freq.get(k, 0.0) * o.err for k, o in plan.items())


def format_plan(plan: dict[Key, Option], freq: dict[Key, float], budget: int | None = None,
                detail: bool = True, weight: dict[Key, float] | None = None) -> str:
    """The plan as a table: one row per expert (or per layer with detail=False), then totals. `weight`: what
    allocate() weighed errors by when it was not the routing frequency (shown, and used for the objective)."""
    rows = []
    if detail:
        rows.append(f"{'layer':>5} {'expert':>6} {'freq':>7} {'codec':>8} {'bytes':>10} {'err':>9}"
                    + (f" {'weight':>9}" if weight else ""))
        for (layer, e), o in sorted(plan.items()):
            f = freq.get((layer, e), 0)
            rows.append(f"{layer:>5} {e:>6} {f:>7.4f} {o.label:>8} {o.nbytes:>10} {o.err:>9.4g}"
                        + (f" {weight.get((layer, e), 0):>9.4g}" if weight else ""))
    else:
        rows.append(f"{'layer':>5} {'experts':>7} {'codecs':<30} {'bytes':>12} {'Σfreq·err':>9}")
        for layer in sorted({k[0] for k in plan}):
            ks = [k for k in plan if k[0] == layer]
            mix: dict[str, int] = {}
            for k in ks:
                mix[plan[k].label] = mix.get(plan[k].label, 0) + 1
            desc = " ".join(f"{n}×{lab}" for lab, n in sorted(mix.items()))
            rows.append(f"{layer:>5} {len(ks):>7} {desc:<30} {sum(plan[k].nbytes for k in ks):>12} "
                        f"{sum((weight or freq).get(k, 0) * plan[k].err for k in ks):>9.4g}")
    total = sum(o.nbytes for o in plan.values())
    tail = f"total {total} bytes" + (f" of budget {budget}" if budget is not None else "")
    rows.append(f"{tail}; Σ {'weight' if weight else 'freq'}·err = {objective(plan, weight or freq):.5g}")
    return "\n".join(rows)


def error_curve(gate, up, down, specs: list[dict], x=None, make: Callable | None = None,
                shape=None, w=None, act_aware: bool = False, biases: dict | None = None) -> list[Option]:
    """Encode one expert with every spec; measure its error (Frobenius, or output error on x [n, D]; with
    routing weights w [n], the absolute routing-weighted squared output error: codec.expert_error).
    When the encoding uses x — a low-rank part is fitted to it, or act_aware weighs the HQQ fit by it — every
    option is measured on the odd rows of x and fitted on the even ones: measured on its own fitting rows
    the low rank looked better than it did on held-out text (docs/quality.md). Absolute errors are then
    scaled back to all n rows. biases: {gate_bias, up_bias, down_bias} of an expert that has them."""
    from ..codecs import make_codec
    from ..experts import ExpertShape
    from .codec import expert_error

    make = make or make_codec
    biases = biases or {}
    shape = shape or ExpertShape(gate.shape[1], gate.shape[0], bias=bool(biases))
    x_fit = x_err = x
    w_err, scale = w, 1.0
    if x is not None and len(x) >= 2 and (act_aware or any(s.get("rank") for s in specs)):
        x_fit, x_err = x[0::2], x[1::2]
        if w is not None:
            w_err, scale = w[1::2], len(x) / len(x_err)
    out = []
    for spec in specs:
        c = make(spec)
        hqq = spec.get("name") == "hqq"
        blob = c.encode(gate, up, down, x=x_fit, act=shape, act_aware=act_aware, **biases) if hqq \
            else c.encode(gate, up, down, **biases)
        err = expert_error(gate, up, down, c, blob, x_err, shape, w_err, biases=biases) \
            if hasattr(c, "dequantize") else 0.0
        out.append(Option(dict(c.spec), int(blob.numel()), err * scale))
    return out
