"""What one miss of a 4-bit expert costs on this CPU: decode time (blob in RAM -> callable unit) and the bytes
the unit keeps, per int4 nibble order the blob may be stored in (`layout`: kernels.LAYOUTS; the host's own
order is a view, another is reordered once per load).

    PYTHONPATH=. python scripts/int4_miss_cost.py [--hidden 4096 --intermediate 14336 --reps 10]

Prints one line per layout: ms per decode (median of --reps), resident bytes / blob bytes, RSS growth over
the reps (each rep holds a copy of the blob and its unit; the last is freed first). Runs on trees that
predate the layout field too (the field is then ignored: legacy b64 order).

Measured 2026-12-03 (AVX2 EPYC, 1 thread, busy 2-core box), ms per miss / held ÷ blob:
  --hidden 1024 --intermediate 3584   before: 90.4 / 2.055×   after: host order b32 0.88 / 1.117×, b64 12.6 /
                                      1.055×, p32 59.8 / 1.055×
  (Mixtral 4096×14336, --reps 5/3)   before: 9678 / 2.055×   after: b32 66 / 1.117×, b64 561 / 1.055×
The host order's 1.117× is the blob (codes + 8-bit meta) plus the bf16 meta the kernel takes (4 B per group
of 64); reordered units hold codes + bf16 meta only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moe_offload.experts import ExpertShape
from moe_offload.quant.codec import HQQCodec
from moe_offload.store.cache import unit_bytes
from moe_offload.utils import proc_status_bytes, reset_peak_rss


def status(key: str) -> float:
    """/proc/self/status `key` in MiB (VmRSS, VmHWM)."""
    return proc_status_bytes(key) / 2**20


def reset_peak() -> float:
    """VmHWM := VmRSS; returns that RSS in MiB."""
    return reset_peak_rss() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    try:
        from moe_offload.quant.kernels import LAYOUTS, host_layout
        layouts, host = list(LAYOUTS), host_layout()
    except ImportError:  # a tree without layouts: the one (b64) order it writes
        layouts, host = [None], None
    D, I = a.hidden, a.intermediate
    shape = ExpertShape(D, I)
    g = torch.Generator().manual_seed(0)
    gate, up, down = (torch.randn(n, k, generator=g) * 0.02 for n, k in ((I, D), (I, D), (D, I)))
    x = torch.randn(1, D, generator=g).to(torch.bfloat16)
    print(f"expert {D}x{I}, 4-bit g64 meta8; torch {torch.__version__}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, host int4 order {host}")
    for layout in layouts:
        spec = {"name": "hqq", "bits": 4, "quantizer": "rtn", **({"layout": layout} if layout else {})}
        codec = HQQCodec(spec)
        blob = codec.encode(gate, up, down)
        ref = None
        times, rss0 = [], reset_peak()
        with torch.inference_mode():
            for _ in range(a.reps):
                b = blob.clone()  # a fresh read buffer per miss, as from disk
                t0 = time.perf_counter()
                unit = codec.decode(b, shape)
                times.append(time.perf_counter() - t0)
                del b
                y = unit(x)
                ref = y if ref is None else ref
                assert torch.equal(y, ref)
            held = unit_bytes(unit)
            del unit
        peak = status("VmHWM")
        tag = (layout or "b64 (legacy)") + (" = host" if layout == host else "")
        print(f"{tag:>16}: decode {statistics.median(times) * 1e3:7.2f} ms/miss, unit holds "
              f"{held / 2**20:6.2f} MiB for a "
              f"{blob.numel() / 2**20:.2f} MiB blob ({held / blob.numel():.3f}x), "
              f"RSS after {a.reps} misses +{status('VmRSS') - rss0:.0f} MiB, peak +{peak - rss0:.0f} MiB")


if __name__ == "__main__":
    main()
