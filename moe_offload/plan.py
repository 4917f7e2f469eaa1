"""The planner: from config.json alone (no weights), the bytes of the backbone and of the routed experts at
each precision, the KV cache, what fits where (device / host RAM / disk), the configuration to run with, and
the decode speed the simulator's time model predicts for it. Impossible requests are refused with the
arithmetic that makes them impossible.

Rule: quantize first, offload only what still does not fit. The experts take the highest precision at which
all of them fit in device + host memory; only when none does are experts streamed from disk, then at the
lowest precision allowed (fewest bytes per read). `moe-offload plan` on this machine then times each streamed
precision (2/3/4-bit) with its own probes and keeps the one predicted fastest (`best_streamed`).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .costmodel import BITS, cpu_compute_bits, miss_cost
from .errors import MoeError, UsageError
from .hub import resolve_model
from .models.known import known_configs  # noqa: F401  (models planned by name)
from .store.cache import engine_expert_bytes  # noqa: F401  (re-exported: tests, scripts)
from .models.sizes import KV_BYTES, ModelSizes, model_sizes  # noqa: F401  (the planner's sizes, re-exported)
from .sim import (GB, GPU_RESERVE, PROFILES, THIS_MACHINE, HardwareProfile, SimResult, Trace, format_profiles,
                  get_profile, host_reserve_for, load_trace, parse_gbs, profile_names, simulate, synthetic_trace)
from .store.policies import POLICIES
from .utils import parse_size

BACKBONE_BITS = (16, 8, 4)  # attention, dense MLPs, shared experts, lm_head; embeddings, norms, routers stay 16-bit


# ---- sizes from config.json: models/sizes.py (ModelSizes, model_sizes) ------------------------------------


def read_model_config(path: str | Path) -> tuple[dict, str]:
    """config.json of an HF folder, a config.json file itself, or the config inside a store's manifest.json;
    or a name of `known_configs` (mixtral-8x7b, qwen3-30b-a3b, ...) when no such path exists."""
    if isinstance(path, str) and not Path(path).exists():
        known = {k.lower(): (k, v) for k, v in known_configs().items()}
        if path.lower() in known:
            name, cfg = known[path.lower()]
            return cfg, name
    path = resolve_model(path)  # org/name: the local HF cache
    if path.suffix.lower() == ".gguf" and path.is_file():  # the config from a GGUF's metadata
        from .gguf_import import read_config

        return read_config(path)
    candidates = [path] if path.is_file() else [path / "config.json", path / "manifest.json"]
    for c in candidates:
        if c.is_file():
            try:
                d = json.loads(c.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise MoeError(f"{c}: not valid JSON ({e})") from None
            if c.name == "manifest.json" and isinstance(d.get("config"), dict):
                d = d["config"]
            name = (path.parent if path.is_file() else path).name or str(path)
            return d, name
    raise UsageError(f"--model {path}: no config.json (give a Hugging Face model folder, its config.json, a store, "
                     f"or one of {', '.join(known_configs())})")


# ---- the plan ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    """Where the routed experts go at one precision, whole experts per tier."""

    bits: int
    expert_bytes: int  # one expert as stored (disk, host, link)
    resident_bytes: int  # one expert as the device holds it (2/3-bit expanded to 4-bit on a CPU)
    all_bytes: int  # every routed expert, stored
    on_device: int  # experts
    in_host: int
    on_disk: int

    @property
    def where(self) -> str:
        if self.on_disk:
            return "disk"
        return "device" if not self.in_host else "device+host"


@dataclass
class Plan:
    model: str
    sizes: ModelSizes
    hardware: HardwareProfile
    context: int
    group_size: int
    kv_bytes: int
    backbone_bits: int | None = None
    backbone_bytes: int | None = None
    rows: list[Row] = field(default_factory=list)
    expert_bits: int | None = None
    memory: int | None = None  # --memory: backbone + expert cache on the device
    host_memory: int | None = None  # --host-memory
    prefetch: bool | None = None
    cpu_misses: bool | None = None
    cpu_miss_cost: dict | None = None
    policy: str = "lru"
    prediction: SimResult | None = None
    trace_source: str | None = None
    feasible: bool = True
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    quantize: dict | None = None  # the estimated `quantize` time here (plan's CLI on this machine)

    @property
    def row(self) -> Row | None:
        return next((r for r in self.rows if r.bits == self.expert_bits), None)

    def recommendation(self) -> dict:
        """What `generate --auto` needs."""
        return dict(memory=self.memory, host_memory=self.host_memory, expert_bits=self.expert_bits,
                    group_size=self.group_size, backbone_bits=self.backbone_bits, prefetch=self.prefetch,
                    cpu_misses=self.cpu_misses, cache_policy=self.policy)

    def to_dict(self) -> dict:
        s, hw = self.sizes, self.hardware
        d = {
            "model": self.model, "model_type": s.model_type, "feasible": self.feasible, "reason": self.reason,
            "params": {"total": s.total_params, "active": s.active_params, "routed": s.routed_params,
                       "backbone": s.backbone_params, "backbone_linear": s.backbone_linear,
                       "backbone_fixed": s.backbone_fixed, "per_expert": s.expert_params},
            "layers": s.n_layers, "moe_layers": len(s.moe_layers), "n_experts": s.n_experts, "top_k": s.top_k,
            "backbone_bytes": {str(b): s.backbone_bytes(b, self.group_size) for b in BACKBONE_BITS},
            "experts_bytes": {str(r.bits): r.all_bytes for r in self.rows},
            "kv": {"kind": s.kv_kind, "bytes_per_token": s.kv_bytes_per_token,
                   "bytes_per_1k_tokens": 1000 * s.kv_bytes_per_token, "context": self.context,
                   "bytes": self.kv_bytes},
            "hardware": asdict(hw) | {"device_usable": hw.device_usable, "host_usable": hw.host_usable},
            "rows": [asdict(r) | {"where": r.where} for r in self.rows],
            "recommended": self.recommendation() if self.feasible else None,
            "cpu_miss_cost": self.cpu_miss_cost,
            "prediction": self.prediction.to_dict() if self.prediction else None,
            "trace": self.trace_source, "notes": self.notes, "quantize": self.quantize,
            "hardware_sources": hw.sources,
        }
        return d


class PlanRefused(MoeError):
    def __init__(self, plan: Plan):
        super().__init__(plan.reason)
        self.plan = plan


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def make_plan(sizes: ModelSizes, hw: HardwareProfile, *, model: str = "model", context: int = 4096,
              expert_bits: int | None = None, min_bits: int = 2, group_size: int = 64, policy: str = "lru",
              trace: Trace | None = None, trace_tokens: int = 256, warmup: int = 64, zipf_s: float = 0.8,
              seed: int = 0, predict: bool = True, footprint=None, embed_bytes: int = 0,
              backbone_bits: int | None = None) -> Plan:
    """Plan `sizes` on `hw`; raises PlanRefused (a MoeError carrying the plan) when it cannot run.

    footprint(bits) -> (stored, resident) | None: one expert's bytes as the engine stores and holds it at
    `bits` (`engine_expert_bytes`); None or a None answer: the arithmetic of costmodel.quant_bytes.
    embed_bytes: the embedding table's bytes in the backbone (held, not streamed per token).
    backbone_bits: the backbone's precision as given (a store's); None: the planner picks it."""
    if backbone_bits is not None and backbone_bits not in BACKBONE_BITS:
        raise UsageError(f"backbone bits must be one of {', '.join(map(str, BACKBONE_BITS))}, got {backbone_bits}")
    if context < 0:
        raise UsageError(f"--context must be >= 0 tokens, got {context}")
    if expert_bits is not None and expert_bits not in BITS:
        raise UsageError(f"--expert-bits must be one of {', '.join(map(str, BITS))}, got {expert_bits}")
    if min_bits not in BITS:
        raise UsageError(f"--min-bits must be one of {', '.join(map(str, BITS))}, got {min_bits}")
    if policy != "opt" and policy not in POLICIES:
        raise UsageError(f"unknown cache policy {policy!r}; choose one of: {', '.join([*POLICIES, 'opt'])}")
    if not sizes.n_routed:
        raise MoeError(f"{model}: no routed experts in this config (n_experts {sizes.n_experts}); nothing to plan")
    cpu = hw.device == "cpu"
    kv = sizes.kv_bytes_per_token * context
    plan = Plan(model=model, sizes=sizes, hardware=hw, context=context, group_size=group_size, kv_bytes=kv,
                policy=policy)
    candidates = [expert_bits] if expert_bits is not None else [b for b in BITS if b >= min_bits]
    res_bits = (lambda b: cpu_compute_bits(b)) if cpu else (lambda b: b)
    dev, host = hw.device_usable, (0 if cpu else hw.host_usable)
    dev_txt = f"{_gb(dev)} usable ({_gb(hw.device_bytes)} {'RAM' if cpu else 'device'} - {_gb(hw.device_reserve)} reserve)"
    host_txt = "" if cpu else f" and the host {_gb(host)} ({_gb(hw.host_bytes)} - {_gb(hw.host_reserve)} reserve)"

    # the backbone, the KV cache and one layer's top-k experts (pinned while the layer runs) live on the device
    working = sizes.top_k * sizes.expert_bytes(res_bits(min(candidates)), group_size)
    allowed = [backbone_bits] if backbone_bits is not None else list(BACKBONE_BITS)
    able = [bb for bb in allowed if sizes.backbone_bytes(bb, group_size) + kv + working <= dev]
    if not able:
        bb4 = sizes.backbone_bytes(min(allowed), group_size)
        plan.feasible = False
        plan.reason = (f"{model} cannot run here: the device must hold the backbone ({_gb(bb4)} even at "
                       f"{min(allowed)}-bit) + KV cache ({_gb(kv)} for {context} tokens) + one layer's "
                       f"{sizes.top_k} experts ({_gb(working)}) = {_gb(bb4 + kv + working)}, but has {dev_txt}")
        raise PlanRefused(plan)

    N = sizes.n_routed

    def rows(bb: int) -> list[Row]:
        dev_free = dev - sizes.backbone_bytes(bb, group_size) - kv
        out = []
        for b in BITS:
            stored, resident = sizes.expert_bytes(b, group_size), sizes.expert_bytes(res_bits(b), group_size)
            exact = footprint(b) if footprint is not None else None
            if exact is not None:
                stored, resident = exact
            n_dev = min(N, dev_free // resident)
            n_host = min(N - n_dev, host // stored)
            out.append(Row(b, stored, resident, N * stored, n_dev, n_host, N - n_dev - n_host))
        return out

    # quantize first, offload only what still does not fit: the experts at the most bits that fit whole with
    # the backbone at some allowed precision (the most bits that lets them); where none fits, the backbone at
    # its fewest, its bytes going to the expert cache. The experts are ~95 % of an MoE's weights: their
    # precision comes first
    table = {bb: rows(bb) for bb in able}
    fits = {bb: [r.bits for r in table[bb] if r.bits in candidates and r.where != "disk"] for bb in able}
    best = max((max(f), bb) for bb, f in fits.items() if f) if any(fits.values()) else None
    bb = best[1] if best else able[-1]
    plan.backbone_bits, plan.backbone_bytes = bb, sizes.backbone_bytes(bb, group_size)
    plan.rows = table[bb]
    by_bits = {r.bits: r for r in plan.rows}
    if bb != able[0]:
        plan.notes.append(f"the backbone's linears (attention, dense MLPs, shared experts, lm_head) at {bb}-bit "
                          f"({_gb(plan.backbone_bytes)} against {_gb(sizes.backbone_bytes(able[0], group_size))} "
                          f"at {able[0]}-bit) leave that room to the experts: quantize with --attn-bits {bb} "
                          f"--head-bits {bb}")
    if best:
        plan.expert_bits = best[0]
    elif hw.has_disk:
        plan.expert_bits = min(candidates)
        plan.notes.append(f"no allowed precision fits in device + host: experts stream from disk at "
                          f"{plan.expert_bits}-bit" + (" (the fewest bytes per read)" if expert_bits is None else ""))
    else:
        b = min(candidates)
        r = by_bits[b]
        need = r.all_bytes + plan.backbone_bytes + kv
        plan.feasible = False
        plan.reason = (f"{model} does not fit: at {b}-bit the experts need {_gb(r.all_bytes)}, plus backbone "
                       f"{_gb(plan.backbone_bytes)} ({bb}-bit) and KV {_gb(kv)} ({context} tokens) = {_gb(need)}; "
                       f"the device has {dev_txt}{host_txt} = {_gb(dev + host)}; no disk tier: give --disk-bw GB/s "
                       f"(or --hardware) to stream the other {r.on_disk} of {N} experts ({_gb(r.on_disk * r.expert_bytes)}) "
                       f"from disk")
        raise PlanRefused(plan)

    r = plan.row
    plan.memory = plan.backbone_bytes + r.on_device * r.resident_bytes
    plan.host_memory = None if cpu or not r.in_host else r.in_host * r.expert_bytes
    plan.prefetch = r.on_device < N
    plan.cpu_misses = False
    if not cpu and r.in_host and hw.link_bw > 0 and hw.cpu_bw > 0:
        c = miss_cost(sizes.expert_params, r.expert_bytes, 1, link_bw=hw.link_bw, cpu_bw=hw.cpu_bw,
                      cpu_flops=hw.cpu_flops, device_bw=hw.device_bw, device_flops=hw.device_flops,
                      latency_s=hw.link_latency_s,
                      cpu_bytes=sizes.expert_bytes(cpu_compute_bits(r.bits), group_size))
        plan.cpu_misses = c.where == "cpu"
        plan.cpu_miss_cost = {"where": c.where, "cpu_s": c.cpu_s, "device_s": c.device_s, "tokens": 1}

    if predict and hw.has_bandwidths and (r.on_disk == 0 or hw.has_disk):
        if trace is None:
            trace = synthetic_trace(trace_tokens + warmup, list(sizes.moe_layers), sizes.n_experts, sizes.top_k,
                                    expert_bytes=r.expert_bytes, zipf_s=zipf_s, seed=seed, n_layers=sizes.n_layers,
                                    expert_params=sizes.expert_params)
            plan.trace_source = f"synthetic Zipf s={zipf_s} routing (seed {seed}), {trace_tokens} tokens after {warmup} warm-up"
        else:
            if trace.n_experts != sizes.n_experts or len(trace.layers) != len(sizes.moe_layers):
                raise MoeError(f"trace has {len(trace.layers)} MoE layers x {trace.n_experts} experts, the model "
                               f"{len(sizes.moe_layers)} x {sizes.n_experts}")
            trace = replace(trace, expert_params=sizes.expert_params)
            warmup = min(warmup, trace.tokens // 4)
            plan.trace_source = f"recorded trace, {trace.tokens - warmup} tokens after {warmup} warm-up"
        plan.prediction = simulate(trace, hw, memory=plan.memory, host_memory=0 if cpu else (plan.host_memory or 0),
                                   policy=policy, expert_bits=r.bits, group_size=group_size, context=context,
                                   warmup=warmup, cpu_misses=plan.cpu_misses, backbone_bytes=plan.backbone_bytes,
                                   kv_bytes_per_token=sizes.kv_bytes_per_token, embed_bytes=embed_bytes,
                                   stored_bytes=r.expert_bytes, computed_bytes_each=r.resident_bytes if cpu else None)
    elif predict:
        plan.notes.append("no tok/s prediction: the hardware's bandwidths are unknown (give --hardware PROFILE, or "
                          "--device-bw and --link-bw)")
    return plan


def format_plan(p: Plan) -> str:
    s, hw = p.sizes, p.hardware
    B = 1e9
    out = [
        f"model: {p.model} ({s.model_type}), {s.n_layers} layers of which {len(s.moe_layers)} MoE, "
        f"{s.n_experts} routed experts per layer, top-{s.top_k}",
        f"params: total {s.total_params:,} ({s.total_params / B:.2f} B), active per token {s.active_params:,} "
        f"({s.active_params / B:.2f} B); routed experts {s.routed_params / B:.2f} B ({s.expert_params:,} each), "
        f"backbone {s.backbone_params / B:.2f} B",
        "backbone: " + ", ".join(f"{b}-bit {_gb(s.backbone_bytes(b, p.group_size))}" for b in BACKBONE_BITS)
        + f" (embeddings, norms, routers stay 16-bit: {_gb(2 * (s.backbone_fixed - s.head_params))})",
        f"KV cache ({s.kv_kind}, 16-bit): {s.kv_bytes_per_token:,} B/token = {1000 * s.kv_bytes_per_token / 1e6:.1f} MB "
        f"per 1k tokens; {_gb(p.kv_bytes)} at --context {p.context}",
        f"hardware: {hw.name}: {hw.description}",
        f"  {'RAM' if hw.device == 'cpu' else 'device'} {_gb(hw.device_bytes)} (usable {_gb(hw.device_usable)})"
        + ("" if hw.device == "cpu" else f", host {_gb(hw.host_bytes)} (usable {_gb(hw.host_usable)})")
        + (f", disk {hw.disk_bw / GB:.1f} GB/s" if hw.has_disk else ", no disk tier"),
    ]
    if p.rows:
        out.append(f"experts (group size {p.group_size}; backbone at {p.backbone_bits}-bit, {_gb(p.backbone_bytes)}):")
        out.append(f"  {'bits':>4}  {'per expert':>10}  {'all experts':>11}  {'device':>17}  {'host':>17}  "
                   f"{'disk':>17}  fits")
        for r in p.rows:
            cells = [f"{n:>5} {_gb(n * (r.resident_bytes if i == 0 else r.expert_bytes)):>10}"
                     for i, n in enumerate((r.on_device, r.in_host, r.on_disk))]
            mark = "  <- chosen" if r.bits == p.expert_bits and p.feasible else ""
            out.append(f"  {r.bits:>4}  {r.expert_bytes / 1e6:>7.1f} MB  {_gb(r.all_bytes):>11}  "
                       f"{'  '.join(f'{c:>17}' for c in cells)}  {r.where}{mark}")
    if p.feasible:
        r = p.row
        flags = f"--memory {p.memory / GB:.2f}GB" + (f" --host-memory {p.host_memory / GB:.2f}GB" if p.host_memory else "")
        out.append(f"recommended: experts {r.bits}-bit, backbone {p.backbone_bits}-bit; {flags}; "
                   f"prefetch {'on' if p.prefetch else 'off'}; CPU compute of misses {'on' if p.cpu_misses else 'off'}"
                   f"; cache: {'hottest experts pinned' if p.cpu_misses else 'policy ' + p.policy}")
        if p.cpu_miss_cost:
            c = p.cpu_miss_cost
            out.append(f"  one missed expert, 1 token: CPU {c['cpu_s'] * 1e3:.2f} ms vs copy + device "
                       f"{c['device_s'] * 1e3:.2f} ms -> {c['where']}")
        if p.prediction:
            q = p.prediction
            out.append(f"predicted decode ({p.trace_source}): device hit rate {q.hit_rate:.3f}, "
                       f"{q.tok_s_serial:.2f} tok/s serial .. {q.tok_s_overlap:.2f} tok/s with transfers hidden "
                       f"(bound by {q.bound})")
            T = max(1, q.tokens)
            out.append(f"  per token: experts {1e3 * q.t_experts / T:.1f} ms, backbone + overhead "
                       f"{1e3 * (q.t_device - q.t_experts) / T:.1f} ms ({q.backbone_read_bytes / 1e6:.0f} MB read, "
                       f"the embedding table aside), misses {1e3 * q.t_disk / T:.1f} ms "
                       f"({q.disk_bytes / T / 1e6:.0f} MB read from disk, each blob decoded into its unit)")
    if p.quantize:
        q = p.quantize
        out.append(f"quantize here (moe-offload quantize --expert-bits {q['bits']} --quantizer {q['quantizer']}): "
                   f"about {q['seconds'] / 60:.0f} min for {q['expert_bytes'] / GB:.1f} GB of bf16 expert weights at "
                   f"{q['rate'] / 1e6:.1f} MB/s, + {q['read_seconds'] / 60:.1f} min reading them at "
                   f"{q['read_bw'] / GB:.2f} GB/s")
        out.append(f"  basis: {q['basis']}")
    if hw.sources and hw.name == THIS_MACHINE:
        out.append(f"measured: {hw.sources}")
    out += [f"note: {n}" for n in p.notes]
    return "\n".join(out)


# ---- the engine's own bytes and this machine's quantizing rate (weights unread) -----------------------------

def quantize_rate(hidden: int, intermediate: int, bits: int = 4, quantizer: str = "hqq", group_size: int = 64,
                  budget_s: float = 0.75, max_bytes: int = 32 << 20) -> dict:
    """bf16 expert bytes/s that `quantize` encodes here: a slice of one expert (gate, up [i, hidden] and down
    [hidden, i], i <= intermediate, a multiple of 64, sized from a first small encode to take about `budget_s`
    and hold at most `max_bytes` of bf16 weights; the faster of two encodes where time allows)
    encoded by the store's codec with `quantizer` and error-checked, as `moe-offload quantize` runs each expert
    (the low-rank correction off; its allocator setting too). Returns {rate, rows, seconds, bytes}."""
    import time

    import torch

    from .experts import ExpertShape
    from .quant.codec import HQQCodec, encode_checked, expert_spec
    from .utils import reuse_freed_memory

    codec = HQQCodec(expert_spec(bits, group_size, quantizer))
    gen = torch.Generator().manual_seed(0)

    def encode(i: int) -> float:  # as `quantize` encodes an expert: encode_checked, with the heap reused
        gate, up = (torch.randn(i, hidden, generator=gen).mul_(0.02).to(torch.bfloat16) for _ in range(2))
        down = torch.randn(hidden, i, generator=gen).mul_(0.02).to(torch.bfloat16)
        t0 = time.perf_counter()
        encode_checked(codec, gate, up, down, act=ExpertShape(hidden, i))
        return time.perf_counter() - t0

    step = 64
    with reuse_freed_memory():
        first = min(intermediate, step)
        t = encode(first)  # also warms the code paths and the heap
        per_row = t / first
        cap = max(step, max_bytes // (6 * hidden) // step * step)
        rows = min(intermediate, cap, max(step, int(budget_s / max(per_row, 1e-9)) // step * step))
        if rows > first:
            t = encode(rows)
            if t < 1.5 * budget_s:  # best of two: a shared machine's worst moments left out
                t = min(t, encode(rows))
        else:
            rows = first
            if t < budget_s:
                t = min(t, encode(first))
    nbytes = 3 * hidden * rows * 2
    return {"rate": nbytes / t, "rows": rows, "seconds": t, "bytes": nbytes}


def quantize_seconds(sizes: ModelSizes, rate: float, read_bw: float = 0.0) -> float:
    """Seconds `quantize` needs for every routed expert of `sizes` (its bf16 bytes at `rate` bytes/s), plus
    reading them once at `read_bw` (0: not counted)."""
    src = 2 * sizes.routed_params
    return src / rate + (src / read_bw if read_bw > 0 else 0.0)


def _custom_profile(vram: int | None, ram: int) -> HardwareProfile:
    if vram is not None:
        return HardwareProfile(name="custom", description="GPU machine from --vram/--ram (no bandwidths known)",
                               device="cuda", device_bytes=vram, host_bytes=ram, link_bw=0.0, host_bw=0.0,
                               disk_bw=0.0, device_bw=0.0, cpu_bw=0.0, cpu_flops=0.0, device_flops=0.0,
                               device_reserve=GPU_RESERVE, host_reserve=host_reserve_for(ram))
    return HardwareProfile(name="custom", description="CPU-only machine from --ram (no bandwidths known)",
                           device="cpu", device_bytes=ram, host_bytes=0, link_bw=0.0, host_bw=0.0, disk_bw=0.0,
                           device_bw=0.0, cpu_bw=0.0, cpu_flops=0.0, device_flops=0.0, link_latency_s=0.0,
                           device_reserve=host_reserve_for(ram))


def resolve_hardware(hardware: str | HardwareProfile | None = None, *, vram=None, ram=None, disk_bw=None,
                     device_bw=None, link_bw=None, cpu_bw=None) -> HardwareProfile:
    """A profile (default: this machine, measured) with the given sizes (bytes) and bandwidths (bytes/s)
    overriding its own. Without a profile, --vram/--ram describe the machine and only given bandwidths are known."""
    if hardware is None and (vram is not None or ram is not None):
        if ram is None:
            raise UsageError("--vram needs --ram (the host RAM) unless --hardware names a profile")
        hw = _custom_profile(vram, ram)
    else:
        hw = get_profile(hardware or THIS_MACHINE)
        if vram is not None:
            if hw.device == "cpu":
                raise UsageError(f"--vram given but hardware {hw.name!r} is CPU-only")
            hw = replace(hw, device_bytes=vram)
        if ram is not None:
            hw = (replace(hw, device_bytes=ram, device_reserve=host_reserve_for(ram)) if hw.device == "cpu"
                  else replace(hw, host_bytes=ram, host_reserve=host_reserve_for(ram)))
    if device_bw is not None:
        hw = replace(hw, device_bw=device_bw, cpu_bw=device_bw if hw.device == "cpu" else hw.cpu_bw)
    over = {k: v for k, v in dict(disk_bw=disk_bw, link_bw=link_bw, cpu_bw=cpu_bw).items() if v is not None}
    return replace(hw, **over) if over else hw


def plan_for(model_path: str | Path, hardware: str | HardwareProfile = THIS_MACHINE, **kw) -> dict:
    """The `generate --auto` hook: dict(memory, host_memory, expert_bits, group_size, backbone_bits, prefetch,
    cpu_misses, cache_policy) for `model_path` on `hardware`; raises MoeError (with the arithmetic) if it
    cannot run. Keywords go to make_plan (context, min_bits, policy, ...); the tok/s prediction is skipped."""
    cfg, name = read_model_config(model_path)
    plan = make_plan(model_sizes(cfg), resolve_hardware(hardware), model=name, predict=False, **kw)
    return plan.recommendation()


# ---- command line ------------------------------------------------------------------------------------------


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model folder, its config.json, or an expert store (weights unread)")
    p.add_argument("--hardware", default=None, help=f"profile: {', '.join(profile_names())} (default: this-machine "
                                                    "unless --vram/--ram describe the machine)")
    p.add_argument("--vram", default=None, help="device memory, e.g. 12GB")
    p.add_argument("--ram", default=None, help="host RAM, e.g. 64GB (the weights' memory on a CPU-only machine)")
    p.add_argument("--disk-bw", default=None, help="disk read GB/s; enables streaming experts from disk")
    p.add_argument("--device-bw", default=None, help="device memory bandwidth GB/s (GEMV weight streaming)")
    p.add_argument("--link-bw", default=None, help="host->device copy GB/s")
    p.add_argument("--cpu-bw", default=None, help="CPU GEMV GB/s")
    p.add_argument("--context", type=int, default=4096, help="tokens of KV cache to hold (default 4096)")
    p.add_argument("--expert-bits", type=int, default=None, choices=BITS, help="force the experts' precision")
    p.add_argument("--min-bits", type=int, default=2, choices=BITS, help="lowest expert precision to consider")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size")
    p.add_argument("--cache-policy", default="lru", help=f"{', '.join(POLICIES)} or opt")
    p.add_argument("--trace", default=None, help="recorded routing trace for the hit rate (default: synthetic Zipf)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"],
                   help="this-machine: the engine's compute dtype its probes run in (default float16)")
    p.add_argument("--threads", type=int, default=None, help="this-machine: torch threads for the probes")
    p.add_argument("--quantizer", default="hqq", choices=["hqq", "rtn"],
                   help="this-machine: the quantizer whose rate the `quantize` estimate probes (quantize's default: hqq)")
    p.add_argument("--json", action="store_true", help="one JSON object")


def best_streamed(plan: Plan, sizes: ModelSizes, kw: dict, bits: list[int], profile_for) -> Plan:
    """When experts stream from disk, the precision among `bits` with the best predicted serial decode, each
    timed with its own probes (`profile_for(b)`: a 2-bit miss decodes its codes into int4 nibbles, which can cost
    more than the read it saves). Keeps `plan` unless another precision is predicted faster; a note says which."""
    if [b for b in bits if b != plan.expert_bits] == []:
        return plan
    plans = {b: make_plan(sizes, profile_for(b), **{**kw, "expert_bits": b})
             for b in dict.fromkeys([plan.expert_bits, *bits])}
    tok_s = {b: p.prediction.tok_s_serial for b, p in plans.items() if p.prediction}
    best = max(tok_s, key=tok_s.get)
    chosen = plans[best]
    chosen.notes.append("streamed precision by predicted decode here: " + ", ".join(
        f"{b}-bit {t:.3f} tok/s" for b, t in sorted(tok_s.items(), reverse=True))
        + (f" -> {best}-bit" + (f" (the rule 'fewest bytes per read' alone gives {plan.expert_bits}-bit)"
                                if best != plan.expert_bits else "")))
    return chosen


def engine_footprint(cfg: dict, group_size: int = 64, dtype: str = "float16"):
    """make_plan's `footprint` for `cfg`'s experts on a CPU: engine_expert_bytes, once per precision."""
    from .sim import expert_dims

    D, I = expert_dims(cfg)
    memo: dict[int, tuple[int, int] | None] = {}

    def footprint(bits: int):
        if bits not in memo:
            memo[bits] = engine_expert_bytes(D, I, bits, group_size, dtype)
        return memo[bits]

    return footprint


def _measured(a, sizes: ModelSizes, footprint) -> HardwareProfile:
    """This machine measured for this model: the engine's dtype, its loader's reads (one 4-bit expert, two in
    flight)."""
    import torch

    from .hardware import measure_this_machine

    if a.threads is not None:
        if a.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    one = (footprint(4) or (sizes.expert_bytes(4, a.group_size),))[0]
    streams = 2  # the loader's workers
    return measure_this_machine(dtype=a.dtype, read_bytes=one, read_streams=streams,
                                disk_bytes=max(128 << 20, 2 * streams * one))


def run(a) -> int:
    if a.hardware == "list":
        print(format_profiles(list(PROFILES.values())))
        return 0
    if a.model is None:
        raise UsageError("plan: give --model FOLDER or a known name (" + ", ".join(known_configs())
                         + "), or --hardware list")
    cfg, name = read_model_config(a.model)
    sizes = model_sizes(cfg)
    vram, ram = parse_size(a.vram), parse_size(a.ram)
    measure = a.hardware == THIS_MACHINE or (a.hardware is None and vram is None and ram is None)
    footprint = engine_footprint(cfg, a.group_size, a.dtype)
    hardware = _measured(a, sizes, footprint) if measure else a.hardware
    hw = resolve_hardware(hardware, vram=vram, ram=ram,
                          disk_bw=parse_gbs(a.disk_bw, "--disk-bw"), device_bw=parse_gbs(a.device_bw, "--device-bw"),
                          link_bw=parse_gbs(a.link_bw, "--link-bw"), cpu_bw=parse_gbs(a.cpu_bw, "--cpu-bw"))
    trace = load_trace(a.trace) if a.trace else None
    kw = dict(model=name, context=a.context, expert_bits=a.expert_bits, min_bits=a.min_bits,
              group_size=a.group_size, policy=a.cache_policy, trace=trace, embed_bytes=sizes.embed_params * 2,
              footprint=footprint if hw.device == "cpu" else None)  # the CPU engine's exact expert bytes
    try:
        if measure:  # time this model's expert calls at the precision the plan picks, then predict with them
            first = make_plan(sizes, hw, predict=False, **kw)
            from .sim import calibrate

            memo: dict = {}
            base = hw
            hw, kw["embed_bytes"] = calibrate(base, cfg, a.dtype, first.expert_bits, a.group_size, memo)
        plan = make_plan(sizes, hw, **kw)
        if measure and a.expert_bits is None and plan.prediction and plan.row.on_disk:
            plan = best_streamed(plan, sizes, kw, [b for b in (4, 3, 2) if b >= a.min_bits],
                                 lambda b: calibrate(base, cfg, a.dtype, b, a.group_size, memo)[0])
    except PlanRefused as e:
        print(json.dumps(e.plan.to_dict()) if a.json else format_plan(e.plan))
        raise
    if measure and plan.expert_bits < 16:
        import torch

        from .sim import expert_dims

        D, I = expert_dims(cfg)
        probe = quantize_rate(D, I, plan.expert_bits, a.quantizer, a.group_size)
        read = quantize_seconds(sizes, math.inf, hw.disk_bw) if hw.disk_bw > 0 else 0.0
        plan.quantize = {
            "bits": plan.expert_bits, "quantizer": a.quantizer, "rate": probe["rate"],
            "expert_bytes": 2 * sizes.routed_params, "seconds": quantize_seconds(sizes, probe["rate"]),
            "read_bw": hw.disk_bw, "read_seconds": read, "probe": probe,
            "basis": (f"{a.quantizer} encoded one {D} x {probe['rows']} slice of an expert "
                      f"({probe['bytes'] / 1e6:.1f} MB of bf16 weights, gate, up and down) at {plan.expert_bits}-bit "
                      f"g{a.group_size} in {probe['seconds']:.2f} s on {torch.get_num_threads()} threads, scaled by "
                      f"the model's {sizes.n_routed} experts' bytes: the codec and its error check as `quantize` "
                      "runs them (its heap reused), the store's writes aside (docs/simulator.md compares it with "
                      "whole runs)")}
    print(json.dumps(plan.to_dict()) if a.json else format_plan(plan))
    return 0
