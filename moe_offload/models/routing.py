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


def _group_mask(scores: torch.Tensor, group_scores: torch.Tensor, topk_group: int) -> torch.Tensor:
    """Bool [N, E]: experts inside the `topk_group` best of the groups (group_scores [N, G])."""
    N, G = group_scores.shape
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    keep = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()
    return keep.unsqueeze(-1).expand(N, G, scores.shape[-1] // G).reshape(N, -1)


def softmax_group_topk(logits: torch.Tensor, top_k: int, method: str, n_group: int | None, topk_group: int | None,
                       norm_topk_prob: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2: softmax over all experts; `greedy` top-k, or `group_limited_greedy` (top-k among the
    `topk_group` groups with the highest single-expert score); × routed_scaling_factor. With `norm_topk_prob`
    (no released V2 sets it) the weights are renormalised and not scaled, as DeepSeek's own V2 code does;
    transformers ignores the flag."""
    scores = torch.softmax(logits.float(), dim=-1)
    if method == "group_limited_greedy":
        group_scores = scores.view(scores.shape[0], n_group, -1).max(dim=-1).values
        scores = scores.masked_fill(~_group_mask(scores, group_scores, topk_group), 0.0)
    elif method != "greedy":
        raise ValueError(f"topk_method {method!r} is not supported for DeepSeek-V2")
    w, idx = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    if top_k > 1 and norm_topk_prob:
        return idx, w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, w * scaling


def sigmoid_group_topk(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                       norm_topk_prob: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 (noaux_tc): sigmoid scores; the choice adds e_score_correction_bias and keeps the
    `topk_group` groups with the best sum of their top-2 choice scores; the weights are the unbiased scores,
    renormalised if `norm_topk_prob`, × routed_scaling_factor."""
    scores = logits.float().sigmoid()
    choice = scores + bias.float()
    group_scores = choice.view(choice.shape[0], n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
    choice = choice.masked_fill(~_group_mask(choice, group_scores, topk_group), float("-inf"))
    idx = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, idx)
    if norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, w * scaling
