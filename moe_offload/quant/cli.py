"""`moe-offload quantize`: a Hugging Face folder -> an expert store with quantized experts (and attention);
the flags of quant.writer.quantize(), its Python API.

    moe-offload quantize --model HF_DIR --out STORE [--expert-bits 2|3|4|8|mixed] [--budget SIZE]
                         [--attn-bits 4|8|16] [--head-bits 4|8|16] [--group-size N] [--lowrank auto|off]
                         [--stats routing_stats.json] [--calib TEXT] [--act-aware auto|on|off]
                         [--quantizer hqq|rtn]

Uniform bits: every routed expert gets the same hqq codec. `mixed` (mixed.plan_mixed): every expert is
encoded at 2/3/4/8 bits × the group sizes of mixed.MENU (--group-size N: N only) (and, with --lowrank auto,
at b bits + a per-layer rank), its error measured, and mixed.allocate picks one option per expert under
--budget (bytes of all routed experts). --plan-error says which error: `rel` (without --calib) the relative
Frobenius error weighted by routing frequency (--stats, else uniform); `out` (default with --calib) Σ_t w_t² ||y_t − ŷ_t||² over the
calibration tokens routed to the expert with router weight w_t, which carries frequency and output scale;
`nll` that, scaled per layer by the calibration NLL rise measured with the layer's experts alone at 2 bits;
`layer` one codec per layer, chosen from the measured calibration NLL rise of each layer alone at each
option (mixed.layer_plan).
With --calib the HQQ fit is activation-aware by default (--act-aware auto): each expert's scales and zeros
minimise its weight error weighted per input column by the second moment of the inputs it sees on the
calibration text (hqq.importance_weights; uniform and mixed bits alike, same format and kernels). The mixed
plan then fits on the even calibration rows of an expert and measures on the odd ones (mixed.error_curve).
The chosen experts are encoded again while the store is written (HQQ is deterministic, so the bytes are the
ones measured). Routers, norms, embeddings, shared experts and dense MLPs stay in the store dtype;
attention projections are quantized when --attn-bits < 16, lm_head when --head-bits < 16 (quant/backbone.py).
Expert biases (gpt-oss) are kept exact (fp32) in each expert's blob beside its quantized weights.
"""

from __future__ import annotations

import sys

from ..progress import add_quiet_arg
from ..utils import mib


def add_args(p):
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--out", required=True, help="store folder to create")
    p.add_argument("--expert-bits", default="4", choices=["2", "3", "4", "8", "mixed"],
                   help="bits per expert weight")
    p.add_argument("--budget", default=None,
                   help="bytes for all routed experts with --expert-bits mixed, e.g. 20GiB")
    p.add_argument("--attn-bits", type=int, default=16, choices=[4, 8, 16],
                   help="16 keeps attention unquantized")
    p.add_argument("--head-bits", type=int, default=16, choices=[4, 8, 16],
                   help="lm_head: 16 keeps it unquantized; 8 (one group per row) or 4 (groups of --group-size, "
                        "default 64) store it like the attention linears (a tied lm_head stays the embedding)")
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


def run(a) -> int:
    from .writer import quantize

    def show(plan) -> None:
        print(plan.format(detail=a.plan_detail))

    r = quantize(a.model, a.out, expert_bits=a.expert_bits, budget=a.budget, attn_bits=a.attn_bits,
                 head_bits=a.head_bits, group_size=a.group_size, lowrank=a.lowrank, stats=a.stats, calib=a.calib,
                 calib_tokens=a.calib_tokens, calib_rows=a.calib_rows, quantizer=a.quantizer,
                 act_aware=a.act_aware, dtype=a.dtype, overwrite=a.overwrite, plan_error=a.plan_error,
                 quiet=a.quiet, log=lambda m: print(m, file=sys.stderr), on_plan=show)
    store = r.store
    backbone = (store.path / "backbone.safetensors").stat().st_size
    mix = " ".join(f"{n}×{k}" for k, n in sorted(r.mix().items()))
    print(f"quantized {len(store.entries)} experts ({mix}, {mib(store.expert_bytes)}, mean error "
          f"{r.mean_error:.4f}) + backbone {mib(backbone)} (attention {a.attn_bits}-bit, lm_head "
          f"{a.head_bits}-bit) in "
          f"{r.seconds:.1f} s -> {store.path}")
    return 0
