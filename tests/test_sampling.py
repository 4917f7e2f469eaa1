"""Sampling: greedy limits, seeds, the top-k / top-p support and frequencies; streamed text and stop strings."""

from __future__ import annotations

import pytest
import torch

from moe_offload import load
from moe_offload.runtime.sampling import sample

PROBS = torch.tensor([0.05, 0.5, 0.15, 0.3])  # token 1 first, then 3, 2, 0
LOGITS = PROBS.log()
IDS = [5, 9, 17, 33, 60, 7, 3, 11]


def draws(n: int, seed: int = 0, **kw) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [sample(LOGITS, generator=g, **kw) for _ in range(n)]


def test_temperature_zero_is_argmax_whatever_the_other_knobs():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    for kw in ({}, {"top_k": 5}, {"top_p": 0.5}, {"temperature": -1.0}):
        assert sample(logits, **{"temperature": 0.0, **kw}) == int(logits.argmax())


def test_seeded_draws_repeat_and_seeds_differ():
    assert draws(200, seed=7, temperature=1.0) == draws(200, seed=7, temperature=1.0)
    assert draws(200, seed=7, temperature=1.0) != draws(200, seed=8, temperature=1.0)


def test_frequencies_follow_the_softmax_and_its_truncations():
    n = 4000
    counts = torch.bincount(torch.tensor(draws(n, temperature=1.0)), minlength=4).float() / n
    assert (counts - PROBS).abs().max() < 0.03
    assert set(draws(500, temperature=1.0, top_k=2)) == {1, 3}
    assert set(draws(500, temperature=1.0, top_p=0.7)) == {1, 3}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert set(draws(500, temperature=1.0, top_p=0.4)) == {1}
    assert set(draws(500, temperature=1.0, top_k=1)) == {1}
    # temperature sharpens / flattens: at T=0.25 token 1 has p = 0.5^4 / sum(p^4) ~ 0.86
    sharp = torch.bincount(torch.tensor(draws(n, temperature=0.25)), minlength=4).float() / n
    want = PROBS**4 / (PROBS**4).sum()
    assert (sharp - want).abs().max() < 0.03


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return load(tiny_checkpoint("mixtral_gqa", tokenizer=True), dtype="float32")


def gen(engine, **kw):
    return engine.generate(prompt_ids=IDS, max_new_tokens=16, ignore_eos=True, **kw)


def test_engine_sampling_limits_equal_greedy(engine):
    greedy = gen(engine).token_ids
    assert gen(engine, temperature=0.0, seed=123).token_ids == greedy
    assert gen(engine, temperature=1.5, top_k=1, seed=1).token_ids == greedy
    assert gen(engine, temperature=1.5, top_p=1e-6, seed=2).token_ids == greedy


def test_engine_seeded_sampling_is_reproducible(engine):
    a = gen(engine, temperature=1.0, seed=42).token_ids
    assert gen(engine, temperature=1.0, seed=42).token_ids == a
    others = [gen(engine, temperature=1.0, seed=s).token_ids for s in (1, 2, 3)]
    assert any(o != a for o in others) and len(set(a)) > 1


def test_streamed_pieces_are_the_decoded_text(engine):
    pieces, tokens = [], []
    for r in engine.stream_generate(prompt_ids=IDS, max_new_tokens=24, ignore_eos=True):
        pieces.append(r.text)
        tokens += [r.token] if r.token is not None else []
    assert len(tokens) == 24
    assert "".join(pieces) == engine.tokenizer.decode(tokens)


def test_every_stop_string_cuts_at_its_first_occurrence(engine):
    full = engine.generate(prompt="The cache", max_new_tokens=24, ignore_eos=True)
    text = full.text
    assert len(text) > 10
    for width in (1, 2, 4):
        for start in range(0, len(text) - width, 3):
            stop = text[start:start + width]
            r = engine.generate(prompt="The cache", max_new_tokens=24, ignore_eos=True, stop=[stop, "\x00never"])
            assert r.text == text[: text.index(stop)], repr(stop)
            assert r.finish_reason == "stop" and r.token_ids == full.token_ids[: len(r.token_ids)]
