"""Quantized bytes and the CPU-vs-device choice for a missed expert, with the arithmetic spelled out."""

import math

import pytest

from moe_offload.costmodel import bytes_per_param, cpu_compute_bits, crossover_tokens, miss_cost, quant_bytes
from moe_offload.errors import UsageError


def test_bytes_per_param_includes_group_metadata():
    assert bytes_per_param(16) == 2.0
    assert bytes_per_param(8, 64) == 1 + 4 / 64
    assert bytes_per_param(4, 64) == 0.5625  # 4.5 bits
    assert bytes_per_param(3, 64) == 3 / 8 + 4 / 64
    assert bytes_per_param(2, 16) == 0.25 + 0.25  # small groups double a 2-bit expert
    with pytest.raises(UsageError):
        bytes_per_param(5)


def test_quant_bytes_exact():
    mixtral_expert = 3 * 4096 * 14336  # 176,160,768 weights
    assert quant_bytes(mixtral_expert, 16) == 352_321_536
    # 4-bit g64: 88,080,384 bytes of codes + 2,752,512 groups x 4 bytes
    assert quant_bytes(mixtral_expert, 4, 64) == 88_080_384 + 11_010_048 == 99_090_432
    assert quant_bytes(mixtral_expert, 4, 64) == mixtral_expert * bytes_per_param(4, 64)
    # partial bytes and partial groups round up: 10 weights at 3 bits = 30 bits -> 4 bytes, 1 group of 64
    assert quant_bytes(10, 3, 64) == 4 + 4
    assert cpu_compute_bits(2) == cpu_compute_bits(3) == 4 and cpu_compute_bits(8) == 8


# One expert of 200 M weights stored in 100 MB; link 12 GB/s (PCIe 3.0), CPU GEMV 24 GB/s, CPU 1 TFLOP/s,
# device 360 GB/s with unbounded FLOPs.
HW = dict(link_bw=12e9, cpu_bw=24e9, cpu_flops=1e12, device_bw=360e9, device_flops=math.inf)
P, B = 200_000_000, 100_000_000


def test_one_token_is_computed_on_the_cpu():
    c = miss_cost(P, B, 1, **HW)
    # CPU: max(100e6 / 24e9, 2 * 200e6 * 1 / 1e12) = max(4.1667 ms, 0.4 ms)
    assert c.cpu_s == pytest.approx(100e6 / 24e9)
    # device: 100e6 / 12e9 (copy) + 100e6 / 360e9 (GEMV) = 8.3333 + 0.2778 ms
    assert c.device_s == pytest.approx(100e6 / 12e9 + 100e6 / 360e9)
    assert c.where == "cpu"


def test_large_batch_moves_the_expert_and_the_crossover_is_22_tokens():
    # CPU turns compute-bound: 0.4 ms per token; device stays 8.6111 ms. 0.4 ms * n >= 8.6111 ms <=> n >= 21.53
    assert miss_cost(P, B, 21, **HW).where == "cpu"  # 8.4 ms < 8.611 ms
    assert miss_cost(P, B, 22, **HW).where == "device"  # 8.8 ms > 8.611 ms
    assert crossover_tokens(P, B, **HW) == 22
    big = miss_cost(P, B, 256, **HW)
    assert big.where == "device" and big.cpu_s == pytest.approx(2 * P * 256 / 1e12)


def test_latency_and_cpu_bytes_shift_the_crossover():
    # 1 ms per copy: device 9.6111 ms -> n >= 24.03 -> 25
    assert crossover_tokens(P, B, latency_s=1e-3, **HW) == 25
    # a link faster than the CPU's GEMV: the device wins already at one token
    assert crossover_tokens(P, B, **{**HW, "link_bw": 48e9}) == 1
    # a 2-bit expert (50 MB) that the CPU must read as 4-bit (100 MB): device 50/12e9 + 50/360e9 = 4.3056 ms,
    # CPU 4.1667 ms -> still CPU at one token
    assert miss_cost(P, 50_000_000, 1, cpu_bytes=100_000_000, **HW).where == "cpu"
    with pytest.raises(UsageError):
        miss_cost(P, B, 0, **HW)
