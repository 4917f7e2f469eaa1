"""Small helpers shared by the CLI, the engine and the store: sizes, dtypes, atomic writes."""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from .errors import UsageError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def parse_size(text: str | int | None) -> int | None:
    """'512MiB', '2GiB', '1.5GB', '123' -> bytes."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"bad size {text!r}: use bytes or a number with KiB/MiB/GiB/KB/MB/GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class Share:
    """`--memory 25%`: the backbone plus this fraction of the expert bytes, resolved once sizes are known."""

    fraction: float  # (0, 1]

    def resolve(self, fixed: int, experts: int) -> int:
        """Bytes for `fixed` (backbone, reserve) plus this share of `experts` (all routed experts' bytes)."""
        return fixed + int(self.fraction * experts)


def parse_memory(text: str | int | Share | None) -> int | Share | str | None:
    """--memory: a size ('2GiB'), a share of the model ('25%': backbone + 25 % of the experts) or 'auto'."""
    if text is None or isinstance(text, (int, Share)) or text == "auto":
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*%\s*", str(text))
    if m is None:
        try:
            return parse_size(text)
        except UsageError:
            raise UsageError(f"bad size {text!r}: use a size (512MiB, 2GiB), a share of the model (25%) "
                             "or auto") from None
    pct = float(m.group(1))
    if not 0 < pct <= 100:
        raise UsageError(f"bad share {text!r}: a share of the model is above 0% and at most 100%")
    return Share(pct / 100)


def mib(n: int | float) -> str:
    return f"{n / 2**20:.1f} MiB"


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def pick_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"unknown device {name!r}: choose cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("device cuda requested but torch sees no CUDA device")
    return torch.device(name)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def proc_status_bytes(key: str) -> int | None:
    """A byte figure of this process from /proc/self/status (VmRSS, VmHWM); None where there is none."""
    try:
        with open("/proc/self/status") as f:
            return next((int(x.split()[1]) * 1024 for x in f if x.startswith(key + ":")), None)
    except OSError:
        return None


def reset_peak_rss() -> int:
    """Linux: VmHWM := VmRSS (clear_refs 5): a later peak_rss_bytes() is the peak from here. Returns VmRSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Peak RSS of this process. Linux: VmHWM, because ru_maxrss survives exec and so reports the parent's
    RSS at fork time for a child of a big process (a test runner, a server)."""
    hwm = proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def best_time(fn: Callable[[], object], repeat: int, sync: Callable[[], None] = lambda: None) -> float:
    """Fastest of `repeat` timed calls of `fn`, `sync` (e.g. a CUDA synchronize) around each."""
    best = float("inf")
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def files_under(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The files of `paths` (one path or several; folders walked in sorted order, missing paths skipped)."""
    out = []
    for p in map(Path, [paths] if isinstance(paths, (str, os.PathLike)) else paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file())
        elif p.is_file():
            out.append(p)
    return out


def drop_page_cache(paths: str | os.PathLike | Iterable[str | os.PathLike], sync: bool = False) -> None:
    """Ask the kernel to drop the pages of every file under `paths` (a file, a folder, or several) from the
    page cache, so --memory stays the truth. `sync`: write dirty pages back first (fsync), since the kernel
    keeps those (bench, before a run that must start cold)."""
    for f in files_under(paths):
        fd = os.open(f, os.O_RDONLY)
        try:
            if sync:
                os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now; non-destructive (file pages are read again if used)


@functools.cache
def _libc():
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
MMAP_MAX_DEFAULT, TRIM_DEFAULT = 65536, 128 * 1024


@contextlib.contextmanager
def reuse_freed_memory():
    """Inside: glibc serves every allocation from its heap and keeps what is freed, so the expert-sized
    temporaries of quantizing (hundreds of MB each, many per expert) reuse pages instead of each being a new
    mmap whose every 4 KiB page faults in zeroed and is unmapped again on free. At Mixtral's widths that page
    work was most of `quantize` (a 4-bit RTN expert, 2 threads: 4.4-4.8 s wall, 5.6-6.4 s system time,
    2.4 M page faults, against 1.2 s and no faults from the second expert on with the heap reused;
    scripts/quant_heap.py, docs/bench/quantize-heap/). The price: nothing freed goes back to the system while
    inside, and a freed block is not always reused (whether it is depends on the heap's layout), so the heap
    can grow past the old peak (quantize of the Mixtral-wide model: 4.4 GB peak RSS against 3.4). On leaving,
    glibc's defaults come back and the heap is trimmed. A no-op without glibc's mallopt."""
    libc = _libc()
    ok = libc is not None and hasattr(libc, "mallopt") and libc.mallopt(M_MMAP_MAX, 0) == 1
    if ok:
        libc.mallopt(M_TRIM_THRESHOLD, -1)  # never trim while inside
    try:
        yield ok
    finally:
        if ok:
            libc.mallopt(M_MMAP_MAX, MMAP_MAX_DEFAULT)
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_DEFAULT)
            if hasattr(libc, "malloc_trim"):
                libc.malloc_trim(0)


def _maps_file(addr: int) -> bool:
    """Does `addr` lie in a mapping of a file (/proc/self/maps: an inode and a path)?"""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                span, _, _, _, inode, *path = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in span.split("-"))
                if lo <= addr < hi:
                    return inode != "0" and bool(path) and not path[0].startswith("[")
    except (OSError, ValueError):
        pass
    return False


def page_out(t: torch.Tensor) -> None:
    """Give back the pages behind a CPU tensor that views a mapped file (a safetensors tensor, once copied):
    they leave this process's RSS and the page cache now instead of when the file is closed. Anything else
    (a converted copy: anonymous memory, which would go to swap) is left alone; a no-op where madvise
    refuses."""
    libc = _libc()
    if libc is None or t.device.type != "cpu" or t.nbytes == 0 or not _maps_file(t.data_ptr()):
        return
    page = mmap.PAGESIZE
    start = t.data_ptr() // page * page
    end = -(-(t.data_ptr() + t.nbytes) // page) * page
    libc.madvise(start, end - start, MADV_PAGEOUT)


def tensor_bytes(tensors: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> int:
    """Bytes held by `tensors` (a state dict or any tensors), each counted once per entry."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return sum(t.numel() * t.element_size() for t in values)
