"""The store's side of opening a model offloaded: does the manifest fit the model, and the least --memory
that runs it. The composition root (runtime/load.py) builds the rest.
"""

from __future__ import annotations

from ..errors import MoeError
from ..hardware import DEVICE_RESERVE
from .cached import store_for  # noqa: F401  (autoconf and scripts open an HF folder's store from here)
from .format import MANIFEST, Store

RESERVE = DEVICE_RESERVE  # bytes of --memory kept out of the expert cache (hardware.py says why)


def check_layout(store: Store, model) -> None:
    """The manifest's experts as the model built from its config has them: one line if not."""
    have = (store.moe_layers, store.n_experts, store.top_k, store.expert_shape)
    want = ([la for la, _ in model.moe_blocks()], model.n_experts, model.top_k, model.expert_shape)
    for name, h, w in zip(("moe_layers", "n_experts", "top_k", "expert_shape"), have, want):
        if h != w:
            raise MoeError(f"{store.path / MANIFEST}: {name} is {h} but its config makes {w}; convert again")


def mib(n: int) -> str:
    return f"{n / 2**20:.{1 if n >= 2**20 else 3}f} MiB"


def min_memory(backbone: int, reserve: int, loads: dict[int, list[int]], top_k: int,
               kv: tuple[int, int] = (0, 0)) -> tuple[int, str]:
    """Smallest --memory that runs: backbone + reserve + KV cache (bytes, tokens) + the largest top_k experts
    of any one layer. Returns (bytes, the arithmetic as text)."""
    biggest = ((la, sorted(sizes)[-top_k:]) for la, sizes in loads.items())
    layer, active = max(biggest, key=lambda t: sum(t[1]))
    need = backbone + reserve + kv[0] + sum(active)
    experts = (f"{len(active)} active experts × {mib(active[0])}" if len(set(active)) == 1
               else f"{len(active)} largest active experts of layer {layer} ({mib(sum(active))})")
    extra = f" + reserve {mib(reserve)}" if reserve else ""
    extra += f" + KV cache {mib(kv[0])} ({kv[1]} tokens)" if kv[0] else ""
    return need, f"backbone {mib(backbone)}{extra} + {experts} = {mib(need)} needed at least"
