"""`moe-offload quantize`: a Hugging Face folder -> an expert store with quantized experts (and attention).

    moe-offload quantize --model HF_DIR --out STORE [--expert-bits 2|3|4|8|mixed] [--budget SIZE]
                         [--attn-bits 4|8|16] [--group-size N] [--lowrank auto|off]
                         [--stats routing_stats.json] [--calib TEXT] [--act-aware auto|on|off]
                         [--quantizer hqq|rtn]

Uniform bits: every routed expert gets the same hqq codec. `mixed`: every expert is encoded at 2/3/4/8 bits
× the group sizes of MENU (--group-size N: N only) (and, with --lowrank auto, at b bits + a per-layer rank),
its error measured, and mixed.allocate picks one option per expert under --budget (bytes of all routed
experts). --plan-error says which error: `rel` (without --calib) the relative Frobenius error weighted by
routing frequency (--stats, else uniform); `out` (default with --calib) Σ_t w_t² ||y_t − ŷ_t||² over the
calibration tokens routed to the expert with router weight w_t, which carries frequency and output scale;
`nll` that, scaled per layer by the calibration NLL rise measured with the layer's experts alone at 2 bits;
`layer` one codec per layer, chosen from the measured calibration NLL rise of each layer alone at each
option (layer_plan).
With --calib the HQQ fit is activation-aware by default (--act-aware auto): each expert's scales and zeros
minimise its weight error weighted per input column by the second moment of the inputs it sees on the
calibration text (hqq.importance_weights; uniform and mixed bits alike, same format and kernels). The mixed
plan then fits on the even calibration rows of an expert and measures on the odd ones (mixed.error_curve).
The chosen experts are encoded again while the store is written (HQQ is deterministic, so the bytes are the
ones measured). Routers, norms, embeddings, lm_head, shared experts and dense MLPs stay in the store dtype;
attention projections are quantized when --attn-bits < 16 (quant/backbone.py). Expert biases (gpt-oss) are
kept exact (fp32) in each expert's blob beside its quantized weights.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import expert_tensors
from ..cli import command
from ..errors import UsageError
from .kernels import write_layout
from ..progress import Progress, add_quiet_arg
from ..utils import mib, parse_dtype, parse_size

BITS = (2, 3, 4, 8)
# The mixed plan's menu: bits × group size (--group-size N: only N). Without coarser groups the 2-bit default
# (g32) is the cheapest option, so a budget of uniform 2-bit has nothing to trade and mixed equals uniform;
# 2-bit g64/g128 free 10-16 % of an expert's bytes for the hotter or more sensitive ones (docs/quality.md).
MENU = {2: (32, 64, 128), 3: (64, 128), 4: (64, 128), 8: (0,)}


def _add_quantize(p):
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--out", required=True, help="store folder to create")
    p.add_argument("--expert-bits", default="4", choices=["2", "3", "4", "8", "mixed"],
                   help="bits per expert weight")
    p.add_argument("--budget", default=None,
                   help="bytes for all routed experts with --expert-bits mixed, e.g. 20GiB")
    p.add_argument("--attn-bits", type=int, default=16, choices=[4, 8, 16],
                   help="16 keeps attention unquantized")
    p.add_argument("--group-size", type=int, default=None,
                   help="group of 2/3/4-bit weights (default: 2-bit 32, 3/4-bit 64; mixed: the plan picks "
                        "from MENU); 8-bit: one per row")
    p.add_argument("--lowrank", default="off", choices=["auto", "off"],
                   help="auto: offer b-bit + low-rank residual options to the mixed plan (used if better)")
    p.add_argument("--stats", default=None,
                   help="routing_stats.json (moe-offload profile) for the mixed plan")
    p.add_argument("--calib", default=None, help="calibration text: routing counts and per-expert inputs")
    p.add_argument("--calib-tokens", type=int, default=2048, help="tokens of --calib to run")
    p.add_argument("--calib-rows", type=int, default=512,
                   help="per expert, at most this many of its calibration inputs (the first ones) are kept: "
                        "what output errors are measured on and activation-aware weights estimated from")
    p.add_argument("--quantizer", default="hqq", choices=["hqq", "rtn"],
                   help="hqq or rtn (round to nearest)")
    p.add_argument("--act-aware", default="auto", choices=["auto", "on", "off"],
                   help="activation-aware HQQ: fit each group's scale and zero to the weight error weighted "
                        "per input column by E[x_j^2] of the inputs the expert sees on --calib (gate/up: its "
                        "routed hidden states; down: act(gate x)*up x). Same format and kernels, other "
                        "scales/zeros. auto (default): on whenever --calib is given, for uniform and mixed "
                        "bits; on needs --calib; off: the data-free fit"),
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the unquantized tensors (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is an expert store or an empty folder")
    p.add_argument("--plan-detail", action="store_true", help="print one plan row per expert")
    add_quiet_arg(p)
    p.add_argument("--plan-error", default=None, choices=["rel", "out", "nll", "layer"],
                   help="what the mixed plan minimises: rel Σ freq·relative error (default without "
                        "--calib); out Σ of routing-weighted squared output errors on the calibration tokens "
                        "(default with --calib); nll: out scaled per layer by its measured sensitivity "
                        "(calibration NLL rise with that layer alone at 2 bits); layer: one codec per "
                        "layer, the byte-feasible set with the least sum of measured per-layer calibration "
                        "NLL rises (each layer alone at each MENU option; exact search)")


def expert_spec(bits: int, group_size: int | None, quantizer: str, rank: int = 0) -> dict:
    """The hqq codec spec; --group-size applies to 2/3/4 bits (8-bit keeps one group per row: int8 kernel)."""
    spec = {"name": "hqq", "bits": bits, "quantizer": quantizer}
    if bits == 4:  # the codes in this CPU's int4 kernel order (2/3-bit codes are expanded at load anyway)
        spec["layout"] = write_layout()
    if group_size is not None and bits < 8:
        spec["group_size"] = group_size
    if rank:
        spec["rank"] = rank
    return spec


@dataclass
class Calibration:
    counts: dict  # {layer: activations per expert}
    xs: dict  # {(layer, expert): x [n, D]}, its first max_rows calibration inputs
    ws: dict  # {(layer, expert): w [n]}, the router's weight of the expert on those rows
    scale: dict  # {(layer, expert): rows routed to it / n}: what a capped sum is multiplied by
    engine: object  # the unquantized model (fp32), for layer_sensitivity
    ids: list


def calibrate(hf_dir: Path, text: Path, max_tokens: int, max_rows: int = 512,
              quiet: bool = True) -> Calibration:
    """Run the unquantized model on the text: routing counts, per-expert inputs and routing weights."""
    from ..profile import record
    from ..runtime.engine import load

    engine = load(hf_dir, dtype="float32")
    if engine.tokenizer is None:
        raise UsageError(f"{hf_dir}: no tokenizer to encode --calib")
    ids = engine.tokenizer.encode(text.read_text(errors="replace"))[:max_tokens]
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


def layer_sensitivity(cal: Calibration, source, model_type: str, shape, spec: dict,
                      act_aware: bool = False) -> dict[int, float]:
    """Per MoE layer: the rise of the calibration NLL (nats/token) with that layer's experts all encoded with
    `spec` (act_aware: weighted by their calibration inputs) and every other layer unquantized."""
    import math

    from ..experts import make_codec

    engine, codec = cal.engine, make_codec(spec)
    window = min(256, engine.context_length)
    base = math.log(engine.perplexity(cal.ids, window)[0])
    out = {}
    for layer, moe in engine.model.moe_blocks():
        units = moe.experts.units
        saved = list(units)
        for e in range(len(units)):
            p = expert_tensors(source, model_type, layer, e)
            x = cal.xs.get((layer, e)) if act_aware else None
            blob = codec.encode(x=x, act=shape, act_aware=act_aware, **p)
            units[e] = codec.decode(blob, shape)
        out[layer] = math.log(engine.perplexity(cal.ids, window)[0]) - base
        units[:] = saved
    return out


def layer_plan(cal: Calibration, source, model_type: str, shape, specs: list[dict], budget: int,
               n_experts: int, act_aware: bool = False) -> dict:
    """--plan-error layer: every layer's experts at one codec. Each layer alone at each spec gives a
    measured calibration NLL rise (layer_sensitivity); mixed.best_per_group picks the spec per layer with
    the least total rise within the budget (rises assumed additive across layers).
    -> {(layer, expert): Option} with err = the layer's rise / its experts."""
    from ..experts import make_codec
    from . import mixed

    E = n_experts
    per_layer: dict[int, list] = {}
    for spec in specs:
        rise = layer_sensitivity(cal, source, model_type, shape, spec, act_aware)
        c = make_codec(spec)
        opt = mixed.Option(dict(c.spec), c.nbytes(shape), 0.0)
        print(f"{opt.label:>8}: calibration NLL rise, each layer alone "
              + " ".join(f"{la}: {r:+.4f}" for la, r in rise.items()), file=sys.stderr)
        for la, r in rise.items():
            per_layer.setdefault(la, []).append(mixed.Option(opt.spec, E * opt.nbytes, r))
    best = mixed.best_per_group(per_layer, budget)
    return {(la, e): mixed.Option(o.spec, o.nbytes // E, o.err / E)
            for la, o in best.items() for e in range(E)}


class _Encoder:
    """What convert() calls per expert: the codec, with this expert's calibration rows and its shape (the
    gated unit); biases pass through to the blob."""

    def __init__(self, codec, x, shape, log, act_aware=False):
        self.codec, self.x, self.shape, self.log, self.act_aware = codec, x, shape, log, act_aware
        self.spec = codec.spec

    def encode(self, gate, up, down, **biases):
        from .codec import expert_error

        blob = self.codec.encode(gate, up, down, x=self.x, act=self.shape, act_aware=self.act_aware, **biases)
        self.log.append(expert_error(gate, up, down, self.codec, blob, self.x, self.shape, biases=biases))
        return blob


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


@command("quantize", "write an expert store with quantized experts (uniform or mixed bits) and attention",
         _add_quantize)
def cmd_quantize(a) -> int:
    from ..checkpoint import SafetensorsFolder, dequantizing, read_config
    from ..experts import make_codec
    from ..models import build, get_module
    from ..store.folders import check_out
    from ..store.format import convert
    from . import mixed
    from .backbone import attention_view
    from .codec import DEFAULT_GROUP

    t0 = time.perf_counter()
    hf, out = Path(a.model), Path(a.out)
    if (hf / "manifest.json").is_file():
        raise UsageError(f"{hf} is an expert store; quantize reads the Hugging Face folder it came from")
    check_out(hf, out, a.overwrite)  # before the calibration and planning, not after
    if a.expert_bits == "mixed" and a.budget is None:
        raise UsageError("--expert-bits mixed needs --budget SIZE (bytes for all routed experts)")
    if a.budget is not None and a.expert_bits != "mixed":
        raise UsageError("--budget applies to --expert-bits mixed")
    if a.lowrank == "auto" and a.plan_error == "layer":
        raise UsageError("--lowrank auto is not offered to --plan-error layer")
    if a.lowrank == "auto" and a.expert_bits != "mixed":
        raise UsageError("--lowrank auto offers options to the mixed plan: use it with --expert-bits mixed")
    for path in (a.stats, a.calib):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{path}: no such file")
    config = read_config(hf)
    get_module(config.get("model_type"))
    with torch.device("meta"):
        args, model = build(config)
    shape, layers, E = model.expert_shape, [la for la, _ in model.moe_blocks()], model.n_experts
    keys = [(la, e) for la in layers for e in range(E)]
    source = dequantizing(SafetensorsFolder(hf), config)

    if a.plan_error is None:  # docs/quality.md: at uniform 2-bit's bytes, out recovered 28 % of its
        # perplexity rise on held-out text, rel -4 % (an earlier, more skewed checkpoint: 78 % and 45 %);
        # activation-aware: out 40 %, layer 47 % (layer ignores routing skew, which won on that checkpoint)
        a.plan_error = "out" if a.calib else "rel"
    if a.act_aware == "on" and not a.calib:
        raise UsageError("--act-aware on weighs the fit by calibration inputs: give --calib")
    act_aware = a.act_aware == "on" or (a.act_aware == "auto" and a.calib is not None)
    if a.plan_error != "rel" and not a.calib:
        raise UsageError(f"--plan-error {a.plan_error} measures output errors on calibration tokens: "
                         "give --calib")
    counts, xs, ws, cal = {}, {}, {}, None
    if a.calib:
        cal = calibrate(hf, Path(a.calib), a.calib_tokens, a.calib_rows, a.quiet)
        counts, xs = cal.counts, cal.xs
        ws = cal.ws if a.plan_error != "rel" else {}
    if a.stats:
        counts = mixed.load_stats(a.stats)
    freq = mixed.frequencies(counts, keys)

    specs = [expert_spec(b, g, a.quantizer) for b in BITS
             for g in ((a.group_size,) if a.group_size is not None else MENU[b])]
    if a.expert_bits == "mixed" and a.plan_error == "layer":
        budget = parse_size(a.budget)
        plan = layer_plan(cal, source, args.model_type, shape, specs, budget, E, act_aware)
        print(mixed.format_plan(plan, freq, budget, detail=a.plan_detail, weight={k: 1.0 for k in keys}))
        chosen = {k: o.spec for k, o in plan.items()}
    elif a.expert_bits == "mixed":
        budget = parse_size(a.budget)
        options = {}
        curves = Progress("quantize: error curves", len(keys), "experts", quiet=a.quiet)
        for layer in layers:
            ranks = {}
            if a.lowrank == "auto":  # per layer, on its hottest expert: the rank that makes b bits match b+1
                e = max(range(E), key=lambda i: freq[layer, i])
                parts = expert_tensors(source, args.model_type, layer, e)
                g, u, d = parts.pop("gate"), parts.pop("up"), parts.pop("down")  # parts: the biases, if any
                base = [expert_spec(b, a.group_size, a.quantizer) for b in (2, 3, 4)]
                curve = mixed.error_curve(g, u, d, base, xs.get((layer, e)), shape=shape, act_aware=act_aware,
                                          biases=parts)
                for b, nxt in zip((2, 3), curve[1:]):
                    ranks[b] = pick_rank(g, u, d, b, nxt.err, xs.get((layer, e)), shape, a.group_size,
                                         a.quantizer, act_aware, parts)
            extra = [expert_spec(b, a.group_size, a.quantizer, r) for b, r in ranks.items() if r]
            for e in range(E):
                parts = expert_tensors(source, args.model_type, layer, e)
                g, u, d = parts.pop("gate"), parts.pop("up"), parts.pop("down")  # parts: the biases, if any
                x = xs.get((layer, e))
                if ws and x is None:  # never routed on the calibration text: no output error to weigh
                    cs = [make_codec(sp) for sp in specs + extra]
                    options[layer, e] = [mixed.Option(dict(c.spec), c.nbytes(shape), 0.0) for c in cs]
                    curves.update()
                    continue
                options[layer, e] = mixed.error_curve(g, u, d, specs + extra, x, shape=shape,
                                                      w=ws.get((layer, e)), act_aware=act_aware, biases=parts)
                curves.update()
            curves.write(f"layer {layer}: error curves of {E} experts measured"
                         + (f", low-rank ranks {ranks}" if ranks else ""))
        curves.close()
        weight = freq
        if a.plan_error != "rel":  # the errors are sums over (capped) calibration rows: scale them up
            weight = {k: cal.scale.get(k, 0.0) for k in keys}
        if a.plan_error == "nll":  # ΔNLL per unit of squared output error, per layer, at 2 bits
            spec2 = expert_spec(2, a.group_size, a.quantizer)
            rise = layer_sensitivity(cal, source, args.model_type, shape, spec2, act_aware)
            label = mixed.Option(make_codec(spec2).spec, 0, 0.0).label
            for layer in layers:
                at2 = sum(weight[layer, e] * next(o.err for o in options[layer, e] if o.label == label)
                          for e in range(E))
                s_l = max(rise[layer], 1e-6) / max(at2, 1e-30)
                for e in range(E):
                    weight[layer, e] *= s_l
            print("layer sensitivity (calibration NLL rise, nats/token, layer alone at "
                  f"{label}): " + " ".join(f"{la}: {r:+.4f}" for la, r in rise.items()), file=sys.stderr)
        plan = mixed.allocate(options, weight, budget)
        print(mixed.format_plan(plan, freq, budget, detail=a.plan_detail or len(keys) <= 64,
                                weight=None if weight is freq else weight))
        chosen = {k: o.spec for k, o in plan.items()}
    else:
        chosen = {k: expert_spec(int(a.expert_bits), a.group_size, a.quantizer) for k in keys}

    errors: list[float] = []
    codecs = {json.dumps(s, sort_keys=True): make_codec(s) for s in chosen.values()}

    def pick(layer, e):
        codec = codecs[json.dumps(chosen[layer, e], sort_keys=True)]
        return _Encoder(codec, xs.get((layer, e)), shape, errors, act_aware)

    view = None
    if a.attn_bits < 16:
        attn_group = DEFAULT_GROUP[a.attn_bits] if a.attn_bits == 8 or a.group_size is None else a.group_size
        view = attention_view(model, a.attn_bits, attn_group)
    summary = {"expert_bits": a.expert_bits, "attn_bits": a.attn_bits, "group_size": a.group_size,
               "quantizer": a.quantizer, "act_aware": act_aware, "lowrank": a.lowrank,
               "budget": parse_size(a.budget),
               "calibration_tokens": a.calib_tokens if a.calib else 0,
               "plan_error": a.plan_error if a.expert_bits == "mixed" else None}
    with Progress("quantize", unit="experts", quiet=a.quiet) as bar:
        store = convert(hf, out, parse_dtype(a.dtype), overwrite=a.overwrite, codec=pick, backbone_view=view,
                        extra={"quantization": summary}, progress=bar)
    if a.stats:
        shutil.copyfile(a.stats, store.path / "routing_stats.json")
    backbone = (store.path / "backbone.safetensors").stat().st_size
    mix: dict[str, int] = {}
    for e in store.entries.values():
        label = mixed.Option(e.codec, e.nbytes, 0.0).label
        mix[label] = mix.get(label, 0) + 1
    print(f"quantized {len(store.entries)} experts ({' '.join(f'{n}×{k}' for k, n in sorted(mix.items()))}, "
          f"{mib(store.expert_bytes)}, mean error {sum(errors) / max(len(errors), 1):.4f}) + backbone "
          f"{mib(backbone)} (attention {a.attn_bits}-bit) in {time.perf_counter() - t0:.1f} s "
          f"-> {store.path}")
    return 0
