"""One routed expert of one layer is the unit of storage, transfer, caching and precision.

A codec turns an expert's three matrices into one flat byte blob and back into a callable unit.
`moe_dispatch` groups tokens by expert so that each needed expert is touched once per layer.

Shape legend: N tokens, D hidden, I expert intermediate, A active experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from operator import itemgetter
from typing import Callable, Iterable, Iterator, Protocol

import torch
import torch.nn.functional as F

from .models.base import ACTIVATIONS, linear, native_moe16
from .utils import DTYPE_NAMES, DTYPES


@dataclass(frozen=True)
class ExpertShape:
    hidden: int  # D
    intermediate: int  # I
    act: str = "silu"  # ACTIVATIONS name, or a GLUS name (a gated unit of (gate, up): gpt-oss's clamped SwiGLU)
    bias: bool = False  # gate/up/down biases (gpt-oss): the unit is a BiasedExpert
    swiglu_alpha: float = 1.702  # clamped SwiGLU only: (up + 1) * gate * sigmoid(alpha * gate)
    swiglu_limit: float = 7.0  # clamped SwiGLU only: gate <= limit, -limit <= up <= limit


class Unit(Protocol):
    """One callable expert, x [n, D] -> [n, D]: what a codec decodes a blob into. `nbytes`: the bytes it
    holds; `tensors()`: every tensor it holds (the cache counts their storages and hands them to the device's
    copy stream)."""

    nbytes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def tensors(self) -> list[torch.Tensor]: ...


class DenseExpert:
    """SwiGLU expert over views of one buffer: gate_up [2I, D] (gate rows, then up rows), down [D, I]."""

    __slots__ = ("gate_up", "down", "act")

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act: str = "silu"):
        self.gate_up, self.down, self.act = gate_up, down, ACTIVATIONS[act]

    def tensors(self) -> list[torch.Tensor]:
        return [self.gate_up, self.down]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [n, D] -> [n, D]
        g, u = linear(x, self.gate_up).chunk(2, dim=-1)
        return linear(self.act(g) * u, self.down)

    @staticmethod
    def run_group(x: torch.Tensor, units: list["DenseExpert"], weights: list[float], each: bool):
        """A decode token through several 16-bit SiLU experts in one native call, with their one-by-one bits
        (models.base.native_moe16); None where it does not apply (_dispatch_one then runs them one by one)."""
        if any(u.act is not F.silu for u in units):
            return None
        return native_moe16(x, [u.gate_up for u in units], [u.down for u in units], weights, each)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss: gate clamped above, up clamped both ways, (up + 1) * gate * sigmoid(alpha * gate)."""
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


GLUS: dict[str, Callable] = {"swiglu_clamp": clamped_swiglu}


class BiasedExpert:
    """Expert with biases and any gated unit: gate_up [2I, D] (gate rows, then up rows), gate_up_bias [2I],
    down [D, I], down_bias [D]. Checkpoints that interleave gate/up (gpt-oss) are split at load time."""

    __slots__ = ("gate_up", "gate_up_bias", "down", "down_bias", "glu")

    def __init__(self, gate_up, gate_up_bias, down, down_bias, shape: ExpertShape):
        self.gate_up, self.gate_up_bias, self.down, self.down_bias = gate_up, gate_up_bias, down, down_bias
        if shape.act in GLUS:
            fn, alpha, limit = GLUS[shape.act], shape.swiglu_alpha, shape.swiglu_limit
            self.glu = lambda g, u: fn(g, u, alpha, limit)
        else:
            act = ACTIVATIONS[shape.act]
            self.glu = lambda g, u: act(g) * u

    def tensors(self) -> list[torch.Tensor]:
        return [self.gate_up, self.gate_up_bias, self.down, self.down_bias]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [n, D] -> [n, D]
        g, u = linear(x, self.gate_up, self.gate_up_bias).chunk(2, dim=-1)
        return linear(self.glu(g, u), self.down, self.down_bias)


def expert_unit(shape: ExpertShape, gate, up, down, gate_bias=None, up_bias=None, down_bias=None) -> Callable:
    """One callable expert from our parts (gate/up [I, D], down [D, I], biases [I] / [D])."""
    if not shape.bias:
        return DenseExpert(torch.cat([gate, up]), down, shape.act)
    return BiasedExpert(torch.cat([gate, up]), torch.cat([gate_bias, up_bias]), down, down_bias, shape)


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
        biases = 2 * shape.intermediate + shape.hidden if shape.bias else 0
        return (3 * shape.hidden * shape.intermediate + biases) * self.dtype.itemsize

    def encode(self, gate, up, down, gate_bias=None, up_bias=None, down_bias=None) -> torch.Tensor:
        parts = [gate, up, down] + [b for b in (gate_bias, up_bias, down_bias) if b is not None]  # biases last
        flat = torch.cat([p.reshape(-1) for p in parts]).to(self.dtype)
        return flat.contiguous().view(torch.uint8)

    def decode(self, blob: torch.Tensor, shape: ExpertShape, dtype: torch.dtype) -> DenseExpert:
        D, I = shape.hidden, shape.intermediate
        w = blob.view(self.dtype)
        if dtype != self.dtype:
            w = w.to(dtype)  # a converted copy; the stored blob keeps its dtype
        if shape.bias:  # [gate | up | down | gate_bias | up_bias | down_bias]
            b = w[3 * I * D:]
            return BiasedExpert(w[: 2 * I * D].view(2 * I, D), b[: 2 * I], w[2 * I * D: 3 * I * D].view(D, I),
                                b[2 * I:], shape)
        return DenseExpert(w[: 2 * I * D].view(2 * I, D), w[2 * I * D:].view(D, I), shape.act)


Group = list[tuple[int, Callable]]  # (expert, unit) pairs ready together
Fetch = Callable[[list[int]], Iterable[Group]]  # needed experts -> their units, group by group as ready


def moe_dispatch(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 fetch: Fetch) -> torch.Tensor:
    """Compute every needed expert once on all its tokens; sum in ascending expert order.

    `fetch(experts)` yields groups of (expert, unit) in any order (a cache yields its hits as one group, then
    each miss as it lands); the sum order is fixed, so offloaded and resident runs give identical numbers. One
    host sync per call.
    """
    if hidden.shape[0] == 1:
        return _dispatch_one(hidden, top_k_index, top_k_weights, fetch)
    N, A = top_k_index.shape
    flat = top_k_index.reshape(-1)  # [N*A]
    needed, counts = torch.unique(flat, return_counts=True)
    order = torch.argsort(flat, stable=True)  # slots grouped by expert, ascending tokens inside each group
    tok_sorted, w_sorted = order // A, top_k_weights.reshape(-1)[order]
    needed, offs = needed.tolist(), [0, *accumulate(counts.tolist())]
    span = {e: slice(offs[i], offs[i + 1]) for i, e in enumerate(needed)}
    parts = {}
    for group in fetch(needed):
        for e, unit in group:
            s = span[e]
            tok = tok_sorted[s]  # a token picks an expert at most once
            parts[e] = (tok, unit(hidden[tok]) * w_sorted[s, None])
    out = torch.zeros_like(hidden)
    for e in needed:
        tok, y = parts[e]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def _dispatch_one(hidden, top_k_index, top_k_weights, fetch: Fetch) -> torch.Tensor:
    """`moe_dispatch` for one token (decode): hidden [1, D], top_k_index / top_k_weights [1, A]. The same
    numbers (each expert's output × its weight, cast, summed in ascending expert order) without grouping. A
    group of units that can run together (`run_group`: the native 4-bit experts) is one call; the whole
    token's experts in one group (every one a hit) come back summed in that order."""
    slot = {e: i for i, e in enumerate(top_k_index[0].tolist())}
    needed = sorted(slot)
    parts, out = {}, None
    for group in fetch(needed):
        group = sorted(group, key=itemgetter(0))
        whole = len(group) == len(needed)
        ys = _run_group(hidden, group, top_k_weights, slot, whole)
        if ys is None:
            parts.update((e, unit(hidden) * top_k_weights[:, slot[e], None]) for e, unit in group)
        elif whole:
            out = ys
        else:
            parts.update((e, ys[i:i + 1]) for i, (e, _) in enumerate(group))
    for e in needed if out is None else ():
        y = parts[e].to(hidden.dtype)
        out = y if out is None else out + y
    return out


def _run_group(hidden, group: Group, top_k_weights, slot: dict, whole: bool) -> torch.Tensor | None:
    """A group (ascending experts) through its units' `run_group` in one call: the weighted sum [1, D] when
    `whole`, else each expert's weighted output [len(group), D]; None where the units have no such call or
    it refuses them."""
    run = getattr(group[0][1], "run_group", None) if len(group) > 1 else None
    if run is None:
        return None
    w = top_k_weights[0].tolist()  # exact: fp32 and 16-bit values are doubles exactly
    return run(hidden, [u for _, u in group], [w[slot[e]] for e, _ in group], each=not whole)


class LocalExperts:
    """All experts of one layer resident in memory (the no-offload backend)."""

    def __init__(self, units: list[Callable]):
        self.units = units

    def _fetch(self, needed: list[int]) -> Iterator[Group]:
        yield [(e, self.units[e]) for e in needed]

    def __call__(self, hidden, top_k_index, top_k_weights):
        return moe_dispatch(hidden, top_k_index, top_k_weights, self._fetch)
