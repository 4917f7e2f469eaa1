"""Routing as small pure functions: fp32 router logits [N, E] -> (top_k_index [N, A], top_k_weights [N, A]).

One function per family rule, parametrised by config flags; each matches transformers' arithmetic.
"""

from __future__ import annotations

import torch


def softmax_topk(logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over all experts -> top-k -> optional renormalisation (Mixtral always renormalises;
    Qwen2/3-MoE and OLMoE follow `norm_topk_prob`)."""
    probs = torch.softmax(logits.float(), dim=-1)
    w, idx = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    return idx, w


def topk_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """top-k logits first, softmax over just those (Granite-MoE, gpt-oss)."""
    vals, idx = torch.topk(logits.float(), top_k, dim=-1)
    return idx, torch.softmax(vals, dim=-1)


def sparsemixer(logits: torch.Tensor, top_k: int, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's sparsemixer at inference (transformers' `sparsemixer`, training=False): top-2 only. For each
    pick, experts whose logit is more than 2·jitter_eps (relative) below the pick's are masked out, the weight is
    the pick's softmax over what is left; the second pick excludes the first."""
    assert top_k == 2, "sparsemixer routes exactly two experts"
    scores = logits.float()
    idx, weights = [], []
    masked = scores
    for _ in range(2):
        best, best_idx = masked.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=best)
        drop = ((best - scores) / factor) > (2 * jitter_eps)
        gates = torch.softmax(masked.masked_fill(drop, float("-inf")), dim=-1)
        idx.append(best_idx)
        weights.append(gates.gather(dim=-1, index=best_idx))
        masked = torch.scatter(scores, -1, best_idx, float("-inf"))
    return torch.cat(idx, dim=-1), torch.cat(weights, dim=-1)
