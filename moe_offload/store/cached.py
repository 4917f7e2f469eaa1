"""Stores converted on the fly when a Hugging Face folder is opened with --memory: where they live, what keys
them, and how they are listed and removed (`moe-offload stores`).

    $MOE_OFFLOAD_CACHE, else $XDG_CACHE_HOME/moe-offload/stores, else ~/.cache/moe-offload/stores
        NAME-KEY/    a store whose manifest records cache_source (the folder) and cache_key

KEY hashes the source's content as cheaply as it can be seen: config.json's bytes, the name, size and mtime of
every weight, index and copied file, and the dtype. A changed source gets a new entry and its stale one goes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import checkpoint_dtype, read_config, read_json
from ..errors import MoeError, UsageError
from ..utils import DTYPE_NAMES, mib
from .format import COPIED, MANIFEST, Store, convert, open_store


def cache_root() -> Path:
    if os.environ.get("MOE_OFFLOAD_CACHE"):
        return Path(os.environ["MOE_OFFLOAD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moe-offload" / "stores"


def source_key(hf_dir: Path, dtype_name: str) -> str:
    h = hashlib.sha256((hf_dir / "config.json").read_bytes())
    for p in sorted(hf_dir.iterdir()):
        if p.is_file() and (p.suffix == ".safetensors" or p.name.endswith(".index.json") or p.name in COPIED):
            st = p.stat()
            h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    h.update(dtype_name.encode())
    return h.hexdigest()[:12]


@dataclass
class Entry:
    path: Path
    source: Path
    key: str
    dtype: str
    nbytes: int
    used: float  # last opened (the manifest's mtime), seconds since the epoch

    def stale(self) -> bool:
        """The source is gone or no longer what the entry was made from."""
        try:
            return source_key(self.source, self.dtype) != self.key
        except OSError:
            return True


def entries(root: Path | None = None) -> list[Entry]:
    """The cache's entries that we made (a store manifest with cache_source), least recently used first."""
    root = root or cache_root()
    out = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            m = read_json(p / MANIFEST)
            src, key, dtype = m["cache_source"], m["cache_key"], m["dtype"]
            nbytes = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
            used = (p / MANIFEST).stat().st_mtime
        except (MoeError, KeyError, OSError, TypeError):
            continue
        if isinstance(src, str) and isinstance(key, str) and isinstance(dtype, str) and not p.is_symlink():
            out.append(Entry(p, Path(src), key, dtype, nbytes, used))
    return sorted(out, key=lambda e: e.used)


def store_for(hf_dir: Path, dtype: torch.dtype | None) -> Store:
    """The store converted from an HF folder, made once under cache_root() and keyed by its content (one
    stderr line when it is made; older entries of the same folder are removed then)."""
    config = read_config(hf_dir)
    dt = DTYPE_NAMES[dtype or checkpoint_dtype(config)]
    source, key = hf_dir.resolve(), source_key(hf_dir, dt)
    out = cache_root() / f"{source.name}-{key}"
    if out.is_dir():
        try:
            store = open_store(out)
            os.utime(out / MANIFEST)  # last used
            return store
        except MoeError as e:
            print(f"moe-offload: cached store {out} is unusable ({e}); converting again", file=sys.stderr)
    stale = [e for e in entries() if e.source == source and e.path != out]
    weights = sum(p.stat().st_size for p in hf_dir.glob("*.safetensors"))
    print(f"moe-offload: converting {hf_dir} into an expert store at {out} (once; about {mib(weights)} "
          "on disk"
          + (f", replacing {len(stale)} stale cop{'y' if len(stale) == 1 else 'ies'}" if stale else "")
          + "; `moe-offload stores` lists and removes them)", file=sys.stderr)
    store = convert(hf_dir, out, getattr(torch, dt), overwrite=True,
                    extra={"cache_source": str(source), "cache_key": key})
    for e in stale:
        shutil.rmtree(e.path, ignore_errors=True)
    return store


def remove(path: str | os.PathLike) -> Entry:
    """Remove one cache entry; anything that is not an entry we made is refused."""
    real = Path(path).resolve()
    for e in entries():
        if e.path.resolve() == real:
            shutil.rmtree(e.path)
            return e
    raise UsageError(f"{path} is not a store in the moe-offload cache ({cache_root()}); nothing removed")


def format_entries(rows: list[Entry]) -> str:
    lines = [f"{'size':>11}  {'last used':<16}  path  <-  source"]
    for e in rows:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.used))
        lines.append(f"{mib(e.nbytes):>11}  {used:<16}  {e.path}  <-  {e.source}"
                     + ("  (stale: source gone or changed)" if e.stale() else ""))
    return "\n".join(lines)
