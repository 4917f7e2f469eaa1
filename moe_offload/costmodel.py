"""Bytes of a quantized weight and the choice "compute a missed expert on the CPU, or move it to the device".

Pure arithmetic, no I/O: the planner, the simulator and (later) the runtime call the same functions.

Bytes. A weight at 16 bits is 2 bytes (bf16/fp16). At b in {8, 4, 3, 2} bits (HQQ / round-to-nearest with
asymmetric groups) the codes are packed densely, b/8 bytes per weight, and each group of `group_size`
weights along the input dimension carries one fp16 scale and one fp16 zero: 4 bytes per group. So
4-bit g64 = 0.5 + 4/64 = 0.5625 bytes per weight (4.5 bits), 2-bit g64 = 0.3125. Packings that waste bits
(e.g. 10 3-bit codes per int32 = 3.2 bits) or quantized scales change this; the store's manifest has the
exact bytes of what was written, this is the planning figure.

CPU vs device. A missed expert that sits in host RAM can be computed where it is (CPU GEMV reads its
bytes once per layer from RAM) or copied over the link and computed on the device:

    cpu    = max(cpu_bytes / cpu_bw, 2 * params * tokens / cpu_flops)
    device = latency + nbytes / link_bw + max(nbytes / device_bw, 2 * params * tokens / device_flops)

For one decode token both are bandwidth-bound: the CPU wins when its GEMV bandwidth beats the link
(Fiddler's observation). For a batch the CPU turns compute-bound and the device wins from
`crossover_tokens` on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UsageError

BITS = (16, 8, 4, 3, 2)  # the expert precisions the planner considers, highest first
META_BYTES_PER_GROUP = 4  # one fp16 scale + one fp16 zero per group
CPU_MIN_KERNEL_BITS = 4  # no 2/3-bit CPU kernel in torch: such experts are expanded to int4pack to compute


def _check(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise UsageError(f"expert bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    if bits != 16 and group_size < 1:
        raise UsageError(f"group size must be >= 1, got {group_size}")


def bytes_per_param(bits: int, group_size: int = 64) -> float:
    """Bytes per weight at `bits`, group metadata included (see the module docstring)."""
    _check(bits, group_size)
    if bits == 16:
        return 2.0
    return bits / 8 + META_BYTES_PER_GROUP / group_size


def quant_bytes(n_params: int, bits: int, group_size: int = 64) -> int:
    """Exact bytes of `n_params` weights: codes rounded up to whole bytes, one metadata record per
    started group."""
    _check(bits, group_size)
    if bits == 16:
        return 2 * n_params
    return -(-n_params * bits // 8) + META_BYTES_PER_GROUP * -(-n_params // group_size)


def cpu_compute_bits(bits: int) -> int:
    """Precision the CPU computes at: 2/3-bit blobs are expanded to 4-bit (int4pack) on arrival."""
    return bits if bits == 16 or bits >= CPU_MIN_KERNEL_BITS else CPU_MIN_KERNEL_BITS


@dataclass(frozen=True)
class MissCost:
    where: str  # "cpu" or "device"
    cpu_s: float
    device_s: float
    tokens: int


def cpu_time(params: int, cpu_bytes: int, tokens: int, cpu_bw: float, cpu_flops: float) -> float:
    """Seconds to compute one expert on `tokens` tokens on the CPU, from RAM."""
    return max(cpu_bytes / cpu_bw, 2.0 * params * tokens / cpu_flops)


def device_time(params: int, nbytes: int, tokens: int, link_bw: float, device_bw: float,
                device_flops: float = math.inf, latency_s: float = 0.0) -> float:
    """Seconds to copy one expert over the link and compute it on the device (no overlap)."""
    return latency_s + nbytes / link_bw + max(nbytes / device_bw, 2.0 * params * tokens / device_flops)


def miss_cost(params: int, nbytes: int, tokens: int, *, link_bw: float, cpu_bw: float, cpu_flops: float,
              device_bw: float, device_flops: float = math.inf, latency_s: float = 0.0,
              cpu_bytes: int | None = None) -> MissCost:
    """Where to compute one missed expert (`params` weights, `nbytes` as stored and moved, `cpu_bytes` as
    the CPU reads them, default nbytes) for `tokens` tokens routed to it. Bandwidths in bytes/s."""
    if tokens < 1:
        raise UsageError(f"tokens routed to an expert must be >= 1, got {tokens}")
    c = cpu_time(params, nbytes if cpu_bytes is None else cpu_bytes, tokens, cpu_bw, cpu_flops)
    d = device_time(params, nbytes, tokens, link_bw, device_bw, device_flops, latency_s)
    return MissCost("cpu" if c < d else "device", c, d, tokens)


def crossover_tokens(params: int, nbytes: int, *, link_bw: float, cpu_bw: float, cpu_flops: float,
                     device_bw: float, device_flops: float = math.inf, latency_s: float = 0.0,
                     cpu_bytes: int | None = None, limit: int = 1 << 20) -> int | None:
    """Smallest token count from which the device is at least as fast; None if the CPU wins up to `limit`."""
    kw = dict(link_bw=link_bw, cpu_bw=cpu_bw, cpu_flops=cpu_flops, device_bw=device_bw,
              device_flops=device_flops, latency_s=latency_s, cpu_bytes=cpu_bytes)
    if miss_cost(params, nbytes, limit, **kw).where == "cpu":
        return None
    lo, hi = 1, limit  # cpu time grows with tokens faster than device time: bisect the first "device"
    while lo < hi:
        mid = (lo + hi) // 2
        if miss_cost(params, nbytes, mid, **kw).where == "device":
            hi = mid
        else:
            lo = mid + 1
    return lo
