"""The expert store on disk: one folder, written once by `convert`, read by the tiers.

    manifest.json         format name + version, the model's config.json, and one entry per routed expert
                          (layer, expert, offset, nbytes, codec spec, crc32)
    experts.bin           each expert one contiguous blob at a 4096-aligned offset, zero-padded to 4096
    backbone.safetensors  every dense tensor (embeddings, attention, norms, routers, shared experts, dense
                          MLPs, lm_head) under its checkpoint name
    tokenizer files, generation_config.json   copied from the Hugging Face folder

`convert` streams one tensor at a time into a temporary folder beside the target and renames it only when
complete, so an interrupted convert leaves nothing under the target name.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import (
    SafetensorsFolder,
    dequantizing,
    check_keys,
    checkpoint_dtype,
    expert_checkpoint_keys,
    expert_tensors,
    read_config,
)
from ..errors import MoeError
from ..experts import Codec, DenseCodec, ExpertShape, make_codec
from ..models import build, get_module
from ..utils import DTYPE_NAMES, atomic_dir, drop_page_cache

FORMAT_NAME = "moe-offload-store"
FORMAT_VERSION = 1
ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffers aligned to the logical block size (<= 4096)
MANIFEST, EXPERTS, BACKBONE = "manifest.json", "experts.bin", "backbone.safetensors"
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
          "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
          "generation_config.json")

Key = tuple[int, int]  # (layer, expert)


def round_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def crc32_hex(buf) -> str:
    return f"{zlib.crc32(buf) & 0xFFFFFFFF:08x}"  # zlib.crc32 releases the GIL: ~6 GB/s here


@dataclass(frozen=True)
class ExpertEntry:
    layer: int
    expert: int
    offset: int  # bytes into experts.bin, a multiple of ALIGN
    nbytes: int  # the codec's blob; the read covers `span` (padded)
    codec: dict
    checksum: str  # crc32 of the nbytes, hex

    @property
    def key(self) -> Key:
        return self.layer, self.expert

    @property
    def span(self) -> int:
        return round_up(self.nbytes)


@dataclass
class Store:
    """An opened, validated store folder."""

    path: Path
    manifest: dict
    entries: dict[Key, ExpertEntry]

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def model_type(self) -> str:
        return self.manifest["model_type"]

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.manifest["dtype"])

    @property
    def expert_shape(self) -> ExpertShape:
        return ExpertShape(**self.manifest["expert_shape"])

    @property
    def moe_layers(self) -> list[int]:
        return self.manifest["moe_layers"]

    @property
    def n_experts(self) -> int:
        return self.manifest["n_experts"]

    @property
    def top_k(self) -> int:
        return self.manifest["top_k"]

    @property
    def experts_path(self) -> Path:
        return self.path / EXPERTS

    @property
    def expert_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def backbone(self) -> SafetensorsFolder:
        return SafetensorsFolder(self.path, single_name=BACKBONE)


# ---- writing ---------------------------------------------------------------------------------------

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def write_safetensors(path: Path, names: list[str], source: SafetensorsFolder, dtype: torch.dtype | None,
                      keep: tuple[str, ...] = ()) -> int:
    """Stream tensors into one safetensors file, one at a time (the header is known from shapes alone).
    Floating tensors are cast to `dtype` when given, except names ending in `keep`. Returns the data bytes."""
    header, offset, plan = {"__metadata__": {"format": "pt"}}, 0, []
    for name in names:
        src = _ST_NAMES[source.dtype_of(name)]
        cast = dtype is not None and src.is_floating_point and not (keep and name.endswith(keep))
        dt = dtype if cast else src
        shape = source.shape_of(name)
        n = dt.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": shape, "data_offsets": [offset, offset + n]}
        plan.append((name, dt))
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % 8)  # data starts 8-aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name, dt in plan:
            t = source.get(name).to(dt).contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
    return offset


def write_experts(path: Path, source: SafetensorsFolder, model_type: str, moe_layers: list[int],
                  n_experts: int, codec: Callable[[int, int], Codec], progress=None) -> list[ExpertEntry]:
    """One expert at a time: read its matrices, encode with codec(layer, expert), write at the next aligned
    offset. `progress` (progress.Progress): one update per expert with the bytes it read."""
    entries, offset = [], 0
    with open(path, "wb") as f:
        for layer in moe_layers:
            for e in range(n_experts):
                parts = expert_tensors(source, model_type, layer, e)
                c = codec(layer, e)
                blob = c.encode(**parts).numpy().data  # uint8 [nbytes]
                n = len(blob)
                f.write(blob)
                f.write(b"\0" * (round_up(n) - n))
                entries.append(ExpertEntry(layer, e, offset, n, dict(c.spec), crc32_hex(blob)))
                offset += round_up(n)
                if progress is not None:
                    progress.update(1, sum(t.numel() * t.element_size() for t in parts.values()))
        f.flush()
        os.fsync(f.fileno())
    drop_page_cache(path)  # the store must not sit in the page cache after writing it
    return entries


def convert(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
            overwrite: bool = False, codec: Codec | Callable[[int, int], Codec] | None = None,
            backbone_view: Callable | None = None, extra: dict | None = None, progress=None) -> Store:
    """Hugging Face folder -> store folder. `dtype` (default: the checkpoint's) for the backbone, the
    compute default and the dense experts; `codec`: one Codec for all experts, or codec(layer, expert) for
    mixed precision (each entry records its own spec). `backbone_view(source, names, keep) -> (source, names,
    keep)` rewrites backbone tensors (quantized attention, quant/backbone.py); `extra` joins the manifest;
    `progress` (progress.Progress) counts the experts written."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if (hf_dir / MANIFEST).is_file():
        raise MoeError(f"{hf_dir} is already an expert store")
    config = read_config(hf_dir)
    get_module(config.get("model_type"))  # unsupported type -> clear error before anything is written
    with torch.device("meta"):
        args, model = build(config)
    source = dequantizing(SafetensorsFolder(hf_dir), config)  # FP8 block-scaled weights -> fp32, as load()
    moe_layers = [layer for layer, _ in model.moe_blocks()]
    n_experts, model_type = model.n_experts, args.model_type
    backbone = list(model.state_dict())
    have = set(source.keys())
    experts = set().union(*(expert_checkpoint_keys(model_type, la, n_experts, have) for la in moe_layers))
    ignore = {"lm_head.weight"} if model.tie else set()
    skip = getattr(model, "skip_checkpoint_key", None)  # tensors a family never uses (as build_model)
    if skip is not None:
        ignore |= {k for k in have if skip(k)}
    check_keys(have, set(backbone) | experts, str(hf_dir), ignore)
    store_dtype = dtype or checkpoint_dtype(config)
    if codec is None:
        codec = DenseCodec(store_dtype)
    pick = codec if not hasattr(codec, "encode") else (lambda layer, expert: codec)
    shape = model.expert_shape

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        if progress is not None:
            progress.start(len(moe_layers) * n_experts)
        entries = write_experts(tmp / EXPERTS, source, model_type, moe_layers, n_experts, pick, progress)
        keep = tuple(getattr(model, "fp32_keys", ()))  # kept in fp32 whatever the dtype (as build_model)
        bsource, bnames = source, backbone
        if backbone_view is not None:
            bsource, bnames, keep = backbone_view(source, backbone, keep)
        write_safetensors(tmp / BACKBONE, bnames, bsource, store_dtype, keep)
        for name in COPIED:
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, tmp / name)
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "model_type": model_type,
            "dtype": DTYPE_NAMES[store_dtype],  # the default compute dtype
            "config": config,
            "expert_shape": {f.name: getattr(shape, f.name) for f in fields(shape)},
            "moe_layers": moe_layers,
            "n_experts": n_experts,
            "top_k": model.top_k,
            "alignment": ALIGN,
            "experts": [asdict(e) for e in entries],
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; a store is an ordinary folder
    return open_store(out_dir)


# ---- reading -----------------------------------------------------------------------------------------

def open_store(path: str | os.PathLike) -> Store:
    """Parse and check a store folder: format and version, entries, experts.bin size, backbone present."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise MoeError(f"{path}: no {MANIFEST} (not an expert store)")
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoeError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        got = m.get("format") if isinstance(m, dict) else None
        raise MoeError(f"{mpath}: not a {FORMAT_NAME} manifest (format {got!r})")
    if m.get("version") != FORMAT_VERSION:
        raise MoeError(f"{path}: store format version {m.get('version')!r} is not supported; this "
                       f"moe-offload reads version {FORMAT_VERSION}: convert the model again")
    try:
        get_module(m["model_type"])
        entries = {}
        for d in m["experts"]:
            e = ExpertEntry(int(d["layer"]), int(d["expert"]), int(d["offset"]), int(d["nbytes"]),
                            dict(d["codec"]), str(d["checksum"]))
            if e.key in entries:
                raise MoeError(f"{mpath}: layer {e.layer} expert {e.expert} listed twice")
            entries[e.key] = e
        want = {(la, x) for la in m["moe_layers"] for x in range(int(m["n_experts"]))}
        ExpertShape(**m["expert_shape"])
        int(m["top_k"])
        if not isinstance(getattr(torch, m["dtype"]), torch.dtype) or not isinstance(m["config"], dict):
            raise ValueError("dtype or config")
        align = int(m["alignment"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MoeError(f"{mpath}: malformed manifest ({type(e).__name__}: {e})") from None
    if align != ALIGN:
        raise MoeError(f"{mpath}: alignment {align} is not supported (expected {ALIGN})")
    if set(entries) != want:
        bad = sorted(set(entries) ^ want)[0]
        raise MoeError(f"{mpath}: the expert entries do not match moe_layers x n_experts (e.g. layer "
                       f"{bad[0]} expert {bad[1]})")
    for spec in {json.dumps(e.codec, sort_keys=True) for e in entries.values()}:
        make_codec(json.loads(spec))  # unknown codec -> clear error now, not mid-generation
    expected = max((e.offset + e.span for e in entries.values()), default=0)
    if any(e.offset % ALIGN for e in entries.values()):
        raise MoeError(f"{mpath}: an expert offset is not {ALIGN}-aligned")
    epath = path / EXPERTS
    if not epath.is_file():
        raise MoeError(f"{path}: {EXPERTS} is missing")
    size = epath.stat().st_size
    if size != expected:
        what = "truncated" if size < expected else "longer than its manifest"
        raise MoeError(f"{epath}: {size} bytes, the manifest expects {expected}: the store is {what}; "
                       f"convert again")
    if not (path / BACKBONE).is_file():
        raise MoeError(f"{path}: {BACKBONE} is missing")
    return Store(path, m, entries)
