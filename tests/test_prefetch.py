"""Speculative prefetch: never changes tokens, counters add up, wrong guesses are cancelled and their
staging bytes come back, predictors are scored honestly."""

from __future__ import annotations

import time

import pytest
import torch

import moe_offload
from moe_offload.errors import UsageError
from moe_offload.prefetch.predictors import Lookahead, PreviousToken, Shadow, evaluate, next_layers, top_m
from moe_offload.profile import gates_of, record
from moe_offload.store.format import convert
from tests.tiny import make_checkpoint

SPEC = ("mixtral", dict(num_hidden_layers=4, num_key_value_heads=2, intermediate_size=48, num_local_experts=8,
                        num_experts_per_tok=2))
PROMPT = [5, 9, 17, 33, 2 + 60, 4, 90, 11]
NEW = 20


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefetch")
    hf = make_checkpoint(root / "hf", SPEC)
    out = root / "store"
    convert(hf, out)
    # a shadow router trained on this model's own routing of random tokens
    engine = moe_offload.load(out, dtype="float32")
    rec = record(engine, torch.randint(0, 128, (512,), generator=torch.Generator().manual_seed(1)).tolist(), 64)
    Shadow.train(rec.hidden, rec.chosen, 8, depth=2, m=2, steps=150).save(out / "shadow_router.safetensors")
    return out


def settle(cache, seconds: float = 10.0) -> None:
    """Wait for dropped loads that were already running to end, then let the cache reclaim their bytes."""
    deadline = time.monotonic() + seconds
    while any(p.drop_when_done for p in cache.pending.values()) and time.monotonic() < deadline:
        time.sleep(0.005)
    cache._reap()


def run(store, memory, **kw):
    engine = moe_offload.load(store, dtype="float32", memory=memory, **kw)
    r = engine.generate(prompt_ids=PROMPT, max_new_tokens=NEW, ignore_eos=True)
    return engine, r


def budgets(store):
    engine = moe_offload.load(store, dtype="float32")
    backbone, experts = engine.info["backbone_bytes"], engine.info["expert_bytes"]
    return [backbone + experts // 4, backbone + experts // 2]


@pytest.mark.parametrize("mode", ["none", "lookahead", "shadow", "auto"])
def test_prefetch_never_changes_tokens(store, mode):
    _, ref = run(store, None)
    for memory in budgets(store):
        for depth in (1, 2):
            engine, r = run(store, memory, prefetch=mode, prefetch_depth=depth)
            assert r.token_ids == ref.token_ids, (mode, memory, depth)
            s = r.stats
            assert s["resident_weight_bytes"] <= memory
            if mode != "none":
                # every speculative load ends used, cancelled before it ran, or read and dropped
                assert s["prefetch_issued"] > 0
                assert s["prefetch_issued"] == s["prefetch_used"] + s["prefetch_cancelled"] + s["prefetch_wasted"]
                cache = engine.expert_cache
                settle(cache)  # a dropped load that was already reading frees its bytes when it ends
                assert cache.stage_used == 0  # staging bytes all came back for reuse
                assert not [k for k, p in cache.pending.items() if p.pool == "stage"]


def test_wrong_guess_is_cancelled_and_its_bytes_reused(store):
    memory = budgets(store)[0]
    engine, _ = run(store, memory, prefetch="lookahead")
    cache = engine.expert_cache
    pf = cache.prefetcher
    cache.stats(reset=True)
    layers = sorted(L for L, _ in engine.model.moe_blocks())
    target = layers[1]
    wrong = [e for e in range(8) if (target, e) not in cache.resident][:2]
    pf.guesses[target] = {("lookahead", layers[0]): wrong}
    assert cache.prefetch([(target, e) for e in wrong]) == len(wrong)
    staged = cache.stage_used
    assert staged > 0
    needed = [e for e in range(8) if e not in wrong][:2]
    pf._settle(cache, target, needed)  # the router chose other experts: both guesses are dropped
    s = cache.stats()
    assert s["prefetch_cancelled"] + s["prefetch_wasted"] == len(wrong)
    settle(cache)
    assert cache.stage_used == 0
    # the freed staging room takes new prefetches
    assert cache.prefetch([(target, wrong[0])]) == 1


def test_auto_switches_off_a_layer_that_does_not_pay(store):
    engine, _ = run(store, budgets(store)[0], prefetch="auto")
    pf = engine.expert_cache.prefetcher
    layers = sorted(L for L, _ in engine.model.moe_blocks())
    src, tgt = layers[0], layers[1]
    for name in pf.predictors:
        s = pf.score.setdefault((name, src, tgt), type(next(iter(pf.score.values())))())
        s.hits, s.predicted = 1, pf.warmup * 4  # precision 1/64: worse than none
    assert pf._choose(src, tgt) is None
    s = pf.score[("lookahead", src, tgt)]
    s.hits = s.predicted  # perfect: used again
    assert pf._choose(src, tgt) == "lookahead"


def test_bad_prefetch_options(store):
    with pytest.raises(UsageError):
        moe_offload.load(store, memory=budgets(store)[0], prefetch="psychic")
    with pytest.raises(UsageError):
        moe_offload.load(store, memory=budgets(store)[0], prefetch="lookahead", prefetch_depth=0)


def test_predictors_offline():
    layers = [0, 2, 3]
    assert next_layers(layers, 0, 2) == [2, 3] and next_layers(layers, 3, 1) == []
    assert top_m(torch.tensor([[0.1, 0.9, 0.5, 0.2]]), 2) == [1, 2]
    # a shadow router trained on a deterministic rule learns it; previous-token cannot
    g = torch.Generator().manual_seed(0)
    T, D, E = 400, 16, 6
    h = torch.randn(T, D, generator=g)
    W = torch.randn(E, D, generator=g)
    chosen = {0: torch.topk(h @ W.T, 2).indices, 1: torch.topk(h @ W.roll(1, 0).T, 2).indices}
    hidden = {0: h, 1: h}
    shadow = Shadow.train(hidden, chosen, E, depth=1, m=2, steps=300)
    acc = evaluate(shadow, hidden, chosen, distance=1)
    prev = evaluate(PreviousToken([0, 1]), hidden, chosen, distance=1)
    assert acc.recall > 0.8 > prev.recall
    assert acc.hits <= acc.needed == T * 2
    # lookahead with the true next router is exact here
    la = evaluate(Lookahead({0: W, 1: W.roll(1, 0)}, depth=1, m=2), hidden, chosen, distance=1)
    assert la.recall == 1.0 and la.precision == 1.0


def test_profile_writes_routing_stats(store, tmp_path):
    import json

    engine = moe_offload.load(store, dtype="float32")
    rec = record(engine, list(range(3, 120)), 50)
    assert rec.tokens == 117 and sorted(rec.chosen) == [0, 1, 2, 3]
    counts = rec.counts()
    assert all(sum(c) == 117 * 2 for c in counts.values())
    la = Lookahead(gates_of(engine.model), depth=1, m=2)
    assert set(la.predict(0, rec.hidden[0][:1])) == {1}
    from moe_offload.profile import routing_stats

    stats = routing_stats(rec, "mixtral")
    json.dumps(stats)
    assert stats["layers"]["0"]["counts"] == counts[0]
    assert 0 < stats["layers"]["0"]["normalized_entropy"] <= 1


def test_record_windows_fit_a_short_context(tmp_path):
    short = make_checkpoint(tmp_path / "short", SPEC, max_position_embeddings=64)
    engine = moe_offload.load(short, dtype="float32")
    rec = record(engine, [3 + i % 120 for i in range(200)])  # default window 256 > context 64
    assert rec.tokens == 200
