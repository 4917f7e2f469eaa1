"""What a layer does with a missed expert besides waiting for it to land: compute it on the CPU
(--cpu-misses), or compute a resident 2-bit stand-in (--miss-fallback lowbit, store/lowbit.py); and the NUMA
placement of the host tier. One `MissRouter` per cache (`cache.router`), told each layer's routing before
dispatch (`on_route`, the way the prefetcher is), so `moe_dispatch` keeps its signature.

--cpu-misses off | auto | on. Per missed expert (neither cached nor on its way), the cost model
(costmodel.miss_cost) weighs "copy it over the link and compute on the device" against "compute it on the
CPU where its bytes are" for the tokens routed to it in this layer:

    cpu    = max(cpu_bytes / cpu_bw, 2 * params * tokens / cpu_flops)
    device = latency + nbytes / link_bw + max(nbytes / device_bw, 2 * params * tokens / device_flops)

so decode (1 token) usually goes to the CPU and a prefill batch to the device. The bytes come from the host
tier, else one disk read into host memory (offered to the host tier): the disk read is the same on both
sides, so it does not enter the choice; nor does the value of caching the expert for later (the device side
caches it, the CPU side does not). The figures are measured at open per codec (a real blob of the store:
CPU unit at 1 and 64 rows, the pinned host->device copy, the device unit at 1 and 64 rows), or taken from a
hardware profile (`hardware=`). The CPU unit is the same codec decoded on the CPU (the same math as the
device kernel's reference); the layer's hidden rows are copied to the CPU once when the routing is known
(the router's output has to reach the CPU then anyway), a loader worker reads, decodes and computes the
expert while the compute thread queues the device work of the hits, and the result rows go back to the
device when the layer takes them.

`auto` and `on` are the same on CUDA. On a CPU-only machine the device IS the CPU: `auto` does nothing;
`on` is a test hook: with no link (link_bw 0) every miss is computed straight from the freshly read blob and
never enters the cache (a bypass). Counters: cpu_computed_experts, cpu_compute_seconds (decode + compute,
in the workers).

NUMA: with a host tier, more than one node and the store's routing_stats.json, the host tier allocates the
blobs of the hottest experts on the GPU's node (numa.place_experts, libnuma numa_alloc_onnode). Those
buffers are pageable (not registered with CUDA), so their copies to the device are staged by the driver.
Stats: numa_nodes (1: no-op), numa_local_experts, numa_enforced.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from .. import numa
from ..codecs import make_codec
from ..costmodel import crossover_tokens, miss_cost
from ..errors import MoeError
from ..hardware import get_profile
from ..utils import best_time
from .cache import unit_bytes
from .format import Key, Store
from .tiers import DiskTier, HostTier

CPU_MISSES = ("off", "auto", "on")
FALLBACKS = ("none", "lowbit")
DEFAULT_THRESHOLD = 0.2
MEASURE_ROWS = 64  # the batch whose timing gives FLOP/s


@dataclass(frozen=True)
class ExpertCost:
    """One codec's expert as the cost model sees it."""

    params: int  # weights of one expert
    nbytes: int  # as stored and moved over the link
    cpu_bytes: int  # what the CPU unit holds and reads per GEMV (2/3-bit expanded to nibbles, dtype copies)


@dataclass(frozen=True)
class Figures:
    """Bytes/s and FLOP/s for the miss decision (costmodel.miss_cost's inputs). link_bw 0: no link."""

    link_bw: float
    cpu_bw: float
    cpu_flops: float
    device_bw: float
    device_flops: float
    latency_s: float = 0.0
    source: str = ""

    def kw(self) -> dict:
        return {"link_bw": self.link_bw, "cpu_bw": self.cpu_bw, "cpu_flops": self.cpu_flops,
                "device_bw": self.device_bw, "device_flops": self.device_flops, "latency_s": self.latency_s}


def spec_key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


def expert_params(store: Store) -> int:
    s = store.expert_shape
    return 3 * s.hidden * s.intermediate + (2 * s.intermediate + s.hidden if s.bias else 0)


def cpu_unit_bytes(codec, nbytes: int, store: Store, dtype: torch.dtype) -> int:
    """Bytes the CPU-decoded unit holds (one trial decode: on meta where the codec allows, else of zeros)."""
    try:
        unit = codec.decode(torch.empty(nbytes, dtype=torch.uint8, device="meta"), store.expert_shape, dtype)
    except Exception:  # noqa: BLE001  (a codec whose decode needs real data: hqq)
        unit = codec.decode(torch.zeros(nbytes, dtype=torch.uint8), store.expert_shape, dtype)
    return unit_bytes(unit)


def expert_costs(store: Store, dtype: torch.dtype) -> dict[str, ExpertCost]:
    """Per distinct codec spec (with its blob size) of the store."""
    out, params = {}, expert_params(store)
    for e in store.entries.values():
        k = spec_key(e.codec)
        if k not in out:
            out[k] = ExpertCost(params, e.nbytes, cpu_unit_bytes(make_codec(e.codec), e.nbytes, store, dtype))
    return out


def profile_figures(hardware) -> Figures:
    hw = get_profile(hardware)
    return Figures(hw.link_bw, hw.cpu_bw, hw.cpu_flops, hw.device_bw, hw.device_flops, hw.link_latency_s,
                   source=f"hardware profile {hw.name}")


def measure_figures(store: Store, device: torch.device, dtype: torch.dtype,
                    costs: dict[str, ExpertCost]) -> dict[str, Figures]:
    """Per codec spec, timed on one real expert of the store (a few ms each). CPU-only: no link, nothing
    timed.
    CUDA (never run on the CPU-only development machine): the CPU unit at 1 and MEASURE_ROWS rows, a pinned
    host->device copy of the blob, the device unit at 1 and MEASURE_ROWS rows."""
    if device.type != "cuda":
        none = Figures(0.0, 0.0, 0.0, 0.0, 0.0, source="no link: the compute device is the CPU")
        return dict.fromkeys(costs, none)
    first: dict[str, Key] = {}
    for key, e in sorted(store.entries.items()):
        first.setdefault(spec_key(e.codec), key)
    disk, out = DiskTier(store.experts_path, pinned=True), {}
    sync = partial(torch.cuda.synchronize, device)
    D, M = store.expert_shape.hidden, MEASURE_ROWS
    g = torch.Generator().manual_seed(0)
    x1 = (0.1 * torch.randn(1, D, generator=g)).to(dtype)
    xm = (0.1 * torch.randn(M, D, generator=g)).to(dtype)
    try:
        with torch.inference_mode():
            for k, key in first.items():
                e, c = store.entries[key], costs[k]
                codec = make_codec(e.codec)
                blob = disk.read(e)[:e.nbytes]  # pinned host memory
                cpu_unit = codec.decode(blob, store.expert_shape, dtype)
                dev_blob = torch.empty(e.nbytes, dtype=torch.uint8, device=device)
                t_link = best_time(partial(dev_blob.copy_, blob, non_blocking=True), 3, sync)
                dev_unit = codec.decode(dev_blob, store.expert_shape, dtype)
                x1d, xmd = x1.to(device), xm.to(device)
                t_cpu1, t_cpum = best_time(partial(cpu_unit, x1), 3), best_time(partial(cpu_unit, xm), 2)
                t_dev1 = best_time(partial(dev_unit, x1d), 3, sync)
                t_devm = best_time(partial(dev_unit, xmd), 3, sync)
                out[k] = Figures(link_bw=e.nbytes / t_link, cpu_bw=c.cpu_bytes / t_cpu1,
                                 cpu_flops=2 * c.params * M / t_cpum, device_bw=e.nbytes / t_dev1,
                                 device_flops=2 * c.params * M / t_devm,
                                 source=f"measured on layer {key[0]} expert {key[1]}")
    finally:
        disk.close()
    return out


class MissRouter:
    """A route hook of the cache (`cache.router`): per-layer decisions for missed experts, the CPU rows of
    each one the CPU computes (the cache runs it: `ExpertCache._compute`), the stand-ins, counters."""

    def __init__(self, store: Store, device: torch.device, cpu_misses: str = "off",
                 figures: dict[str, Figures] | None = None, costs: dict[str, ExpertCost] | None = None,
                 stand_ins=None, threshold: float = DEFAULT_THRESHOLD, numa_info: dict | None = None):
        self.mode = cpu_misses
        self.cpu_on = cpu_misses == "on" or (cpu_misses == "auto" and device.type == "cuda")
        self.figures, self.costs = figures or {}, costs or {}
        self.spec_of = {k: spec_key(e.codec) for k, e in store.entries.items()}
        self.stand_ins, self.threshold = stand_ins, threshold  # lowbit.StandIns or None
        self.numa_info = numa_info or {"numa_nodes": 1}
        self.decided: dict[Key, str] = {}  # this layer's misses: "cpu" | "lowbit"
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> hidden, top_k_index (CPU)
        self.reset()

    def reset(self) -> None:
        self.lowbit_fallbacks = 0

    @property
    def active(self) -> bool:
        return self.cpu_on or self.stand_ins is not None

    # ---- the decision ----------------------------------------------------------------------------------
    def decide(self, key: Key, tokens: int) -> str:
        """'cpu' or 'device' for missed expert `key` with `tokens` tokens routed to it."""
        spec = self.spec_of[key]
        f, c = self.figures[spec], self.costs[spec]
        if f.link_bw <= 0:  # no link: the device is the CPU
            return "cpu"
        return miss_cost(c.params, c.nbytes, tokens, cpu_bytes=c.cpu_bytes, **f.kw()).where

    def crossovers(self) -> dict[str, int | None]:
        """Per codec: tokens from which the device wins (None: the CPU always wins, e.g. no link)."""
        out = {}
        for spec, c in self.costs.items():
            f = self.figures.get(spec)
            if f is not None:
                out[spec] = (None if f.link_bw <= 0
                             else crossover_tokens(c.params, c.nbytes, cpu_bytes=c.cpu_bytes, **f.kw()))
        return out

    def on_route(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor, cache) -> None:
        """Layer `layer` routed (hidden [N, D], top_k_index / top_k_weights [N, A]): decide its misses, those
        experts of it that `cache` neither holds nor has on their way."""
        self.decided.clear()
        self.inputs.clear()
        if not self.active:
            return
        idx = top_k_index.cpu()  # a sync the dispatch makes anyway (torch.unique(...).tolist())
        needed = torch.unique(idx).tolist()
        missing = [e for e in needed if (layer, e) not in cache.resident and (layer, e) not in cache.pending]
        if not missing:
            return
        flat = idx.reshape(-1)
        n = max(needed) + 1
        tokens = torch.bincount(flat, minlength=n).tolist()  # a token picks an expert at most once
        weights = top_k_weights.detach().float().cpu().reshape(-1)
        wmax = torch.zeros(n).scatter_reduce_(0, flat, weights, "amax")  # per expert, its largest weight
        for e in missing:
            k = (layer, e)
            if self.stand_ins is not None and float(wmax[e]) < self.threshold:
                self.decided[k] = "lowbit"
            elif self.cpu_on and self.decide(k, tokens[e]) == "cpu":
                self.decided[k] = "cpu"
        if "cpu" in self.decided.values():
            self.inputs[layer] = (hidden.detach().cpu(), idx)

    def how(self, key: Key) -> str | None:
        """The cache's question for a true miss: 'cpu', 'lowbit' or None (load it). Answered once."""
        how = self.decided.pop(key, None)
        if how == "lowbit":
            self.lowbit_fallbacks += 1
        return how

    def stand_in(self, key: Key) -> Callable:
        return self.stand_ins.units[key]

    def rows(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        """A miss the CPU computes: (this layer's hidden rows on the CPU [N, D], the rows routed to it: the
        ones moe_dispatch will hand this expert, in the same order)."""
        hidden, idx = self.inputs[key[0]]
        return hidden, torch.where(idx == key[1])[0]

    # ---- stats -------------------------------------------------------------------------------------------
    def stats(self, cpu_experts: int, cpu_seconds: float) -> dict:
        """cpu_experts, cpu_seconds: the cache's counts of the misses it computed on the CPU."""
        s = {"cpu_misses": self.mode, "cpu_computed_experts": cpu_experts,
             "cpu_compute_seconds": cpu_seconds, "lowbit_fallbacks": self.lowbit_fallbacks}
        if self.stand_ins is not None:
            s.update(miss_fallback="lowbit", fallback_threshold=self.threshold)
        s.update(self.numa_info)
        return s


# ---- NUMA -------------------------------------------------------------------------------------------------


class NumaHostTier(HostTier):
    """The host tier with placement: a blob it keeps is first copied into memory bound to its node."""

    def __init__(self, capacity_bytes: int, policy: str, n_layers: int, n_experts: int,
                 placement: numa.Placement):
        super().__init__(capacity_bytes, policy, n_layers, n_experts)
        self.placement = placement

    def offer(self, key: Key, blob: torch.Tensor, step: int) -> None:
        node = self.placement.node_of.get(key)
        if node is not None and self.placement.enforced and key not in self.blobs:
            try:
                placed = numa.alloc_on_node(blob.numel(), node)
                placed.copy_(blob)
                blob = placed
            except (OSError, MemoryError):  # the node is full: keep the blob where it is
                pass
        super().offer(key, blob, step)


def plan_numa(store: Store, host_bytes: int | None, device: torch.device,
              nodes: list[numa.Node] | None = None) -> tuple[dict, numa.Placement | None]:
    """(stats entries, placement or None). Placement needs a host tier, > 1 node and routing_stats.json."""
    nodes = numa.detect() if nodes is None else nodes
    info = {"numa_nodes": len(nodes)}
    stats_path = Path(store.path) / "routing_stats.json"
    if len(nodes) < 2 or not host_bytes or not stats_path.is_file():
        return info, None
    try:
        routing = json.loads(stats_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoeError(f"{stats_path}: not valid JSON ({e})") from None
    gpu = numa.gpu_pci_address(device.index or 0) if device.type == "cuda" else None
    ids = {n.id for n in nodes}
    local = numa.local_node(gpu=gpu) if gpu else numa.compute_node(nodes)
    local = local if local in ids else nodes[0].id
    capacity = {n.id: min(host_bytes, n.mem_free or host_bytes) for n in nodes}
    sizes = {k: e.span for k, e in store.entries.items()}
    freq = {k: v for k, v in numa._freq_items(routing).items() if k in sizes}
    p = numa.place_experts(freq, sizes, capacity, local, nodes)
    info.update(numa_local_experts=sum(1 for n in p.node_of.values() if n == local), numa_enforced=p.enforced)
    return info, p


def describe(router: MissRouter) -> dict:
    """engine.info entries: the figures and crossover per codec."""
    if not router.cpu_on:
        return {}
    return {"cpu_miss_figures": {s: asdict(f) for s, f in router.figures.items()},
            "cpu_miss_crossover_tokens": router.crossovers()}
