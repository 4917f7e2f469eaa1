"""One routed expert of one layer is the unit of storage, transfer, caching and precision.

A codec turns an expert's three matrices into one flat byte blob and back into a callable unit.
`moe_dispatch` groups tokens by expert so that each needed expert is touched once per layer.

Shape legend: N tokens, D hidden, I expert intermediate, A active experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol

import torch
import torch.nn.functional as F

from .errors import MoeError
from .models.base import ACTIVATIONS
from .utils import DTYPE_NAMES, DTYPES


@dataclass(frozen=True)
class ExpertShape:
    hidden: int  # D
    intermediate: int  # I
    act: str = "silu"


class DenseExpert:
    """SwiGLU expert over views of one buffer: gate_up [2I, D] (gate rows, then up rows), down [D, I]."""

    __slots__ = ("gate_up", "down", "act")

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act: str = "silu"):
        self.gate_up, self.down, self.act = gate_up, down, ACTIVATIONS[act]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [n, D] -> [n, D]
        g, u = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return F.linear(self.act(g) * u, self.down)


class Codec(Protocol):
    """How one expert is laid out in a blob. `spec` goes into the manifest verbatim."""

    spec: dict

    def nbytes(self, shape: ExpertShape) -> int: ...

    def encode(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor: ...

    def decode(self, blob: torch.Tensor, shape: ExpertShape, dtype: torch.dtype) -> Callable: ...


class DenseCodec:
    """Plain weights in one dtype: [gate (I×D) | up (I×D) | down (D×I)]."""

    def __init__(self, dtype: torch.dtype | str):
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.spec = {"name": "dense", "dtype": DTYPE_NAMES[self.dtype]}

    def nbytes(self, shape: ExpertShape) -> int:
        return 3 * shape.hidden * shape.intermediate * self.dtype.itemsize

    def encode(self, gate, up, down) -> torch.Tensor:
        flat = torch.cat([gate.reshape(-1), up.reshape(-1), down.reshape(-1)]).to(self.dtype)
        return flat.contiguous().view(torch.uint8)

    def decode(self, blob: torch.Tensor, shape: ExpertShape, dtype: torch.dtype) -> DenseExpert:
        D, I = shape.hidden, shape.intermediate
        w = blob.view(self.dtype)
        if dtype != self.dtype:
            w = w.to(dtype)  # a converted copy; the stored blob keeps its dtype
        return DenseExpert(w[: 2 * I * D].view(2 * I, D), w[2 * I * D:].view(D, I), shape.act)


CODECS: dict[str, Callable[..., Codec]] = {"dense": lambda spec: DenseCodec(spec["dtype"])}


def make_codec(spec: dict) -> Codec:
    if spec.get("name") not in CODECS:
        raise MoeError(f"unknown expert codec {spec.get('name')!r}; known: {', '.join(CODECS)}")
    return CODECS[spec["name"]](spec)


Fetch = Callable[[list[int]], Iterable[tuple[int, Callable]]]


def moe_dispatch(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 fetch: Fetch) -> torch.Tensor:
    """Compute every needed expert once on all its tokens; sum in ascending expert order.

    `fetch(experts)` yields (expert, unit) in any order (a cache yields hits first, misses as they land);
    the sum order is fixed, so offloaded and resident runs give identical numbers.
    """
    needed = torch.unique(top_k_index).tolist()
    parts = {}
    for e, unit in fetch(needed):
        tok, slot = torch.where(top_k_index == e)
        parts[e] = (tok, unit(hidden[tok]) * top_k_weights[tok, slot, None])
    out = torch.zeros_like(hidden)
    for e in needed:
        tok, y = parts[e]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


class LocalExperts:
    """All experts of one layer resident in memory (the no-offload backend)."""

    def __init__(self, units: list[Callable]):
        self.units = units

    def _fetch(self, needed: list[int]) -> Iterator[tuple[int, Callable]]:
        return ((e, self.units[e]) for e in needed)

    def __call__(self, hidden, top_k_index, top_k_weights):
        return moe_dispatch(hidden, top_k_index, top_k_weights, self._fetch)
