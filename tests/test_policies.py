"""Cache policies and the Belady-OPT yardstick: hit counts worked out by hand on small traces, OPT
against exhaustive search, OPT >= every policy, byte budgets, pinning, streaming."""

from __future__ import annotations

import random
from functools import cache
from itertools import combinations

import pytest

from moe_offload.errors import UsageError
from moe_offload.store.policies import (
    POLICIES,
    Policy,
    ReplayResult,
    belady_opt,
    make_policy,
    replay,
    trace_from_steps,
)

S = 10  # bytes of every expert in the equal-size traces


def one_layer(experts):  # one layer, one expert per token
    return [[(0, e)] for e in experts]


def counts(r: ReplayResult):
    return r.hits, r.misses, r.evictions, r.bypassed


# Trace A, 1 layer, capacity 2 experts: 0 1 0 2 0 1 2 1 3 1
TRACE_A = one_layer([0, 1, 0, 2, 0, 1, 2, 1, 3, 1])


@pytest.mark.parametrize("name", ["lru", "lru-global"])
def test_lru_by_hand(name):
    # LRU order (oldest first) after each token:
    # 0 M [0] | 1 M [0 1] | 0 H [1 0] | 2 M evict 1 [0 2] | 0 H [2 0] | 1 M evict 2 [0 1]
    # 2 M evict 0 [1 2] | 1 H [2 1] | 3 M evict 2 [1 3] | 1 H   -> 4 hits, 6 misses, 4 evictions
    r = replay(TRACE_A, {(0, e): S for e in range(4)}, 2 * S, name, 1, 4)
    assert counts(r) == (4, 6, 4, 0)
    assert r.bytes_loaded == 6 * S and r.hit_rate == pytest.approx(0.4)


def test_lfu_by_hand():
    # (count, last access tick); victim = min count, then oldest. Counts survive eviction.
    # 0 M c0=1 | 1 M c1=1 | 0 H c0=2 | 2 M: 0(2,3) 1(1,2) -> evict 1, c2=1 | 0 H c0=3
    # 1 M: 0(3,5) 2(1,4) -> evict 2, c1=2 | 2 M: 0(3,5) 1(2,6) -> evict 1, c2=2
    # 1 M: 0(3,5) 2(2,7) -> evict 2, c1=3 | 3 M: 0(3,5) 1(3,8) tie -> older 0, c3=1 | 1 H
    r = replay(TRACE_A, lambda k: S, 2 * S, make_policy("lfu", 1, 4, 2 * S, age_every=1000), 1, 4)
    assert counts(r) == (3, 7, 5, 0)


TRACE_B = one_layer([0, 0, 0, 0, 1, 2, 1, 2, 1, 2])  # an expert hot early, then cold


def test_lfu_ageing_by_hand():
    # No ageing: c0 reaches 4 and 0 is never evicted; 1 and 2 evict each other: hits only at tokens 2-4.
    r = replay(TRACE_B, lambda k: S, 2 * S, make_policy("lfu", 1, 4, 2 * S, age_every=1000), 1, 4)
    assert counts(r) == (3, 7, 5, 0)
    # Halve every 2 accesses: c0 1 | 2 -> 1 | 2 | 3 -> 1 (tick 4) | 1 M c1=1 (tick 5)
    # 2 M: 0(1,4) 1(1,5) tie -> evict older 0; then 1 and 2 stay: 3 + 4 hits
    r = replay(TRACE_B, lambda k: S, 2 * S, make_policy("lfu", 1, 4, 2 * S, age_every=2), 1, 4)
    assert counts(r) == (7, 3, 1, 0)
    # LRU gets the same 7 on this trace
    assert replay(TRACE_B, lambda k: S, 2 * S, "lru", 1, 4).hits == 7


def test_lrfu_keeps_hot_expert_by_hand():
    # Hot expert 0 between one-off experts, capacity 2, half_life 4 (a use is worth 2**(-d/4) d tokens on).
    # LRU: only token 1 hits (each one-off pushes 0 out before it returns).
    # LRFU CRF now: t3 evict 1 (0: 1.84*2^-.5=1.30 > 1: .84) | t4 0 H crf0=1+1.84*2^-.75=2.09
    # t5 evict 2 (1.76 > .71) | t6 evict 3 (1.48 > .84) | t7 0 H crf0=2.25 | t8 evict 4 | t9 evict 5 | t10 0 H
    trace = one_layer([0, 0, 1, 2, 0, 3, 4, 0, 5, 6, 0])
    sizes = lambda k: S  # noqa: E731
    assert replay(trace, sizes, 2 * S, "lru", 1, 8).hits == 1
    r = replay(trace, sizes, 2 * S, make_policy("lrfu", 1, 8, 2 * S, half_life=4), 1, 8)
    assert counts(r) == (4, 7, 5, 0)  # misses at t0 t2 (room) t3 t5 t6 t8 t9


def test_lrfu_layer_clock():
    # half_life 1. (1,0) used at tokens 3 and 4: CRF 1.5; (0,0) used at token 5: CRF 1. Layer 0 now runs
    # token 6 without (0,0): both have missed one chance, 0.75 vs 0.5 -> evict (0,0). Decay by plain token
    # count would rank (1,0) lower (1.5 * 2**-2 = 0.375 < 0.5), though layer 1 may still need it now.
    p = make_policy("lrfu", 2, 4, 3 * S, half_life=1)
    for key, step in [((1, 0), 3), ((1, 0), 4), ((0, 0), 5)]:
        if key not in p.resident:
            p.on_insert(key, S, step)
        p.on_access(key, step)
    p.on_insert((0, 1), S, 6)
    p.on_access((0, 1), 6)
    assert p.victim((0, 2), S, {(0, 1), (0, 2)}) == (0, 0)


def test_lrfu_prior_protects_hot_expert():
    # Without a prior expert 1 (used at token 1) outranks 0 (used at token 0): log2 CRF + t/4 = .25 vs 0.
    # A prior p=.5 with weight 4 lifts 0 by log2(1 + 4 * .5) = 1.58 and flips it.
    def victim(**opts):
        p = make_policy("lrfu", 1, 4, 2 * S, **opts)
        for e, step in [(0, 0), (1, 1)]:
            p.on_insert((0, e), S, step)
            p.on_access((0, e), step)
        return p.victim((0, 2), S, {(0, 2)})

    assert victim(half_life=4) == (0, 0)
    assert victim(half_life=4, prior={(0, 0): 0.5}, prior_weight=4.0) == (0, 1)


def test_per_layer_lru_vs_global_by_hand():
    # 2 layers, capacity 4 experts: per-layer share 2. Steps (layer 0 | layer 1):
    # t0 [0] | [0]   t1 [1 2] | []   t2 [0] | []   t3 [3] | [1]   t4 [0] | [0]
    # t0-t2 same for both: 4 misses, (0,0) hit at t2; layer 0 holds 3 (over its share), layer 1 holds 1.
    # global LRU order after t2: (1,0) (0,1) (0,2) (0,0)
    #   t3: (0,3) evicts (1,0); (1,1) evicts (0,1) | t4: (0,0) H, (1,0) M evicts (0,2) -> 2 hits, 7 misses
    # per-layer: t3: (0,3): layer 0 over share -> its LRU (0,1); (1,1): layer 1 under share -> layer 0's
    #   LRU (0,2) | t4: (0,0) H, (1,0) H -> 3 hits, 6 misses
    trace = trace_from_steps([[[0], [0]], [[1, 2], []], [[0], []], [[3], [1]], [[0], [0]]])
    assert counts(replay(trace, lambda k: S, 4 * S, "lru-global", 2, 4)) == (2, 7, 3, 0)
    assert counts(replay(trace, lambda k: S, 4 * S, "lru", 2, 4)) == (3, 6, 2, 0)


def test_opt_by_hand():
    # Next use of each token of trace A (index): 2 5 4 6 inf 7 inf 9 inf inf
    # 0 M | 1 M | 0 H | 2 M: next 6, farthest resident 1@5 is sooner -> stream 2 | 0 H | 1 H
    # 2 M: next inf, 0@inf is no later -> stream | 1 H | 3 M: stream | 1 H   -> 5 hits, 0 evictions
    r = belady_opt(TRACE_A, lambda k: S, 2 * S, 1, 4)
    assert counts(r) == (5, 5, 0, 3)
    # a pinned entry: [0 1] [2 3] [3] [1] [2]; at [2 3]: 3 (next use sooner) first evicts 0 (never again),
    # then 2 (needed at entry 4) would have to evict 1 (needed at entry 3) -> stream 2.  hits: 3, 1
    trace = [[(0, 0), (0, 1)], [(0, 2), (0, 3)], [(0, 3)], [(0, 1)], [(0, 2)]]
    r = belady_opt(trace, lambda k: S, 2 * S, 1, 4)
    assert counts(r) == (2, 5, 1, 2)


# ---- exhaustive search: OPT is optimal for equal sizes ---------------------------------------------


def brute_force_hits(entries, cap: int, pinned: bool) -> int:
    """Most hits over every choice of what to keep, capacity `cap` experts."""
    entries = [tuple(dict.fromkeys(e)) for e in entries]
    if not pinned:
        entries = [(k,) for e in entries for k in e]

    @cache
    def best(i: int, resident: frozenset) -> int:
        if i == len(entries):
            return 0
        need = set(entries[i])
        kept = resident & need  # hits stay pinned through the entry
        pool = sorted((resident | need) - kept)  # the rest may be kept or dropped
        room = cap - len(kept)
        sub = max(
            best(i + 1, frozenset(kept | set(c))) for r in range(room + 1) for c in combinations(pool, r)
        )
        return len(kept) + sub

    return best(0, frozenset())


def random_steps(rng: random.Random, n_tokens: int, n_layers: int, n_experts: int, top_k: int):
    weights = [rng.random() ** 2 + 0.05 for _ in range(n_experts)]  # skewed popularity

    def pick():
        out = []
        while len(out) < top_k:
            e = rng.choices(range(n_experts), weights)[0]
            out += [e] if e not in out else []
        return out

    return [[pick() for _ in range(n_layers)] for _ in range(n_tokens)]


@pytest.mark.parametrize("pinned", [True, False])
def test_opt_matches_exhaustive_search(pinned):
    rng = random.Random(7)
    for _ in range(25):
        top_k, cap = rng.choice([(1, 2), (2, 2), (2, 3)])
        trace = trace_from_steps(random_steps(rng, 6, 2, 3, top_k))
        r = belady_opt(trace, lambda k: S, cap * S, 2, 3, pinned_per_layer=pinned)
        assert r.hits == brute_force_hits(trace, cap, pinned), trace


ALL_POLICIES = [
    *POLICIES,
    ("lfu", {"age_every": 16}),
    ("lrfu", {"half_life": 1.0}),
    ("lrfu", {"half_life": 64.0, "prior": {(0, 0): 0.9, (1, 3): 0.5}}),
]


def policy_named(spec, n_layers, n_experts, cap):
    name, opts = (spec, {}) if isinstance(spec, str) else spec
    return make_policy(name, n_layers, n_experts, cap, **opts)


@pytest.mark.parametrize("pinned", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_opt_beats_every_policy(seed, pinned):
    rng = random.Random(seed)
    n_layers, n_experts = 3, 6
    trace = trace_from_steps(random_steps(rng, 60, n_layers, n_experts, 2))
    for cap in (3, 7, 12):
        opt = belady_opt(trace, lambda k: S, cap * S, n_layers, n_experts, pinned_per_layer=pinned)
        for spec in ALL_POLICIES:
            p = policy_named(spec, n_layers, n_experts, cap * S)
            r = replay(trace, lambda k: S, cap * S, p, n_layers, n_experts, pinned_per_layer=pinned)
            assert r.hits + r.misses == opt.hits + opt.misses == sum(map(len, trace))
            assert opt.hits >= r.hits, (spec, cap)
        assert opt.hits > replay(trace, lambda k: S, cap * S, "lru", n_layers, n_experts).hits


# ---- byte budgets, pinning, streaming ----------------------------------------------------------------


class Checked(Policy):
    """Wraps a policy and checks every call against its own count of resident bytes and hits."""

    def __init__(self, inner: Policy, capacity: int):
        self.inner, self.capacity, self.mine, self.fresh = inner, capacity, {}, set()
        self.name, self.resident = inner.name, inner.resident
        self.victims = self.hits = self.hit_bytes = 0

    def on_access(self, key, step):
        assert key in self.mine
        if key in self.fresh:  # the access right after its insert
            self.fresh.discard(key)
        else:
            self.hits += 1
            self.hit_bytes += self.mine[key]
        self.inner.on_access(key, step)

    def on_insert(self, key, nbytes, step):
        self.mine[key] = nbytes
        self.fresh.add(key)
        assert sum(self.mine.values()) <= self.capacity
        self.inner.on_insert(key, nbytes, step)

    def on_evict(self, key):
        del self.mine[key]
        self.inner.on_evict(key)

    def victim(self, incoming, nbytes, exclude):
        v = self.inner.victim(incoming, nbytes, exclude)
        assert v is None or (v in self.mine and v not in exclude and v != incoming)
        self.victims += 1
        return v

    def should_admit(self, key, nbytes):
        return self.inner.should_admit(key, nbytes)


def test_unequal_sizes_respect_budget():
    rng = random.Random(3)
    n_layers, n_experts = 4, 8
    sizes = {(la, e): rng.choice([3, 5, 8, 13, 40]) for la in range(n_layers) for e in range(n_experts)}
    trace = trace_from_steps(random_steps(rng, 80, n_layers, n_experts, 3))
    needed = sum(sizes[k] for entry in trace for k in entry)
    for cap in (35, 60, 150):
        opt = belady_opt(trace, sizes, cap, n_layers, n_experts)
        assert 0 < opt.peak_bytes <= cap and opt.evictions > 0
        for spec in ALL_POLICIES:
            p = Checked(policy_named(spec, n_layers, n_experts, cap), cap)
            r = replay(trace, sizes, cap, p, n_layers, n_experts)
            assert 0 < r.peak_bytes <= cap and p.victims == r.evictions > 0
            assert r.hits == p.hits and r.bytes_loaded == needed - p.hit_bytes
    # the 40-byte experts never fit in 35 bytes: every use of one streams
    big = sum(1 for entry in trace for k in entry if sizes[k] == 40)
    assert big > 0 and replay(trace, sizes, 35, "lru", n_layers, n_experts).bypassed >= big


@pytest.mark.parametrize("name", list(POLICIES))
def test_victim_honours_exclude(name):
    p = make_policy(name, 1, 8, 4 * S)
    for e in range(4):  # one expert per token: recency and frequency both rank 0 < 1 < 2 < 3
        p.on_insert((0, e), S, e)
        p.on_access((0, e), e)
    assert p.victim((0, 4), S, {(0, 4)}) == (0, 0)
    assert p.victim((0, 4), S, {(0, 4), (0, 0)}) == (0, 1)
    assert p.victim((0, 4), S, {(0, 4), (0, 0), (0, 1), (0, 2)}) == (0, 3)
    assert p.victim((0, 4), S, {(0, e) for e in range(5)}) is None
    p.on_evict((0, 0))
    assert p.victim((0, 4), S, set()) == (0, 1)  # an evicted key is never offered again


def test_per_layer_lru_falls_back_to_layer_over_share():
    p = make_policy("lru", 2, 4, 4 * S)  # share: 2 experts per layer
    for step, key in enumerate([(0, 0), (0, 1), (0, 2), (1, 0)]):
        p.on_insert(key, S, step)
        p.on_access(key, step)
    assert p.victim((1, 1), S, {(1, 1)}) == (0, 0)  # layer 1 under its share: take from layer 0 (over it)
    assert p.victim((0, 3), S, {(0, 3)}) == (0, 0)  # layer 0 over its share: its own LRU
    assert p.victim((0, 3), S, {(0, 0), (0, 1), (0, 2), (0, 3)}) == (1, 0)  # own layer all pinned


@pytest.mark.parametrize("spec", ["opt", *POLICIES])
def test_streamed_misses(spec):
    def run(trace, sizes, cap):
        if spec == "opt":
            return belady_opt(trace, sizes, cap, 1, 4)
        return replay(trace, sizes, cap, spec, 1, 4)

    # expert 0 (30 bytes) never fits in 20: both uses stream it; expert 1 is cached and hits
    r = run(one_layer([0, 1, 0, 1]), {(0, 0): 30, (0, 1): S}, 2 * S)
    assert counts(r) == (1, 3, 0, 2) and r.bytes_loaded == 30 + S + 30 and r.peak_bytes == S
    # three experts needed at once, room for two: the last one served streams (nothing evictable).
    # The policies serve in trace order: (0,2) streams, then misses again and evicts; OPT serves it first.
    r = run([[(0, 0), (0, 1), (0, 2)], [(0, 2)]], lambda k: S, 2 * S)
    assert counts(r) == ((1, 3, 0, 1) if spec == "opt" else (0, 4, 1, 1)) and r.peak_bytes == 2 * S


def test_pinning_model():
    # capacity 1: entry [0 1] -- 0 is cached and pinned, so 1 streams; the next [0] hits.
    # Unpinned (classic paging), 1 evicts 0 once 0 was used, and the next [0] misses.
    trace = [[(0, 0), (0, 1)], [(0, 0)]]
    assert counts(replay(trace, lambda k: S, S, "lru-global", 1, 2)) == (1, 2, 0, 1)
    assert counts(replay(trace, lambda k: S, S, "lru-global", 1, 2, pinned_per_layer=False)) == (0, 3, 2, 0)


def test_unknown_policy_and_option():
    with pytest.raises(UsageError, match="lru, lru-global, lfu, lrfu"):
        make_policy("fifo", 2, 4, 100)
    with pytest.raises(UsageError, match="fifo"):
        replay([[(0, 0)]], lambda k: S, 100, "fifo", 2, 4)
    with pytest.raises(UsageError, match="half_lyfe"):
        make_policy("lrfu", 2, 4, 100, half_lyfe=3)


def test_trace_from_steps_and_replay_steps():
    steps = [[[1, 2], [3]], [[0], [1, 2]]]  # steps[t][layer]
    trace = trace_from_steps(steps)
    assert trace == [[(0, 1), (0, 2)], [(1, 3)], [(0, 0)], [(1, 1), (1, 2)]]

    seen = []

    class Rec(Checked):
        def on_access(self, key, step):
            seen.append((key, step))
            super().on_access(key, step)

    replay(trace, lambda k: S, 10 * S, Rec(make_policy("lru", 2, 4, 10 * S), 10 * S), 2, 4)
    # the token counter restarts its layer scan at layer 0
    assert seen == [((0, 1), 0), ((0, 2), 0), ((1, 3), 0), ((0, 0), 1), ((1, 1), 1), ((1, 2), 1)]
