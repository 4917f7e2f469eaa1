"""A GGUF file's bytes split into routed experts and the rest, per tensor type, and the `--memory` values that hold
the file's non-expert tensors plus a share of its experts (what "N % of the file's experts" means in
docs/benchmarks.md's GGUF rows), next to the store `--model FILE.gguf` converts it into when one is given.

    PYTHONPATH=. python scripts/gguf_budgets.py FILE.gguf [--pcts 100,50,25] [--store STORE]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from moe_offload.gguf_import import open_gguf

MiB = 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf")
    p.add_argument("--pcts", default="100,50,25")
    p.add_argument("--store", help="the store converted from the file (its manifest's expert and backbone bytes)")
    a = p.parse_args()
    g = open_gguf(a.gguf)
    expert_names = {n for names in g.experts.values() for n in names}
    experts = sum(int(g.tensors[n].n_bytes) for n in expert_names)
    rest = sum(int(t.n_bytes) for n, t in g.tensors.items() if n not in expert_names)
    types: Counter = Counter()
    for n in expert_names:
        types[g.tensors[n].tensor_type.name] += int(g.tensors[n].n_bytes)
    size = Path(a.gguf).stat().st_size
    print(f"{Path(a.gguf).name}: {size / MiB:.1f} MiB file; routed experts {experts / MiB:.1f} MiB "
          f"({', '.join(f'{t} {b / MiB:.1f}' for t, b in types.most_common())}); "
          f"other tensors {rest / MiB:.1f} MiB")
    for pct in (float(x) for x in a.pcts.split(",")):
        m = rest + experts * pct / 100
        print(f"  {pct:g} % of the file's experts: --memory {m / MiB:.0f}MiB ({100 * m / size:.1f} % of the file); "
              f"{pct:g} % of the file: --memory {size * pct / 100 / MiB:.0f}MiB")
    if a.store:
        man = json.loads((Path(a.store) / "manifest.json").read_text())
        ex = sum(e["nbytes"] for e in man["experts"])
        bb = (Path(a.store) / "backbone.safetensors").stat().st_size
        coded = len(man.get("source", {}).get("backbone_8bit") or [])
        eight = f", {coded} matrices as 8-bit codes" if coded else ""
        print(f"store {a.store}: experts {ex / MiB:.1f} MiB ({ex / experts:.2f}x the file's), backbone "
              f"{bb / MiB:.1f} MiB ({man['dtype']}{eight}; {bb / rest:.2f}x the file's other tensors)")


if __name__ == "__main__":
    main()
