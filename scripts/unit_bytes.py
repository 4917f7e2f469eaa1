"""What one cached expert holds, against its stored bytes (issue 16: a 4-bit expert counted 1.12× its blob).

    PYTHONPATH=. python scripts/unit_bytes.py STORE [--layer 0 --expert 0]

Reads one expert's blob from STORE the way the cache does (DiskTier into a page-aligned buffer), decodes it
for this CPU, and prints every distinct storage its tensors keep alive: whether it is the read buffer (a view
of the stored bytes) or a tensor of its own (a copy made at decode), its bytes, dtype and shape; then the unit's
resident bytes (store.cache.unit_bytes, what the cache counts) ÷ the stored span.
"""

from __future__ import annotations

import argparse
import json

import torch

from moe_offload.codecs import make_codec
from moe_offload.store.cache import unit_bytes
from moe_offload.store.format import open_store
from moe_offload.store.tiers import DiskTier

MiB = 2**20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("store")
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--expert", type=int, default=0)
    a = p.parse_args()
    store = open_store(a.store)
    layer = store.moe_layers[0] if a.layer is None else a.layer
    e = store.entries[layer, a.expert]
    disk = DiskTier(store.experts_path, pinned=False, verify="always")
    buf = disk.read(e)
    unit = make_codec(e.codec).decode(buf[:e.nbytes], store.expert_shape, store.dtype)
    seen: dict[int, torch.Tensor] = {}
    for t in unit.tensors():
        seen.setdefault(t.untyped_storage()._cdata, t)
    print(f"codec {json.dumps(e.codec, sort_keys=True)}")
    print(f"stored: blob {e.nbytes / MiB:.2f} MiB, span {e.span / MiB:.2f} MiB")
    own = 0
    for t in seen.values():
        n = t.untyped_storage().nbytes()
        blob = t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
        own += 0 if blob else n
        print(f"  {'read buffer (view)' if blob else 'own copy          '} {n / MiB:8.2f} MiB  "
              f"{str(t.dtype):15s} {tuple(t.shape)}")
    r = unit_bytes(unit)
    print(f"resident {r / MiB:.2f} MiB = {r / e.span:.3f}× the span; copies made at decode {own / MiB:.2f} MiB")
    disk.close()


if __name__ == "__main__":
    main()
