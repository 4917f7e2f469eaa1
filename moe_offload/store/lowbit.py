"""2-bit stand-ins for missed experts (HOBBIT-style): --miss-fallback lowbit, --fallback-threshold W.

Every routed expert gets a 2-bit HQQ copy (the "hqq" codec of quant/codec.py: group 32, 8-bit meta, the
HQQ optimiser) that stays resident on the compute device for the whole run and is counted in --memory like
the backbone. When a needed expert is a miss (neither cached nor on its way: it would stall) and the routing
weight of every token that uses it is below W, the layer computes the stand-in at once instead of waiting.
The full-precision expert is NOT loaded for it: a use at low weight says little about the next use, and
loading it would spend the disk bandwidth and cache room the fallback just saved. A miss with any weight
>= W loads as usual. Tokens change by design, so this is off by default and exactness tests keep it off.

Where the copies come from: `experts_lowbit.bin` + `experts_lowbit.json` beside experts.bin. The first open
with --miss-fallback lowbit quantizes every expert from its full blob (one at a time) and saves them there
(`moe-offload lowbit --model STORE` does the same offline, e.g. with --quantizer rtn, ~16x faster); later
opens read them after checking the spec and that every source blob's crc32 is unchanged. A store folder we
cannot write gets its copies rebuilt in memory at every open. Experts with biases (gpt-oss) have no 2-bit
stand-in codec and are refused.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..codecs import make_codec
from ..errors import MoeError, UsageError
from ..experts import DenseExpert, ExpertShape
from .cache import unit_bytes
from .format import Key, Store, crc32_hex, open_store
from .tiers import DiskTier

SPEC = {"name": "hqq", "bits": 2, "group_size": 32, "meta_bits": 8, "rank": 0, "quantizer": "hqq"}
BIN, INDEX = "experts_lowbit.bin", "experts_lowbit.json"


@dataclass
class StandIns:
    units: dict[Key, Callable]  # decoded on the compute device
    nbytes: int  # what they hold there
    source: str  # how they were obtained (for engine.info)


def full_weights(codec, blob: torch.Tensor, shape: ExpertShape) -> tuple[torch.Tensor, ...]:
    """gate, up [I, D], down [D, I] in fp32 as the expert's own codec computes with them."""
    if hasattr(codec, "dequantize"):  # hqq: the weights its kernels use, low-rank correction included
        gate_up, down = codec.dequantize(blob, shape)
    else:
        unit = codec.decode(blob, shape, torch.float32)
        if not isinstance(unit, DenseExpert):
            raise MoeError(f"--miss-fallback lowbit: cannot read weights of codec {codec.spec}")
        gate_up, down = unit.gate_up, unit.down
    gate, up = gate_up.float().chunk(2)
    return gate, up, down.float()


def build(store: Store, spec: dict = SPEC, log=None) -> dict[Key, torch.Tensor]:
    """The 2-bit blob of every expert, quantized from its verified full blob, one expert at a time."""
    shape = store.expert_shape
    if shape.bias:
        raise MoeError(f"--miss-fallback lowbit: {store.model_type} experts have biases; there is no 2-bit "
                       f"stand-in codec for them")
    low = make_codec(spec)
    disk, out = DiskTier(store.experts_path), {}
    codecs: dict[str, object] = {}
    t0 = time.perf_counter()
    try:
        for i, (k, e) in enumerate(sorted(store.entries.items())):
            codec = codecs.setdefault(json.dumps(e.codec, sort_keys=True), make_codec(e.codec))
            out[k] = low.encode(*full_weights(codec, disk.read(e)[:e.nbytes], shape))
            if log is not None and (i + 1) % 64 == 0:
                log(f"  {i + 1}/{len(store.entries)} experts in {time.perf_counter() - t0:.0f} s")
    finally:
        disk.close()
    return out


def save(store: Store, blobs: dict[Key, torch.Tensor], spec: dict = SPEC) -> None:
    """experts_lowbit.bin, then its index (the index's presence marks a complete file); each via rename."""
    entries, offset = [], 0
    tmp_bin = store.path / f".{BIN}.tmp-{os.getpid()}"
    try:
        with open(tmp_bin, "wb") as f:
            for k in sorted(blobs):
                data = blobs[k].numpy().data
                f.write(data)
                entries.append([k[0], k[1], offset, len(data), crc32_hex(data), store.entries[k].checksum])
                offset += len(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_bin, store.path / BIN)
    finally:
        tmp_bin.unlink(missing_ok=True)
    index = {"spec": spec, "bytes": offset, "entries": entries}
    tmp = store.path / f".{INDEX}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(index))
    os.replace(tmp, store.path / INDEX)


def _layout(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k != "quantizer"}  # how codes were fitted does not change decode


def read(store: Store) -> tuple[dict[Key, torch.Tensor], str] | None:
    """(the saved blobs, their quantizer), or None when absent, of another layout, stale (a source blob
    changed) or damaged."""
    ipath, bpath = store.path / INDEX, store.path / BIN
    if not ipath.is_file() or not bpath.is_file():
        return None
    try:
        index = json.loads(ipath.read_text())
        if _layout(index["spec"]) != _layout(SPEC) or bpath.stat().st_size != index["bytes"]:
            return None
        quantizer = str(index["spec"]["quantizer"])
        entries = {(int(a), int(b)): (int(off), int(n), crc, src)
                   for a, b, off, n, crc, src in index["entries"]}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        return None
    if set(entries) != set(store.entries) or any(entries[k][3] != e.checksum
                                                 for k, e in store.entries.items()):
        return None
    out = {}
    fd = os.open(bpath, os.O_RDONLY)
    try:
        for k, (off, n, crc, _) in sorted(entries.items()):
            buf = torch.empty(n, dtype=torch.uint8)
            view = memoryview(buf.numpy()).cast("B")
            if os.preadv(fd, [view], off) != n or crc32_hex(view) != crc:
                return None
            out[k] = buf
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # they now live in our tensors only
    finally:
        os.close(fd)
    return out, quantizer


def log_stderr(msg: str) -> None:
    print(f"moe-offload: {msg}", file=sys.stderr)


def stand_ins(store: Store, device: torch.device, dtype: torch.dtype, log=log_stderr) -> StandIns:
    """Read (or build once and save) the 2-bit copies and decode them on `device`."""
    got = read(store)
    blobs, source = (got[0], f"read from {BIN} ({got[1]})") if got is not None else (None, "")
    if blobs is None:
        log(f"building 2-bit stand-ins of {len(store.entries)} experts for --miss-fallback lowbit (once)")
        blobs = build(store, log=log)
        try:
            save(store, blobs)
            source = f"built at open, saved to {BIN}"
        except OSError as e:
            source = f"built at open (not saved: {e.strerror or e})"
    low, units, nbytes = make_codec(SPEC), {}, 0
    with torch.inference_mode():
        for k, blob in blobs.items():
            unit = low.decode(blob.to(device), store.expert_shape, dtype)
            units[k] = unit
            nbytes += unit_bytes(unit)
    return StandIns(units, nbytes, source)


# ---- command line ------------------------------------------------------------------------------------------


def add_args(p) -> None:
    p.add_argument("--model", required=True, help="expert store folder")
    p.add_argument("--quantizer", default="hqq", choices=["hqq", "rtn"],
                   help="hqq (default, what an open builds) or rtn (round to nearest: ~16x faster, "
                        "less exact)")


def run(a) -> int:
    path = Path(a.model)
    if not (path / "manifest.json").is_file():
        raise UsageError(f"--model {path}: not an expert store (convert it first)")
    store = open_store(path)
    spec = {**SPEC, "quantizer": a.quantizer}
    t0 = time.perf_counter()
    blobs = build(store, spec, log=log_stderr)
    save(store, blobs, spec)
    n = sum(b.numel() for b in blobs.values())
    print(f"wrote {len(blobs)} 2-bit stand-ins ({n / 2**20:.1f} MiB, {a.quantizer}) in "
          f"{time.perf_counter() - t0:.1f} s -> {path / BIN}")
    return 0
