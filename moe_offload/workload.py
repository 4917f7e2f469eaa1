"""What a bench run feeds every system: its memory budgets (backbone + a share of the expert bytes) and its
fixed prompts. Below bench.py and concurrency.py, which both read it."""

from __future__ import annotations


def budget_bytes(pct: float, backbone: int, experts: int, kv: int = 0) -> int:
    """--memory for a budget given as a percentage of the expert bytes: backbone + pct % of the experts + `kv`,
    the KV cache the run holds (--memory bounds weights and KV caches: without it, "100 %" evicts an expert
    for the KV cache's bytes)."""
    return backbone + int(experts * pct / 100) + kv


KV_CHUNK = 256  # tokens a KV cache grows by at least: a request without max_tokens holds only what it uses


def kv_tokens(prompt: int, max_new: int, chunk: int = KV_CHUNK) -> int:
    """Tokens of KV cache the engine holds for one `prompt`-token request of `max_new` new tokens: it
    allocates prompt + min(max_new, KV_CHUNK), then grows by max(KV_CHUNK, ×2), never past prompt + max_new
    (runtime/engine.py)."""
    have, need = prompt + max(min(max_new, chunk), 1), prompt + max_new - 1  # the last token is not fed
    while have < need:
        have = min(prompt + max_new, max(have + chunk, 2 * have))
    return have


def prompts_for(vocab: int, n_tokens: int, count: int) -> list[list[int]]:
    """`count` fixed prompts (seeds 0..count-1) of random ids in [3, vocab): the same for every system."""
    import numpy as np

    lo = 3 if vocab > 3 else 0
    return [np.random.default_rng(seed).integers(lo, vocab, n_tokens).tolist() for seed in range(count)]
