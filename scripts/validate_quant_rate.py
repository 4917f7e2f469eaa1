"""The planner's quantize-time probe against a measured `quantize` run: `plan.quantize_rate` (one slice of an
expert encoded by the store's codec, < 5 s) for each quantizer at the given widths, and the time it predicts for
`--experts` experts next to a measured wall time.

    PYTHONPATH=. python scripts/validate_quant_rate.py [--hidden 4096 --intermediate 14336 --experts 32]
        [--measured-s 251.2] [--quantizers rtn,hqq] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--experts", type=int, default=32, help="experts the measured run quantized")
    p.add_argument("--measured-s", type=float, default=None, help="the measured run's wall seconds")
    p.add_argument("--quantizers", default="rtn,hqq")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    import torch

    from moe_offload.plan import quantize_rate

    if a.threads:
        torch.set_num_threads(a.threads)
    src = a.experts * 3 * a.hidden * a.intermediate * 2
    print(f"{a.experts} experts {a.hidden}x{a.intermediate}: {src / 1e9:.2f} GB of bf16 weights; "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}")
    for q in a.quantizers.split(","):
        t0 = time.perf_counter()
        r = quantize_rate(a.hidden, a.intermediate, a.bits, q)
        est = src / r["rate"]
        cmp = f"; measured {a.measured_s:.1f} s: measured / predicted {a.measured_s / est:.2f}" if a.measured_s else ""
        print(f"{q}: probe {a.hidden}x{r['rows']} slice in {r['seconds']:.2f} s ({time.perf_counter() - t0:.1f} s "
              f"with its sizing encode) = {r['rate'] / 1e6:.1f} MB/s -> predicted {est:.0f} s{cmp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
