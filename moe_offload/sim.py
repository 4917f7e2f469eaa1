"""Trace-driven simulator: replay a recorded routing trace through the cache policies (store/policies.py)
on a hardware profile and predict the expert hit rate and decode tokens/s. The time model is in
docs/simulator.md; `moe-offload simulate` is the command line.

A trace is one decode token per row: `experts[t, i, :]` = the expert ids the i-th MoE layer selected for
token t. `save_trace` / `load_trace` read and write it as .json or .npz (the format is below and in the docs).

Shape legend: T tokens, L MoE layers, K experts per token (top-k), P predicted experts, E experts per layer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .costmodel import BITS, cpu_compute_bits, quant_bytes
from .errors import MoeError, UsageError
from .hardware import (GB, GPU_RESERVE, PROFILES, THIS_MACHINE, GiB, HardwareProfile, expert_gemv_bw,  # noqa: F401
                       format_profiles, get_profile, host_reserve_for, measure_disk_read, measure_this_machine,
                       measure_token_overhead, profile_names)
from .hardware import _toy_config  # noqa: F401  (tests read it here)
from .store.policies import POLICIES, belady_opt, replay
from .utils import parse_size


# ---- traces --------------------------------------------------------------------------------------------------

TRACE_FORMAT, TRACE_VERSION = "moe-offload-trace", 1


@dataclass
class Trace:
    """Decode routing of one or more sequences, token after token.

    experts[t, i] are the K expert ids MoE layer `layers[i]` (a decoder-layer index, as in the store) selected
    for token t; `predicted[t, i]` optionally the P ids a look-ahead predictor proposed for that layer before
    it ran. `expert_bytes` is the size of one expert as stored (an int, or [L, E] per expert); the optional
    `expert_params` (weights per expert) lets the simulator re-price experts at other bits, `backbone_bytes`
    and `kv_bytes_per_token` complete the time model."""

    experts: np.ndarray  # [T, L, K] int
    n_experts: int
    expert_bytes: int | np.ndarray
    layers: list[int] | None = None  # decoder-layer index of each MoE layer; default 0..L-1
    n_layers: int | None = None  # decoder layers in the model; default max(layers) + 1
    expert_params: int | None = None
    backbone_bytes: int | None = None
    kv_bytes_per_token: int | None = None
    predicted: np.ndarray | None = None  # [T, L, P] int
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.experts = np.asarray(self.experts, dtype=np.int64)
        if self.experts.ndim != 3:
            raise MoeError(f"trace: experts must be [tokens, moe layers, top_k], got shape {self.experts.shape}")
        T, L, _ = self.experts.shape
        self.layers = list(range(L)) if self.layers is None else [int(x) for x in self.layers]
        if len(self.layers) != L or len(set(self.layers)) != L:
            raise MoeError(f"trace: {L} MoE layers in experts but layers = {self.layers}")
        self.n_layers = max(self.layers, default=-1) + 1 if self.n_layers is None else int(self.n_layers)
        if self.layers and (min(self.layers) < 0 or max(self.layers) >= self.n_layers):
            raise MoeError(f"trace: layers {self.layers} outside 0..{self.n_layers - 1}")
        self.n_experts = int(self.n_experts)
        if self.experts.size and (self.experts.min() < 0 or self.experts.max() >= self.n_experts):
            raise MoeError(f"trace: expert ids outside 0..{self.n_experts - 1}")
        if isinstance(self.expert_bytes, (list, tuple, np.ndarray)) and np.ndim(self.expert_bytes) > 0:
            self.expert_bytes = np.asarray(self.expert_bytes, dtype=np.int64)
            if self.expert_bytes.shape != (L, self.n_experts):
                raise MoeError(f"trace: expert_bytes must be one int or [{L}, {self.n_experts}], "
                               f"got shape {self.expert_bytes.shape}")
        else:
            self.expert_bytes = int(self.expert_bytes)
        if self.predicted is not None:
            self.predicted = np.asarray(self.predicted, dtype=np.int64)
            if self.predicted.ndim != 3 or self.predicted.shape[:2] != (T, L):
                raise MoeError(f"trace: predicted must be [{T}, {L}, P], got shape {self.predicted.shape}")

    @property
    def tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    def entries(self, start: int = 0, stop: int | None = None) -> list[list[tuple[int, int]]]:
        """policies.replay's trace: one entry per (token, MoE layer), the (layer, expert) keys it needs."""
        rows = self.experts[start:stop].tolist()
        return [[(la, e) for e in row] for tok in rows for la, row in zip(self.layers, tok)]

    def size_fn(self) -> Callable[[tuple[int, int]], int]:
        if isinstance(self.expert_bytes, int):
            b = self.expert_bytes
            return lambda key: b
        pos = {la: i for i, la in enumerate(self.layers)}
        table = self.expert_bytes
        return lambda key: int(table[pos[key[0]], key[1]])

    def all_expert_bytes(self) -> int:
        if isinstance(self.expert_bytes, int):
            return self.expert_bytes * len(self.layers) * self.n_experts
        return int(self.expert_bytes.sum())


def _header(tr: Trace) -> dict:
    return {"format": TRACE_FORMAT, "version": TRACE_VERSION, "n_layers": tr.n_layers, "layers": tr.layers,
            "n_experts": tr.n_experts, "top_k": tr.top_k, "tokens": tr.tokens,
            "expert_params": tr.expert_params, "backbone_bytes": tr.backbone_bytes,
            "kv_bytes_per_token": tr.kv_bytes_per_token, "meta": tr.meta}


def save_trace(path: str | os.PathLike, trace: Trace) -> Path:
    """Write `trace` as .json (readable) or .npz (compact); the suffix picks. Written to a temp name, then
    renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    if path.suffix == ".json":
        d = _header(trace)
        d["expert_bytes"] = trace.expert_bytes if isinstance(trace.expert_bytes, int) else trace.expert_bytes.tolist()
        d["experts"] = trace.experts.tolist()
        if trace.predicted is not None:
            d["predicted"] = trace.predicted.tolist()
        tmp.write_text(json.dumps(d))
    elif path.suffix == ".npz":
        arrays = {"header": np.array(json.dumps(_header(trace))), "experts": trace.experts.astype(np.int32),
                  "expert_bytes": np.asarray(trace.expert_bytes, dtype=np.int64)}
        if trace.predicted is not None:
            arrays["predicted"] = trace.predicted.astype(np.int32)
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    else:
        raise UsageError(f"trace file {path}: use a .json or .npz suffix")
    os.replace(tmp, path)
    return path


def _from_header(h: dict, experts, expert_bytes, predicted, path) -> Trace:
    if h.get("format") != TRACE_FORMAT:
        raise MoeError(f"{path}: not a routing trace (format {h.get('format')!r}, want {TRACE_FORMAT!r})")
    if h.get("version") != TRACE_VERSION:
        raise MoeError(f"{path}: trace version {h.get('version')!r} not supported (this build reads {TRACE_VERSION})")
    try:
        return Trace(experts=experts, n_experts=h["n_experts"], expert_bytes=expert_bytes, layers=h.get("layers"),
                     n_layers=h.get("n_layers"), expert_params=h.get("expert_params"),
                     backbone_bytes=h.get("backbone_bytes"), kv_bytes_per_token=h.get("kv_bytes_per_token"),
                     predicted=predicted, meta=h.get("meta") or {})
    except KeyError as e:
        raise MoeError(f"{path}: trace lacks {e}") from None
    except MoeError as e:
        raise MoeError(f"{path}: {e}") from None


def load_trace(path: str | os.PathLike) -> Trace:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"trace {path}: no such file")
    try:
        if path.suffix == ".json":
            d = json.loads(path.read_text())
            if "experts" not in d or "expert_bytes" not in d:
                raise MoeError(f"{path}: trace lacks 'experts' or 'expert_bytes'")
            return _from_header(d, d["experts"], d["expert_bytes"], d.get("predicted"), path)
        with np.load(path, allow_pickle=False) as z:
            h = json.loads(str(z["header"]))
            eb = z["expert_bytes"]
            return _from_header(h, z["experts"], int(eb) if eb.ndim == 0 else eb,
                                z["predicted"] if "predicted" in z.files else None, path)
    except (ValueError, OSError, KeyError) as e:  # bad JSON, not a zip, missing array
        raise MoeError(f"{path}: not a readable trace ({type(e).__name__}: {e})") from None


def synthetic_trace(n_tokens: int, layers: list[int], n_experts: int, top_k: int, expert_bytes: int,
                    zipf_s: float = 0.8, seed: int = 0, **fields_) -> Trace:
    """Zipf-like routing: in each layer expert popularity p ∝ 1 / rank^s over a random ranking, and each
    token draws its top_k distinct experts without replacement by p (Gumbel top-k). No temporal locality
    between tokens: a stand-in until a recorded trace exists."""
    rng = np.random.default_rng(seed)
    L = len(layers)
    logp = -zipf_s * np.log(np.arange(1, n_experts + 1, dtype=np.float64))
    ranks = np.argsort(rng.random((L, n_experts)), axis=1)  # ranks[i, e] = popularity rank of expert e
    scores = logp[ranks][None] + rng.gumbel(size=(n_tokens, L, n_experts))
    experts = np.argsort(-scores, axis=2)[:, :, :top_k]
    return Trace(experts=experts, n_experts=n_experts, expert_bytes=expert_bytes, layers=list(layers),
                 meta={"synthetic": {"zipf_s": zipf_s, "seed": seed}}, **fields_)


# ---- simulation --------------------------------------------------------------------------------------------


@dataclass
class SimResult:
    hardware: str
    policy: str
    tokens: int  # simulated decode tokens (after warm-up)
    warmup: int
    accesses: int  # (token, layer, expert) uses
    hits: int  # served from device memory
    misses: int  # not on the device
    disk_reads: int  # misses that came from disk (not in device + host)
    link_bytes: int  # bytes copied host -> device
    disk_bytes: int  # bytes read from disk
    expert_capacity: int  # device bytes for the expert cache
    host_capacity: int  # host bytes for experts (0: no host tier)
    backbone_bytes: int
    cpu_misses: bool
    t_device: float  # seconds over all simulated tokens, per resource
    t_cpu: float
    t_link: float
    t_disk: float
    prefetch_recall: float | None = None  # share of used experts the trace's predictor proposed
    t_experts: float = 0.0  # the expert calls' part of t_device
    backbone_read_bytes: int = 0  # backbone bytes one token streams (the embedding table aside: one row)
    notes: list[str] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.accesses)

    @property
    def time_serial(self) -> float:
        return self.t_device + self.t_cpu + self.t_link + self.t_disk

    @property
    def time_overlap(self) -> float:
        return max(self.t_device, self.t_cpu, self.t_link, self.t_disk)

    @property
    def tok_s_serial(self) -> float:
        return self.tokens / self.time_serial if self.time_serial > 0 else math.inf

    @property
    def tok_s_overlap(self) -> float:
        return self.tokens / self.time_overlap if self.time_overlap > 0 else math.inf

    @property
    def bound(self) -> str:
        """The resource that limits the overlapped time."""
        t = {"device compute": self.t_device, "CPU compute": self.t_cpu, "link": self.t_link, "disk": self.t_disk}
        return max(t, key=t.get)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(hit_rate=self.hit_rate, time_serial=self.time_serial, time_overlap=self.time_overlap,
                 tok_s_serial=self.tok_s_serial, tok_s_overlap=self.tok_s_overlap, bound=self.bound)
        return d


@dataclass
class _Counts:
    hits: int = 0
    misses: int = 0
    miss_bytes: int = 0


def _replay_counts(trace: Trace, sizes, capacity: int, policy: str, warmup: int, prime=()) -> _Counts:
    """Hits / misses / bytes of the tokens after `warmup`, the cache starting empty before `prime` (entries
    replayed first, uncounted: what the run touched before its recorded routing) and the warm-up.
    Online policies are deterministic, so the prefix's own counts (a prefix replay) are subtracted exactly;
    for "opt" the subtraction is an approximation (the optimum on the prefix alone may differ)."""

    def run(entries):
        if policy == "opt":
            return belady_opt(entries, sizes, capacity, trace.n_layers, trace.n_experts)
        return replay(entries, sizes, capacity, policy, trace.n_layers, trace.n_experts)

    prime = list(prime)
    full = run(prime + trace.entries())
    c = _Counts(full.hits, full.misses, full.bytes_loaded)
    if warmup or prime:
        pre = run(prime + trace.entries(0, warmup))
        c = _Counts(c.hits - pre.hits, c.misses - pre.misses, c.miss_bytes - pre.bytes_loaded)
    return c


def _static_hot(trace: Trace, sizes, capacity: int, warmup: int) -> tuple[set, _Counts]:
    """Pin the most used experts of the trace (ties: lower key) until `capacity` is full; count after warm-up."""
    freq = Counter(k for entry in trace.entries() for k in dict.fromkeys(entry))
    hot, used = set(), 0
    for key, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0])):
        if used + sizes(key) <= capacity:
            hot.add(key)
            used += sizes(key)
    c = _Counts()
    for entry in trace.entries(warmup):
        for key in dict.fromkeys(entry):
            if key in hot:
                c.hits += 1
            else:
                c.misses += 1
                c.miss_bytes += sizes(key)
    return hot, c


def simulate(trace: Trace, hw: HardwareProfile, *, memory: int | None = None, host_memory: int | None = None,
             policy: str = "lru", expert_bits: int | None = None, group_size: int = 64, context: int = 0,
             warmup: int = 0, cpu_misses: bool = False, backbone_bytes: int | None = None,
             kv_bytes_per_token: int | None = None, embed_bytes: int = 0, stored_bytes: int | None = None,
             computed_bytes_each: int | None = None, prime: np.ndarray | None = None,
             preload: bool = False) -> SimResult:
    """Replay `trace` on `hw` and apply the time model (docs/simulator.md).

    memory: device bytes for weights (backbone + expert cache), default the device's usable bytes minus the
    KV cache. host_memory: host RAM bytes for experts (GPU machines), default the usable host RAM.
    expert_bits: re-price experts at these bits from the trace's expert_params (default: the trace's bytes).
    cpu_misses: (GPU) pin the most used experts on the device and compute every miss on the CPU from RAM.
    embed_bytes: the embedding table's bytes within the backbone: held, but a token reads one row of it, so
    they are not streamed per token. With `hw.expert_call_s` set (the engine's unit timed at the model's shapes
    and precision) every expert use costs that, else its bytes at `hw.device_bw`. Every disk read also costs
    `hw.miss_cpu_s` (decoding the blob into a unit), on the miss path with the read.
    stored_bytes / computed_bytes_each (with expert_bits): one expert's bytes as stored and as the CPU holds and
    computes it, where the engine's exact figures are known (default: costmodel.quant_bytes).
    prime: token rows [P, L, K] (the trace's layers) replayed into the cache before the trace, uncounted: the
    routing a run did before the recorded one (its prefill), so the replay starts as warm as the run did.
    preload: every expert read into the cache first (the engine's --preload, which `auto` does when the budget
    holds them all), before `prime`.
    """
    if policy != "opt" and policy not in POLICIES:
        raise UsageError(f"unknown cache policy {policy!r}; choose one of: {', '.join([*POLICIES, 'opt'])}")
    if not 0 <= warmup < trace.tokens:
        raise UsageError(f"warm-up must be 0..{trace.tokens - 1} tokens for a trace of {trace.tokens}, got {warmup}")
    if not hw.has_bandwidths:
        raise UsageError(f"hardware {hw.name!r} lacks bandwidths for a time prediction (device_bw / link_bw)")
    notes = []
    cpu_device = hw.device == "cpu"
    if expert_bits is not None:
        if trace.expert_params is None:
            raise UsageError("--expert-bits needs expert_params in the trace (weights per expert); this trace has none")
        stored = stored_bytes or quant_bytes(trace.expert_params, expert_bits, group_size)
        # a CPU computes 2/3-bit experts expanded to 4-bit: that is what sits in its memory and what it reads
        computed = computed_bytes_each or quant_bytes(trace.expert_params, cpu_compute_bits(expert_bits), group_size)
        resident = computed if cpu_device else stored
        resident_fn = lambda k: resident
        all_bytes = resident * len(trace.layers) * trace.n_experts
    else:
        resident_fn = trace.size_fn()
        all_bytes = trace.all_expert_bytes()
    backbone = backbone_bytes if backbone_bytes is not None else trace.backbone_bytes
    if backbone is None:
        backbone = 0
        notes.append("backbone bytes unknown (not in the trace, no --backbone-bytes): counted as 0")
    kv = kv_bytes_per_token if kv_bytes_per_token is not None else (trace.kv_bytes_per_token or 0)
    if context and not kv:
        notes.append("KV bytes per token unknown: the KV cache is counted as 0")
    kv_total = kv * context
    if memory is None:
        memory = hw.device_usable - kv_total
    capacity = memory - backbone
    if capacity < 0:
        raise MoeError(f"--memory {memory / GB:.2f} GB holds no expert: the backbone alone is {backbone / GB:.2f} GB")
    if memory + kv_total > hw.device_bytes:
        notes.append(f"--memory {memory / GB:.2f} GB + KV {kv_total / GB:.2f} GB exceeds the device's "
                     f"{hw.device_bytes / GB:.2f} GB")
    if cpu_device:
        if host_memory:
            raise UsageError(f"hardware {hw.name!r} is CPU-only: no host tier (--host-memory); --memory is its RAM")
        host_cap = 0
    else:
        host_cap = hw.host_usable if host_memory is None else host_memory
    if cpu_misses and cpu_device:
        raise UsageError("--cpu-misses is for GPU machines; on a CPU-only machine every expert is computed on the CPU")

    if preload:  # rows that use every expert of every layer once, ahead of any other priming
        _, L, K = trace.experts.shape
        every = np.arange(-(-trace.n_experts // K) * K).reshape(-1, 1, K) % trace.n_experts
        every = np.broadcast_to(every, (every.shape[0], L, K))
        prime = every if prime is None else np.concatenate(
            [every, np.asarray(prime, dtype=np.int64).reshape(-1, L, K)])
    if prime is not None:
        prime = np.asarray(prime, dtype=np.int64).reshape(-1, *trace.experts.shape[1:])
        prime = Trace(experts=prime, n_experts=trace.n_experts, expert_bytes=trace.expert_bytes,
                      layers=trace.layers, n_layers=trace.n_layers).entries()  # checks the ids
    else:
        prime = []
    # device tier
    if cpu_misses:
        _, dev = _static_hot(trace, resident_fn, capacity, warmup)
    else:
        dev = _replay_counts(trace, resident_fn, capacity, policy, warmup, prime)
    # disk tier: the host holds what the device evicts (exclusive tiers), so device + host act as one cache
    # of their combined size under the same policy; its misses are the disk reads.
    if cpu_device:
        disk = dev
    elif all_bytes <= capacity + host_cap:
        disk = _Counts()  # everything fits in device + host: loaded once, before decoding
    else:
        disk = _replay_counts(trace, resident_fn, capacity + host_cap, policy, warmup, prime)
    disk_bytes = disk.misses * stored if expert_bits is not None else disk.miss_bytes  # disk holds stored bytes

    T = trace.tokens - warmup
    accesses = dev.hits + dev.misses
    entries = trace.entries(warmup)
    computed_bytes = sum(resident_fn(k) for entry in entries for k in dict.fromkeys(entry))
    uses = sum(len(dict.fromkeys(entry)) for entry in entries)
    backbone_read = max(0, backbone - embed_bytes)
    t_device = T * ((backbone_read + kv_total) / hw.device_bw + hw.token_overhead_s)
    t_cpu = t_link = 0.0
    if cpu_misses:
        miss_read = dev.miss_bytes if expert_bits is None else dev.misses * computed
        t_experts = (computed_bytes - dev.miss_bytes) / hw.device_bw
        t_cpu = miss_read / hw.cpu_bw
        link_bytes = 0
    else:
        t_experts = uses * hw.expert_call_s if hw.expert_call_s > 0 else computed_bytes / hw.device_bw
        link_bytes = 0 if cpu_device else dev.miss_bytes
        if not cpu_device:
            t_link = link_bytes / hw.link_bw + dev.misses * hw.link_latency_s
    t_device += t_experts
    t_disk = (disk_bytes / hw.disk_bw + disk.misses * (hw.disk_latency_s + hw.miss_cpu_s)) if disk.misses else 0.0
    if disk.misses and not hw.has_disk:
        raise MoeError(f"{disk.misses} expert reads from disk but hardware {hw.name!r} has no disk bandwidth")

    recall = None
    if trace.predicted is not None:
        got = sum(len(set(a) & set(p)) for a, p in zip(trace.experts[warmup:].reshape(-1, trace.top_k).tolist(),
                                                        trace.predicted[warmup:].reshape(T * len(trace.layers), -1).tolist()))
        recall = got / max(1, T * len(trace.layers) * trace.top_k)
    return SimResult(hardware=hw.name, policy="static-hot" if cpu_misses else policy, tokens=T, warmup=warmup,
                     accesses=accesses, hits=dev.hits, misses=dev.misses, disk_reads=disk.misses,
                     link_bytes=link_bytes, disk_bytes=disk_bytes, expert_capacity=capacity, host_capacity=host_cap,
                     backbone_bytes=backbone, cpu_misses=cpu_misses, t_device=t_device, t_cpu=t_cpu, t_link=t_link,
                     t_disk=t_disk, prefetch_recall=recall, t_experts=t_experts, backbone_read_bytes=backbone_read,
                     notes=notes)


def format_result(r: SimResult) -> str:
    lines = [
        f"simulated {r.tokens} decode tokens (after {r.warmup} warm-up) on {r.hardware}, policy {r.policy}",
        f"expert cache: {r.expert_capacity / GB:.3f} GB on the device, host tier {r.host_capacity / GB:.3f} GB; "
        f"backbone {r.backbone_bytes / GB:.3f} GB",
        f"hit rate {r.hit_rate:.4f} ({r.hits} hits, {r.misses} misses of {r.accesses}); {r.disk_reads} reads from "
        f"disk ({r.disk_bytes / GB:.3f} GB), {r.link_bytes / GB:.3f} GB over the link",
        f"time per token: device {1e3 * r.t_device / r.tokens:.2f} ms (experts {1e3 * r.t_experts / r.tokens:.2f}, "
        f"overhead included), CPU {1e3 * r.t_cpu / r.tokens:.2f} ms, "
        f"link {1e3 * r.t_link / r.tokens:.2f} ms, disk {1e3 * r.t_disk / r.tokens:.2f} ms",
        f"predicted decode: {r.tok_s_serial:.2f} tok/s serial (no prefetch) .. {r.tok_s_overlap:.2f} tok/s with "
        f"transfers fully hidden (prefetch; bound by {r.bound})",
    ]
    if r.prefetch_recall is not None:
        lines.append(f"trace predictor recall {r.prefetch_recall:.3f}")
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


# ---- this machine, timed at a model's shapes -----------------------------------------------------------------


def expert_dims(config: dict) -> tuple[int, int]:
    """(hidden, intermediate) of one routed expert of `config`'s model (built on the meta device)."""
    import torch

    from .models import build

    with torch.device("meta"):
        _, skel = build({k: v for k, v in config.items() if k not in ("rope_scaling", "rope_parameters")})
    return skel.expert_shape.hidden, skel.expert_shape.intermediate


def model_probes(config: dict, bits: int = 16, dtype: str = "float16", device: str = "cpu") -> dict:
    """The model-specific figures of the time model, measured here now, under the names bench's `limits` and
    scripts/validate_scale.py read: one expert call at `bits` (2/3-bit computed as int4 on a CPU), decoding a
    missed blob into its unit, and the per-token overhead of the architecture at toy widths (seconds)."""
    from .costmodel import cpu_compute_bits
    from .hardware import expert_call_seconds, expert_decode_seconds

    D, I = expert_dims(config)
    kb = cpu_compute_bits(bits) if device == "cpu" else bits
    return {"expert_call_s": expert_call_seconds(D, I, kb, dtype, device=device),
            "miss_cpu_s": expert_decode_seconds(D, I, bits, dtype) if device == "cpu" else 0.0,
            "token_overhead_s": measure_token_overhead(config, dtype, device=device)}


def calibrate(hw: HardwareProfile, config: dict, dtype: str = "float16", bits: int | None = None,
              group_size: int = 64, memo: dict | None = None) -> tuple[HardwareProfile, int]:
    """`hw` (a measured profile) timed for `config`'s model here: the expert GEMV bytes/s at its shapes
    (`expert_gemv_bw`, 16-bit) or, for `bits` < 16, one expert call through the engine's quantized unit and
    kernel (`expert_call_seconds`: the 4-bit codec's `make_linear`, call overhead included); the per-token
    overhead of the architecture at toy widths. Returns (profile, bytes of the embedding table in `dtype`, of
    which a token reads one row). `memo`: a dict kept between calls for one model, so each probe runs once."""
    import torch

    from .models.sizes import model_sizes

    memo = {} if memo is None else memo

    def once(key, fn):
        if key not in memo:
            memo[key] = fn()
        return memo[key]

    D, I = expert_dims(config)
    dev = hw.device
    over = once("overhead", lambda: measure_token_overhead(config, dtype, device=dev))
    embed = model_sizes(config).embed_params * getattr(torch, dtype).itemsize
    src = hw.sources
    if bits is not None and bits < 16:
        from .costmodel import cpu_compute_bits
        from .hardware import expert_call_seconds

        kb = cpu_compute_bits(bits) if dev == "cpu" else bits
        call = once(("call", kb), lambda: expert_call_seconds(D, I, kb, dtype, device=dev))
        hw = replace(hw, expert_call_s=call)
        src += (f"; one {kb}-bit expert call at D={D} I={I} (the engine's unit, make_linear's kernel) "
                f"{1e3 * call:.2f} ms")
        if dev == "cpu":
            from .hardware import expert_decode_seconds

            dec = once(("decode", bits), lambda: expert_decode_seconds(D, I, bits, dtype))
            hw = replace(hw, miss_cpu_s=dec)
            src += f"; decoding a missed {bits}-bit expert into its unit {1e3 * dec:.2f} ms"
    else:
        bw = once("gemv", lambda: expert_gemv_bw(D, I, dtype, device=dev))  # CUDA: the GPU's GEMV, not the CPU's
        hw = replace(hw, device_bw=bw, cpu_bw=bw if dev == "cpu" else hw.cpu_bw)
        src += f"; expert GEMV at D={D} I={I} {bw / GB:.1f} GB/s"
    src += f"; per-token overhead {1e3 * over:.2f} ms (the architecture at toy widths)"
    return replace(hw, token_overhead_s=over, sources=src), embed


# ---- command line ------------------------------------------------------------------------------------------


def parse_gbs(text: str | None, flag: str) -> float | None:
    if text is None:
        return None
    try:
        v = float(text)
    except ValueError:
        raise UsageError(f"{flag} takes GB/s as a number, got {text!r}") from None
    if v <= 0:
        raise UsageError(f"{flag} must be > 0 GB/s, got {text}")
    return v * GB


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default=None, help="routing trace (.json / .npz) written by `moe-offload profile`")
    p.add_argument("--hardware", required=True, help=f"profile: {', '.join(profile_names())}, or `list`")
    p.add_argument("--memory", default=None, help="device bytes for weights (backbone + expert cache), e.g. 10GiB")
    p.add_argument("--host-memory", default=None, help="host RAM bytes for experts (GPU machines)")
    p.add_argument("--cache-policy", default="lru", help=f"{', '.join(POLICIES)} or opt (offline optimum)")
    p.add_argument("--expert-bits", type=int, default=None, choices=BITS, help="re-price experts at these bits")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size (metadata per group)")
    p.add_argument("--backbone-bytes", default=None, help="override the trace's backbone bytes")
    p.add_argument("--context", type=int, default=0, help="KV cache tokens read per decode step")
    p.add_argument("--warmup", type=int, default=None, help="tokens excluded from the counts (default: T/4, "
                                                              "at most 64)")
    p.add_argument("--cpu-misses", action="store_true", help="pin hot experts; compute misses on the CPU")
    p.add_argument("--disk-bw", default=None, help="override the profile's disk read bandwidth, GB/s")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="this-machine: the compute dtype its GEMV is measured in (default bfloat16)")
    p.add_argument("--read-streams", type=int, default=2,
                   help="this-machine: reads in flight when measuring the disk (the loader's workers, default 2)")
    p.add_argument("--threads", type=int, default=None, help="this-machine: torch threads for the measurements")
    p.add_argument("--json", action="store_true", help="one JSON object")


def run(a) -> int:
    if a.hardware == "list":
        if a.json:
            print(json.dumps([asdict(p) for p in PROFILES.values()]))
        else:
            print(format_profiles(list(PROFILES.values())))
            print(f"{THIS_MACHINE}: measured when named (RAM, CPU GEMV, cold disk read; GPU when present), < 5 s")
        return 0
    if a.trace is None:
        raise UsageError("simulate: give --trace FILE (or --hardware list)")
    trace = load_trace(a.trace)
    embed_bytes = 0
    exact: dict = {}
    if a.read_streams < 1 or (a.threads is not None and a.threads < 1):
        raise UsageError("--read-streams and --threads must be >= 1")
    config = (trace.meta or {}).get("config")
    if config and a.expert_bits is not None and a.expert_bits < 16:  # re-priced: the engine's own bytes
        from .models.sizes import model_sizes
        from .store.cache import engine_expert_bytes

        if trace.expert_params is None:
            trace = replace(trace, expert_params=model_sizes(config).expert_params)
        e = engine_expert_bytes(*expert_dims(config), a.expert_bits, a.group_size, a.dtype)
        if e is not None:
            exact = {"stored_bytes": e[0], "computed_bytes_each": e[1]}
    if a.hardware == THIS_MACHINE:  # measured the way this trace's model would run here
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        sizes = np.asarray(trace.expert_bytes)
        one = exact.get("stored_bytes") or int(sizes.mean())
        hw = measure_this_machine(dtype=a.dtype, read_bytes=one, read_streams=a.read_streams,
                                  disk_bytes=max(128 << 20, 4 * a.read_streams * one))
        if config:  # the trace names its model: time its expert shapes and its per-token fixed cost here
            try:
                hw, embed_bytes = calibrate(hw, config, a.dtype, a.expert_bits, a.group_size)
            except Exception as e:  # an architecture the toy build cannot shrink: keep the generic profile
                print(f"simulate: note: per-token overhead not measured ({type(e).__name__}: {e})", file=sys.stderr)
    else:
        hw = get_profile(a.hardware)
    if a.disk_bw is not None:
        hw = replace(hw, disk_bw=parse_gbs(a.disk_bw, "--disk-bw"))
    warmup = min(64, trace.tokens // 4) if a.warmup is None else a.warmup
    r = simulate(trace, hw, memory=parse_size(a.memory), host_memory=parse_size(a.host_memory),
                 policy=a.cache_policy, expert_bits=a.expert_bits, group_size=a.group_size, context=a.context,
                 warmup=warmup, cpu_misses=a.cpu_misses, backbone_bytes=parse_size(a.backbone_bytes),
                 embed_bytes=embed_bytes, **exact)
    if a.json:
        print(json.dumps(r.to_dict()))
    else:
        print(format_result(r))
    return 0


if __name__ == "__main__":  # pragma: no cover
    import runpy  # `python -m moe_offload.sim ARGS` is `moe-offload simulate ARGS`

    sys.argv[1:1] = ["simulate"]
    runpy.run_module("moe_offload", run_name="__main__")
