"""`--auto` (generate, chat, serve, profile): the planner picks the offload configuration (`auto_config`: an
OffloadConfig for runtime.load.load; the namespace of flags is read, never changed).

plan.plan_for(model, hardware) — hardware measured on this machine, or `--hardware PROFILE` — gives
--memory, --host-memory, prefetch on/off, CPU compute of misses on/off and the cache policy; every option the
user set explicitly wins. One stderr line says what was chosen. An impossible plan is the planner's one-line
refusal (exit 1).

The plan counts bytes at the precision it would like (`expert_bits`); the store runs at the precision it was
written in. So the plan is carried over as counts: the experts it puts on the device (and in host RAM) become
that many of the store's own experts, at their real footprint, on top of the store's real backbone. When the
plan wants another precision than the store holds, a second line gives the `moe-offload quantize` command,
and the budgets are planned again at the store's precision (nothing is quantized silently).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

from .errors import MoeError
from .utils import pick_device


def store_bits(store) -> int:
    """The precision the planner should see: hqq bits, or 16 for dense experts (fp32 too)."""
    bits = {int(e.codec.get("bits", 16)) if e.codec.get("name") == "hqq" else 16
            for e in store.entries.values()}
    return max(bits)  # mixed precision: plan for the widest


def store_backbone_bits(store) -> int:
    """The precision of the store's backbone linears as the planner counts them (plan.BACKBONE_BITS): the
    fewest bits of its attention and lm_head (`quantize --attn-bits / --head-bits`, a GGUF conversion's 8-bit
    backbone), 16 when they are unquantized."""
    m = store.manifest
    q = m.get("quantization") or {}
    bits = [int(q.get(k) or 16) for k in ("attn_bits", "head_bits")]
    if (m.get("source") or {}).get("backbone_8bit"):
        bits.append(8)
    return min(bits)


def backbone_bytes(store, dtype) -> int:
    """Bytes open_offloaded will count for the backbone: floating tensors in the compute dtype (fp32 for the
    family's fp32 keys), others as stored, a tied lm_head counted again (it is in the state dict twice)."""
    import torch

    from .models import build
    from .store.format import _ST_NAMES

    with torch.device("meta"):
        _, model = build(store.config)
    fp32 = tuple(getattr(model, "fp32_keys", ()))
    src = store.backbone()
    total = 0
    for name in src.keys():  # noqa: SIM118  (a SafetensorsFolder, not a dict)
        dt = _ST_NAMES[src.dtype_of(name)]
        n = int(torch.Size(src.shape_of(name)).numel())
        if dt.is_floating_point:
            dt = torch.float32 if fp32 and name.endswith(fp32) else dtype
        total += n * dt.itemsize
        if model.tie and name.endswith("embed_tokens.weight"):
            total += n * dt.itemsize
    return total


def _flag(name: str, value, mine: bool) -> str:
    return f"--{name} {value}" + (" (yours)" if mine else "")


def offload_options(values: Mapping) -> dict:
    """The offload keywords of runtime.load.load from the flags' values (an argparse namespace's `vars`)."""
    kw = {"host_memory": values.get("host_memory"), "cache_policy": values.get("cache_policy")}
    for name in ("prefetch", "prefetch_depth", "prefetch_experts", "cpu_misses", "miss_fallback",
                 "fallback_threshold", "verify_reads", "embed_rows", "preload", "disk_reads"):
        if values.get(name) is not None:
            kw[name] = values[name]
    if values.get("hardware") not in (None, "this-machine") and kw.get("cpu_misses", "off") != "off":
        kw["hardware"] = values["hardware"]  # the cost model's figures from the profile instead of measuring
    return kw


def auto_config(a: argparse.Namespace, log=lambda m: print(m, file=sys.stderr)):
    """`--auto`: the offload config with the plan's choice for every option the user left unset."""
    from .runtime.load import OffloadConfig

    a = argparse.Namespace(**{**vars(a), "memory": None if a.memory == "auto" else a.memory})  # the plan's
    values = {**vars(a), **plan_options(a, log)}
    return OffloadConfig.parse(pick_device(a.device), values["memory"], **offload_options(values))


def plan_options(a: argparse.Namespace, log=lambda m: print(m, file=sys.stderr)) -> dict:
    """memory, host_memory, prefetch, cpu_misses, cache_policy: the user's value where `a` sets one, else the
    plan's; one line to `log` says which."""
    from .costmodel import cpu_compute_bits
    from .plan import PlanRefused, model_sizes, plan_for, read_model_config
    from .hardware import THIS_MACHINE, get_profile
    from .runtime.engine import DEFAULT_MODEL, is_store
    from .store.cache import footprints
    from .store.format import open_store
    from .store.open import RESERVE, mib, min_memory, store_for
    from .utils import parse_dtype

    path = Path(a.model) if a.model else DEFAULT_MODEL
    if not path.is_dir():
        raise MoeError(f"model path {path} is not a folder")
    hw = get_profile(getattr(a, "hardware", None) or THIS_MACHINE)
    rec = plan_for(path, hw)  # PlanRefused: the planner's refusal, one line
    store = open_store(path) if is_store(path) else store_for(path, parse_dtype(a.dtype))
    have, bb = store_bits(store), store_backbone_bits(store)
    want, want_bb = rec["expert_bits"], rec["backbone_bits"]
    if (want, want_bb) != (have, bb):  # the plan's counts hold for the precisions it assumed: plan again at the store's
        src = "HF_FOLDER" if is_store(path) else path  # quantize reads the Hugging Face folder
        backbone = f" --attn-bits {want_bb} --head-bits {want_bb}" if want_bb != bb else ""
        log(f"moe-offload: the plan runs the experts at {want}-bit with the backbone's linears at {want_bb}-bit, "
            f"this store holds {have}-bit experts and a {bb}-bit backbone: quantize first (moe-offload quantize "
            f"--model {src} --expert-bits {want}{backbone} --out {path.name}-{want}bit) and run that; going on "
            f"with the store as it is")
        try:
            rec = plan_for(path, hw, expert_bits=have, backbone_bits=bb)
        except PlanRefused as e:
            raise MoeError(f"{e} (at the store's {have}-bit experts and {bb}-bit backbone; quantized as the plan "
                           f"says it would fit)") from None
    device = pick_device(a.device)
    dt = parse_dtype(a.dtype) or store.dtype
    sizes = model_sizes(read_model_config(path)[0])
    g, bits = rec["group_size"], rec["expert_bits"]
    resident = sizes.expert_bytes(cpu_compute_bits(bits) if hw.device == "cpu" else bits, g)
    n_all = sizes.n_routed
    n_dev = min(n_all, max(0, (rec["memory"] - sizes.backbone_bytes(rec["backbone_bits"], g)) // resident))
    n_host = (rec["host_memory"] or 0) // sizes.expert_bytes(bits, g)

    # the plan's counts in the store's own bytes
    foot = footprints(store, device, dt)
    loads = sorted((f.load for f in foot.values()), reverse=True)
    backbone, reserve = backbone_bytes(store, dt), RESERVE.get(device.type, 0)
    per_layer = {la: [foot[(la, e)].load for e in range(store.n_experts)] for la in store.moe_layers}
    floor, _ = min_memory(backbone, reserve, per_layer, store.top_k)
    memory = max(backbone + reserve + sum(loads[:n_dev]), floor)
    spans = max(e.span for e in store.entries.values())
    host = n_host * spans if device.type == "cuda" and n_host else None
    chosen = {"memory": memory, "host_memory": host, "prefetch": "auto" if rec["prefetch"] else "none",
              "cpu_misses": "auto" if rec["cpu_misses"] and device.type == "cuda" else "off",
              "cache_policy": rec["cache_policy"]}
    mine = {k: getattr(a, k, None) is not None for k in chosen}
    v = {k: getattr(a, k) if mine[k] else c for k, c in chosen.items()}
    where = f"{n_dev} of {n_all} experts" if n_dev < n_all else f"all {n_all} experts"
    mem = v["memory"] if isinstance(v["memory"], str) else mib(int(v["memory"]))
    parts = [_flag("memory", mem, mine["memory"]) + ("" if mine["memory"] else f" ({where})"),
             _flag("host-memory", mib(v["host_memory"]) if isinstance(v["host_memory"], int)
                   else v["host_memory"] or "none", mine["host_memory"]),
             _flag("prefetch", v["prefetch"], mine["prefetch"]),
             _flag("cpu-misses", v["cpu_misses"], mine["cpu_misses"]),
             _flag("cache-policy", v["cache_policy"], mine["cache_policy"])]
    dropped = " (the plan's host tier and CPU misses need CUDA: running on cpu)" if (
        device.type != "cuda" and (rec["host_memory"] or rec["cpu_misses"])) else ""
    log(f"moe-offload: --auto on {hw.name}: {', '.join(parts)}; plan: experts {bits}-bit, backbone "
        f"{rec['backbone_bits']}-bit{dropped}")
    return v
