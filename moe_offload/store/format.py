"""The expert store on disk: one folder, written once by `convert`, read by the tiers.

    manifest.json         format name + version, the model's config.json, and one entry per routed expert
                          (layer, expert, offset, nbytes, codec spec, crc32)
    experts.bin           each expert one contiguous blob at a 4096-aligned offset, zero-padded to 4096
    backbone.safetensors  every dense tensor (embeddings, attention, norms, routers, shared experts, dense
                          MLPs, lm_head) under its checkpoint name
    tokenizer files, generation_config.json   copied from the Hugging Face folder

`convert` streams one tensor at a time into a temporary folder beside the target and renames it only when
complete, so an interrupted convert leaves nothing under the target name (store/folders.py: what --out may
name, replacing a store, leftovers of killed runs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import (
    FAMILY_KEYS,
    LIMITS,
    SafetensorsFolder,
    check_config,
    check_config_tensors,
    check_keys,
    checkpoint_dtype,
    config_value,
    dequantizing,
    expert_checkpoint_keys,
    expert_tensors,
    model_file,
    read_config,
    read_json,
)
from ..errors import MoeError
from ..codecs import make_codec
from ..experts import GLUS, Codec, DenseCodec, ExpertShape
from ..models import build, get_module
from ..models.base import ACTIVATIONS
from ..utils import DTYPE_NAMES, DTYPES, drop_page_cache, page_out, tensor_bytes
from .folders import FORMAT_NAME, MANIFEST, check_out, store_dir

FORMAT_VERSION = 1
ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffers aligned to the logical block size (<= 4096)
EXPERTS, BACKBONE = "experts.bin", "backbone.safetensors"
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

    def check_backbone(self) -> None:
        """The backbone file against the manifest's crc32 (stores written before the field: not checked)."""
        want = self.manifest.get("backbone_checksum")
        if want is not None and (got := file_crc32(self.path / BACKBONE)) != want:
            raise MoeError(f"{self.path / BACKBONE}: checksum mismatch (crc32 {got}, manifest {want}): the "
                           f"store is corrupt, convert the model again")


# ---- writing ---------------------------------------------------------------------------------------

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def write_safetensors(path: Path, names: list[str], source: SafetensorsFolder, dtype: torch.dtype | None,
                      keep: tuple[str, ...] = ()) -> str:
    """Stream tensors into one safetensors file, one at a time (the header is known from shapes alone).
    Floating tensors are cast to `dtype` when given, except names ending in `keep`. Returns the file's
    crc32."""
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
        data = struct.pack("<Q", len(head)) + head
        f.write(data)
        crc = zlib.crc32(data)
        for name, dt in plan:
            t = source.get(name)
            data = t.to(dt).contiguous().reshape(-1).view(torch.uint8).numpy().data
            f.write(data)
            crc = zlib.crc32(data, crc)
            page_out(t)  # its mapped pages, now (write_experts)
        f.flush()
        os.fsync(f.fileno())
    return f"{crc & 0xFFFFFFFF:08x}"


def file_crc32(path: Path, chunk: int = 16 << 20) -> str:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while data := f.read(chunk):
            crc = zlib.crc32(data, crc)
    return f"{crc & 0xFFFFFFFF:08x}"


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
                for t in parts.values():  # the checkpoint's mapped pages of this expert, now: they added up to
                    page_out(t)  # the whole checkpoint in RSS (quantize of a 12.1 GB model peaked at 14.1 GB)
                n = len(blob)
                f.write(blob)
                f.write(b"\0" * (round_up(n) - n))
                entries.append(ExpertEntry(layer, e, offset, n, dict(c.spec), crc32_hex(blob)))
                offset += round_up(n)
                if progress is not None:
                    progress.update(1, tensor_bytes(parts))
        f.flush()
        os.fsync(f.fileno())
    drop_page_cache(path)  # the store must not sit in the page cache after writing it
    return entries


def files_to_copy(hf_dir: Path) -> list[Path]:
    """The tokenizer and generation files a store takes: only from inside the model folder, JSON files only
    when they are JSON objects (checked before any conversion work)."""
    out = [model_file(hf_dir, name, resolve=True) for name in COPIED if (hf_dir / name).is_file()]
    for src in out:
        if src.suffix == ".json":
            read_json(src)
    return out


def copy_file(src: Path, folder: Path) -> None:
    """Copy into `folder` with permissions no wider than the source's."""
    shutil.copyfile(src, folder / src.name)
    os.chmod(folder / src.name, src.stat().st_mode & (folder / src.name).stat().st_mode & 0o777)


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
    check_out(hf_dir, out_dir, overwrite)
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
    ignore |= {k for k in have if model.skip_checkpoint_key(k)}  # never used by the family (as build_model)
    check_keys(have, set(backbone) | experts, str(hf_dir), ignore)
    copies = files_to_copy(hf_dir)
    store_dtype = dtype or checkpoint_dtype(config)
    if codec is None:
        codec = DenseCodec(store_dtype)
    pick = codec if not hasattr(codec, "encode") else (lambda layer, expert: codec)
    shape = model.expert_shape

    with store_dir(out_dir, overwrite=overwrite) as tmp:
        if progress is not None:
            progress.start(len(moe_layers) * n_experts)
        entries = write_experts(tmp / EXPERTS, source, model_type, moe_layers, n_experts, pick, progress)
        keep = model.fp32_keys  # kept in fp32 whatever the dtype (as build_model)
        bsource, bnames = source, backbone
        if backbone_view is not None:
            bsource, bnames, keep = backbone_view(source, backbone, keep)
        backbone_crc = write_safetensors(tmp / BACKBONE, bnames, bsource, store_dtype, keep)
        for src in copies:
            copy_file(src, tmp)
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
            "backbone_checksum": backbone_crc,  # crc32 of the whole file, checked when a model is opened
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; a store is an ordinary folder
    return open_store(out_dir)


# ---- reading -----------------------------------------------------------------------------------------

def open_store(path: str | os.PathLike) -> Store:
    """Parse and check a store folder before anything is sized from it: format and version, every count and
    entry against the config and experts.bin's size, the config against the backbone's tensors."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise MoeError(f"{path}: no {MANIFEST} (not an expert store)")
    m = read_json(mpath)
    if m.get("format") != FORMAT_NAME:
        raise MoeError(f"{mpath}: not a {FORMAT_NAME} manifest (format {m.get('format')!r:.40})")
    if m.get("version") != FORMAT_VERSION:
        raise MoeError(f"{path}: store format version {m.get('version')!r:.20} is not supported; this "
                       f"moe-offload reads version {FORMAT_VERSION}: convert the model again")
    epath = path / EXPERTS
    if not epath.is_file():
        raise MoeError(f"{path}: {EXPERTS} is missing")
    if not (path / BACKBONE).is_file():
        raise MoeError(f"{path}: {BACKBONE} is missing")
    try:
        entries = check_manifest(m, mpath, epath.stat().st_size)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MoeError(f"{mpath}: malformed manifest ({type(e).__name__}: {e})") from None
    check_config_tensors(m["config"], SafetensorsFolder(path, single_name=BACKBONE), f"{mpath} (config)")
    return Store(path, m, entries)


def _int(v, lo: int, hi: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{what} must be an integer, got {v!r:.40}")
    if not lo <= v <= hi:
        raise ValueError(f"{what} {v} is out of range ({lo}..{hi})")
    return v


def check_manifest(m: dict, mpath: Path, size: int) -> dict[Key, ExpertEntry]:
    """Every field of a manifest checked, counts before lists are walked: entries fit in experts.bin (`size`
    bytes), aligned, disjoint, one per (moe layer, expert), each as long as its codec says."""
    get_module(m["model_type"])
    config = m["config"]
    if not isinstance(config, dict) or config.get("model_type") != m["model_type"]:
        raise ValueError("config must be the model's config.json, of the same model_type")
    check_config(config, f"{mpath} (config)")
    if m["dtype"] not in DTYPES:
        raise ValueError(f"dtype {m['dtype']!r:.40} is not one of {', '.join(DTYPES)}")
    if _int(m["alignment"], 1, 1 << 30, "alignment") != ALIGN:
        raise MoeError(f"{mpath}: alignment {m['alignment']} is not supported (expected {ALIGN})")
    if "backbone_checksum" in m and not re.fullmatch(r"[0-9a-f]{8}", str(m["backbone_checksum"])):
        raise ValueError("backbone_checksum must be 8 hex digits")
    sh = m["expert_shape"]
    shape = ExpertShape(_int(sh["hidden"], 1, 1 << 17, "expert_shape.hidden"),
                        _int(sh["intermediate"], 1, 1 << 20, "expert_shape.intermediate"),
                        str(sh.get("act", "silu")), bool(sh.get("bias", False)),
                        float(sh.get("swiglu_alpha", 1.702)), float(sh.get("swiglu_limit", 7.0)))
    if shape.act not in ACTIVATIONS and shape.act not in GLUS:
        raise ValueError(f"expert_shape.act {shape.act!r:.40} is not a known activation")
    if shape.hidden != config["hidden_size"]:
        raise ValueError(f"expert_shape.hidden {shape.hidden} is not the config's hidden_size "
                         f"{config['hidden_size']}")
    n_layers = config["num_hidden_layers"]
    layers = [_int(la, 0, n_layers - 1, "a moe_layers entry") for la in m["moe_layers"]]
    if len(set(layers)) != len(layers):
        raise ValueError("moe_layers lists a layer twice")
    n = _int(m["n_experts"], 1, LIMITS["num_experts"], "n_experts")
    want_n = config_value(config, FAMILY_KEYS[m["model_type"]][0][1])
    if n != want_n:
        raise ValueError(f"n_experts {n} is not the config's expert count {want_n}")
    _int(m["top_k"], 1, n, "top_k")
    items = m["experts"]
    if not isinstance(items, list) or len(items) != len(layers) * n:
        got = len(items) if isinstance(items, list) else "none"
        raise ValueError(f"{len(layers)} moe_layers × {n} experts need {len(layers) * n} entries, the list "
                         f"has {got}")
    moe = set(layers)
    entries: dict[Key, ExpertEntry] = {}
    nbytes_of: dict[str, int] = {}  # codec spec -> its blob size for this shape
    for d in items:
        e = ExpertEntry(_int(d["layer"], 0, n_layers - 1, "layer"), _int(d["expert"], 0, n - 1, "expert"),
                        _int(d["offset"], 0, 1 << 62, "offset"), _int(d["nbytes"], 1, 1 << 40, "nbytes"),
                        d["codec"], d["checksum"])
        where = f"layer {e.layer} expert {e.expert}"
        if e.layer not in moe or e.key in entries:
            raise ValueError(f"{where} is " + ("listed twice" if e.key in entries else "not in moe_layers"))
        if e.offset % ALIGN:
            raise MoeError(f"{mpath}: {where}: offset {e.offset} is not {ALIGN}-aligned")
        if not isinstance(e.checksum, str) or not re.fullmatch(r"[0-9a-f]{8}", e.checksum):
            raise ValueError(f"{where}: checksum must be 8 hex digits")
        spec = json.dumps(e.codec, sort_keys=True)
        if spec not in nbytes_of:
            if not isinstance(e.codec, dict):
                raise ValueError(f"{where}: codec must be an object")
            try:  # unknown codec or parameters -> one line now, not mid-generation
                nbytes_of[spec] = make_codec(e.codec).nbytes(shape)
            except (MoeError, KeyError, TypeError, ValueError, ArithmeticError) as err:
                raise MoeError(f"{mpath}: {where}: bad codec {spec:.100} ({err})") from None
        if e.nbytes != nbytes_of[spec]:
            raise MoeError(f"{mpath}: {where}: nbytes {e.nbytes}, its codec's blob is {nbytes_of[spec]}")
        entries[e.key] = e
    end = 0
    for e in sorted(entries.values(), key=lambda e: e.offset):
        if e.offset < end:
            raise MoeError(f"{mpath}: layer {e.layer} expert {e.expert} overlaps the expert before it")
        end = e.offset + e.span
    if size != end:
        what = "truncated" if size < end else "longer than its manifest"
        raise MoeError(f"{mpath.parent / EXPERTS}: {size} bytes, the manifest expects {end}: the store is "
                       f"{what}; convert again")
    return entries
