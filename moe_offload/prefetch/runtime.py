"""Speculative expert prefetch at run time.

When layer L's routing is known, the prefetcher (1) drops the speculative loads aimed at L that the router
did not choose, and (2) predicts the experts of layers L+1..L+d from L's hidden state and queues them as
low-priority loads into the cache's staging area, where they do not evict cached experts until used.
Demand loads always pre-empt them (the loader's priorities). Tokens never change: only timing does.

Modes: none | lookahead | shadow | auto. `auto` runs both predictors (two tiny GEMVs per layer), measures
each one's precision per source layer on the live routing, and per layer uses the better one, or none
where precision stays under `min_precision` ("a predictor that is wrong half the time is worse than none").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UsageError
from .predictors import Lookahead, Shadow, next_layers, top_m

MODES = ("none", "lookahead", "shadow", "auto")


@dataclass
class LayerScore:
    """Live precision of one predictor for one (source layer, target layer) pair."""

    hits: int = 0
    predicted: int = 0

    @property
    def precision(self) -> float:
        return self.hits / self.predicted if self.predicted else 1.0


@dataclass
class Prefetcher:
    """A route hook of the expert cache: told each layer's routing (and the cache) before it fetches."""

    predictors: dict  # name -> Lookahead | Shadow
    mode: str
    depth: int = 1
    m: int = 2
    min_precision: float = 0.5
    warmup: int = 16  # predictions per layer before auto may switch a layer off
    guesses: dict = field(default_factory=dict)  # target layer -> {predictor name: experts predicted for it}
    score: dict = field(default_factory=dict)  # (predictor, source, target) -> LayerScore
    needed: int = 0
    covered: int = 0  # needed experts already resident or arriving when their layer asked

    def __post_init__(self):
        if self.mode not in MODES:
            raise UsageError(f"--prefetch {self.mode!r}: choose one of {', '.join(MODES)}")

    def reset(self) -> None:
        self.needed = self.covered = 0

    # ---- called by the layer's experts backend before it fetches ------------------------------------------
    def on_route(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor, cache) -> None:
        """hidden [N, D], top_k_index [N, A] of `layer`; `cache`: the store.cache.ExpertCache to load into."""
        needed = torch.unique(top_k_index).tolist()
        self._settle(cache, layer, needed)
        keys = self._predict(layer, hidden)
        if keys:
            cache.prefetch(keys)

    def _settle(self, cache, layer: int, needed: list[int]) -> None:
        """The real routing of `layer` is known: score the guesses aimed at it, cancel the wrong loads."""
        self.needed += len(needed)
        self.covered += sum((layer, e) in cache.resident or (layer, e) in cache.pending for e in needed)
        guesses = self.guesses.pop(layer, {})
        for (name, source), experts in guesses.items():
            s = self.score.setdefault((name, source, layer), LayerScore())
            s.hits += len(set(experts) & set(needed))
            s.predicted += len(experts)
        wrong = {(layer, e) for (_, _), experts in guesses.items() for e in experts} - {(layer, e) for e in needed}
        if wrong:
            cache.cancel_prefetch(sorted(wrong))

    def _choose(self, source: int, target: int) -> str | None:
        """auto: the predictor with the best live precision for this pair, or None if none pays."""
        best, best_p = None, -1.0
        for name in self.predictors:
            s = self.score.get((name, source, target), LayerScore())
            if s.predicted >= self.warmup and s.precision < self.min_precision:
                continue
            if s.precision > best_p:
                best, best_p = name, s.precision
        return best

    def _predict(self, layer: int, hidden: torch.Tensor) -> list[tuple[int, int]]:
        keys = []
        moe_layers = next(iter(self.predictors.values())).moe_layers
        for target in next_layers(moe_layers, layer, self.depth):
            guesses = {}
            for name, pred in self.predictors.items():
                if self.mode != "auto" and name != self.mode:
                    continue
                if isinstance(pred, Shadow) and (layer, target) not in pred.maps:
                    continue
                guesses[name] = top_m(pred.scores(layer, target, hidden), self.m)
            for name, experts in guesses.items():  # every guess is scored when the target's routing is known
                self.guesses.setdefault(target, {})[(name, layer)] = experts
            chosen = self._choose(layer, target) if self.mode == "auto" else self.mode
            if chosen in guesses:  # only the chosen predictor's guesses are fetched
                keys += [(target, e) for e in guesses[chosen]]
        return keys

    def stats(self, cache) -> dict:
        issued, used = cache.prefetch_issued, cache.prefetch_used
        per_layer = {}
        for (name, source, target), s in sorted(self.score.items()):
            per_layer[f"{name}:{source}->{target}"] = round(s.precision, 4)
        return {
            "prefetch_mode": self.mode,
            "prefetch_recall": self.covered / self.needed if self.needed else 0.0,
            "prefetch_precision": used / issued if issued else 0.0,
            "prefetch_precision_by_layer": per_layer,
        }


def make_prefetcher(model, store_path, mode: str, depth: int = 1, m: int | None = None) -> Prefetcher | None:
    """Build the predictors `mode` needs from the resident routers (lookahead) and the store's trained
    shadow router (shadow_router.safetensors, written by `moe-offload profile --train-shadow`)."""
    if mode not in MODES:
        raise UsageError(f"--prefetch {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "none":
        return None
    if depth < 1:
        raise UsageError("--prefetch-depth must be >= 1")
    m = m or model.top_k
    if not 1 <= m <= model.n_experts:
        raise UsageError(f"--prefetch-experts must be in 1..{model.n_experts}")
    gates = {L: moe.router_linear().weight.detach() for L, moe in model.moe_blocks()}  # a router bias left out
    predictors = {}
    if mode in ("lookahead", "auto"):
        predictors["lookahead"] = Lookahead(gates, depth=depth, m=m)
    shadow_path = store_path / "shadow_router.safetensors"
    if mode == "shadow" or (mode == "auto" and shadow_path.is_file()):
        shadow = Shadow.load(shadow_path, m=m, depth=depth)
        dev = next(iter(gates.values())).device  # the maps score hidden states where the model runs (CUDA)
        shadow.maps = {k: (W.to(dev, torch.float32), b.to(dev, torch.float32))
                       for k, (W, b) in shadow.maps.items()}
        shadow.moe_layers = sorted(gates)
        predictors["shadow"] = shadow
    return Prefetcher(predictors, mode, depth=depth, m=m)
