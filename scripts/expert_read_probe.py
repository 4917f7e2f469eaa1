"""The disk as a miss reads it, two ways, alternating: whole experts of a store through its DiskTier, `workers`
in flight, into reused page-aligned buffers faulted in beforehand (store.tiers.measure_expert_reads, what the bench
records as disk_loader_bw) and into a fresh buffer per read (its page faults inside the read), plus the bench's
temp-file probes (hardware.measure_disk). GB/s per round.

    PYTHONPATH=. python scripts/expert_read_probe.py STORE [--rounds 3] [--workers 2] [--mib 512]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from moe_offload.hardware import measure_disk
from moe_offload.store.tiers import measure_expert_reads
from moe_offload.store.format import open_store
from moe_offload.store.tiers import DiskTier


def fresh_buffers(store, workers: int, nbytes: int) -> float:
    entries = sorted(store.entries.values(), key=lambda e: e.offset)
    span = max(e.span for e in entries)
    n = max(1, min(len(entries), max(workers, nbytes // span)))
    pick = [entries[i * len(entries) // n] for i in range(n)]
    disk = DiskTier(store.experts_path)
    try:
        disk.verified.update(e.key for e in pick)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as ex:
            done = sum(b.numel() for b in ex.map(disk.read, pick))
        return done / (time.perf_counter() - t0)
    finally:
        disk.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--mib", type=int, default=512)
    a = ap.parse_args(argv)
    store = open_store(a.store)
    nbytes = a.mib << 20
    for r in range(a.rounds):
        reused = measure_expert_reads(store, a.workers, nbytes)
        fresh = fresh_buffers(store, a.workers, nbytes)
        files = measure_disk(store.path, nbytes)
        print(f"round {r}: whole experts, reused buffers {reused / 1e9:.2f} GB/s, fresh buffers {fresh / 1e9:.2f}; "
              + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in files.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
