"""Progress of long work on stderr, with a rate and an ETA:

    convert: 12/48 experts (25 %), 35.2 experts/s, 120.3 MB/s, ETA 1.0 s

On a terminal: one live line, redrawn in place at most 10 times a second. Elsewhere (a log, a pipe): a plain
line each time another 10 % is done or `every_s` seconds passed, whichever comes first. `quiet`: nothing.
A tiny printer rather than tqdm: the core package stays free of extra dependencies, and it prints the two
rates convert needs (units/s and MB/s) and plain periodic lines where tqdm writes carriage-return redraws.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def fmt_seconds(s: float) -> str:
    """1.2 s, 45 s, 3 min 05 s, 2 h 03 min."""
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def status(desc: str, done: int, total: int | None, unit: str, elapsed: float, nbytes: int = 0) -> str:
    """One progress line: count (and share), rate(s), ETA; once done, the time it took."""
    rate = done / elapsed if elapsed > 0 else None
    parts = [f"{desc}: {done}/{total} {unit}" + (f" ({100 * done // total} %)" if total else "")
             if total is not None else f"{desc}: {done} {unit}"]
    parts.append(f"{rate:.1f} {unit}/s" if rate is not None else f"- {unit}/s")
    if nbytes:
        parts.append(f"{nbytes / 1e6 / elapsed:.1f} MB/s" if elapsed > 0 else "- MB/s")
    if total is not None and done >= total:
        parts.append(f"done in {fmt_seconds(elapsed)}")
    elif total is not None:
        parts.append(f"ETA {fmt_seconds((total - done) / rate)}" if rate else "ETA ?")
    return ", ".join(parts)


class Progress:
    """`update(n, nbytes)` as work completes; `close()` at the end (or use it as a context manager).
    `total` may be given later with `start(total)` (convert learns it after reading the config)."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", quiet: bool = False,
                 stream: TextIO | None = None, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.desc, self.unit, self.quiet, self.every_s, self.clock = desc, unit, quiet, every_s, clock
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.start(total)

    def start(self, total: int | None) -> Progress:
        self.total, self.done, self.nbytes = total, 0, 0
        self.t0 = self.last = self.clock()
        self.tenths, self.live = 0, False
        return self

    def line(self) -> str:
        return status(self.desc, self.done, self.total, self.unit, self.clock() - self.t0, self.nbytes)

    def update(self, n: int = 1, nbytes: int = 0) -> None:
        self.done += n
        self.nbytes += nbytes
        if self.quiet:
            return
        now = self.clock()
        if self.tty:
            if now - self.last >= 0.1 or (self.total is not None and self.done >= self.total):
                self._draw()
            return
        tenths = 10 * self.done // self.total if self.total else 0
        if tenths > self.tenths or now - self.last >= self.every_s:
            self.tenths = max(tenths, self.tenths)
            self._print()

    def write(self, message: str) -> None:
        """A line of its own on the stream, above the live line on a terminal."""
        if self.tty and self.live and not self.quiet:
            self.stream.write("\r\x1b[K")
        print(message, file=self.stream, flush=True)
        if self.tty and self.live and not self.quiet:
            self._draw()

    def _draw(self) -> None:
        self.stream.write("\r" + self.line() + "\x1b[K")
        self.stream.flush()
        self.last, self.live = self.clock(), True

    def _print(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last = self.clock()

    def close(self) -> None:
        if self.quiet:
            return
        if self.tty:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
        elif self.total is None or self.tenths < 10:  # the last periodic line was not the final count
            self._print()
        self.quiet = True  # closed: later calls print nothing

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif self.tty and self.live and not self.quiet:  # leave the terminal on a fresh line for the error
            self.stream.write("\n")
            self.quiet = True


def add_quiet_arg(p) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
