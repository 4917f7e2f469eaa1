"""Expert-cache replacement policies and their offline yardstick, as pure bookkeeping (no I/O, no tensors).

The unit of caching is one routed expert of one layer, `Key = (layer, expert)`; budgets are bytes.
A cache (store/cache.py, or `replay` below for traces) owns the bytes and calls the policy:

    hit:   on_access(key, step)
    miss:  should_admit(key, nbytes)?  no -> stream it (use once, do not cache)
           while it does not fit: v = victim(key, nbytes, exclude); evict v; on_evict(v)
           on_insert(key, nbytes, step); on_access(key, step)

`exclude` holds the experts pinned by the layer being computed; `victim` never returns one of them nor a
key that is not resident, and returns None when nothing is evictable, so the caller's loop terminates.
`step` is the decode-step / token counter (monotone); policies that decay history count it in tokens.

`replay` drives any policy over a routing trace; `belady_opt` is the offline optimum for the same
cache model, the ceiling every policy is measured against.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import UsageError

Key = tuple[int, int]  # (layer, expert)


class _LazyHeap:
    """Min-heap of (priority, key) where only an entry equal to `live[key]` counts; older entries of a
    key are skipped when met. O(log n) set, amortised O(log n) min."""

    def __init__(self):
        self.heap: list[tuple[object, Key]] = []
        self.live: dict[Key, object] = {}

    def set(self, key: Key, prio) -> None:
        self.live[key] = prio
        heapq.heappush(self.heap, (prio, key))
        if len(self.heap) > 4 * len(self.live) + 64:  # too many stale entries: compact
            self.rebuild()

    def discard(self, key: Key) -> None:
        self.live.pop(key, None)

    def rebuild(self) -> None:
        self.heap = [(p, k) for k, p in self.live.items()]
        heapq.heapify(self.heap)

    def min_excluding(self, exclude: set[Key] | frozenset[Key]) -> Key | None:
        aside, found = [], None
        while self.heap:
            prio, key = self.heap[0]
            if self.live.get(key, _DEAD) != prio:
                heapq.heappop(self.heap)  # stale
            elif key in exclude:
                aside.append(heapq.heappop(self.heap))
            else:
                found = key
                break
        for entry in aside:
            heapq.heappush(self.heap, entry)
        return found


_DEAD = object()


class Policy:
    """Base class: tracks what is resident (key -> bytes); subclasses rank the victims."""

    name = "base"

    def __init__(self, n_layers: int, n_experts: int, capacity_bytes: int, **opts):
        if opts:
            raise UsageError(f"cache policy {self.name!r}: unknown option(s) {', '.join(sorted(opts))}")
        self.n_layers, self.n_experts, self.capacity = n_layers, n_experts, capacity_bytes
        self.resident: dict[Key, int] = {}  # key -> nbytes
        self.used = 0  # bytes resident

    def on_access(self, key: Key, step: int) -> None:
        pass

    def on_insert(self, key: Key, nbytes: int, step: int) -> None:
        self.used += nbytes - self.resident.get(key, 0)
        self.resident[key] = nbytes

    def on_evict(self, key: Key) -> None:
        self.used -= self.resident.pop(key)

    def victim(self, incoming: Key, nbytes: int, exclude: set[Key]) -> Key | None:
        raise NotImplementedError

    def should_admit(self, key: Key, nbytes: int) -> bool:
        return True


class LRU(Policy):
    """Per-layer LRU, the baseline of Eliseev & Mazur (2023), who keep k experts per layer.

    Each layer's share of the budget is capacity // n_layers. The victim is the least-recently-used
    evictable expert of the incoming key's own layer when that layer would exceed its share; otherwise
    (the layer is under its share, so another layer is over it) the LRU expert of the layer holding the
    most bytes above its share. A full cache thus converges to k experts per layer, while free space
    is still used by whichever layer needs it. Fallback: any evictable key, layers by bytes over share.
    """

    name = "lru"

    def __init__(self, n_layers: int, n_experts: int, capacity_bytes: int, **opts):
        super().__init__(n_layers, n_experts, capacity_bytes, **opts)
        self.share = capacity_bytes // n_layers
        self.layer_bytes = [0] * n_layers
        self.order: list[OrderedDict[Key, None]] = [OrderedDict() for _ in range(n_layers)]  # LRU first

    def on_access(self, key: Key, step: int) -> None:
        super().on_access(key, step)
        if key in self.resident:
            self.order[key[0]].move_to_end(key)

    def on_insert(self, key: Key, nbytes: int, step: int) -> None:
        self.layer_bytes[key[0]] += nbytes - self.resident.get(key, 0)
        super().on_insert(key, nbytes, step)
        self.order[key[0]][key] = None
        self.order[key[0]].move_to_end(key)

    def on_evict(self, key: Key) -> None:
        self.layer_bytes[key[0]] -= self.resident[key]
        super().on_evict(key)
        del self.order[key[0]][key]

    def victim(self, incoming: Key, nbytes: int, exclude: set[Key]) -> Key | None:
        own = incoming[0]
        others = sorted(set(range(self.n_layers)) - {own}, key=lambda la: -self.layer_bytes[la])
        if self.layer_bytes[own] + nbytes > self.share:
            layers = [own, *others]
        else:
            over = [la for la in others if self.layer_bytes[la] > self.share]
            layers = [*over, own, *(la for la in others if self.layer_bytes[la] <= self.share)]
        for la in layers:
            for key in self.order[la]:
                if key not in exclude:
                    return key
        return None


class GlobalLRU(Policy):
    """One LRU list across all layers under the global byte budget."""

    name = "lru-global"

    def __init__(self, n_layers: int, n_experts: int, capacity_bytes: int, **opts):
        super().__init__(n_layers, n_experts, capacity_bytes, **opts)
        self.order: OrderedDict[Key, None] = OrderedDict()  # LRU first

    def on_access(self, key: Key, step: int) -> None:
        super().on_access(key, step)
        if key in self.resident:
            self.order.move_to_end(key)

    def on_insert(self, key: Key, nbytes: int, step: int) -> None:
        super().on_insert(key, nbytes, step)
        self.order[key] = None
        self.order.move_to_end(key)

    def on_evict(self, key: Key) -> None:
        super().on_evict(key)
        del self.order[key]

    def victim(self, incoming: Key, nbytes: int, exclude: set[Key]) -> Key | None:
        for key in self.order:
            if key not in exclude:
                return key
        return None


class LFU(Policy):
    """Least-frequently-used with ageing. Counts are kept for every key seen, resident or not (a
    model has at most a few thousand experts), so an expert evicted and reloaded keeps its history.
    Every `age_every` accesses all counts are halved (integer division), so old popularity fades;
    the default, 8 * n_layers * n_experts, halves once the average expert has been used ~8 times
    (a fixed small period such as 256 accesses is 4 Mixtral tokens: counts never grow and LFU
    degrades to recency). Victim: the smallest count; ties go to the least recently accessed."""

    name = "lfu"

    def __init__(
        self, n_layers: int, n_experts: int, capacity_bytes: int, age_every: int | None = None, **opts
    ):
        super().__init__(n_layers, n_experts, capacity_bytes, **opts)
        self.age_every = 8 * n_layers * n_experts if age_every is None else age_every
        if self.age_every < 1:
            raise UsageError(f"cache policy 'lfu': age_every must be >= 1 access, got {age_every}")
        self.count: dict[Key, int] = {}
        self.last: dict[Key, int] = {}  # key -> access tick of its latest access
        self.ticks = 0  # accesses so far
        self.heap = _LazyHeap()  # resident keys by (count, last tick)

    def on_access(self, key: Key, step: int) -> None:
        super().on_access(key, step)
        self.ticks += 1
        self.count[key] = self.count.get(key, 0) + 1
        self.last[key] = self.ticks
        if key in self.resident:
            self.heap.set(key, (self.count[key], self.ticks))
        if self.ticks % self.age_every == 0:
            self.count = {k: c // 2 for k, c in self.count.items()}
            self.heap.live = {k: (self.count[k], self.last[k]) for k in self.resident}
            self.heap.rebuild()

    def on_insert(self, key: Key, nbytes: int, step: int) -> None:
        super().on_insert(key, nbytes, step)
        self.heap.set(key, (self.count.get(key, 0), self.last.get(key, 0)))

    def on_evict(self, key: Key) -> None:
        super().on_evict(key)
        self.heap.discard(key)

    def victim(self, incoming: Key, nbytes: int, exclude: set[Key]) -> Key | None:
        return self.heap.min_excluding(exclude)


class LRFU(Policy):
    """Frequency-aware LRU: LRFU (Lee et al., 2001) with decay counted in layer slots, plus an
    optional routing prior.

    Each key carries a combined recency-frequency value, CRF = sum over its past uses of
    2 ** (-missed / half_life), `missed` = tokens its layer has run since that use: a use counts 1 and
    half of that `half_life` tokens later. Victim: the resident key with the smallest CRF now (ties:
    least recently used). A small half_life behaves like LRU, a large one like LFU; MoE routing has
    both a stable per-expert popularity and bursts over consecutive tokens, which a middle value
    serves. History is kept for every key, so a hot expert that was evicted comes back with its credit.

    Decay runs on the layer's own clock: while layer l computes token t, an expert of a layer <= l not
    used at t has already missed token t, one of a later layer has not yet had its chance. (Decay by
    plain token count ranks a later layer's expert, about to be needed, like an earlier layer's that
    was just passed over: on synthetic MoE traces that lost up to 10 points of hit rate to LRU.)

    `prior` (key -> activation frequency per token, e.g. from routing_stats.json) multiplies a key's
    CRF by (1 + prior_weight * p): hot experts are remembered longer, by half_life * log2(1 +
    prior_weight * p) tokens. Within a layer the order log2(CRF) + step / half_life does not change
    with time, so each layer's resident keys sit in a heap: O(log n) per access, O(n_layers) per victim.
    """

    name = "lrfu"

    def __init__(
        self,
        n_layers: int,
        n_experts: int,
        capacity_bytes: int,
        half_life: float = 4.0,
        prior: Mapping[Key, float] | None = None,
        prior_weight: float = 4.0,
        **opts,
    ):
        super().__init__(n_layers, n_experts, capacity_bytes, **opts)
        if not half_life > 0:
            raise UsageError(f"cache policy 'lrfu': half_life must be > 0 tokens, got {half_life}")
        self.half_life = float(half_life)
        self.boost = {tuple(k): math.log2(1.0 + prior_weight * p) for k, p in (prior or {}).items()}
        self.crf: dict[Key, float] = {}  # CRF as of the key's latest use
        self.last: dict[Key, int] = {}  # step of the key's latest use
        self.ticks = 0  # accesses so far (tie-break: older first)
        self.heaps = [_LazyHeap() for _ in range(n_layers)]  # resident keys per layer by (rank, tick)

    def _rank(self, key: Key) -> float:  # log2(CRF now) + now / half_life, for keys of one layer
        crf = self.crf.get(key, 0.0)
        if crf <= 0.0:
            return -math.inf
        return math.log2(crf) + self.last[key] / self.half_life + self.boost.get(key, 0.0)

    def on_access(self, key: Key, step: int) -> None:
        super().on_access(key, step)
        self.ticks += 1
        if key in self.crf:
            self.crf[key] = 1.0 + self.crf[key] * 2.0 ** (-(step - self.last[key]) / self.half_life)
        else:
            self.crf[key] = 1.0
        self.last[key] = step
        if key in self.resident:
            self.heaps[key[0]].set(key, (self._rank(key), self.ticks))

    def on_insert(self, key: Key, nbytes: int, step: int) -> None:
        super().on_insert(key, nbytes, step)
        self.heaps[key[0]].set(key, (self._rank(key), self.ticks))

    def on_evict(self, key: Key) -> None:
        super().on_evict(key)
        self.heaps[key[0]].discard(key)

    def victim(self, incoming: Key, nbytes: int, exclude: set[Key]) -> Key | None:
        best, best_key = None, None
        for layer, heap in enumerate(self.heaps):
            key = heap.min_excluding(exclude) if heap.live else None
            if key is None:
                continue
            rank, tick = heap.live[key]
            cand = (rank - (1.0 / self.half_life if layer <= incoming[0] else 0.0), tick)  # missed token now
            if best is None or cand < best:
                best, best_key = cand, key
        return best_key


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (LRU, GlobalLRU, LFU, LRFU)}


def make_policy(name: str, n_layers: int, n_experts: int, capacity_bytes: int, **opts) -> Policy:
    if name not in POLICIES:
        raise UsageError(f"unknown cache policy {name!r}; choose one of: {', '.join(POLICIES)}")
    return POLICIES[name](n_layers, n_experts, capacity_bytes, **opts)


# ---- trace replay --------------------------------------------------------------------------------


@dataclass
class ReplayResult:
    hits: int = 0
    misses: int = 0
    bytes_loaded: int = 0  # bytes fetched for misses, cached or streamed
    evictions: int = 0
    bypassed: int = 0  # misses not cached: refused by the policy, larger than the budget, or no room
    peak_bytes: int = 0  # most bytes resident at any point

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)


def _size_fn(sizes: Mapping[Key, int] | Callable[[Key], int]) -> Callable[[Key], int]:
    return sizes.__getitem__ if isinstance(sizes, Mapping) else sizes


def _entries(trace: list[list[Key]]) -> list[list[Key]]:
    return [list(dict.fromkeys(map(tuple, entry))) for entry in trace]  # a key needed twice counts once


def trace_from_steps(steps: list[list[list[int]]]) -> list[list[Key]]:
    """steps[t][layer] = expert ids used by `layer` at token (or prefill block) t -> trace entries in
    (t, layer) order."""
    return [[(layer, int(e)) for e in experts] for step in steps for layer, experts in enumerate(step)]


def _steps(entries: list[list[Key]]) -> list[int]:
    """Token counter per entry: a new step starts when an entry's layer is not after the previous one's."""
    out, step, prev = [], 0, None
    for entry in entries:
        if entry:
            if prev is not None and entry[0][0] <= prev:
                step += 1
            prev = entry[0][0]
        out.append(step)
    return out


def replay(
    trace: list[list[Key]],
    sizes: Mapping[Key, int] | Callable[[Key], int],
    capacity_bytes: int,
    policy: Policy | str,
    n_layers: int,
    n_experts: int,
    pinned_per_layer: bool = True,
) -> ReplayResult:
    """Run `trace` through a cache of `capacity_bytes` (starting empty) managed by `policy`.

    trace: one entry per (token step, layer) in execution order, the experts that layer needs. With
    `pinned_per_layer` the keys of an entry are all needed at once, so none of them may be evicted
    while the entry runs; without it keys are served one at a time (the classic paging model).
    A miss loads the expert (bytes_loaded += size) and caches it after evicting victims, unless the
    policy refuses it, it is larger than the budget, or the evictable keys cannot make room: then it
    is streamed (used once, not cached, counted in `bypassed`). The step of an entry is inferred:
    a new token starts when the layer does not increase."""
    size = _size_fn(sizes)
    if isinstance(policy, str):
        policy = make_policy(policy, n_layers, n_experts, capacity_bytes)
    if policy.resident:
        raise UsageError("replay needs a fresh policy: this one already holds keys")
    res, resident, used = ReplayResult(), {}, 0
    entries = _entries(trace)
    for entry, step in zip(entries, _steps(entries)):
        pinned = set(entry) if pinned_per_layer else set()
        for key in entry:
            if key in resident:
                res.hits += 1
                policy.on_access(key, step)
                continue
            nbytes = size(key)
            res.misses += 1
            res.bytes_loaded += nbytes
            room = capacity_bytes - sum(resident.get(k, 0) for k in pinned)  # bytes freeable + free
            if nbytes > room or not policy.should_admit(key, nbytes):
                res.bypassed += 1
                continue
            while used + nbytes > capacity_bytes:
                v = policy.victim(key, nbytes, pinned)
                if v is None or v not in resident or v in pinned:
                    raise AssertionError(f"{policy.name}: bad victim {v} for {key} (pinned {sorted(pinned)})")
                used -= resident.pop(v)
                policy.on_evict(v)
                res.evictions += 1
            resident[key] = nbytes
            used += nbytes
            res.peak_bytes = max(res.peak_bytes, used)
            policy.on_insert(key, nbytes, step)
            policy.on_access(key, step)
    return res


def belady_opt(
    trace: list[list[Key]],
    sizes: Mapping[Key, int] | Callable[[Key], int],
    capacity_bytes: int,
    n_layers: int,
    n_experts: int,
    pinned_per_layer: bool = True,
) -> ReplayResult:
    """Offline optimum for `replay`'s cache model: Belady's MIN with bypass.

    On a miss that does not fit, evict the resident keys whose next use is farthest in the future,
    but only those used later than the incoming key; if they cannot make room, stream the incoming key
    instead. A pinned entry is a set of simultaneous uses, so "next use" is a rank, not a position:
    two keys next needed by the same entry are ordered by their uses after that, and so on (the one
    resident then stays pinned through it). Within an entry the misses are served nearest-first, so the
    entry keeps the keys needed soonest. For equal sizes this is optimal over every eviction/bypass
    choice under the same pinning (tests check it against exhaustive search). For unequal sizes the
    same farthest-next-use rule is only a heuristic upper bound, not exact (the problem is then
    NP-hard): a policy may beat it."""
    size = _size_fn(sizes)
    entries = _entries(trace)
    if not pinned_per_layer:
        entries = [[k] for entry in entries for k in entry]  # classic paging: one use at a time
    # nxt[i][j] = (entry index of the next use of entries[i][j], rank of that use within its entry)
    never = (math.inf, 0)
    nxt: list[list[tuple[float, int]]] = [[] for _ in entries]
    rank: list[dict[Key, int]] = [{} for _ in entries]  # entry -> key -> rank of its next use there
    seen: dict[Key, int] = {}  # key -> entry of its next use, scanning backwards
    for i in range(len(entries) - 1, -1, -1):
        nxt[i] = [(seen[k], rank[seen[k]][k]) if k in seen else never for k in entries[i]]
        order = sorted(range(len(entries[i])), key=nxt[i].__getitem__)
        rank[i] = {entries[i][j]: r for r, j in enumerate(order)}
        for k in entries[i]:
            seen[k] = i

    res, resident, used = ReplayResult(), {}, 0
    far = _LazyHeap()  # resident keys by negated next use: farthest first

    def serve(key: Key, next_use: tuple[float, int], pinned: set[Key]) -> None:
        nonlocal used
        prio = (-next_use[0], -next_use[1])
        if key in resident:
            res.hits += 1
            far.set(key, prio)
            return
        nbytes = size(key)
        res.misses += 1
        res.bytes_loaded += nbytes
        victims, freed = [], 0
        while used - freed + nbytes > capacity_bytes:
            v = far.min_excluding(pinned)
            if v is None or far.live[v] >= prio:  # nothing left that is needed later than `key`
                break
            victims.append((v, far.live[v]))
            freed += resident[v]
            far.discard(v)
        if used - freed + nbytes > capacity_bytes:
            for v, vprio in victims:  # keep them: streaming `key` costs no more hits
                far.set(v, vprio)
            res.bypassed += 1
            return
        for v, _ in victims:
            used -= resident.pop(v)
            res.evictions += 1
        resident[key] = nbytes
        used += nbytes
        res.peak_bytes = max(res.peak_bytes, used)
        far.set(key, prio)

    for entry, nexts in zip(entries, nxt):
        pinned = set(entry)
        for j in sorted(range(len(entry)), key=lambda j: (entry[j] not in resident, nexts[j])):
            serve(entry[j], nexts[j], pinned)
    return res
