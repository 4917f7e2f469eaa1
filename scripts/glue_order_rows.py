"""How often a row's mean of squares comes out the same in torch's summation order for 8 and for 16 fp32 lanes
(q4.c's rms_norm with each width against torch's own RMSNorm): why models/base.py checks a width on 64 rows.

    PYTHONPATH=. python scripts/glue_order_rows.py [--rows 64] [--widths 64,200,2048,4133]

Per width, two kinds of rows (magnitudes spread per row, over 12 decades; per element, over 3): the rows of
each whose output differs from torch's with each lane count. The width torch sums in here differs in none.
"""

from __future__ import annotations

import argparse

import torch

from moe_offload.models import base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--widths", default="64,200,2048,4133")
    a = ap.parse_args()
    lib = base._glue_library()
    if lib is None:
        print("no native glue here (no compiler, MOE_OFFLOAD_NATIVE=0, or no width matches torch)")
        return 2
    g = torch.Generator().manual_seed(0)
    print(f"torch sums in {base.glue_lanes()} lanes here; rows (of {a.rows}) whose RMSNorm output differs from torch's")
    print(f"{'width':>6} {'rows':>12} {'8 lanes':>8} {'16 lanes':>9}")  # base.LANES
    for width in (int(w) for w in a.widths.split(",")):
        kinds = {"per-row": torch.randn(a.rows, width, generator=g) * 10 ** (torch.rand(a.rows, 1, generator=g) * 12 - 6),
                 "per-element": torch.randn(a.rows, width, generator=g) * 10 ** (torch.rand(a.rows, width, generator=g) * 3)}
        for kind, x in kinds.items():
            w = torch.ones(width)
            want = base.rms_norm(x, w, 1e-6).view(torch.int32)
            diff = [int((base.rms_native(lib, x, w, 1e-6, lanes).view(torch.int32) != want).any(-1).sum())
                    for lanes in base.LANES]
            print(f"{width:>6} {kind:>12} {diff[0]:>8} {diff[1]:>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
