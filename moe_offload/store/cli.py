"""`moe-offload convert`: a Hugging Face folder -> an expert store (see store/format.py)."""

from __future__ import annotations

import time

from ..cli import command
from ..utils import mib, parse_dtype


def _add_convert(p):
    p.add_argument("--model", required=True, help="Hugging Face model folder or GGUF file")
    p.add_argument("--out", required=True, help="store folder to create")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the stored weights (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


@command("convert", "convert a Hugging Face MoE folder into an expert store", _add_convert)
def cmd_convert(a) -> int:
    from .format import convert  # imports torch: keep it out of the timing

    t0 = time.perf_counter()
    if a.model.lower().endswith(".gguf"):  # a GGUF file (gguf_import.py)
        from ..gguf_import import convert_gguf as convert
    store = convert(a.model, a.out, parse_dtype(a.dtype), overwrite=a.overwrite)
    backbone = (store.path / "backbone.safetensors").stat().st_size
    print(f"converted {len(store.entries)} experts ({mib(store.expert_bytes)}, {store.manifest['dtype']}) "
          f"+ backbone {mib(backbone)} in {time.perf_counter() - t0:.1f} s -> {store.path}")
    return 0
