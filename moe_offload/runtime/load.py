"""The composition root: one `load` turns a path and options into a running Engine, built once, fully formed.

    options --OffloadConfig.parse--> config (frozen, checked once)
    HF folder, no offload options:  backbone + every expert resident (LocalExperts)
    expert store or any option:     store -> backbone -> tiers (disk, host) -> policy -> route hooks
                                    (prefetcher, miss router) -> ExpertCache -> OffloadedExperts per layer
    either way:                     -> Engine(...)  (the only place one is built)

`--memory` is the bytes of weights on the compute device: backbone + expert cache + DEVICE_RESERVE
(hardware.py). On a CPU-only machine that is RAM and there is no separate host tier; on CUDA,
`--host-memory` adds a pinned RAM tier between disk and device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import SafetensorsFolder, checkpoint_dtype, dequantizing, read_config
from ..errors import MoeError, UsageError
from ..hardware import DEVICE_RESERVE
from ..hub import resolve_model
from ..models import get_module
from ..prefetch.runtime import MODES as PREFETCH_MODES
from ..prefetch.runtime import make_prefetcher
from ..store import misses
from ..store.cache import ExpertCache, OffloadedExperts, footprints
from ..store.cached import store_for
from ..store.format import BACKBONE, open_store
from ..store.open import check_layout, mib, min_memory
from ..store.policies import POLICIES
from ..store.rows import KEY as EMBED_KEY
from ..store.rows import MODES as EMBED_MODES
from ..store.rows import choose as choose_embed_rows
from ..store.rows import why_resident
from ..store.tiers import DISK_READS
from ..store.tiers import HostTier
from ..utils import Share, drop_page_cache, parse_dtype, parse_memory, parse_size, pick_device
from .engine import (DEFAULT_MODEL, Engine, _eos_ids, attach_local_experts, build_model, check_ctx_size,
                     is_store, kv_bytes_per_token)
from .tokenizer import Tokenizer

DEFAULT_POLICY = "lru"
VERIFY = ("first", "always")
OPTIONS = ("host_memory", "cache_policy", "prefetch", "prefetch_depth", "prefetch_experts", "cpu_misses",
           "miss_fallback", "fallback_threshold", "hardware", "verify_reads", "embed_rows", "preload", "disk_reads")
PRELOAD = ("auto", "on", "off")


@dataclass(frozen=True)
class OffloadConfig:
    """How the routed experts are kept: budgets, tiers, cache policy, prefetch, miss handling, verification.
    Built by `parse` (keywords of `load`, the CLI's flags, the planner's choice), checked there once."""

    memory: int | Share | None = None  # device bytes for weights + KV caches; a Share of the model; None: all
    host_memory: int | None = None  # pinned host RAM tier (CUDA)
    cache_policy: str = DEFAULT_POLICY
    prefetch: str = "none"
    prefetch_depth: int = 1
    prefetch_experts: int | None = None  # per predicted layer; None: the model's top-k
    cpu_misses: str = "off"
    miss_fallback: str = "none"
    fallback_threshold: float = misses.DEFAULT_THRESHOLD
    hardware: str | None = None  # a hardware profile for the miss cost model instead of measuring
    verify_reads: str = "first"
    embed_rows: str = "resident"  # the embedding table held, or its rows read from the store (store/rows.py)
    preload: str = "off"  # read every expert at load: on, off, or auto (when the budget holds them all)
    disk_reads: str = "direct"  # how a miss reads experts.bin (store.tiers.DiskTier): direct or buffered

    @classmethod
    def parse(cls, device: torch.device, memory=None, **options) -> OffloadConfig:
        """Keyword options (None: the default) -> a checked config; bad input: one UsageError line."""
        unknown = {k: v for k, v in options.items() if k not in OPTIONS and v is not None}
        if unknown:
            named = ", ".join(f"{k}={v!r}" for k, v in unknown.items())
            raise UsageError(f"unsupported offload option(s): {named}")
        o = {k: options.get(k) for k in OPTIONS}
        memory = parse_memory(memory)
        host = parse_size(o["host_memory"])
        if host is not None and device.type != "cuda":
            raise UsageError("--host-memory is for CUDA devices; on CPU the expert cache is in RAM: "
                             "use --memory")
        if memory == "auto":
            raise UsageError("memory='auto' is the command line's planner; give bytes or a share like '25%'")
        if isinstance(memory, int) and memory <= 0:
            raise UsageError(f"--memory must be positive, got {memory}")
        cpu_misses, fallback, threshold = check_misses(o["cpu_misses"], o["miss_fallback"],
                                                       o["fallback_threshold"])
        policy = o["cache_policy"] or DEFAULT_POLICY
        if policy not in POLICIES:
            raise UsageError(f"unknown cache policy {policy!r}; choose one of: {', '.join(POLICIES)}")
        prefetch = o["prefetch"] or "none"
        if prefetch not in PREFETCH_MODES:
            raise UsageError(f"--prefetch {prefetch!r}: choose one of {', '.join(PREFETCH_MODES)}")
        depth = 1 if o["prefetch_depth"] is None else o["prefetch_depth"]
        if prefetch != "none" and depth < 1:
            raise UsageError("--prefetch-depth must be >= 1")
        verify = o["verify_reads"] or "first"
        if verify not in VERIFY:
            raise UsageError(f"--verify-reads must be one of {', '.join(VERIFY)}, got {verify!r}")
        embed_rows = o["embed_rows"] or "resident"
        if embed_rows not in EMBED_MODES:
            raise UsageError(f"--embed-rows must be one of {', '.join(EMBED_MODES)}, got {embed_rows!r}")
        preload = o["preload"] or "off"  # (the command line's default is auto)
        if preload not in PRELOAD:
            raise UsageError(f"--preload must be one of {', '.join(PRELOAD)}, got {preload!r}")
        disk_reads = o["disk_reads"] or "direct"
        if disk_reads not in DISK_READS:
            raise UsageError(f"--disk-reads must be one of {', '.join(DISK_READS)}, got {disk_reads!r}")
        return cls(memory, host, policy, prefetch, depth, o["prefetch_experts"], cpu_misses, fallback,
                   threshold, o["hardware"], verify, embed_rows, preload, disk_reads)


def check_misses(cpu_misses: str | None, miss_fallback: str | None,
                 fallback_threshold) -> tuple[str, str, float]:
    cpu_misses = cpu_misses or "off"
    miss_fallback = miss_fallback or "none"
    if cpu_misses not in misses.CPU_MISSES:
        raise UsageError(f"--cpu-misses must be one of {', '.join(misses.CPU_MISSES)}, "
                         f"got {cpu_misses!r}")
    if miss_fallback not in misses.FALLBACKS:
        raise UsageError(f"--miss-fallback must be one of {', '.join(misses.FALLBACKS)}, "
                         f"got {miss_fallback!r}")
    if fallback_threshold is not None and miss_fallback != "lowbit":
        raise UsageError("--fallback-threshold needs --miss-fallback lowbit")
    try:
        threshold = misses.DEFAULT_THRESHOLD if fallback_threshold is None else float(fallback_threshold)
    except (TypeError, ValueError):
        raise UsageError(f"--fallback-threshold must be a number, got {fallback_threshold!r}") from None
    if not 0.0 <= threshold <= 1.0 or math.isnan(threshold):
        raise UsageError(f"--fallback-threshold must be in 0..1 (a routing weight), got {threshold}")
    return cpu_misses, miss_fallback, threshold


def load(path: str | Path | None = None, device: str | None = None, dtype: str | torch.dtype | None = None,
         memory: str | int | None = None, ctx_size: int | None = None, config: OffloadConfig | None = None,
         backbone_bits: int | str | None = None, **offload) -> Engine:
    """Load an HF model folder or an expert store. `memory` (bytes, '2GiB', '25%') caps weights and KV caches
    on the device; `ctx_size` caps the context (prompt + new tokens) below the model's; further keywords
    (host_memory, cache_policy, prefetch, ...) go to the store. `config`: an OffloadConfig built already
    (the planner's, `--auto`), instead of `memory` and the keywords. `backbone_bits`: a GGUF file's conversion
    (gguf_import.convert_gguf; None: "auto")."""
    path = resolve_model(path) if path is not None else DEFAULT_MODEL  # org/name: the local HF cache
    if path.suffix.lower() == ".gguf" and path.is_file():  # a GGUF file converts once into a cached store
        from ..gguf_import import store_for as gguf_store

        path = gguf_store(path, parse_dtype(dtype), backbone_bits).path
    if not path.exists():
        raise MoeError(f"model path {path} does not exist")
    if not path.is_dir():
        raise MoeError(f"model path {path} is not a folder")
    dev = pick_device(device)
    offloaded = config is not None or is_store(path) or memory is not None or any(  # (rows on demand need a
        v is not None for k, v in offload.items()  # store's file; preloading a resident model is a no-op)
        if not (k == "embed_rows" and v != "disk") and k != "preload")
    if config is None:
        memory = parse_memory(memory)  # bytes, a Share of the model ('25%', resolved by the store) or 'auto'
        config = OffloadConfig.parse(dev, memory, **offload) if offloaded else OffloadConfig()
    if offloaded:
        parts = open_offloaded(path, dev, parse_dtype(dtype), config, ctx_size)
    else:
        parts = open_resident(path, dev, parse_dtype(dtype), ctx_size)
    return Engine(**parts)


def open_resident(path: Path, device: torch.device, dtype: torch.dtype | None, ctx_size: int | None) -> dict:
    """An HF folder with every routed expert resident: Engine's arguments."""
    config = read_config(path)
    get_module(config.get("model_type"))
    dt = dtype or checkpoint_dtype(config)
    source = dequantizing(SafetensorsFolder(path), config)  # FP8 block-scaled weights -> fp32 at load
    args, model = build_model(config, source, device, dt)
    nbytes = attach_local_experts(model, source, args.model_type, device, dt)
    tokenizer = Tokenizer(path) if (path / "tokenizer.json").is_file() else None
    backbone = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    info = {"format": "hf", "model_type": args.model_type, "expert_bytes": nbytes, "backbone_bytes": backbone}
    return dict(model=model, args=args, tokenizer=tokenizer, device=device, dtype=dt, path=path,
                eos_ids=_eos_ids(path, config, tokenizer), info=info, ctx_size=ctx_size)


def embed_rows(c: OffloadConfig, source, config: dict, dtype: torch.dtype) -> tuple[bool, int]:
    """Read embedding rows from the store on demand (store/rows.py) instead of holding the table? And the
    table's bytes that rows on demand could take out of the budget (0 when they cannot, or already do)."""
    why = why_resident(source, bool(config.get("tie_word_embeddings", False)))
    table = 0 if why else math.prod(source.shape_of(EMBED_KEY)) * dtype.itemsize
    rows = c.embed_rows != "resident" and choose_embed_rows(c.embed_rows, c.memory, table, why)
    return rows, 0 if rows else table


def open_offloaded(path: Path, device: torch.device, dtype: torch.dtype | None, config: OffloadConfig,
                   ctx_size: int | None = None) -> dict:
    """The backbone resident, the routed experts cached from the store: Engine's arguments."""
    c = config
    store = open_store(path) if is_store(path) else store_for(path, dtype)
    dt = dtype or store.dtype
    store.check_backbone()
    source = store.backbone()
    rows, movable = embed_rows(c, source, store.config, dt)  # movable: what a refusal can offer (below)
    args, model = build_model(store.config, source, device, dt, expert_keys=False,
                              embed_rows=store.path / BACKBONE if rows else None)
    del source  # its mapping closed, so the page cache below can let go of the file
    check_layout(store, model)
    ctx_size = check_ctx_size(ctx_size, model.max_len)
    drop_page_cache(store.path / BACKBONE)  # the backbone now lives in our tensors only
    backbone = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    stand = None
    if c.miss_fallback == "lowbit":  # 2-bit copies of every expert, resident all run: counted as backbone
        from ..store.lowbit import stand_ins

        stand = stand_ins(store, device, dt)
    fixed = backbone + (stand.nbytes if stand else 0)
    memory, capacity = c.memory, None
    foot = footprints(store, device, dt)
    reserve = DEVICE_RESERVE.get(device.type, 0)
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
            hint = (f"; with --embed-rows disk (the {mib(movable)} embedding table read by rows, not held) "
                    f"{mib(need - movable)} is enough" if movable and memory >= need - movable else "")
            raise MoeError(f"--memory {mib(memory)} is too small: {arithmetic}{hint}")
        capacity = memory - fixed - reserve

    # tiers: the host tier (CUDA), placed per NUMA node when the machine and the store's statistics allow
    n_layers = max(store.moe_layers) + 1
    host_bytes = c.host_memory if device.type == "cuda" and c.host_memory else None
    numa_info, placement = misses.plan_numa(store, host_bytes, device)
    host = None
    if host_bytes and placement is not None:
        host = misses.NumaHostTier(host_bytes, c.cache_policy, n_layers, store.n_experts, placement)
    elif host_bytes:
        host = HostTier(host_bytes, c.cache_policy, n_layers, store.n_experts)

    # route hooks: the prefetcher, and the miss router (CPU compute of misses, 2-bit stand-ins)
    costs = figures = None
    if c.cpu_misses == "on" or (c.cpu_misses == "auto" and device.type == "cuda"):
        costs = misses.expert_costs(store, dt)
        figures = (dict.fromkeys(costs, misses.profile_figures(c.hardware)) if c.hardware is not None
                   else misses.measure_figures(store, device, dt, costs))
    router = misses.MissRouter(store, device, c.cpu_misses, figures, costs, stand, c.fallback_threshold,
                               numa_info)
    prefetcher, staging = None, 0
    if c.prefetch != "none":
        prefetcher = make_prefetcher(model, store.path, c.prefetch, c.prefetch_depth, c.prefetch_experts)
        # staging holds one predicted set per layer ahead, and leaves the cache one layer's active experts
        biggest = max(f.load for f in foot.values())
        want = prefetcher.depth * prefetcher.m * biggest
        staging = max(0, min(want, capacity - store.top_k * biggest))

    cache = ExpertCache(store, device, dt, capacity, c.cache_policy, base_bytes=fixed, host=host,
                        staging_bytes=staging, verify=c.verify_reads, kv_in_budget=memory is not None,
                        prefetcher=prefetcher, router=router, foot=foot, disk_reads=c.disk_reads)
    for layer, moe in model.moe_blocks():
        moe.experts = OffloadedExperts(cache, layer)
    full_kv = model.kv_bytes_per_token(dt) * (ctx_size or model.max_len)  # a whole context's KV cache
    preloaded = cache.preload() if c.preload == "on" or (c.preload == "auto" and cache.fits_all(full_kv)) else 0
    tokenizer = Tokenizer(store.path) if (store.path / "tokenizer.json").is_file() else None
    info = {"format": "store", "store": str(store.path), "model_type": store.model_type,
            "expert_bytes": store.expert_bytes, "backbone_bytes": backbone, "memory": memory,
            "cache_capacity_bytes": capacity, "cache_policy": c.cache_policy, "host_memory": c.host_memory,
            "disk_direct_io": cache.disk.direct, "disk_reads": cache.disk.reads, "prefetch": c.prefetch,
            "staging_bytes": cache.staging_bytes,
            "embed_rows": "disk" if rows else "resident", "preloaded_experts": preloaded}
    info.update(cpu_misses=c.cpu_misses, miss_fallback=c.miss_fallback, **misses.describe(router),
                **numa_info)
    if stand:
        info.update(fallback_threshold=c.fallback_threshold, lowbit_bytes=stand.nbytes,
                    lowbit_source=stand.source)
    return dict(model=model, args=args, tokenizer=tokenizer, device=device, dtype=dt, path=store.path,
                eos_ids=_eos_ids(store.path, store.config, tokenizer), expert_stats=cache.stats, info=info,
                ctx_size=ctx_size, expert_cache=cache)
