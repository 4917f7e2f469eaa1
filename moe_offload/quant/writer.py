"""quantize(): a Hugging Face folder -> an expert store with quantized experts (uniform or mixed bits) and,
optionally, quantized attention. `moe-offload quantize` is a thin wrapper (quant/cli.py documents the
options); the mixed plan is mixed.plan_mixed."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from . import mixed

ACT_AWARE = ("auto", "on", "off")


@dataclass
class QuantizeResult:
    store: object  # the written store (store.format.Store)
    plan: mixed.MixedPlan | None  # expert_bits="mixed" only
    mean_error: float  # of the experts as written (codec.expert_error)
    seconds: float

    def mix(self) -> dict[str, int]:
        """codec label -> experts stored with it."""
        out: dict[str, int] = {}
        for e in self.store.entries.values():
            label = mixed.Option(e.codec, e.nbytes, 0.0).label
            out[label] = out.get(label, 0) + 1
        return out


class _Encoder:
    """What convert() calls per expert: the codec, with this expert's calibration rows and its shape (the
    gated unit); biases pass through to the blob."""

    def __init__(self, codec, x, shape, log, act_aware=False):
        self.codec, self.x, self.shape, self.log, self.act_aware = codec, x, shape, log, act_aware
        self.spec = codec.spec

    def encode(self, gate, up, down, **biases):
        from .codec import encode_checked

        blob, error = encode_checked(self.codec, gate, up, down, self.x, self.shape, self.act_aware, **biases)
        self.log.append(error)
        return blob


def quantize(model: str | os.PathLike, out: str | os.PathLike, *, expert_bits: int | str = 4,
             budget: int | str | None = None, attn_bits: int = 16, head_bits: int = 16,
             group_size: int | None = None,
             lowrank: str = "off", stats: str | os.PathLike | None = None,
             calib: str | os.PathLike | None = None, calib_tokens: int = 2048, calib_rows: int = 512,
             quantizer: str = "hqq", act_aware: str = "auto", dtype=None, overwrite: bool = False,
             plan_error: str | None = None, quiet: bool = True,
             log: Callable[[str], None] = mixed.silent,
             on_plan: Callable[[mixed.MixedPlan], None] | None = None) -> QuantizeResult:
    """Write the store `out` from the Hugging Face folder `model`. expert_bits: 2, 3, 4, 8 or "mixed" (with
    budget: bytes for all routed experts, or a size like "20GiB"). calib: a text file run through the
    unquantized model for routing counts and per-expert inputs; stats: routing_stats.json (copied into the
    store). act_aware "auto": on when calib is given. plan_error: default "out" with calib, else "rel".
    on_plan(plan) is called with the mixed plan before the store is written; log gets the planner's lines."""
    from ..codecs import make_codec
    from ..progress import Progress
    from ..store.folders import check_out
    from ..store.format import convert
    from ..utils import parse_dtype, parse_size, reuse_freed_memory
    from .backbone import attention_view, chain, head_view
    from .codec import DEFAULT_GROUP

    t0 = time.perf_counter()
    hf, out = Path(model), Path(out)
    expert_bits = str(expert_bits)
    if (hf / "manifest.json").is_file():
        raise UsageError(f"{hf} is an expert store; quantize reads the Hugging Face folder it came from")
    check_out(hf, out, overwrite)  # before the calibration and planning, not after
    if expert_bits not in ("2", "3", "4", "8", "mixed"):
        raise UsageError(f"expert bits must be 2, 3, 4, 8 or mixed, got {expert_bits!r}")
    if expert_bits == "mixed" and budget is None:
        raise UsageError("--expert-bits mixed needs --budget SIZE (bytes for all routed experts)")
    if budget is not None and expert_bits != "mixed":
        raise UsageError("--budget applies to --expert-bits mixed")
    if lowrank == "auto" and plan_error == "layer":
        raise UsageError("--lowrank auto is not offered to --plan-error layer")
    if lowrank == "auto" and expert_bits != "mixed":
        raise UsageError("--lowrank auto offers options to the mixed plan: use it with --expert-bits mixed")
    if head_bits not in (4, 8, 16):
        raise UsageError(f"head bits must be 4, 8 or 16, got {head_bits!r}")
    if act_aware not in ACT_AWARE:
        raise UsageError(f"act_aware must be one of {', '.join(ACT_AWARE)}, got {act_aware!r}")
    for path in (stats, calib):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{path}: no such file")
    budget = parse_size(budget)
    ckpt = mixed.Checkpoint.open(hf)

    if plan_error is None:  # docs/quality.md: at uniform 2-bit's bytes, out recovered 28 % of its
        # perplexity rise on held-out text, rel -4 % (an earlier, more skewed checkpoint: 78 % and 45 %);
        # activation-aware: out 40 %, layer 47 % (layer ignores routing skew, which won on that checkpoint)
        plan_error = "out" if calib else "rel"
    if act_aware == "on" and not calib:
        raise UsageError("--act-aware on weighs the fit by calibration inputs: give --calib")
    aware = act_aware == "on" or (act_aware == "auto" and calib is not None)
    if plan_error != "rel" and not calib:
        raise UsageError(f"--plan-error {plan_error} measures output errors on calibration tokens: "
                         "give --calib")
    cal = mixed.calibrate(hf, calib, calib_tokens, calib_rows, quiet) if calib else None
    xs = cal.xs if cal is not None else {}

    plan = None
    if expert_bits == "mixed":
        plan = mixed.plan_mixed(ckpt, budget, group_size=group_size, quantizer=quantizer, lowrank=lowrank,
                                plan_error=plan_error, counts=mixed.load_stats(stats) if stats else None,
                                cal=cal, act_aware=aware, quiet=quiet, log=log)
        if on_plan is not None:
            on_plan(plan)
        chosen = plan.specs
    else:
        chosen = {k: mixed.expert_spec(int(expert_bits), group_size, quantizer) for k in ckpt.keys}

    errors: list[float] = []
    codecs = {json.dumps(s, sort_keys=True): make_codec(s) for s in chosen.values()}

    def pick(layer, e):
        codec = codecs[json.dumps(chosen[layer, e], sort_keys=True)]
        return _Encoder(codec, xs.get((layer, e)), ckpt.shape, errors, aware)

    views = []
    for fn, bits in ((attention_view, attn_bits), (head_view, head_bits)):
        if bits < 16:
            group = DEFAULT_GROUP[bits] if bits == 8 or group_size is None else group_size
            views.append(fn(ckpt.model, bits, group))
    view = chain(views) if views else None
    summary = {"expert_bits": expert_bits, "attn_bits": attn_bits, "head_bits": head_bits,
               "group_size": group_size, "quantizer": quantizer, "act_aware": aware, "lowrank": lowrank,
               "budget": budget,
               "calibration_tokens": calib_tokens if calib else 0,
               "plan_error": plan_error if expert_bits == "mixed" else None}
    with Progress("quantize", unit="experts", quiet=quiet) as bar, reuse_freed_memory():
        store = convert(hf, out, parse_dtype(dtype), overwrite=overwrite, codec=pick, backbone_view=view,
                        extra={"quantization": summary}, progress=bar)
    if stats:
        shutil.copyfile(stats, store.path / "routing_stats.json")
    return QuantizeResult(store, plan, sum(errors) / max(len(errors), 1), time.perf_counter() - t0)
