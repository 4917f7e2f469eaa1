"""`moe-offload convert`: a Hugging Face folder -> an expert store (see store/format.py)."""

from __future__ import annotations

import time

from ..hub import resolve_model
from ..progress import Progress, add_quiet_arg
from ..utils import mib, parse_dtype


def add_convert_args(p):
    p.add_argument("--model", required=True, help="Hugging Face model folder or GGUF file")
    p.add_argument("--out", required=True, help="store folder to create")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the stored weights (default: the checkpoint's)")
    p.add_argument("--backbone-bits", default=None, choices=["auto", "16", "8"],
                   help="GGUF files: attention and lm_head as 8-bit codes (8), where the file holds them "
                        "quantized (auto, the default), or dequantized to --dtype (16)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is an expert store or an empty folder")
    add_quiet_arg(p)


def run_convert(a) -> int:
    from .format import convert as _convert  # imports torch: keep it out of the timing

    t0 = time.perf_counter()
    convert = _convert
    a.model = str(resolve_model(a.model))  # org/name: the local HF cache
    extra = {}
    if a.model.lower().endswith(".gguf"):  # a GGUF file (gguf_import.py)
        from ..gguf_import import convert_gguf as convert

        extra["backbone_bits"] = a.backbone_bits or "auto"
    elif getattr(a, "backbone_bits", None) is not None:
        from ..errors import UsageError

        raise UsageError("--backbone-bits applies to GGUF files; for a Hugging Face folder use "
                         "`moe-offload quantize --attn-bits 8 --head-bits 8`")
    with Progress("convert", unit="experts", quiet=a.quiet) as bar:
        store = convert(a.model, a.out, parse_dtype(a.dtype), overwrite=a.overwrite, progress=bar, **extra)
    backbone = (store.path / "backbone.safetensors").stat().st_size
    print(f"converted {len(store.entries)} experts ({mib(store.expert_bytes)}, {store.manifest['dtype']}) "
          f"+ backbone {mib(backbone)} in {time.perf_counter() - t0:.1f} s -> {store.path}")
    return 0


def add_stores_args(p):
    what = p.add_mutually_exclusive_group()
    what.add_argument("--remove", default=None, metavar="PATH", help="remove this cached store")
    what.add_argument("--prune", action="store_true",
                      help="remove cached stores whose source folder is gone or changed")


def run_stores(a) -> int:
    from . import cached

    if a.remove is not None:
        e = cached.remove(a.remove)
        print(f"removed {e.path} ({mib(e.nbytes)})")
        return 0
    rows = cached.entries()
    if a.prune:
        gone = [e for e in rows if e.stale()]
        for e in gone:
            cached.remove(e.path)
        print(f"removed {len(gone)} stale cached store(s), {mib(sum(e.nbytes for e in gone))}")
        return 0
    print(f"{cached.cache_root()}: {len(rows)} cached store(s), {mib(sum(e.nbytes for e in rows))}")
    if rows:
        print(cached.format_entries(rows))
    return 0
