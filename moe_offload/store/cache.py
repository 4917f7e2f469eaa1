"""The device tier: routed experts cached under one byte budget shared by all layers, and the per-layer
backends that run `moe_dispatch` over it.

Budget (bytes, never counts): every expert resident on the compute device and every load in flight holds
a reservation, so `cache_used + stage_used <= capacity` at all times; the peak of backbone + those bytes
is reported as `resident_weight_bytes`. A load reserves its decode footprint: the blob read from disk,
plus the converted copy while both live when the codec converts (store dtype != compute dtype); once
decoded, the reservation shrinks to what the unit really holds.

One layer's fetch: hits are yielded at once while its misses load in the background (demand priority),
each miss as soon as it lands, so reading overlaps compute. The experts the layer needs are pinned (the
policy's `exclude`) until computed; when the budget cannot take another miss, the fetch waits for one to
land, computes it, unpins it and goes on, so any budget >= one layer's active experts works, prefill too.

Prefetch hook (the prefetcher drives it): `prefetch(keys)` loads into a staging area of `staging_bytes`
kept out of the cache's share of the budget; staged experts evict nothing until a layer uses them, then
they join the cache. `cancel_prefetch()` drops queued or staged ones.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import torch

from ..codecs import make_codec
from ..errors import MoeError
from ..experts import Unit, moe_dispatch
from .format import ExpertEntry, Key, Store
from .loader import DEMAND, PREFETCH, CopyStream, Handle, Loader
from .policies import make_policy
from .tiers import BufferPool, DiskTier, HostTier

def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def unit_bytes(unit: Unit, tensors: list[torch.Tensor] | None = None) -> int:
    """What a unit keeps alive: the storages behind its tensors (a view of the read buffer keeps all of it), or
    its own count (`unit.nbytes`) if that is larger."""
    return max(storage_bytes(unit.tensors() if tensors is None else tensors), unit.nbytes)


@dataclass(frozen=True)
class Footprint:
    resident: int  # bytes the decoded unit holds on the device
    load: int  # bytes needed while loading: the read buffer and, if decode converts, the copy too


def footprints(store: Store, device: torch.device, dtype: torch.dtype) -> dict[Key, Footprint]:
    """Per expert, from one trial decode per distinct (codec, size) on the meta device (no memory)."""
    shape, memo, out = store.expert_shape, {}, {}
    for key, e in store.entries.items():
        spec = (json.dumps(e.codec, sort_keys=True), e.nbytes)
        if spec not in memo:
            alloc = e.span if device.type == "cpu" else e.nbytes  # CPU: the page-aligned read buffer itself
            codec = make_codec(e.codec)
            try:
                buf = torch.empty(alloc, dtype=torch.uint8, device="meta")
                unit = codec.decode(buf[:e.nbytes], shape, dtype)
            except Exception:  # a codec whose decode needs real data: decode zeros once
                buf = torch.zeros(alloc, dtype=torch.uint8, device=device)
                unit = codec.decode(buf[:e.nbytes], shape, dtype)
            tensors = unit.tensors()
            resident = unit_bytes(unit, tensors)
            views = any(t.untyped_storage()._cdata == buf.untyped_storage()._cdata for t in tensors)
            memo[spec] = Footprint(resident, resident if views else resident + alloc)
        out[key] = memo[spec]
    return out


class Computed:
    """A missed expert computed on the CPU for this layer's tokens: its rows, on the caller's device."""

    __slots__ = ("y",)
    nbytes = 0

    def __init__(self, y: torch.Tensor):
        self.y = y

    def tensors(self) -> list[torch.Tensor]:
        return []  # used once, never cached: nothing to count or keep

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [n, D] (the same rows the worker computed)
        if x.shape[0] != self.y.shape[0]:
            raise AssertionError(f"CPU result has {self.y.shape[0]} rows, the layer asks {x.shape[0]}")
        return self.y.to(device=x.device, dtype=x.dtype)


@dataclass
class Loaded:
    unit: Callable
    nbytes: int  # resident bytes of the unit
    tensors: list[torch.Tensor]
    bypass: bool = False  # computed elsewhere (--cpu-misses): used once, never cached


@dataclass
class Pending:
    handle: Handle
    reserved: int
    pool: str  # "cache" (demand, or a prefetch a layer claimed) or "stage" (speculative prefetch)
    claimed: bool = False  # a fetch waits on it
    drop_when_done: bool = False  # cancelled or abandoned while running: release its bytes once it ends


class ExpertCache:
    """Experts of all MoE layers on `device` under `capacity` bytes (see the module docstring)."""

    def __init__(self, store: Store, device: torch.device, dtype: torch.dtype, capacity: int,
                 policy: str = "lru", base_bytes: int = 0, host: HostTier | None = None, workers: int = 2,
                 staging_bytes: int = 0, verify: str = "first", kv_in_budget: bool = False,
                 prefetcher=None, router=None, foot: dict[Key, Footprint] | None = None, disk_reads: str = "direct"):
        """host: the pinned RAM tier (CUDA) or None. prefetcher (prefetch.runtime.Prefetcher) and router
        (misses.MissRouter): the route hooks, told each layer's routing before it fetches (OffloadedExperts).
        staging_bytes: kept for staged prefetches. foot: `footprints(store, device, dtype)` if known."""
        self.store, self.device, self.dtype = store, device, dtype
        self.entries: dict[Key, ExpertEntry] = store.entries
        self.shape = store.expert_shape
        self.capacity, self.staging_bytes, self.base_bytes = capacity, staging_bytes, base_bytes
        self.policy_name = policy
        self.foot = footprints(store, device, dtype) if foot is None else foot
        biggest = max(self.foot[k].load for k in self.entries)
        if staging_bytes and not 0 <= staging_bytes <= capacity - biggest:
            raise MoeError(f"staging {staging_bytes} bytes leaves the expert cache less than one expert")
        n_layers = max(store.moe_layers) + 1  # keys carry model layer indices
        self.policy = make_policy(policy, n_layers, store.n_experts, capacity - staging_bytes)
        codecs = {}
        self.codec = {k: codecs.setdefault(json.dumps(e.codec, sort_keys=True), make_codec(e.codec))
                      for k, e in self.entries.items()}
        cuda = device.type == "cuda"
        self.disk = DiskTier(store.experts_path, pinned=cuda, verify=verify, reads=disk_reads)
        self.buffers = BufferPool() if not cuda and BufferPool.usable() else None  # CPU: reuse read buffers
        self.host = host
        self.copier = CopyStream(device) if cuda else None
        self.loader = Loader(workers)
        self.prefetcher, self.router = prefetcher, router
        self.decides = router is not None and router.active  # --cpu-misses / --miss-fallback: it decides
        hooks = ((prefetcher, prefetcher is not None), (router, self.decides))
        self.hooks = tuple(h for h, on in hooks if on)  # told each layer's routing, in this order
        self._cpu: set[Key] = set()  # this fetch's misses the CPU computes (--cpu-misses)
        self.resident: dict[Key, Callable] = {}
        self.sizes: dict[Key, int] = {}
        self.pending: dict[Key, Pending] = {}
        self.cache_used = 0  # resident experts + demand loads in flight
        self.stage_used = 0  # prefetches in flight or staged
        self.kv_in_budget = kv_in_budget  # --memory given: KV caches come out of `capacity` (hold_kv)
        self.full_capacity = capacity
        self.kv_bytes = 0  # KV caches of the sequences in flight
        # one layer's largest active experts, pinned while it runs: the least the experts can be left
        self.working = max(sum(sorted(self.foot[(la, e)].load for e in range(store.n_experts))[-store.top_k:])
                           for la in store.moe_layers)
        self.step, self.prev_layer = 0, None
        self.lock = threading.Lock()  # workers add to the byte counters
        self._zero()
        self._finalizer = weakref.finalize(self, _shut, self.loader, self.disk)  # threads and fd go with us

    def _zero(self) -> None:
        self.hits = self.misses = self.evictions = 0
        self.bytes_read_disk = self.bytes_to_device = 0
        self.cpu_experts, self.cpu_seconds = 0, 0.0  # --cpu-misses: experts computed on the CPU, and its time
        self.stall = 0.0
        # issued = used + cancelled (never read) + wasted (read, then dropped unused) once a pass settles
        self.prefetch_issued = self.prefetch_used = self.prefetch_cancelled = self.prefetch_wasted = 0
        self.peak = self.base_bytes + self.cache_used + self.stage_used
        self.peak_all, self.peak_kv = self.peak + self.kv_bytes, self.kv_bytes
        if self.host is not None:
            self.host.hits, self.host.peak = 0, self.host.used

    # ---- accounting ------------------------------------------------------------------------------------
    def _note_peak(self) -> None:
        weights = self.base_bytes + self.cache_used + self.stage_used
        self.peak = max(self.peak, weights)
        self.peak_all = max(self.peak_all, weights + self.kv_bytes)
        self.peak_kv = max(self.peak_kv, self.kv_bytes)

    def hold_kv(self, nbytes: int) -> None:
        """`nbytes` more (negative: fewer) of KV cache, called between steps. Under --memory they come out of
        the experts' share (evicting now), down to one layer's active experts and the prefetch staging; KV
        past that is over the budget and shows in `resident_bytes` (load refuses a --memory that cannot hold
        the KV of --ctx-size tokens)."""
        self.kv_bytes += nbytes
        if self.kv_in_budget:
            floor = min(self.full_capacity, self.staging_bytes + self.working)
            self.capacity = max(self.full_capacity - self.kv_bytes, floor)
            if self.cache_used + self.stage_used > self.capacity:
                self.cancel_prefetch()
                self._reap()
            while self.cache_used + self.stage_used > self.capacity and self.resident:
                victim = self.policy.victim(next(iter(self.resident)), 0, set())
                if victim is None:
                    break
                self._evict(victim)
            self._trim()
        self._note_peak()

    def _evict(self, key: Key) -> None:
        if key not in self.resident:
            raise AssertionError(f"policy {self.policy_name} chose {key}, which is not resident")
        del self.resident[key]
        self.cache_used -= self.sizes.pop(key)
        self.policy.on_evict(key)
        self.evictions += 1

    def _release(self, key: Key) -> None:
        p = self.pending.pop(key)
        if p.pool == "stage":
            self.stage_used -= p.reserved
        else:
            self.cache_used -= p.reserved

    def _make_room(self, incoming: Key, need: int, pinned: set[Key]) -> bool:
        """Evict until `need` more bytes fit in the cache's share; when every cached expert is pinned, borrow
        free staging space, dropping speculative prefetches if needed. False: wait for a load to land."""
        limit = self.capacity - self.staging_bytes
        while self.cache_used + need > limit:
            v = self.policy.victim(incoming, need, pinned)
            if v is not None:
                self._evict(v)
            elif self.cache_used + self.stage_used + need <= self.capacity:
                return True
            elif not self._drop_one_prefetch(pinned):
                return False
        return True

    def _drop_one_prefetch(self, keep: set[Key]) -> bool:
        for k, p in self.pending.items():
            speculative = p.pool == "stage" and not p.claimed and k not in keep
            if speculative and (p.handle.done() or p.handle.cancel()):
                self._drop_prefetch(k, p)
                return True
        return False

    def _drop_prefetch(self, k: Key, p: Pending) -> None:
        """Give up an unclaimed speculative load: a queued one never runs (cancelled); a finished or running
        one was read for nothing (wasted) and frees its bytes now or when it ends."""
        if p.handle.cancel():  # still queued (or already cancelled): never read
            self.prefetch_cancelled += 1
            self._release(k)
            return
        self.prefetch_wasted += 1
        if p.handle.done():
            self._release(k)
        else:
            p.drop_when_done = True

    def _reap(self) -> None:
        for k in [k for k, p in self.pending.items() if p.drop_when_done and p.handle.done()]:
            self._release(k)

    # ---- loading (worker threads) ------------------------------------------------------------------------
    def _read(self, key: Key, step: int, buf: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """The one tier walk (demand loads, prefetches, CPU-computed misses): the blob from the host tier,
        else from disk (offered to the host tier). -> (blob, bytes read from disk)"""
        blob = self.host.get(key, step) if self.host is not None else None
        if blob is not None:
            return blob, 0
        e = self.entries[key]
        blob = self.disk.read(e, buf)  # verified, page-aligned; pinned on CUDA
        if self.host is not None:
            self.host.offer(key, blob, step)
        return blob, e.span

    def _load(self, key: Key, step: int, buf: torch.Tensor | None = None) -> Loaded:
        e = self.entries[key]
        blob, disk = self._read(key, step, buf)
        decode = partial(self.codec[key].decode, shape=self.shape, dtype=self.dtype)
        if self.copier is not None:
            unit = self.copier.upload(blob[:e.nbytes], decode)
            moved = e.nbytes
        else:
            unit = decode(blob[:e.nbytes])  # CPU: the read buffer is already the compute tier
            moved = e.span
        with self.lock:
            self.bytes_read_disk += disk
            self.bytes_to_device += moved
        tensors = unit.tensors()
        return Loaded(unit, unit_bytes(unit, tensors), tensors)

    def _compute(self, key: Key, hidden: torch.Tensor, tok: torch.Tensor, step: int) -> Loaded:
        """--cpu-misses: the expert decoded on the CPU where its blob is (host RAM) and run on this layer's
        rows hidden[tok]; the result is used once, never cached."""
        e = self.entries[key]
        blob, disk = self._read(key, step)
        t0 = time.perf_counter()
        with torch.inference_mode():
            unit = self.codec[key].decode(blob[:e.nbytes], self.shape, self.dtype)  # on the CPU, from RAM
            y = unit(hidden[tok])
        dt = time.perf_counter() - t0
        with self.lock:
            self.bytes_read_disk += disk
            self.cpu_experts += 1
            self.cpu_seconds += dt
        return Loaded(Computed(y), 0, [], bypass=True)

    def _submit(self, key: Key, priority: float) -> Handle:
        """Queue the load of `key`, whose bytes the caller has just reserved. CPU: its read buffer is taken
        from the pool now, so the free buffers left fit in what the budget has not reserved."""
        buf = None
        if self.buffers is not None:
            buf = self.buffers.take(self.entries[key].span)
            self._trim()
        return self.loader.submit(partial(self._load, key, self.step, buf), priority)

    def _trim(self) -> None:
        if self.buffers is not None:
            self.buffers.trim(self.capacity - self.cache_used - self.stage_used)

    # ---- the layer's fetch -------------------------------------------------------------------------------
    def _tick(self, layer: int) -> int:
        if self.prev_layer is None or layer <= self.prev_layer:  # a new forward pass: one step per token
            self.step += 1
        self.prev_layer = layer
        return self.step

    def fetch(self, layer: int, needed: list[int]) -> Iterable[list[tuple[int, Callable]]]:
        """(expert, unit) for every needed expert of `layer`, in groups ready together (experts.Fetch): the
        hits as one group, the 2-bit stand-ins as one, then each miss as it lands. Every one a hit (the
        common case of a decode token once the cache is warm): that one group as a list, without the
        generator's bookkeeping for misses (the same counts and policy updates)."""
        resident = self.resident
        keys = [(layer, e) for e in needed]
        if self.pending or not all(k in resident for k in keys):
            return self._fetch(layer, needed)
        step = self._tick(layer)
        self.hits += len(keys)
        on_access = self.policy.on_access
        for k in keys:
            on_access(k, step)
        return [[(k[1], resident[k]) for k in keys]]

    def _fetch(self, layer: int, needed: list[int]) -> Iterator[list[tuple[int, Callable]]]:
        step = self._tick(layer)
        self._reap()
        pinned = {(layer, e) for e in needed}
        ready: list[Key] = []
        low: list[Key] = []  # misses served by their resident 2-bit stand-in (--miss-fallback lowbit)
        todo: deque[Key] = deque()
        ours: set[Key] = set()  # loads this fetch waits on
        landed: queue.SimpleQueue[Key] = queue.SimpleQueue()
        for e in needed:
            k = (layer, e)
            if k in self.resident:
                self.hits += 1
                self.policy.on_access(k, step)
                ready.append(k)
            elif k in self.pending:  # prefetched (staged or on its way), or left by an aborted fetch
                p = self.pending[k]
                if p.pool == "stage":
                    self.stage_used -= p.reserved
                    self.cache_used += p.reserved
                    p.pool = "cache"
                    self.prefetch_used += 1
                    if p.drop_when_done:  # counted wasted when dropped while still reading: used after all
                        self.prefetch_wasted -= 1
                p.claimed, p.drop_when_done = True, False
                p.handle.set_priority(DEMAND)
                ok = p.handle.done() and not p.handle.cancelled() and p.handle.error is None
                self.hits += ok
                self.misses += not ok
                ours.add(k)
                p.handle.add_done_callback(lambda h, k=k: landed.put(k))
            else:
                self.misses += 1
                how = self.router.how(k) if self.decides else None
                if how == "lowbit":
                    low.append(k)
                    continue
                if how == "cpu":
                    self._cpu.add(k)
                todo.append(k)
        transient = 0
        try:
            self._issue(todo, pinned, ours, landed)
            if ready:
                yield [(k[1], self.resident[k]) for k in ready]
                pinned.difference_update(ready)
                self._issue(todo, pinned, ours, landed)
            if low:
                yield [(k[1], self.router.stand_in(k)) for k in low]
            while ours or todo:
                if not ours:
                    self._wait_for_room(layer, todo[0])
                    self._issue(todo, pinned, ours, landed)
                    continue
                t0 = time.perf_counter()
                k = landed.get()
                self.stall += time.perf_counter() - t0
                ours.discard(k)
                unit, transient = self._land(k, pinned, step)
                yield [(k[1], unit)]
                pinned.discard(k)
                self.cache_used -= transient
                transient = 0
                self._issue(todo, pinned, ours, landed)
        finally:  # normal end, an error, or the consumer gave up: nothing stays reserved for nobody
            self._cpu.clear()
            self.cache_used -= transient
            for k in ours:
                p = self.pending[k]
                if p.handle.cancel() or p.handle.done():
                    self._release(k)
                else:
                    p.claimed, p.drop_when_done = False, True

    def _issue(self, todo: deque, pinned: set[Key], ours: set[Key], landed: queue.SimpleQueue) -> None:
        """Start demand loads in order while the budget takes them."""
        while todo:
            k = todo[0]
            need, job = self.foot[k].load, None
            if k in self._cpu:  # computed on the CPU from host memory, never cached
                # CPU-only: the blob is read into the compute tier, its load footprint is reserved; CUDA: it
                # lives in host memory
                need = need if self.device.type == "cpu" else 0
                job = partial(self._compute, k, *self.router.rows(k), self.step)
            if not self._make_room(k, need, pinned):
                return
            todo.popleft()
            self._cpu.discard(k)
            self.cache_used += need
            self._note_peak()
            handle = self._submit(k, DEMAND) if job is None else self.loader.submit(job, DEMAND)
            self.pending[k] = Pending(handle, need, "cache", claimed=True)
            ours.add(k)
            self.pending[k].handle.add_done_callback(lambda h, k=k: landed.put(k))

    def _wait_for_room(self, layer: int, k: Key) -> None:
        """Nothing of this fetch is in flight and the next miss does not fit: a speculative prefetch still
        running holds the bytes; wait for it (it can then be dropped). Else the budget is too small."""
        running = [p for p in self.pending.values()
                   if p.pool == "stage" and not p.claimed and p.handle.running()]
        if not running:
            raise MoeError(f"expert budget {self.capacity} bytes cannot hold layer {layer}'s expert {k[1]} "
                           f"({self.foot[k].load} bytes) beside what is pinned: raise --memory")
        t0 = time.perf_counter()
        with running[0].handle.cond:
            running[0].handle.cond.wait_for(running[0].handle.done)
        self.stall += time.perf_counter() - t0

    def _land(self, k: Key, pinned: set[Key], step: int) -> tuple[Callable, int]:
        """A finished load joins the cache (or, refused by the policy, is used once). -> (unit, transient)"""
        p = self.pending[k]
        try:
            got: Loaded = p.handle.result()
        except BaseException:
            self._release(k)
            raise
        del self.pending[k]
        p.handle.value = None  # the cache owns the unit now: eviction alone decides when its buffer is free
        self.cache_used += got.nbytes - p.reserved  # shrink the reservation to what is resident
        self._trim()  # a codec that converts left its read buffer free
        if self.copier is not None:
            self.copier.hand_over(got.tensors)
        if got.bypass or not self.policy.should_admit(k, got.nbytes):
            return got.unit, got.nbytes
        self._make_room(k, 0, pinned | {k})  # only if a codec's footprint was larger than foreseen
        self.resident[k], self.sizes[k] = got.unit, got.nbytes
        self.policy.on_insert(k, got.nbytes, step)
        self.policy.on_access(k, step)
        return got.unit, 0

    # ---- prefetch hook ---------------------------------------------------------------------------------
    def set_staging(self, nbytes: int) -> None:
        """Keep `nbytes` of the budget for staged prefetches (call before the first generation)."""
        if not 0 <= nbytes <= self.capacity - max(self.foot[k].load for k in self.entries):
            raise MoeError(f"staging {nbytes} bytes leaves the expert cache less than one expert")
        self.staging_bytes = nbytes
        if not self.resident and not self.pending:  # the policy's per-layer shares follow its capacity
            self.policy = make_policy(self.policy_name, self.policy.n_layers, self.store.n_experts,
                                      self.capacity - nbytes)

    def prefetch(self, keys: list[Key], priority: float = 1.0) -> int:
        """Queue low-priority loads of `keys` into the staging area (no eviction). Returns how many were
        issued; keys already resident or pending, or that do not fit the free staging bytes, are skipped."""
        self._reap()
        issued = 0
        for k in keys:
            k = (int(k[0]), int(k[1]))
            if k in self.resident or k in self.pending or k not in self.entries:
                continue
            need = self.foot[k].load
            if (self.stage_used + need > self.staging_bytes
                    or self.cache_used + self.stage_used + need > self.capacity):
                continue
            self.stage_used += need
            self._note_peak()
            self.pending[k] = Pending(self._submit(k, PREFETCH + priority), need, "stage")
            self.prefetch_issued += 1
            issued += 1
        return issued

    def cancel_prefetch(self, keys: list[Key] | None = None) -> int:
        """Drop speculative prefetches (all, or those of `keys`) that no layer has claimed: queued ones never
        run, staged ones free their bytes, running ones free them when they end. Returns how many."""
        wanted = None if keys is None else {(int(a), int(b)) for a, b in keys}
        n = 0
        for k, p in list(self.pending.items()):
            if p.pool != "stage" or p.claimed or p.drop_when_done or (wanted is not None and k not in wanted):
                continue
            self._drop_prefetch(k, p)
            n += 1
        return n

    # ---- preload ---------------------------------------------------------------------------------------
    def fits_all(self, reserve: int = 0) -> bool:
        """Every expert resident at once, with a load's slack and `reserve` bytes left (the KV cache a full
        context needs, when it comes out of the budget): the budget is not a cache but the whole model."""
        slack = max(0, max(f.load - f.resident for f in self.foot.values()))
        held = sum(f.resident for f in self.foot.values())
        return held + slack + (reserve if self.kv_in_budget else 0) <= self.capacity - self.staging_bytes

    def preload(self) -> int:
        """Read every expert into the cache now (the loader's reads in flight, layer by layer), as llama.cpp's
        load reads its whole file: a budget that holds the model then serves the first tokens from memory
        instead of missing on each expert's first use. Counters start from zero afterwards. -> experts read."""
        n = 0
        for layer in sorted({k[0] for k in self.entries}):
            for group in self.fetch(layer, sorted(e for (la, e) in self.entries if la == layer)):
                n += len(group)
        self.stats(reset=True)
        return n

    # ---- stats -----------------------------------------------------------------------------------------
    def stats(self, reset: bool = False) -> dict:
        n = self.hits + self.misses
        s = {
            "expert_hits": self.hits,
            "expert_misses": self.misses,
            "hit_rate": self.hits / n if n else 0.0,
            "bytes_read_disk": self.bytes_read_disk,
            "bytes_to_device": self.bytes_to_device,
            "stall_seconds": self.stall,
            "resident_weight_bytes": self.peak,
            "resident_bytes": self.peak_all,  # weights + KV caches: what --memory bounds
            "kv_cache_bytes_peak": self.peak_kv,
            "cache_policy": self.policy_name,
            "cache_capacity_bytes": self.full_capacity,  # before KV caches took their share
            "evictions": self.evictions,
            "disk_direct_io": self.disk.direct, "disk_reads": self.disk.reads,
        }
        if self.buffers is not None:
            s.update(read_buffers_allocated=self.buffers.allocated, read_buffers_reused=self.buffers.reused)
        if self.host is not None:
            s.update(host_hits=self.host.hits, host_capacity_bytes=self.host.capacity,
                     host_resident_bytes=self.host.peak)
        if self.prefetch_issued or self.staging_bytes:
            s.update(prefetch_issued=self.prefetch_issued, prefetch_used=self.prefetch_used,
                     prefetch_cancelled=self.prefetch_cancelled, prefetch_wasted=self.prefetch_wasted)
        if self.prefetcher is not None:
            s.update(self.prefetcher.stats(self))
            if reset:
                self.prefetcher.reset()
        if self.router is not None:
            s.update(self.router.stats(self.cpu_experts, self.cpu_seconds))
            if reset:
                self.router.reset()
        if reset:
            self._zero()
        return s

    def close(self) -> None:
        self._finalizer()


def _shut(loader: Loader, disk: DiskTier) -> None:
    loader.close()
    disk.close()


class OffloadedExperts:
    """The experts backend of one MoE layer: `moe_dispatch` over the shared cache."""

    def __init__(self, cache: ExpertCache, layer: int):
        self.cache, self.layer = cache, layer

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        # hidden [N, D], top_k_index / top_k_weights [N, A] -> [N, D]
        # the route hooks: the prefetcher settles this layer's guesses and queues the next layers' loads; the
        # miss router decides this layer's misses (CPU compute or 2-bit stand-in)
        for hook in self.cache.hooks:
            hook.on_route(self.layer, hidden, top_k_index, top_k_weights, self.cache)
        return moe_dispatch(hidden, top_k_index, top_k_weights, partial(self.cache.fetch, self.layer))


PAGE = 4096  # a stored expert is read into a page-aligned buffer of its whole pages


def engine_expert_bytes(hidden: int, intermediate: int, bits: int, group_size: int = 64,
                        dtype: str = "float16") -> tuple[int, int] | None:
    """One expert at `bits` as the engine stores it (the 4-bit store's codec, page-rounded span) and as its CPU
    cache holds it (`store.cache.unit_bytes` of the unit `HQQCodec.decode` makes from zeros, the kernel
    `make_linear` picks here: a 4-bit expert with 16-bit meta is a view of its read buffer, 1.00x its stored
    bytes; one with 8-bit meta also keeps its scales and zeros expanded to bf16). None for 8/16-bit (costmodel's arithmetic holds there) or a group size the codec refuses."""
    if bits >= 8:
        return None
    from ..experts import ExpertShape
    from ..quant.codec import HQQCodec, expert_spec

    try:
        codec = HQQCodec(expert_spec(bits, group_size, "rtn"))
        shape = ExpertShape(hidden, intermediate)
        n = codec.nbytes(shape)
        span = -(-n // PAGE) * PAGE
        buf = torch.zeros(span, dtype=torch.uint8)
        unit = codec.decode(buf[:n], shape, getattr(torch, dtype))
    except (MoeError, ValueError, RuntimeError):
        return None
    return span, unit_bytes(unit)
