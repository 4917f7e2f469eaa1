"""Open a model with its routed experts offloaded: the backbone resident, experts cached from the store.

`--memory` is the bytes of weights on the compute device: backbone + expert cache + RESERVE below. On a
CPU-only machine that is RAM and there is no separate host tier; on CUDA, `--host-memory` adds a pinned
RAM tier between disk and device.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MoeError, UsageError
from ..prefetch.runtime import make_prefetcher
from ..runtime.engine import Engine, _eos_ids, build_model, check_ctx_size, is_store, kv_bytes_per_token
from ..runtime.tokenizer import Tokenizer
from ..utils import Share, drop_page_cache, parse_memory, parse_size
from . import misses
from .cache import ExpertCache, OffloadedExperts, footprints
from .cached import store_for
from .format import BACKBONE, MANIFEST, Store, open_store

# Bytes of --memory kept out of the expert cache. CPU: 0, the accounting is exact (each cached expert is
# its own page-rounded mmap, counted whole). CUDA: slack for the caching allocator's rounding and
# fragmentation, which our byte counts do not see.
RESERVE = {"cpu": 0, "cuda": 64 << 20}
DEFAULT_POLICY = "lru"


def check_layout(store: Store, model) -> None:
    """The manifest's experts as the model built from its config has them: one line if not."""
    have = (store.moe_layers, store.n_experts, store.top_k, store.expert_shape)
    want = ([la for la, _ in model.moe_blocks()], model.n_experts, model.top_k, model.expert_shape)
    for name, h, w in zip(("moe_layers", "n_experts", "top_k", "expert_shape"), have, want):
        if h != w:
            raise MoeError(f"{store.path / MANIFEST}: {name} is {h} but its config makes {w}; convert again")


def mib(n: int) -> str:
    return f"{n / 2**20:.{1 if n >= 2**20 else 3}f} MiB"


def min_memory(backbone: int, reserve: int, loads: dict[int, list[int]], top_k: int,
               kv: tuple[int, int] = (0, 0)) -> tuple[int, str]:
    """Smallest --memory that runs: backbone + reserve + KV cache (bytes, tokens) + the largest top_k experts
    of any one layer. Returns (bytes, the arithmetic as text)."""
    biggest = ((la, sorted(sizes)[-top_k:]) for la, sizes in loads.items())
    layer, active = max(biggest, key=lambda t: sum(t[1]))
    need = backbone + reserve + kv[0] + sum(active)
    experts = (f"{len(active)} active experts × {mib(active[0])}" if len(set(active)) == 1
               else f"{len(active)} largest active experts of layer {layer} ({mib(sum(active))})")
    extra = f" + reserve {mib(reserve)}" if reserve else ""
    extra += f" + KV cache {mib(kv[0])} ({kv[1]} tokens)" if kv[0] else ""
    return need, f"backbone {mib(backbone)}{extra} + {experts} = {mib(need)} needed at least"


def open_offloaded(path: Path, device: torch.device, dtype: torch.dtype | None, memory: int | None,
                   host_memory: str | int | None = None, cache_policy: str | None = None,
                   prefetch: str | None = None, prefetch_depth: int | None = None,
                   prefetch_experts: int | None = None, cpu_misses: str | None = None,
                   miss_fallback: str | None = None, fallback_threshold: float | None = None,
                   hardware: str | None = None, verify_reads: str | None = None, ctx_size: int | None = None,
                   **rest) -> Engine:
    unknown = {k: v for k, v in rest.items() if v is not None}
    if unknown:
        named = ", ".join(f"{k}={v!r}" for k, v in unknown.items())
        raise UsageError(f"unsupported offload option(s): {named}")
    path, memory = Path(path), parse_memory(memory)
    host_bytes = parse_size(host_memory)
    if host_bytes is not None and device.type != "cuda":
        raise UsageError("--host-memory is for CUDA devices; on CPU the expert cache is in RAM: use --memory")
    if memory == "auto":
        raise UsageError("memory='auto' is the command line's planner; give bytes or a share like '25%'")
    if isinstance(memory, int) and memory <= 0:
        raise UsageError(f"--memory must be positive, got {memory}")
    cpu_misses, miss_fallback, threshold = misses.check_options(cpu_misses, miss_fallback, fallback_threshold)
    store = open_store(path) if is_store(path) else store_for(path, dtype)
    dt = dtype or store.dtype
    store.check_backbone()
    args, model = build_model(store.config, store.backbone(), device, dt, expert_keys=False)
    check_layout(store, model)
    ctx_size = check_ctx_size(ctx_size, model.max_len)
    drop_page_cache(store.path / BACKBONE)  # the backbone now lives in our tensors only
    backbone = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    stand = None
    if miss_fallback == "lowbit":  # 2-bit copies of every expert, resident all run: counted like the backbone
        from .lowbit import stand_ins

        stand = stand_ins(store, device, dt)
    fixed = backbone + (stand.nbytes if stand else 0)
    foot = footprints(store, device, dt)
    reserve = RESERVE.get(device.type, 0)
    kv = (kv_bytes_per_token(model, dt) * ctx_size, ctx_size) if ctx_size else (0, 0)  # -c: must fit
    if isinstance(memory, Share):  # --memory 25%: backbone + reserve + KV (-c) + that share of the experts
        memory = memory.resolve(fixed + reserve + kv[0], sum(f.load for f in foot.values()))
    if memory is None:  # everything fits
        capacity = sum(f.load for f in foot.values())
    else:
        loads = {la: [foot[(la, e)].load for e in range(store.n_experts)] for la in store.moe_layers}
        need, arithmetic = min_memory(fixed, reserve, loads, store.top_k, kv)
        if stand:
            arithmetic += f" (the backbone figure includes {mib(stand.nbytes)} of 2-bit stand-ins)"
        if memory < need:
            raise MoeError(f"--memory {mib(memory)} is too small: {arithmetic}")
        capacity = memory - fixed - reserve
    policy = cache_policy or DEFAULT_POLICY
    cache = ExpertCache(store, device, dt, capacity, policy, base_bytes=fixed, host_bytes=host_bytes,
                        verify=verify_reads or "first", kv_in_budget=memory is not None)
    numa_info, placement = misses.plan_numa(store, host_bytes if cache.host is not None else None, device)
    if placement is not None:  # the host tier is still empty: swap in the one that places blobs per node
        cache.host = misses.NumaHostTier(host_bytes, policy, max(store.moe_layers) + 1, store.n_experts,
                                         placement)
    costs = figures = None
    if cpu_misses == "on" or (cpu_misses == "auto" and device.type == "cuda"):
        costs = misses.expert_costs(store, dt)
        figures = (dict.fromkeys(costs, misses.profile_figures(hardware)) if hardware is not None
                   else misses.measure_figures(store, device, dt, costs))
    cache.extras = misses.MissRouter(cache, cpu_misses, figures, costs, stand, threshold, numa_info)
    for layer, moe in model.moe_blocks():
        moe.experts = OffloadedExperts(cache, layer)
    if prefetch not in (None, "none"):
        cache.prefetcher = make_prefetcher(cache, model, store.path, prefetch,
                                           1 if prefetch_depth is None else prefetch_depth, prefetch_experts)
        # staging holds one predicted set per layer ahead, and always leaves the cache one layer's active experts
        biggest = max(f.load for f in foot.values())
        want = cache.prefetcher.depth * cache.prefetcher.m * biggest
        cache.set_staging(max(0, min(want, capacity - store.top_k * biggest)))
    tokenizer = Tokenizer(store.path) if (store.path / "tokenizer.json").is_file() else None
    info = {"format": "store", "store": str(store.path), "model_type": store.model_type,
            "expert_bytes": store.expert_bytes, "backbone_bytes": backbone, "memory": memory,
            "cache_capacity_bytes": capacity, "cache_policy": policy, "host_memory": host_bytes,
            "disk_direct_io": cache.disk.direct, "prefetch": prefetch or "none", "staging_bytes": cache.staging_bytes}
    info.update(cpu_misses=cpu_misses, miss_fallback=miss_fallback, **misses.describe(cache.extras),
                **numa_info)
    if stand:
        info.update(fallback_threshold=threshold, lowbit_bytes=stand.nbytes, lowbit_source=stand.source)
    engine = Engine(model, args, tokenizer, device, dt, store.path,
                    _eos_ids(store.path, store.config, tokenizer), expert_stats=cache.stats, info=info,
                    ctx_size=ctx_size)
    engine.expert_cache = cache  # the prefetcher's handle: cache.prefetch(keys) / cache.cancel_prefetch()
    return engine
