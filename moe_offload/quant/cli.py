"""`moe-offload quantize`: a Hugging Face folder -> an expert store with quantized experts (and attention).

    moe-offload quantize --model HF_DIR --out STORE [--expert-bits 2|3|4|8|mixed] [--budget SIZE]
                         [--attn-bits 4|8|16] [--group-size N] [--lowrank auto|off]
                         [--stats routing_stats.json] [--calib TEXT] [--quantizer hqq|rtn]

Uniform bits: every routed expert gets the same hqq codec. `mixed`: every expert is encoded at 2/3/4/8 bits
(and, with --lowrank auto, at b bits + a per-layer rank), its error measured (output error on its
calibration tokens when --calib is given, else relative Frobenius error), and mixed.allocate picks one
option per expert under --budget (bytes of all routed experts), weighting errors by routing frequency
(--stats, else counted on --calib, else uniform). The chosen experts are encoded again while the store is
written (HQQ is deterministic, so the bytes are the ones measured). Routers, norms, embeddings, lm_head,
shared experts and dense MLPs stay in the store dtype; attention projections are quantized when
--attn-bits < 16 (quant/backbone.py).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

from ..cli import command
from ..errors import MoeError, UsageError
from ..utils import mib, parse_dtype, parse_size

BITS = (2, 3, 4, 8)


def _add_quantize(p):
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--out", required=True, help="store folder to create")
    p.add_argument("--expert-bits", default="4", choices=["2", "3", "4", "8", "mixed"])
    p.add_argument("--budget", default=None,
                   help="bytes for all routed experts with --expert-bits mixed, e.g. 20GiB")
    p.add_argument("--attn-bits", type=int, default=16, choices=[4, 8, 16],
                   help="16 keeps attention unquantized")
    p.add_argument("--group-size", type=int, default=None,
                   help="group of 2/3/4-bit weights (default: 2-bit 32, 3/4-bit 64); 8-bit: one per row")
    p.add_argument("--lowrank", default="off", choices=["auto", "off"],
                   help="auto: offer b-bit + low-rank residual options to the mixed plan (used if better)")
    p.add_argument("--stats", default=None,
                   help="routing_stats.json (moe-offload profile) for the mixed plan")
    p.add_argument("--calib", default=None, help="calibration text: routing counts and per-expert inputs")
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--quantizer", default="hqq", choices=["hqq", "rtn"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the unquantized tensors (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--plan-detail", action="store_true", help="print one plan row per expert")


def expert_spec(bits: int, group_size: int | None, quantizer: str, rank: int = 0) -> dict:
    """The hqq codec spec; --group-size applies to 2/3/4 bits (8-bit keeps one group per row: int8 kernel)."""
    spec = {"name": "hqq", "bits": bits, "quantizer": quantizer}
    if group_size is not None and bits < 8:
        spec["group_size"] = group_size
    if rank:
        spec["rank"] = rank
    return spec


def calibrate(hf_dir: Path, text: Path, max_tokens: int, max_rows: int = 512):
    """Run the unquantized model on the text; returns ({layer: counts}, {(layer, expert): x [n, D]})."""
    from ..profile import record
    from ..runtime.engine import load

    engine = load(hf_dir, dtype="float32")
    if engine.tokenizer is None:
        raise UsageError(f"{hf_dir}: no tokenizer to encode --calib")
    ids = engine.tokenizer.encode(text.read_text(errors="replace"))[:max_tokens]
    rec = record(engine, ids, window=min(256, engine.context_length))
    xs = {}
    for layer, chosen in rec.chosen.items():
        for e in range(rec.n_experts):
            rows = (chosen == e).any(-1).nonzero().flatten()[:max_rows]
            if len(rows):
                xs[layer, e] = rec.hidden[layer][rows]
    return rec.counts(), xs


class _Encoder:
    """What convert() calls per expert: the codec, with this expert's calibration rows and activation."""

    def __init__(self, codec, x, act, log):
        self.codec, self.x, self.act, self.log = codec, x, act, log
        self.spec = codec.spec

    def encode(self, gate, up, down, **extra):
        if extra:
            raise MoeError(f"hqq codec: experts with {', '.join(sorted(extra))} are not supported")
        from .codec import expert_error

        blob = self.codec.encode(gate, up, down, x=self.x, act=self.act)
        self.log.append(expert_error(gate, up, down, self.codec, blob, self.x, self.act))
        return blob


def pick_rank(gate, up, down, bits: int, target: float, x, act: str, group_size, quantizer: str) -> int:
    """Smallest rank (doubling from 4) whose b-bit + rank error reaches `target`; 0 if none below the cap."""
    from .codec import HQQCodec, expert_error
    from .lowrank import breakeven_rank

    I, D = gate.shape
    cap = min(breakeven_rank(2 * I, D), breakeven_rank(D, I)) // 4  # above: a dense copy in disguise
    r = 4
    while r <= cap:
        c = HQQCodec(expert_spec(bits, group_size, quantizer, r))
        if expert_error(gate, up, down, c, x=x, act=act) <= target:
            return r
        r *= 2
    return 0


@command("quantize", "write an expert store with quantized experts (uniform or mixed bits) and attention",
         _add_quantize)
def cmd_quantize(a) -> int:
    from ..checkpoint import SafetensorsFolder, dequantizing, expert_tensors, read_config
    from ..experts import make_codec
    from ..models import build, get_module
    from ..store.format import convert
    from . import mixed
    from .backbone import attention_view
    from .codec import DEFAULT_GROUP

    t0 = time.perf_counter()
    hf, out = Path(a.model), Path(a.out)
    if (hf / "manifest.json").is_file():
        raise UsageError(f"{hf} is an expert store; quantize reads the Hugging Face folder it came from")
    if a.expert_bits == "mixed" and a.budget is None:
        raise UsageError("--expert-bits mixed needs --budget SIZE (bytes for all routed experts)")
    if a.budget is not None and a.expert_bits != "mixed":
        raise UsageError("--budget applies to --expert-bits mixed")
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

    counts, xs = {}, {}
    if a.calib:
        counts, xs = calibrate(hf, Path(a.calib), a.calib_tokens)
    if a.stats:
        counts = mixed.load_stats(a.stats)
    freq = mixed.frequencies(counts, keys)

    if a.expert_bits == "mixed":
        budget = parse_size(a.budget)
        specs = [expert_spec(b, a.group_size, a.quantizer) for b in BITS]
        options = {}
        for layer in layers:
            ranks = {}
            if a.lowrank == "auto":  # per layer, on its hottest expert: the rank that makes b bits match b+1
                e = max(range(E), key=lambda i: freq[layer, i])
                parts = expert_tensors(source, args.model_type, layer, e)
                g, u, d = parts["gate"], parts["up"], parts["down"]
                curve = mixed.error_curve(g, u, d, specs[:3], xs.get((layer, e)), shape=shape)
                for b, nxt in zip((2, 3), curve[1:]):
                    ranks[b] = pick_rank(g, u, d, b, nxt.err, xs.get((layer, e)), shape.act, a.group_size,
                                         a.quantizer)
            extra = [expert_spec(b, a.group_size, a.quantizer, r) for b, r in ranks.items() if r]
            for e in range(E):
                parts = expert_tensors(source, args.model_type, layer, e)
                if set(parts) - {"gate", "up", "down"}:
                    raise MoeError(f"{args.model_type}: experts with biases are not supported by hqq")
                options[layer, e] = mixed.error_curve(parts["gate"], parts["up"], parts["down"],
                                                      specs + extra, xs.get((layer, e)), shape=shape)
            print(f"layer {layer}: error curves of {E} experts measured"
                  + (f", low-rank ranks {ranks}" if ranks else ""), file=sys.stderr)
        plan = mixed.allocate(options, freq, budget)
        print(mixed.format_plan(plan, freq, budget, detail=a.plan_detail or len(keys) <= 64))
        chosen = {k: o.spec for k, o in plan.items()}
    else:
        chosen = {k: expert_spec(int(a.expert_bits), a.group_size, a.quantizer) for k in keys}

    errors: list[float] = []
    codecs = {json.dumps(s, sort_keys=True): make_codec(s) for s in chosen.values()}

    def pick(layer, e):
        codec = codecs[json.dumps(chosen[layer, e], sort_keys=True)]
        return _Encoder(codec, xs.get((layer, e)), shape.act, errors)

    view = None
    if a.attn_bits < 16:
        attn_group = DEFAULT_GROUP[a.attn_bits] if a.attn_bits == 8 or a.group_size is None else a.group_size
        view = attention_view(model, a.attn_bits, attn_group)
    summary = {"expert_bits": a.expert_bits, "attn_bits": a.attn_bits, "group_size": a.group_size,
               "quantizer": a.quantizer, "lowrank": a.lowrank, "budget": parse_size(a.budget),
               "calibration_tokens": a.calib_tokens if a.calib else 0}
    store = convert(hf, out, parse_dtype(a.dtype), overwrite=a.overwrite, codec=pick, backbone_view=view,
                    extra={"quantization": summary})
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
