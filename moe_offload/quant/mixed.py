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

plan_mixed() is the planner `quantize --expert-bits mixed` runs (quant/writer.quantize): a Hugging Face
checkpoint (Checkpoint, read without its weights) and a budget -> error curves per expert (optionally on
calibrate()'s per-expert inputs) -> allocate(), or with plan_error="layer" one codec per layer (layer_plan).

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
from .codec import expert_spec  # noqa: F401  (quant.mixed.expert_spec, as before)

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


# ---- the planner of `quantize --expert-bits mixed`: a checkpoint, a budget -> one codec per expert -------

BITS = (2, 3, 4, 8)
# The mixed plan's menu: bits × group size (group_size=N: only N). Without coarser groups the 2-bit default
# (g32) is the cheapest option, so a budget of uniform 2-bit has nothing to trade and mixed equals uniform;
# 2-bit g64/g128 free 10-16 % of an expert's bytes for the hotter or more sensitive ones (docs/quality.md).
MENU = {2: (32, 64, 128), 3: (64, 128), 4: (64, 128), 8: (0,)}
PLAN_ERRORS = ("rel", "out", "nll", "layer")


def silent(message: str) -> None:
    """The default `log`: says nothing."""


@dataclass
class Checkpoint:
    """What the planner and the writer need of a Hugging Face folder, without loading its weights."""

    path: os.PathLike
    config: dict
    model: object  # the model built on the meta device: expert shape, MoE layers, attention_view
    model_type: str
    source: object  # the folder's tensors (dequantized when the checkpoint ships quantized)

    @classmethod
    def open(cls, hf_dir: str | os.PathLike) -> Checkpoint:
        import torch

        from ..checkpoint import SafetensorsFolder, dequantizing, read_config
        from ..models import build, get_module

        config = read_config(hf_dir)
        get_module(config.get("model_type"))
        with torch.device("meta"):
            args, model = build(config)
        return cls(hf_dir, config, model, args.model_type, dequantizing(SafetensorsFolder(hf_dir), config))

    @property
    def shape(self):
        return self.model.expert_shape

    @property
    def layers(self) -> list[int]:
        return [la for la, _ in self.model.moe_blocks()]

    @property
    def keys(self) -> list[Key]:
        return [(la, e) for la in self.layers for e in range(self.model.n_experts)]

    def expert(self, layer: int, e: int) -> tuple:
        """(gate, up, down, biases): biases {gate_bias, ...} when the family has them, else {}."""
        from ..checkpoint import expert_tensors

        parts = expert_tensors(self.source, self.model_type, layer, e)
        return parts.pop("gate"), parts.pop("up"), parts.pop("down"), parts


@dataclass
class Calibration:
    counts: dict  # {layer: activations per expert}
    xs: dict  # {(layer, expert): x [n, D]}, its first max_rows calibration inputs
    ws: dict  # {(layer, expert): w [n]}, the router's weight of the expert on those rows
    scale: dict  # {(layer, expert): rows routed to it / n}: what a capped sum is multiplied by
    engine: object  # the unquantized model (fp32), for layer_sensitivity
    ids: list


def calibrate(hf_dir: str | os.PathLike, text: str | os.PathLike, max_tokens: int, max_rows: int = 512,
              quiet: bool = True) -> Calibration:
    """Run the unquantized model on the text file: routing counts, per-expert inputs and routing weights."""
    from pathlib import Path

    import torch

    from ..errors import UsageError
    from ..profile import record
    from ..progress import Progress
    from ..runtime.load import load

    engine = load(hf_dir, dtype="float32")
    if engine.tokenizer is None:
        raise UsageError(f"{hf_dir}: no tokenizer to encode --calib")
    ids = engine.tokenizer.encode(Path(text).read_text(errors="replace"))[:max_tokens]
    with Progress("quantize: calibration", len(ids), "tokens", quiet=quiet) as bar:
        rec = record(engine, ids, window=min(256, engine.context_length), progress=bar)
    moes = dict(engine.model.moe_blocks())
    xs, ws, scale = {}, {}, {}
    for layer, chosen in rec.chosen.items():
        moe = moes[layer]
        with torch.inference_mode():
            _, w = moe.route(moe.router_logits(rec.hidden[layer]))  # [T, A], aligned with chosen
        for e in range(rec.n_experts):
            hit = chosen == e  # [T, A]
            rows = hit.any(-1).nonzero().flatten()
            if len(rows):
                xs[layer, e] = rec.hidden[layer][rows[:max_rows]]
                ws[layer, e] = (w * hit).sum(-1)[rows[:max_rows]]
                scale[layer, e] = len(rows) / len(rows[:max_rows])
    return Calibration(rec.counts(), xs, ws, scale, engine, ids)


def layer_sensitivity(cal: Calibration, ckpt: Checkpoint, spec: dict,
                      act_aware: bool = False) -> dict[int, float]:
    """Per MoE layer: the rise of the calibration NLL (nats/token) with that layer's experts all encoded with
    `spec` (act_aware: weighted by their calibration inputs) and every other layer unquantized."""
    import math

    from ..codecs import make_codec

    engine, codec, shape = cal.engine, make_codec(spec), ckpt.shape
    window = min(256, engine.context_length)
    base = math.log(engine.perplexity(cal.ids, window)[0])
    out = {}
    for layer, moe in engine.model.moe_blocks():
        units = moe.experts.units
        saved = list(units)
        for e in range(len(units)):
            gate, up, down, biases = ckpt.expert(layer, e)
            x = cal.xs.get((layer, e)) if act_aware else None
            blob = codec.encode(gate, up, down, x=x, act=shape, act_aware=act_aware, **biases)
            units[e] = codec.decode(blob, shape)
        out[layer] = math.log(engine.perplexity(cal.ids, window)[0]) - base
        units[:] = saved
    return out


def layer_plan(cal: Calibration, ckpt: Checkpoint, specs: list[dict], budget: int, act_aware: bool = False,
               log: Callable[[str], None] = silent) -> dict[Key, Option]:
    """plan_error="layer": every layer's experts at one codec. Each layer alone at each spec gives a
    measured calibration NLL rise (layer_sensitivity); best_per_group picks the spec per layer with the least
    total rise within the budget (rises assumed additive across layers).
    -> {(layer, expert): Option} with err = the layer's rise / its experts."""
    from ..codecs import make_codec

    E = ckpt.model.n_experts
    per_layer: dict[int, list] = {}
    for spec in specs:
        rise = layer_sensitivity(cal, ckpt, spec, act_aware)
        c = make_codec(spec)
        opt = Option(dict(c.spec), c.nbytes(ckpt.shape), 0.0)
        log(f"{opt.label:>8}: calibration NLL rise, each layer alone "
            + " ".join(f"{la}: {r:+.4f}" for la, r in rise.items()))
        for la, r in rise.items():
            per_layer.setdefault(la, []).append(Option(opt.spec, E * opt.nbytes, r))
    best = best_per_group(per_layer, budget)
    return {(la, e): Option(o.spec, o.nbytes // E, o.err / E) for la, o in best.items() for e in range(E)}


def pick_rank(gate, up, down, bits: int, target: float, x, act, group_size, quantizer: str,
              act_aware: bool = False, biases: dict | None = None) -> int:
    """Smallest rank (doubling from 4) whose b-bit + rank error reaches `target`; 0 if none below the cap."""
    from .codec import HQQCodec, expert_error
    from .lowrank import breakeven_rank

    I, D = gate.shape
    cap = min(breakeven_rank(2 * I, D), breakeven_rank(D, I)) // 4  # above: a dense copy in disguise
    r = 4
    while r <= cap:
        c = HQQCodec(expert_spec(bits, group_size, quantizer, r))
        if expert_error(gate, up, down, c, x=x, act=act, act_aware=act_aware, biases=biases) <= target:
            return r
        r *= 2
    return 0


@dataclass
class MixedPlan:
    """The mixed plan: the chosen option per expert, and what it was chosen by."""

    chosen: dict[Key, Option]
    freq: dict[Key, float]  # routing frequency per expert (uniform without statistics)
    budget: int
    weight: dict[Key, float] | None = None  # what the errors were weighed by, where not freq
    per_expert: bool = False  # few experts: the table always shows one row per expert

    @property
    def specs(self) -> dict[Key, dict]:
        return {k: o.spec for k, o in self.chosen.items()}

    def format(self, detail: bool = False) -> str:
        return format_plan(self.chosen, self.freq, self.budget, detail=detail or self.per_expert,
                           weight=self.weight)


def plan_mixed(ckpt: Checkpoint | str | os.PathLike, budget: int, *, group_size: int | None = None,
               quantizer: str = "hqq", lowrank: str = "off", plan_error: str = "rel",
               counts: dict[int, list[float]] | None = None, cal: Calibration | None = None,
               act_aware: bool = False, quiet: bool = True, log: Callable[[str], None] = silent) -> MixedPlan:
    """One codec per routed expert of a Hugging Face checkpoint, Σ bytes <= budget (quant/cli.py's docstring
    describes plan_error and lowrank). counts: routing statistics (load_stats); cal: calibrate()'s run of the
    unquantized model, needed by every plan_error but "rel" (whose counts it also supplies when counts is
    None). log: one line per measured layer sensitivity."""
    from ..errors import UsageError
    from ..codecs import make_codec
    from ..progress import Progress

    if plan_error not in PLAN_ERRORS:
        raise UsageError(f"plan_error must be one of {', '.join(PLAN_ERRORS)}, got {plan_error!r}")
    if plan_error != "rel" and cal is None:
        raise UsageError(f"--plan-error {plan_error} measures output errors on calibration tokens: "
                         "give --calib")
    if lowrank == "auto" and plan_error == "layer":
        raise UsageError("--lowrank auto is not offered to --plan-error layer")
    ckpt = ckpt if isinstance(ckpt, Checkpoint) else Checkpoint.open(ckpt)
    shape, layers, E, keys = ckpt.shape, ckpt.layers, ckpt.model.n_experts, ckpt.keys
    xs = cal.xs if cal is not None else {}
    ws = cal.ws if cal is not None and plan_error != "rel" else {}
    freq = frequencies(counts if counts is not None else cal.counts if cal is not None else {}, keys)
    specs = [expert_spec(b, g, quantizer) for b in BITS
             for g in ((group_size,) if group_size is not None else MENU[b])]
    if plan_error == "layer":
        chosen = layer_plan(cal, ckpt, specs, budget, act_aware, log)
        return MixedPlan(chosen, freq, budget, weight={k: 1.0 for k in keys})

    options = {}
    curves = Progress("quantize: error curves", len(keys), "experts", quiet=quiet)
    for layer in layers:
        ranks = {}
        if lowrank == "auto":  # per layer, on its hottest expert: the rank that makes b bits match b+1
            e = max(range(E), key=lambda i: freq[layer, i])
            g, u, d, biases = ckpt.expert(layer, e)
            base = [expert_spec(b, group_size, quantizer) for b in (2, 3, 4)]
            curve = error_curve(g, u, d, base, xs.get((layer, e)), shape=shape, act_aware=act_aware,
                                biases=biases)
            for b, nxt in zip((2, 3), curve[1:]):
                ranks[b] = pick_rank(g, u, d, b, nxt.err, xs.get((layer, e)), shape, group_size, quantizer,
                                     act_aware, biases)
        extra = [expert_spec(b, group_size, quantizer, r) for b, r in ranks.items() if r]
        for e in range(E):
            g, u, d, biases = ckpt.expert(layer, e)
            x = xs.get((layer, e))
            if ws and x is None:  # never routed on the calibration text: no output error to weigh
                cs = [make_codec(sp) for sp in specs + extra]
                options[layer, e] = [Option(dict(c.spec), c.nbytes(shape), 0.0) for c in cs]
                curves.update()
                continue
            options[layer, e] = error_curve(g, u, d, specs + extra, x, shape=shape, w=ws.get((layer, e)),
                                            act_aware=act_aware, biases=biases)
            curves.update()
        curves.write(f"layer {layer}: error curves of {E} experts measured"
                     + (f", low-rank ranks {ranks}" if ranks else ""))
    curves.close()
    weight = freq
    if plan_error != "rel":  # the errors are sums over (capped) calibration rows: scale them up
        weight = {k: cal.scale.get(k, 0.0) for k in keys}
    if plan_error == "nll":  # ΔNLL per unit of squared output error, per layer, at 2 bits
        spec2 = expert_spec(2, group_size, quantizer)
        rise = layer_sensitivity(cal, ckpt, spec2, act_aware)
        label = Option(make_codec(spec2).spec, 0, 0.0).label
        for layer in layers:
            at2 = sum(weight[layer, e] * next(o.err for o in options[layer, e] if o.label == label)
                      for e in range(E))
            s_l = max(rise[layer], 1e-6) / max(at2, 1e-30)
            for e in range(E):
                weight[layer, e] *= s_l
        log("layer sensitivity (calibration NLL rise, nats/token, layer alone at "
            f"{label}): " + " ".join(f"{la}: {r:+.4f}" for la, r in rise.items()))
    return MixedPlan(allocate(options, weight, budget), freq, budget, None if weight is freq else weight,
                     per_expert=len(keys) <= 64)
