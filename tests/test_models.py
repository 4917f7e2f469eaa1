"""Every architecture against transformers: greedy tokens, logits, cached vs uncached, sharded checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from moe_offload import load
from tests import tiny

N_NEW = 20
PROMPT = torch.randint(3, 128, (10,), generator=torch.Generator().manual_seed(1)).tolist()  # longer than windows


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    """spec -> (our engine, transformers model) over one saved folder; each built once."""
    made = {}

    def get(spec):
        if spec not in made:
            folder = tiny_checkpoint(spec)
            made[spec] = load(folder, dtype="float32"), tiny.load_hf(folder)
        return made[spec]

    return get


@pytest.mark.parametrize("spec", list(tiny.SPECS))
def test_greedy_tokens_and_logits_match_transformers(pair, spec):
    engine, hf = pair(spec)
    ref = tiny.hf_greedy(hf, PROMPT, N_NEW)
    ours = engine.generate(prompt_ids=PROMPT, max_new_tokens=N_NEW, ignore_eos=True)
    assert ours.token_ids == ref
    assert ours.finish_reason == "length" and ours.prompt_tokens == len(PROMPT)
    assert len(set(ref)) > 1 or len(set(tiny.hf_greedy(hf, PROMPT[::-1], N_NEW))) > 1  # not a degenerate model

    # first step (prefill) and every position of prompt + generation: one full forward each side
    full = PROMPT + ref
    with torch.no_grad():
        want = hf(torch.tensor([full])).logits[0].float()
    got = engine.logits(full)
    assert got.shape == want.shape
    assert (got[len(PROMPT) - 1] - want[len(PROMPT) - 1]).abs().max().item() < 1e-4
    assert (got - want).abs().max().item() < 1e-4
    assert want.std().item() > 0.5  # logits far from uniform: the comparison is meaningful


@pytest.mark.parametrize("spec", ["mixtral_mha_swa_tied", "qwen2_moe_mha_step2_tied", "qwen3_moe_gqa_dense",
                                  "olmoe_gqa_clip"])
def test_cached_decode_equals_full_forward(pair, spec):
    engine, _ = pair(spec)
    tiny.assert_cached_equals_uncached(engine, PROMPT + PROMPT[::-1])  # 20 tokens: past every sliding window


def test_perplexity_equals_transformers_loss(pair):
    engine, hf = pair("qwen3_moe_gqa_dense")
    ids = PROMPT * 3
    ppl, n = engine.perplexity(ids, window=len(ids))
    with torch.no_grad():
        loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert n == len(ids) - 1
    assert ppl == pytest.approx(float(torch.exp(loss)), rel=1e-5)


def test_sharded_checkpoint_loads_and_matches(tiny_checkpoint, pair):
    folder = tiny_checkpoint("qwen2_moe_shared_dense", max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (folder / "model.safetensors").exists()
    _, hf = pair("qwen2_moe_shared_dense")  # same seed and spec, single file
    engine = load(folder, dtype="float32")
    assert engine.generate(prompt_ids=PROMPT, max_new_tokens=N_NEW, ignore_eos=True).token_ids == \
        tiny.hf_greedy(hf, PROMPT, N_NEW)
    torch.testing.assert_close(engine.logits(PROMPT), pair("qwen2_moe_shared_dense")[0].logits(PROMPT),
                               atol=0, rtol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(pair, tiny_checkpoint, dtype):
    folder = tiny_checkpoint("mixtral_gqa")
    engine = load(folder, dtype=dtype)
    assert engine.model.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    r = engine.generate(prompt_ids=PROMPT, max_new_tokens=8, ignore_eos=True)
    assert len(r.token_ids) == 8
    ref = pair("mixtral_gqa")[0].logits(PROMPT)
    got = engine.logits(PROMPT)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - ref).abs().max().item() < 0.1 * ref.abs().max().item()  # half rounding, not a wrong model


def test_generation_stops_at_the_end_of_the_context(pair):
    engine, hf = pair("olmoe_gqa_clip")
    assert engine.context_length == 128
    prompt = (PROMPT * 13)[:120]
    r = engine.generate(prompt_ids=prompt, max_new_tokens=50, ignore_eos=True)
    assert r.finish_reason == "length" and len(r.token_ids) == 128 - len(prompt)
    assert r.token_ids == tiny.hf_greedy(hf, prompt, 128 - len(prompt))
