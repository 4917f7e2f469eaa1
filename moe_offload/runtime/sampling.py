"""Next-token choice from fp32 logits [V]: repetition penalty, then greedy at temperature 0, else temperature,
top-k, top-p and min-p (the order of transformers' and vLLM's warpers)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

REPEAT_LAST_N = 64  # tokens of prompt + generation the repetition penalty looks back on (llama.cpp's default)


def recent(prompt: Sequence[int], out: Sequence[int], n: int = REPEAT_LAST_N) -> list[int]:
    """The last `n` tokens of prompt + generated, without copying either whole."""
    return (list(prompt[-n:]) + list(out[-n:]))[-n:]


def penalize(logits: torch.Tensor, seen: Sequence[int], penalty: float) -> torch.Tensor:
    """llama.cpp's repeat_penalty (= transformers' repetition_penalty): each token seen once or more has its
    logit divided by `penalty` when positive, multiplied when negative."""
    if penalty == 1.0 or not seen:
        return logits
    idx = torch.tensor(sorted(set(seen)), dtype=torch.long)
    x = logits[idx]
    return logits.index_put((idx,), torch.where(x > 0, x / penalty, x * penalty))


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None, *, min_p: float = 0.0, repetition_penalty: float = 1.0,
           seen: Sequence[int] = ()) -> int:
    logits = penalize(logits.float(), seen, repetition_penalty)
    if temperature <= 0:  # argmax's index (the first of equal maxima, a NaN's if any) by max's kernel: 190 against
        return int(logits.reshape(-1).max(0).indices)  # 60 us over 151936 logits (scripts/greedy_pick.py)
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop = cum - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    if min_p > 0.0:  # keep tokens at least min_p times as likely as the most likely one
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))
