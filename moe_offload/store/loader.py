"""Asynchronous expert loads: a few worker threads, a priority queue, cancellable handles, and on CUDA a
copy stream for host->device copies.

Threads suffice: `os.preadv`, `zlib.crc32` and torch copies release the GIL, so reads overlap compute.
Work in flight is bounded twice: by the workers (at most `workers` reads at once) and by the cache, which
submits a load only after reserving its bytes in the budget. Lower priority values run first: demand
loads (DEMAND) before prefetches (PREFETCH + the prefetcher's own rank).
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable

import torch

DEMAND, PREFETCH = 0, 100

_QUEUED, _RUNNING, _DONE, _CANCELLED = range(4)


class Handle:
    """A Future-like view of one load: cancel() before it starts, result() to wait, callbacks when done."""

    __slots__ = ("fn", "priority", "state", "value", "error", "cond", "callbacks", "loader")

    def __init__(self, fn: Callable, priority: float, loader: "Loader"):
        self.fn, self.priority, self.loader = fn, priority, loader
        self.state, self.value, self.error = _QUEUED, None, None
        self.cond = loader.cond  # one lock for the whole pool: states change under it
        self.callbacks: list[Callable[["Handle"], None]] = []

    def cancel(self) -> bool:
        """True if the load will never run (it was still queued, or already cancelled)."""
        with self.cond:
            if self.state == _QUEUED:
                self.state = _CANCELLED
                self.fn = None  # let go of what the load held (its read buffer) while the heap still lists it
            return self.state == _CANCELLED

    def cancelled(self) -> bool:
        return self.state == _CANCELLED

    def running(self) -> bool:
        return self.state == _RUNNING

    def done(self) -> bool:
        return self.state in (_DONE, _CANCELLED)

    def set_priority(self, priority: float) -> None:
        """Move a queued load (e.g. a prefetch that a layer now needs) to `priority`."""
        with self.cond:
            if self.state == _QUEUED and priority != self.priority:
                self.priority = priority
                self.loader._push(self)

    def add_done_callback(self, fn: Callable[["Handle"], None]) -> None:
        """`fn(handle)` runs in the worker that finishes the load, or now if it has finished."""
        with self.cond:
            if not self.done():
                self.callbacks.append(fn)
                return
        fn(self)

    def result(self, timeout: float | None = None):
        with self.cond:
            if not self.cond.wait_for(self.done, timeout):
                raise TimeoutError("expert load did not finish in time")
        if self.state == _CANCELLED:
            raise RuntimeError("expert load was cancelled")
        if self.error is not None:
            raise self.error
        return self.value


class Loader:
    """A small pool of daemon threads running submitted loads by priority (FIFO within a priority)."""

    def __init__(self, workers: int = 2):
        self.cond = threading.Condition()
        self.heap: list[tuple[float, int, Handle]] = []
        self.seq = itertools.count()
        self.closed = False
        self.threads = [threading.Thread(target=self._work, name=f"moe-loader-{i}", daemon=True)
                        for i in range(workers)]
        for t in self.threads:
            t.start()

    def _push(self, h: Handle) -> None:  # under self.cond; stale entries (old priority) are skipped later
        heapq.heappush(self.heap, (h.priority, next(self.seq), h))
        self.cond.notify()

    def submit(self, fn: Callable[[], object], priority: float = DEMAND) -> Handle:
        h = Handle(fn, priority, self)
        with self.cond:
            if self.closed:
                raise RuntimeError("loader is closed")
            self._push(h)
        return h

    def _next(self) -> Handle | None:
        with self.cond:
            while True:
                while self.heap:
                    prio, _, h = heapq.heappop(self.heap)
                    if h.state == _QUEUED and h.priority == prio:
                        h.state = _RUNNING
                        return h
                if self.closed:
                    return None
                self.cond.wait()

    def _work(self) -> None:
        while (h := self._next()) is not None:
            try:
                h.value = h.fn()
            except BaseException as e:  # handed to whoever waits on the handle
                h.error = e
            with self.cond:
                h.state = _DONE
                h.fn = None
                callbacks, h.callbacks = h.callbacks, []
                self.cond.notify_all()
            for fn in callbacks:
                fn(h)
            h = callbacks = None  # an idle worker must not keep its last load (and its read buffer) alive

    def close(self) -> None:
        with self.cond:
            self.closed = True
            for _, _, h in self.heap:
                if h.state == _QUEUED:
                    h.state = _CANCELLED
            self.heap.clear()
            self.cond.notify_all()
        # let a load in progress finish: a daemon thread still inside torch when the interpreter exits
        # aborts the process ("terminate called without an active exception")
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(timeout=10)


class CopyStream:
    """Host->device copies (and the decode that follows) on a side stream, from pinned staging buffers.

    The worker records an event after the copy + decode and waits on it, so a finished load is usable by
    any stream. Tensors made here are allocated on the copy stream: the cache calls `hand_over` before the
    compute stream uses them, so the caching allocator does not reuse their memory for a later copy while
    kernels queued on the compute stream may still read it.
    """

    def __init__(self, device: torch.device):
        assert device.type == "cuda"
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def upload(self, blob: torch.Tensor, decode: Callable[[torch.Tensor], object]):
        """blob: pinned uint8 host tensor -> decode(device copy of it), run on the copy stream."""
        with torch.cuda.stream(self.stream):
            dev = torch.empty(blob.numel(), dtype=torch.uint8, device=self.device)
            dev.copy_(blob, non_blocking=True)
            unit = decode(dev)
            event = torch.cuda.Event()
            event.record(self.stream)
        event.synchronize()  # blocks this worker only; `blob` may be reused once the copy is done
        return unit

    def hand_over(self, tensors: list[torch.Tensor]) -> None:
        compute = torch.cuda.current_stream(self.device)
        for t in tensors:
            t.record_stream(compute)
