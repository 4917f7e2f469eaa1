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
