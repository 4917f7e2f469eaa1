"""Where expert bytes come from: the disk tier (experts.bin) and, on CUDA machines, a pinned host-RAM tier.

The disk tier reads one expert's byte range with one `os.preadv` into a page-aligned buffer we own, with
O_DIRECT where the filesystem takes it (probed once) and otherwise a buffered read followed by
POSIX_FADV_DONTNEED on the range: the OS page cache never silently holds the model, so `--memory` is the
truth. The first read of each expert in a process is checked against the manifest's crc32 (`verify="first"`,
the default; `"always"` checks every read: crc32 costs ~6 ms of CPU per 22 MB expert, twice the read). Every
read also checks, with one fstat and one stat, that experts.bin is still the file opened (device, inode, size,
mtime, ctime): a store rewritten in place or replaced under a running process is refused, not served.

Read buffers come from a `BufferPool`: a fresh anonymous mapping costs a page fault per 4 KiB page on its first
write and an munmap when it dies (~16 ms of CPU per 22 MB expert on our CI box, three times the O_DIRECT read
itself), so the buffer of an evicted expert is read into again once nothing views it any more.
"""

from __future__ import annotations

import mmap
import os
import threading

import torch

from ..errors import MoeError
from .format import ALIGN, ExpertEntry, Key, crc32_hex
from .policies import make_policy


def aligned_buffer(nbytes: int, pinned: bool = False) -> torch.Tensor:
    """uint8 [nbytes] starting on a page boundary. CPU: anonymous mmap (freed by munmap when the tensor
    dies, so RSS really drops on eviction). pinned: page-locked memory for async host->device copies."""
    if not pinned:
        return torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=torch.uint8)[:nbytes]
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=True)
    skip = -raw.data_ptr() % ALIGN
    return raw[skip:skip + nbytes]


def _writable(t: torch.Tensor) -> memoryview:
    return memoryview(t.numpy()).cast("B")


_use_count = getattr(torch._C, "_storage_Use_Count", None)  # references to a storage (tensors, views, wrappers)


class BufferPool:
    """Page-aligned CPU read buffers, reused. Every buffer handed out (as a new view) stays listed; once no
    tensor but ours views it (its expert was evicted, or its load was dropped) it is free and the next `take` of its size
    reads into it. Free buffers still hold RAM, so their owner caps them with `trim(room)` (bytes of its
    budget that no resident expert or load holds). Thread-safe."""

    def __init__(self):
        self.lent: list[tuple[torch.Tensor, int]] = []  # (buffer, its storage's use count when idle)
        self.free: dict[int, list[tuple[torch.Tensor, int]]] = {}
        self.free_bytes = self.reused = self.allocated = 0
        self.lock = threading.Lock()

    @staticmethod
    def _count(buf: torch.Tensor) -> int:
        return _use_count(buf.untyped_storage()._cdata)

    def _reclaim(self) -> None:  # under self.lock
        busy = []
        for buf, idle in self.lent:
            if self._count(buf) <= idle:
                self.free.setdefault(buf.numel(), []).append((buf, idle))
                self.free_bytes += buf.numel()
            else:
                busy.append((buf, idle))
        self.lent = busy

    def take(self, nbytes: int) -> torch.Tensor:
        """uint8 [nbytes], page-aligned: a free buffer of exactly that size, else a new mapping."""
        with self.lock:
            self._reclaim()
            spare = self.free.get(nbytes)
            if spare:
                item = spare.pop()
                self.free_bytes -= nbytes
                self.reused += 1
            else:
                buf = aligned_buffer(nbytes)
                item = (buf, self._count(buf))
                self.allocated += 1
            self.lent.append(item)
            return item[0][:]  # a view of its own: it counts as a user of the storage while it lives

    def trim(self, room: int) -> None:
        """Unmap free buffers (largest first) until they hold at most `room` bytes."""
        with self.lock:
            self._reclaim()
            for size in sorted(self.free, reverse=True):
                spare = self.free[size]
                while spare and self.free_bytes > room:
                    spare.pop()
                    self.free_bytes -= size
            self.free = {k: v for k, v in self.free.items() if v}

    @staticmethod
    def usable() -> bool:
        return _use_count is not None


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


DISK_READS = ("direct", "buffered")
READAHEAD_DROP = 8 << 20  # bytes past a buffered read dropped with it: what the kernel's readahead fetched ahead


class DiskTier:
    """Positional reads of experts.bin; safe to call from several threads at once (pread has no offset).

    reads "direct": O_DIRECT where the filesystem takes it (no page cache at all), else buffered as below.
    "buffered": page-cache reads with the kernel's readahead, each read's pages (and READAHEAD_DROP bytes past
    it, which readahead may have fetched) dropped right after it (POSIX_FADV_DONTNEED), so the weights do not
    stay in the page cache; while a read is in flight its pages are there too. On this project's virtual disk
    a probe read Mixtral-width 4-bit experts (94 MB) buffered at ~2x the O_DIRECT rate, yet decoding under a
    budget ran 0.75-0.82x as fast with buffered reads (the copy out of the page cache takes CPU the experts
    need, and readahead reads past the expert): direct stays the default (docs/benchmarks.md)."""

    def __init__(self, path: str | os.PathLike, pinned: bool = False, verify: str = "first", reads: str = "direct"):
        if verify not in ("first", "always"):
            raise ValueError(f"verify={verify!r}: 'first' or 'always'")
        if reads not in DISK_READS:
            raise ValueError(f"reads={reads!r}: one of {', '.join(DISK_READS)}")
        self.path, self.pinned, self.verify, self.reads = str(path), pinned, verify, reads
        self.verified: set[Key] = set()  # experts whose bytes matched their crc32 in this process
        self.fd, self.direct = self._open()
        self.identity = _identity(os.fstat(self.fd))

    def _open(self) -> tuple[int, bool]:
        if self.reads == "buffered":
            return os.open(self.path, os.O_RDONLY), False
        if hasattr(os, "O_DIRECT") and os.path.getsize(self.path) >= ALIGN:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            except OSError:  # tmpfs and some others refuse O_DIRECT at open
                fd = None
            if fd is not None:
                try:
                    if os.preadv(fd, [_writable(aligned_buffer(ALIGN))], 0) == ALIGN:
                        return fd, True
                except OSError:  # ... or at the first read (EINVAL)
                    pass
                os.close(fd)
        return os.open(self.path, os.O_RDONLY), False

    def read(self, e: ExpertEntry, buf: torch.Tensor | None = None) -> torch.Tensor:
        """One expert's blob, verified: uint8 [span], page-aligned (the first e.nbytes are the blob); into
        `buf` (page-aligned, e.span bytes) when given."""
        if buf is None:
            buf = aligned_buffer(e.span, self.pinned)
        elif buf.numel() != e.span:
            raise ValueError(f"read buffer of {buf.numel()} bytes for an expert span of {e.span}")
        view, done = _writable(buf), 0
        while done < e.span:  # preadv may return short; loop until the padded range is in
            n = os.preadv(self.fd, [view[done:]], e.offset + done)
            if n <= 0:
                raise MoeError(f"{self.path}: layer {e.layer} expert {e.expert}: read stopped at byte "
                               f"{e.offset + done} of {e.offset + e.span} (file truncated?)")
            done += n
        if not self.direct:  # its pages, and what readahead fetched past them
            os.posix_fadvise(self.fd, e.offset, e.span + READAHEAD_DROP, os.POSIX_FADV_DONTNEED)
        self.check_unchanged()
        if self.verify == "first" and e.key in self.verified:
            return buf
        got = crc32_hex(view[:e.nbytes])
        if got != e.checksum:
            raise MoeError(f"{self.path}: checksum mismatch in layer {e.layer} expert {e.expert} (bytes "
                           f"{e.offset}..{e.offset + e.nbytes}: crc32 {got}, manifest {e.checksum}): the "
                           f"store is corrupt, convert the model again")
        self.verified.add(e.key)
        return buf

    def check_unchanged(self) -> None:
        """Refuse to go on when experts.bin was modified (the fd) or replaced or removed (the path) since it
        was opened."""
        try:
            there = _identity(os.stat(self.path))
        except FileNotFoundError:
            there = None
        here = _identity(os.fstat(self.fd))
        if here == self.identity and there == self.identity:
            return
        name = os.path.basename(self.path)
        why = (f"{name} was removed" if there is None
               else f"{name} was replaced" if there[:2] != self.identity[:2]
               else f"{name} is {here[2]} bytes, was {self.identity[2]}" if here[2] != self.identity[2]
               else f"{name} was modified")
        raise MoeError(f"store {os.path.dirname(self.path)} changed on disk while in use ({why}); restart to "
                       f"load it again")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class HostTier:
    """Pinned host RAM between disk and a CUDA device: verified blobs as read from disk, under a byte budget
    and its own replacement policy. Thread-safe (loader workers insert, the compute thread looks up)."""

    def __init__(self, capacity_bytes: int, policy: str, n_layers: int, n_experts: int):
        self.capacity = capacity_bytes
        self.policy = make_policy(policy, n_layers, n_experts, capacity_bytes)
        self.blobs: dict[Key, torch.Tensor] = {}
        self.used = self.peak = self.hits = self.evictions = 0
        self.lock = threading.Lock()

    def get(self, key: Key, step: int) -> torch.Tensor | None:
        with self.lock:
            blob = self.blobs.get(key)
            if blob is not None:
                self.hits += 1
                self.policy.on_access(key, step)
            return blob

    def offer(self, key: Key, blob: torch.Tensor, step: int) -> None:
        """Keep `blob` if the policy admits it and victims make room; else it is only a staging buffer.
        (An evicted blob that a worker is still copying lives on until that copy ends.)"""
        n = blob.numel()
        with self.lock:
            if key in self.blobs or n > self.capacity or not self.policy.should_admit(key, n):
                return
            while self.used + n > self.capacity:
                v = self.policy.victim(key, n, set())
                if v is None:
                    return
                self.used -= self.blobs.pop(v).numel()
                self.policy.on_evict(v)
                self.evictions += 1
            self.blobs[key] = blob
            self.used += n
            self.peak = max(self.peak, self.used)
            self.policy.on_insert(key, n, step)
            self.policy.on_access(key, step)


def measure_expert_reads(store, workers: int = 2, nbytes: int = 512 << 20, reads: str = "direct") -> float:
    """Bytes/s of the engine's own miss reads from `store` (a store.format.Store): whole experts' spans read
    through its DiskTier (`reads`: O_DIRECT where the filesystem takes it, or buffered and dropped after),
    `workers` reads in flight as the loader's workers keep them, each into one of `workers` page-aligned
    buffers faulted in beforehand and reused, as the cache reuses its read buffers. A disk's speed depends on
    the request's size and kind, so the probe reads what a miss reads: experts spread over experts.bin, at
    least `workers`, about `nbytes` in all;
    their checksums are not recomputed (a run verifies an expert on its first read only)."""
    import queue
    import time
    from concurrent.futures import ThreadPoolExecutor

    from ..utils import drop_page_cache

    entries = sorted(store.entries.values(), key=lambda e: e.offset)
    span = max(e.span for e in entries)
    n = max(1, min(len(entries), max(workers, nbytes // span)))
    pick = [entries[i * len(entries) // n] for i in range(n)]
    bufs: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(workers):
        b = aligned_buffer(span)
        b.fill_(1)  # its pages faulted in, as a reused buffer's are
        bufs.put(b)

    def read(e) -> int:
        b = bufs.get()
        try:
            return disk.read(e, b[:e.span]).numel()
        finally:
            bufs.put(b)

    disk = DiskTier(store.experts_path, reads=reads)
    try:
        disk.verified.update(e.key for e in pick)
        if not disk.direct:
            drop_page_cache(store.experts_path, sync=True)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as ex:
            done = sum(ex.map(read, pick))
        return done / (time.perf_counter() - t0)
    finally:
        disk.close()
