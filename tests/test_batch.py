"""Batched generation: a batch of sequences of different lengths gives each one its solo tokens, fetches each
needed expert once per layer per step for the whole batch, and the KV cache is sized to the request."""

from __future__ import annotations

import pytest
import torch

from moe_offload import load
from moe_offload.errors import MoeError, UsageError
from moe_offload.runtime.engine import KV_CHUNK
from moe_offload.store.format import convert, open_store
from tests import test_families, tiny

# (prompt length, new tokens): past every tiny sliding window (4..6), different lengths in one batch
SHAPES = [(3, 6), (9, 4), (5, 7)]
# one spec per family, with sliding windows, MLA, sinks, shared experts, dense layers, biases where they exist
FAMILIES = ["mixtral_mha_swa_tied", "qwen2_moe_mha_step2_tied", "qwen3_moe_gqa_dense", "olmoe_gqa_clip",
            "granitemoe_mha_tied_bias", "phimoe_mha_swa_longrope", "deepseek_v2_group_lora_yarn_tied",
            "deepseek_v3_group_lora_yarn", "gpt_oss_swa_yarn_clamped"]


def requests(vocab: int = 128, shapes=SHAPES, **kw) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    return [dict(prompt_ids=torch.randint(3, vocab, (n,), generator=g).tolist(), max_new_tokens=m,
                 ignore_eos=True, **kw) for n, m in shapes]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """spec -> (HF folder, store folder), built once."""
    made = {}

    def get(spec):
        if spec not in made:
            root = tmp_path_factory.mktemp(spec)
            if spec in tiny.SPECS:
                hf = tiny.make_checkpoint(root / "hf", spec)
            else:
                hf = test_families.make_checkpoint(root / "hf", spec)
            made[spec] = hf, convert(hf, root / "store").path
        return made[spec]

    return get


def small_memory(engine, store) -> int:
    """--memory of the backbone + one layer's active experts: every step of every layer misses."""
    s = open_store(store)
    return engine.info["backbone_bytes"] + s.top_k * max(e.span for e in s.entries.values())


def solo_and_batch(engine, reqs) -> tuple[list, list]:
    solo = [engine.generate(**r).token_ids for r in reqs]
    return solo, [r.token_ids for r in engine.generate_batch(reqs)]


# ---- exactness -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("offloaded", [False, True], ids=["resident", "offloaded"])
@pytest.mark.parametrize("spec", FAMILIES)
def test_each_sequence_of_a_batch_gets_its_solo_greedy_tokens(checkpoint, spec, offloaded):
    hf, store = checkpoint(spec)
    engine = load(hf, dtype="float32")
    if offloaded:
        engine = load(store, dtype="float32", memory=small_memory(engine, store))
    reqs = requests()
    solo, batch = solo_and_batch(engine, reqs)
    assert batch == solo and [len(t) for t in batch] == [m for _, m in SHAPES]
    assert len({tuple(t) for t in solo}) > 1  # not one degenerate answer


def test_batch_is_exact_with_prefetch_cpu_misses_and_a_quantized_codec(checkpoint, tmp_path):
    from moe_offload.cli import main

    hf, store = checkpoint("mixtral_gqa")
    memory = small_memory(load(hf, dtype="float32"), store)
    for engine in (load(store, dtype="float32", memory=memory, prefetch="lookahead"),
                   load(store, dtype="float32", cpu_misses="on")):
        solo, batch = solo_and_batch(engine, requests())
        assert batch == solo
    assert main(["quantize", "--model", str(hf), "--out", str(tmp_path / "q4"), "--expert-bits", "4"]) == 0
    solo, batch = solo_and_batch(load(tmp_path / "q4", dtype="float32"), requests())
    assert batch == solo


def test_sampling_stops_and_finish_reasons_are_per_sequence(checkpoint):
    hf, _ = checkpoint("mixtral_gqa")
    engine = load(hf, dtype="float32")
    greedy, sampled, eos, cancelled = requests(shapes=[(4, 6), (6, 6), (5, 6), (3, 6)])
    sampled.update(temperature=0.9, top_k=20, seed=3)
    first = engine.generate(**eos).token_ids[2]
    eos_engine_ids = set(engine.eos_ids)
    engine.eos_ids = {first}
    eos["ignore_eos"] = False
    seen = []
    cancelled["should_stop"] = lambda: len(seen) >= 2
    try:
        solo = [engine.generate(**r) for r in (greedy, sampled, eos)]
        got = {}
        for i, r in engine.stream_generate_batch([greedy, sampled, eos, cancelled]):
            got.setdefault(i, []).append(r)
            if i == 3 and r.token is not None:
                seen.append(r.token)
    finally:
        engine.eos_ids = eos_engine_ids
    for i, want in enumerate(solo):
        assert [r.token for r in got[i] if r.token is not None] == want.token_ids
        assert got[i][-1].finish_reason == want.finish_reason
    assert [got[i][-1].finish_reason for i in range(4)] == ["length", "length", "stop", "cancelled"]
    assert len(got[2]) == 3 and len(seen) == 2  # EOS ended one early; the others went on


def test_a_sequence_added_between_steps_joins_the_running_batch_prefilled_in_chunks(checkpoint):
    hf, _ = checkpoint("mixtral_gqa")
    engine = load(hf, dtype="float32")
    a, b = requests(shapes=[(5, 6), (7, 3)])
    solo = [engine.generate(**r).token_ids for r in (a, b)]
    batch = engine.batch(prefill_chunk=3)  # b's prompt of 7 tokens takes 3 steps, a decodes meanwhile
    sa = batch.add(**a)
    toks, steps = {id(sa): []}, 0
    while batch.seqs:
        if steps == 2:
            sb = batch.add(**b)
            toks[id(sb)] = []
        for seq, r in batch.step():
            if r.token is not None:
                toks[id(seq)].append(r.token)
        steps += 1
    assert [toks[id(sa)], toks[id(sb)]] == solo and engine.kv_bytes == 0
    assert steps == 8  # a: prefill, 5 decodes, ends at step 6; b: 3 prefill steps from step 2, 2 decodes


# ---- one fetch per expert per layer per step --------------------------------------------------------------

def test_a_batch_reads_each_needed_expert_once_per_layer_per_step(checkpoint):
    hf, store = checkpoint("mixtral_gqa")
    memory = small_memory(load(hf, dtype="float32"), store)
    span = max(e.span for e in open_store(store).entries.values())
    reqs = requests(shapes=[(4, 5), (6, 5), (3, 5), (5, 5)])

    def run(rs):
        engine = load(store, dtype="float32", memory=memory)
        cache, calls = engine.expert_cache, []
        fetch = cache.fetch

        def counted(layer, needed):
            calls.append((layer, list(needed)))
            return fetch(layer, needed)

        cache.fetch = counted
        results = engine.generate_batch(rs)  # each result counts what was read since the previous one ended
        keys = ("expert_hits", "expert_misses", "bytes_read_disk")
        return {k: sum(r.stats[k] for r in results) for k in keys}, calls

    stats, calls = run(reqs)
    n_moe = len(open_store(store).moe_layers)
    assert len(calls) == 5 * n_moe  # one fetch per MoE layer per step for the whole batch, not per sequence
    assert all(len(set(n)) == len(n) for _, n in calls)
    assert stats["expert_hits"] == 0  # the budget keeps nothing across layers
    assert stats["expert_misses"] == sum(len(n) for _, n in calls)  # each needed expert loaded once
    assert stats["bytes_read_disk"] == stats["expert_misses"] * span
    solo = [run([r])[0] for r in reqs]
    assert stats["bytes_read_disk"] < sum(s["bytes_read_disk"] for s in solo)


# ---- KV cache sized to the request ------------------------------------------------------------------------

def test_kv_cache_holds_prompt_plus_new_tokens_not_the_model_context(tiny_checkpoint):
    hf = tiny_checkpoint("mixtral_gqa", max_position_embeddings=4096)
    engine = load(hf, dtype="float32")
    # 2 layers x (k, v) x 2 kv heads x head_dim 16 x 4 bytes
    assert engine.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    r = engine.generate(prompt_ids=[5, 6, 7, 8], max_new_tokens=6, ignore_eos=True)
    assert r.stats["kv_cache_bytes"] == (4 + 6) * engine.kv_bytes_per_token
    # no limit asked (the server's default: the room left): the cache grows with what is generated
    room = engine.context_length - 4
    r = engine.generate(prompt_ids=[5, 6, 7, 8], max_new_tokens=room, stop="x" * 50, ignore_eos=False)
    per_token = engine.kv_bytes_per_token
    assert r.stats["kv_cache_bytes"] <= (4 + KV_CHUNK) * per_token < 4096 * per_token
    assert engine.kv_bytes == 0  # freed when the request ends


def test_kv_cache_grows_past_its_first_chunk_and_tokens_stay_the_same(tiny_checkpoint, monkeypatch):
    from moe_offload.runtime import engine as engine_mod

    hf = tiny_checkpoint("mixtral_gqa")
    engine = load(hf, dtype="float32")
    req = dict(prompt_ids=[5, 6, 7], max_new_tokens=20, ignore_eos=True)
    want = engine.generate(**req).token_ids
    monkeypatch.setattr(engine_mod, "KV_CHUNK", 4)  # starts at 3 + 4 tokens, grows twice
    r = engine.generate(**req)
    assert r.token_ids == want and r.stats["kv_cache_bytes"] == 23 * engine.kv_bytes_per_token


def test_ctx_size_caps_the_context_and_refuses_what_does_not_fit(tiny_checkpoint):
    hf = tiny_checkpoint("mixtral_gqa")
    full = load(hf, dtype="float32")
    engine = load(hf, dtype="float32", ctx_size=16)
    assert engine.context_length == 16 and full.context_length == 128
    req = dict(prompt_ids=[5, 6, 7, 8], max_new_tokens=12, ignore_eos=True)
    assert engine.generate(**req).token_ids == full.generate(**req).token_ids
    r = engine.generate(**dict(req, max_new_tokens=50))  # generation stops at the end of the context
    assert r.finish_reason == "length" and r.token_ids == full.generate(**req).token_ids
    assert r.stats["kv_cache_bytes"] == 16 * engine.kv_bytes_per_token
    with pytest.raises(UsageError, match="prompt is 16 tokens"):
        engine.generate(prompt_ids=list(range(3, 19)), max_new_tokens=0)
    for bad in (0, -1, 129, 2.5):
        with pytest.raises(UsageError, match="ctx_size"):
            load(hf, ctx_size=bad)


def test_memory_counts_the_kv_cache(checkpoint):
    hf, store = checkpoint("mixtral_gqa")
    engine = load(hf, dtype="float32")
    memory = small_memory(engine, store) + 6 * max(e.span for e in open_store(store).entries.values())
    kv_ctx = 128 * engine.kv_bytes_per_token
    with pytest.raises(MoeError, match=r"KV cache 0\.\d+ MiB \(128 tokens\)"):
        load(store, dtype="float32", memory=small_memory(engine, store) + kv_ctx - 1, ctx_size=128)
    offl = load(store, dtype="float32", memory=memory, ctx_size=128)
    r = offl.generate(prompt_ids=[5, 6, 7, 8], max_new_tokens=30, ignore_eos=True)
    kv = 34 * engine.kv_bytes_per_token
    assert r.stats["kv_cache_bytes"] == r.stats["kv_cache_bytes_peak"] == kv
    assert r.stats["resident_bytes"] <= memory
    assert r.stats["resident_weight_bytes"] <= memory - kv  # the experts gave the KV cache its room
    assert offl.expert_cache.capacity == offl.expert_cache.full_capacity  # given back at the end


def test_bench_concurrency_compares_a_queue_with_one_batch(checkpoint, tmp_path):
    import json

    from moe_offload.cli import main

    hf, _ = checkpoint("mixtral_gqa")
    assert main(["bench", "--model", str(hf), "--concurrency", "1,3", "--budgets", "30", "--prompt-tokens",
                 "4", "--new-tokens", "4", "--dtype", "float32", "--threads", "1", "--peers", "none",
                 "--no-cgroup", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "concurrency.json").read_text())["rows"]
    assert [(r["streams"], r["mode"]) for r in rows] == [(1, "queue"), (1, "batched"), (3, "queue"),
                                                         (3, "batched")]
    assert [r["tokens"] for r in rows] == [4, 4, 12, 12]
    queue, batched = rows[2]["bytes_read_per_token"], rows[3]["bytes_read_per_token"]
    assert 0 < batched < queue  # a batch reads a shared expert once for all its streams
    assert rows[3]["same_tokens"] == 1.0 and rows[3]["token_ids"] == rows[2]["token_ids"]  # float32: exact
    assert "| 30% | 3 | batched |" in (tmp_path / "out" / "concurrency.md").read_text()
    with pytest.raises(UsageError, match="--concurrency"):
        from moe_offload.concurrency import parse_levels

        parse_levels("1,x")
