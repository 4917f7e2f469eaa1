"""Route hooks: what is told a MoE layer's routing before the layer computes its experts.

A hook has one method (`RouteHook`): `on_route(layer, hidden, top_k_index, top_k_weights, cache)` with
hidden [N, D] and top_k_index / top_k_weights [N, A]; `cache` is the store.cache.ExpertCache of an offloaded
model, None for a resident one. The expert cache tells its own hooks (the prefetcher, the miss router);
`attach(model, *hooks)` / `hooked(model, *hooks)` tell hooks every layer of any model (for good / for a block). `RouteLog` is the one routing
recorder (profile, prefetch-report and bench use it).

Shape legend: N tokens, D hidden, A active experts per token.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Protocol

import torch


class RouteHook(Protocol):
    def on_route(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor, cache) -> None: ...


class Hooked:
    """A layer's experts backend with hooks told the routing first."""

    def __init__(self, inner, layer: int, hooks: tuple[RouteHook, ...]):
        self.inner, self.layer, self.hooks = inner, layer, hooks

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        cache = getattr(self.inner, "cache", None)  # store.cache.OffloadedExperts carries its cache
        for hook in self.hooks:
            hook.on_route(self.layer, hidden, top_k_index, top_k_weights, cache)
        return self.inner(hidden, top_k_index, top_k_weights)


def attach(model, *hooks: RouteHook) -> None:
    """From now on every MoE layer of `model` tells `hooks` its routing."""
    for layer, moe in model.moe_blocks():
        moe.experts = Hooked(moe.experts, layer, hooks)


@contextmanager
def hooked(model, *hooks: RouteHook):
    """Within the block, every MoE layer of `model` tells `hooks` its routing; its backends as they were
    after."""
    saved = [(moe, moe.experts) for _, moe in model.moe_blocks()]
    try:
        attach(model, *hooks)
        yield
    finally:
        for moe, inner in saved:
            moe.experts = inner


class RouteLog:
    """Every MoE call's routing: `calls` [(layer, top_k_index [N, A] on the CPU, hidden [N, D] fp32 on the
    CPU or None)]. hidden: keep the router's input too. decode_only: single-token calls only."""

    def __init__(self, hidden: bool = False, decode_only: bool = False):
        self.hidden, self.decode_only = hidden, decode_only
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []

    def on_route(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor, cache) -> None:
        if self.decode_only and hidden.shape[0] != 1:
            return
        h = hidden.detach().float().cpu() if self.hidden else None
        self.calls.append((layer, top_k_index.detach().cpu(), h))
