"""The error of a GGUF-born store's 8-bit backbone codes (convert_gguf backbone_bits auto / 8): per matrix
||W8 - Wfile|| / ||Wfile||, Wfile the file's dequantized values, W8 what the store computes with; with
--reference (the same model at F16), also the file's own quantization error ||Wfile - Wf16|| / ||Wf16|| and
the store's ||W8 - Wf16|| / ||Wf16||.

    PYTHONPATH=. python scripts/gguf_backbone_error.py FILE.gguf --store STORE [--reference F16.gguf]
"""

from __future__ import annotations

import argparse
import json

import torch

from moe_offload.gguf_import import GGUFSource, gguf_config, open_gguf
from moe_offload.models import build
from moe_offload.quant.kernels import PackedMatrix
from moe_offload.store.format import open_store


def source(path: str) -> GGUFSource:
    g = open_gguf(path)
    cfg = gguf_config(g)
    with torch.device("meta"):
        _, model = build(cfg)
    return GGUFSource(g, cfg, {k: tuple(v.shape) for k, v in model.state_dict().items()})


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf")
    p.add_argument("--store", required=True)
    p.add_argument("--reference", help="the same model as an F16 GGUF")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    store = open_store(a.store)
    names = store.manifest["source"].get("backbone_8bit") or []
    if not names:
        raise SystemExit(f"{a.store}: no 8-bit backbone matrices")
    src, ref = source(a.gguf), source(a.reference) if a.reference else None
    bb = store.backbone()
    rows = []
    for name in names:
        stem = name[: -len(".weight")]
        qsz, qw = bb.get(f"{stem}.qsz"), bb.get(f"{stem}.qweight")
        N = qsz.shape[1]
        W8 = PackedMatrix(qw, qsz, 8, N, qw.numel() // N).dequantize().float()
        Wf = src.get(name).float()
        r = {"name": name, "type": src.g.type_name(src.g.names[name]), "err_8bit_vs_file": rel(W8, Wf)}
        if ref is not None:
            W16 = ref.get(name).float()
            r.update(err_file_vs_f16=rel(Wf, W16), err_8bit_vs_f16=rel(W8, W16))
        rows.append(r)
    if a.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"{'matrix':<40} {'type':<6} {'8-bit vs file':>13}" + (f" {'file vs F16':>11} {'8-bit vs F16':>12}"
                                                                   if ref else ""))
    for r in rows:
        print(f"{r['name']:<40} {r['type']:<6} {r['err_8bit_vs_file']:>13.5f}" +
              (f" {r['err_file_vs_f16']:>11.5f} {r['err_8bit_vs_f16']:>12.5f}" if ref else ""))
    worst = max(rows, key=lambda r: r["err_8bit_vs_file"])
    print(f"{len(rows)} matrices; worst 8-bit vs file {worst['err_8bit_vs_file']:.5f} ({worst['name']})"
          + (f"; mean file vs F16 {sum(r['err_file_vs_f16'] for r in rows) / len(rows):.5f}, mean 8-bit vs F16 "
             f"{sum(r['err_8bit_vs_f16'] for r in rows) / len(rows):.5f}" if ref else ""))


if __name__ == "__main__":
    main()
