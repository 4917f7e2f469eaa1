"""Which files of moe_offload one offloaded decode step runs: the bundled model as an expert store under
--memory 50% (defaults otherwise), one prompt prefilled and a few tokens decoded to warm the cache, then one
more decode step traced (sys.settrace in the compute thread, threading.settrace in the loader workers).
Prints per file: lines executed / lines in the file; then the totals.

    PYTHONPATH=$PWD python scripts/decode_walk.py
"""

from __future__ import annotations

import sys
import tempfile
import threading
from collections import defaultdict
from pathlib import Path

import moe_offload
from moe_offload.runtime.engine import DEFAULT_MODEL
from moe_offload import load
from moe_offload.store.format import convert

ROOT = Path(moe_offload.__file__).resolve().parent


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        convert(DEFAULT_MODEL, store)
        engine = load(store, dtype="float32", memory="50%")
        batch = engine.batch()
        batch.add(prompt="The router picks", max_new_tokens=8, ignore_eos=True)
        for _ in range(4):  # prefill, then decode steps: the cache is warm and still misses now and then
            batch.step()
        hits: dict[str, set[int]] = defaultdict(set)

        def tracer(frame, event, arg):
            path = frame.f_code.co_filename
            if not path.startswith(str(ROOT)):
                return None
            hits[path].add(frame.f_lineno)
            return tracer

        threading.settrace(tracer)
        sys.settrace(tracer)
        try:
            batch.step()
        finally:
            sys.settrace(None)
            threading.settrace(None)
        batch.close()
    total_files = total_lines = run = 0
    for path in sorted(hits):
        n = len(Path(path).read_text().splitlines())
        print(f"{Path(path).relative_to(ROOT.parent)}: {len(hits[path])} lines run of {n}")
        total_files, total_lines, run = total_files + 1, total_lines + n, run + len(hits[path])
    print(f"total: {total_files} files, {total_lines} lines in them, {run} lines run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
