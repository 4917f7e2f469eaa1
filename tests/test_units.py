"""Every expert unit says what it holds: `nbytes` and `tensors()`. The cache counts a unit's bytes from them
(store.cache.unit_bytes); a tensor a unit holds but does not list would be memory the budget never sees, so
each codec's unit is checked here against a walk of its attributes."""

from __future__ import annotations

import pytest
import torch

from moe_offload.codecs import make_codec
from moe_offload.experts import ExpertShape
from moe_offload.store.cache import Computed, storage_bytes, unit_bytes

SPECS = [
    {"name": "dense", "dtype": "float32"},
    {"name": "dense", "dtype": "bfloat16"},
    {"name": "hqq", "bits": 2},
    {"name": "hqq", "bits": 3},
    {"name": "hqq", "bits": 4},
    {"name": "hqq", "bits": 8},
    {"name": "hqq", "bits": 2, "rank": 8},
    {"name": "hqq", "bits": 4, "rank": 16},
    {"name": "gguf", "gate_up": "q4", "down": "bfloat16"},
    {"name": "gguf", "gate_up": "q8", "down": "q4"},
]


def reachable(obj, depth: int = 6, seen=None) -> list[torch.Tensor]:
    """Every tensor reachable through attributes, slots, lists and dicts (the test's own reflection)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth < 0 or id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, type)) \
            or callable(obj) and not hasattr(obj, "__dict__") and not hasattr(type(obj), "__slots__"):
        return []
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        kids = list(obj)
    elif isinstance(obj, dict):
        kids = list(obj.values())
    else:
        names = [n for c in type(obj).__mro__ for n in getattr(c, "__slots__", ())]
        kids = [getattr(obj, n, None) for n in names] + list(getattr(obj, "__dict__", {}).values())
    return [t for k in kids for t in reachable(k, depth - 1, seen)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(str(v) for v in s.values()))
@pytest.mark.parametrize("bias", [False, True])
def test_a_unit_lists_every_tensor_it_holds(spec, bias):
    if bias and spec["name"] == "gguf":
        pytest.skip("GGUF experts have no biases")
    D, I = 64, 96
    shape = ExpertShape(D, I, bias=bias)
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(*s, generator=g) * 0.05 for s in ((I, D), (I, D), (D, I))]
    codec = make_codec(spec)
    if bias:
        b = dict(gate_bias=torch.randn(I, generator=g), up_bias=torch.randn(I, generator=g),
                 down_bias=torch.randn(D, generator=g))
        blob = codec.encode(*w, **b)
    else:
        blob = codec.encode(*w)
    unit = codec.decode(blob, shape, torch.float32)
    listed = {t.untyped_storage()._cdata for t in unit.tensors()}
    held = {t.untyped_storage()._cdata for t in reachable(unit)}
    assert held <= listed, "a tensor the unit holds is not in unit.tensors()"
    assert isinstance(unit.nbytes, int) and unit.nbytes > 0
    assert unit_bytes(unit) == max(storage_bytes(unit.tensors()), unit.nbytes)
    x = torch.randn(3, D, generator=g)
    assert unit(x).shape == (3, D)


def test_a_cpu_computed_result_holds_nothing():
    y = torch.ones(2, 4)
    c = Computed(y)
    assert c.nbytes == 0 and c.tensors() == []
