"""What a bench run feeds every system: its memory budgets (backbone + a share of the expert bytes) and its
fixed prompts. Below bench.py and concurrency.py, which both read it."""

from __future__ import annotations


def budget_bytes(pct: float, backbone: int, experts: int) -> int:
    """--memory for a budget given as a percentage of the expert bytes: backbone + pct % of the experts."""
    return backbone + int(experts * pct / 100)


def prompts_for(vocab: int, n_tokens: int, count: int) -> list[list[int]]:
    """`count` fixed prompts (seeds 0..count-1) of random ids in [3, vocab): the same for every system."""
    import numpy as np

    lo = 3 if vocab > 3 else 0
    return [np.random.default_rng(seed).integers(lo, vocab, n_tokens).tolist() for seed in range(count)]
