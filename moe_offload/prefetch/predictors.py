"""Expert predictors: which experts will layers L+1..L+d need, given layer L's hidden state?

- `Lookahead`: the next layers' own routers applied to the current hidden state (the paper's speculative
  loading). Free: the router weights are already resident.
- `Shadow`: a small learned linear map per (layer, distance) trained on routing traces.
- `PreviousToken`: the baseline — the experts the target layer used for the previous token.

Shape legend: N tokens, D hidden, E experts, A active experts per token, m experts fetched per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import MoeError


def next_layers(moe_layers: list[int], layer: int, depth: int) -> list[int]:
    """The `depth` MoE layers after `layer` (dense layers skipped)."""
    later = [l for l in moe_layers if l > layer]
    return later[:depth]


def top_m(scores: torch.Tensor, m: int) -> list[int]:
    """scores [N, E] -> experts in the top-m of any token, ordered by best score (strongest first)."""
    m = min(m, scores.shape[-1])
    best = scores.float().max(dim=0).values if scores.shape[0] > 1 else scores[0].float()
    idx = torch.topk(scores.float(), m, dim=-1).indices.unique().tolist()
    return sorted(idx, key=lambda e: -float(best[e]))


class Lookahead:
    name = "lookahead"

    def __init__(self, gates: dict[int, torch.Tensor], depth: int = 1, m: int = 2):
        self.gates = {l: g.float() for l, g in gates.items()}  # layer -> router weight [E, D]
        self.moe_layers = sorted(gates)
        self.depth, self.m = depth, m

    def scores(self, layer: int, target: int, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h.float(), self.gates[target])  # [N, E]

    def predict(self, layer: int, h: torch.Tensor) -> dict[int, list[int]]:
        return {t: top_m(self.scores(layer, t, h), self.m) for t in next_layers(self.moe_layers, layer, self.depth)}


class Shadow:
    """Per (layer, distance d): logits_{L+d} ≈ W h_L + b, trained with a multi-label loss on traces."""

    name = "shadow"

    def __init__(self, maps: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]], moe_layers: list[int],
                 depth: int = 1, m: int = 2):
        self.maps, self.moe_layers, self.depth, self.m = maps, moe_layers, depth, m

    def scores(self, layer: int, target: int, h: torch.Tensor) -> torch.Tensor:
        W, b = self.maps[(layer, target)]
        return F.linear(h.float(), W, b)

    def predict(self, layer: int, h: torch.Tensor) -> dict[int, list[int]]:
        return {t: top_m(self.scores(layer, t, h), self.m)
                for t in next_layers(self.moe_layers, layer, self.depth) if (layer, t) in self.maps}

    @classmethod
    def train(cls, hidden: dict[int, torch.Tensor], chosen: dict[int, torch.Tensor], n_experts: int,
              depth: int = 2, m: int = 2, steps: int = 300, lr: float = 1e-2, seed: int = 0) -> "Shadow":
        """hidden[L] [T, D] and chosen[L] [T, A] for the same T tokens, per MoE layer."""
        g = torch.Generator().manual_seed(seed)
        layers = sorted(hidden)
        maps = {}
        for L in layers:
            x = hidden[L].float()
            x_mean, x_std = x.mean(0), x.std(0) + 1e-6
            xn = (x - x_mean) / x_std
            for t in next_layers(layers, L, depth):
                y = torch.zeros(x.shape[0], n_experts).scatter_(1, chosen[t].long(), 1.0)  # [T, E] multi-hot
                W = (torch.randn(n_experts, x.shape[1], generator=g) * 0.01).requires_grad_()
                b = torch.zeros(n_experts, requires_grad=True)
                opt = torch.optim.Adam([W, b], lr=lr)
                with torch.enable_grad():
                    for _ in range(steps):
                        opt.zero_grad()
                        loss = F.binary_cross_entropy_with_logits(F.linear(xn, W, b), y)
                        loss.backward()
                        opt.step()
                # fold the input normalisation into the map: W (x - mu) / sd + b
                Wf = (W / x_std).detach()
                maps[(L, t)] = (Wf, (b - Wf @ x_mean).detach())
        return cls(maps, layers, depth, m)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for (L, t), (W, b) in self.maps.items():
            tensors[f"{L}.{t}.weight"], tensors[f"{L}.{t}.bias"] = W.contiguous(), b.contiguous()
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        save_file(tensors, str(tmp), metadata={"moe_layers": ",".join(map(str, self.moe_layers)),
                                               "depth": str(self.depth)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, m: int = 2, depth: int | None = None) -> "Shadow":
        from safetensors import safe_open

        if not Path(path).is_file():
            raise MoeError(f"{path}: no shadow router; train one with `moe-offload profile --train-shadow`")
        maps = {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                L, t, kind = k.split(".")
                W, b = maps.get((int(L), int(t)), (None, None))
                maps[(int(L), int(t))] = (f.get_tensor(k), b) if kind == "weight" else (W, f.get_tensor(k))
        layers = [int(x) for x in meta.get("moe_layers", "").split(",") if x]
        return cls(maps, layers, depth or int(meta.get("depth", 1)), m)


class PreviousToken:
    """Baseline: layer L+d will use the experts it used for the previous token."""

    name = "previous-token"

    def __init__(self, moe_layers: list[int], depth: int = 1):
        self.moe_layers, self.depth, self.last = moe_layers, depth, {}

    def observe(self, layer: int, chosen: list[int]) -> None:
        self.last[layer] = chosen

    def predict(self, layer: int, h: torch.Tensor) -> dict[int, list[int]]:
        return {t: self.last.get(t, []) for t in next_layers(self.moe_layers, layer, self.depth)}


@dataclass
class Accuracy:
    """Counts over (token, target layer) predictions: recall = hits / needed, precision = hits / predicted."""

    hits: int = 0
    needed: int = 0
    predicted: int = 0
    per_layer: dict = field(default_factory=dict)

    def add(self, target: int, predicted: list[int], needed: list[int]) -> None:
        h = len(set(predicted) & set(needed))
        self.hits, self.needed, self.predicted = self.hits + h, self.needed + len(needed), self.predicted + len(predicted)
        c = self.per_layer.setdefault(target, [0, 0, 0])
        c[0], c[1], c[2] = c[0] + h, c[1] + len(needed), c[2] + len(predicted)

    @property
    def recall(self) -> float:
        return self.hits / self.needed if self.needed else 0.0

    @property
    def precision(self) -> float:
        return self.hits / self.predicted if self.predicted else 0.0

    def layer_recall(self, target: int) -> float:
        h, n, _ = self.per_layer.get(target, (0, 0, 0))
        return h / n if n else 0.0


def evaluate(predictor, hidden: dict[int, torch.Tensor], chosen: dict[int, torch.Tensor], distance: int = 1) -> Accuracy:
    """Offline accuracy at exactly `distance` MoE layers ahead, token by token (decode-like, N = 1)."""
    layers = sorted(hidden)
    acc = Accuracy()
    T = next(iter(hidden.values())).shape[0]
    for i in range(T):
        for L in layers:
            targets = next_layers(layers, L, distance)
            if len(targets) < distance:
                continue
            t = targets[-1]
            if isinstance(predictor, PreviousToken):
                pred = chosen[t][i - 1].tolist() if i > 0 else []
            else:
                pred = top_m(predictor.scores(L, t, hidden[L][i:i + 1]), predictor.m)
            acc.add(t, pred, chosen[t][i].tolist())
    return acc
