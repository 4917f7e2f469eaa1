"""The machine probes in hardware.py: one implementation per figure, shared by the simulator's and planner's
`this-machine` profile and by bench's limits."""

from __future__ import annotations

import os

import torch

from moe_offload import hardware
from moe_offload.hardware import measure_disk, measure_disk_read, measure_gemv, measure_ram_read, read_cold

MiB = 1 << 20


def test_bench_disk_methods_and_their_labels(tmp_path):
    out = measure_disk(tmp_path, 4 * MiB, chunk=MiB, streams=2)
    labels = ["O_DIRECT 1 MiB reads", "O_DIRECT 2 x 1 MiB reads in flight", "buffered 1 MiB reads (readahead)"]
    assert labels[2] in out and set(out) <= set(labels) and all(v > 0 for v in out.values())
    assert not list(tmp_path.iterdir())  # the temp file is gone


def test_both_disk_probes_time_the_same_cold_reader(tmp_path, monkeypatch):
    calls = []

    def spy(path, nbytes, chunk, streams=1, direct=True):
        calls.append((os.path.getsize(path), nbytes, chunk, streams, direct))
        return 1.0

    monkeypatch.setattr(hardware, "read_cold", spy)
    assert measure_disk_read(str(tmp_path), nbytes=3 * MiB, chunk=MiB, streams=2) == (
        1.0, "O_DIRECT, 1.0 MiB reads x2 in flight")
    assert calls == [(3 * MiB, 3 * MiB, MiB, 2, True)]
    calls.clear()
    assert measure_disk(tmp_path, 2 * MiB, chunk=MiB, streams=3) == {
        "O_DIRECT 1 MiB reads": 1.0, "O_DIRECT 3 x 1 MiB reads in flight": 1.0,
        "buffered 1 MiB reads (readahead)": 1.0}
    assert calls == [(2 * MiB, 2 * MiB, MiB, 1, True), (2 * MiB, 2 * MiB, MiB, 3, True),
                     (2 * MiB, 2 * MiB, MiB, 1, False)]


def test_disk_read_falls_back_to_buffered_where_o_direct_is_refused(tmp_path, monkeypatch):
    real = read_cold

    def refuse_direct(path, nbytes, chunk, streams=1, direct=True):
        if direct:
            raise OSError(22, "Invalid argument")
        return real(path, nbytes, chunk, streams, direct)

    monkeypatch.setattr(hardware, "read_cold", refuse_direct)
    bw, method = measure_disk_read(str(tmp_path), nbytes=2 * MiB, chunk=MiB)
    assert bw > 0 and method == "buffered after POSIX_FADV_DONTNEED, 1.0 MiB reads"
    assert list(measure_disk(tmp_path, 2 * MiB, chunk=MiB)) == ["buffered 1 MiB reads (readahead)"]
    assert not list(tmp_path.iterdir())


def test_ram_and_gemv_probes_give_best_and_median():
    threads = torch.get_num_threads()
    ram = measure_ram_read(None, nbytes=4 * MiB, repeat=3)
    gemv = measure_gemv(None, "float32", 64, 256, total=MiB, repeat=3)
    assert torch.get_num_threads() == threads  # None leaves torch's threads alone
    for r in (ram, gemv):
        assert set(r) == {"best", "median"} and r["best"] >= r["median"] > 0
    bw, flops = hardware._cpu_gemv(MiB, "float32")
    assert bw > 0 and flops > 0


def test_expert_read_probe_reads_whole_experts_of_the_store_as_a_miss_does(tmp_path):
    """The bench's disk figure for the simulator: the store's own experts read whole through its DiskTier
    (O_DIRECT where it can), a few in flight, as the loader reads a miss; the disk's speed on a virtual disk
    depends on the request's size, so a temp file read in 8 MiB pieces is not that figure."""
    from moe_offload.store.tiers import measure_expert_reads
    from moe_offload.store.format import convert, open_store
    from moe_offload.store import tiers
    from tests.tiny import make_checkpoint

    store = open_store(convert(make_checkpoint(tmp_path / "hf"), tmp_path / "store").path)
    seen = []
    real = tiers.DiskTier.read
    tiers.DiskTier.read = lambda self, e, buf=None: seen.append(e.key) or real(self, e, buf)
    try:
        bw = measure_expert_reads(store, workers=2, nbytes=1 << 30)
    finally:
        tiers.DiskTier.read = real
    assert bw > 0 and sorted(seen) == sorted(store.entries)  # 1 GiB asked: every expert of the tiny store, once


def test_the_gemv_probe_times_the_engines_own_linear(monkeypatch):
    """The probe runs models.base.linear (the native 16-bit GEMV, the fp32 GEMM of many half rows where the CPU
    has no half GEMMs), not torch's F.linear alone: on an AVX-512 Xeon F.linear read float16 at half bfloat16's
    rate, a rate the engine's float16 decode does not run at."""
    from moe_offload.models import base

    calls = []
    real = base.linear
    monkeypatch.setattr(base, "linear", lambda x, w, b=None: calls.append((x.shape[0], w.dtype)) or real(x, w, b))
    gemv = measure_gemv(None, "float16", 64, 256, total=MiB, repeat=2)
    assert gemv["best"] > 0 and calls and {c for c in calls} == {(1, torch.float16)}
    calls.clear()
    hardware._cpu_gemv(MiB, "bfloat16")
    assert {m for m, _ in calls} == {1, 64}


def test_the_expert_call_probe_cycles_past_the_last_level_cache(tmp_path, monkeypatch):
    # this project's Xeon shows cpu0 a 480 MiB L3: a fixed 96 MiB of experts stayed in it, and the probe timed a
    # Qwen3-width 4-bit expert call at 0.08-0.09 ms where decode pays 0.13-0.14 (docs/benchmarks.md)
    from moe_offload import cpuinfo

    for i, (level_type, size) in enumerate([("Data", "48K"), ("Instruction", "64K"), ("Unified", "2048K"),
                                            ("Unified", "491520K")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "type").write_text(level_type + "\n")
        (d / "size").write_text(size + "\n")
    assert cpuinfo.last_level_cache_bytes(tmp_path) == 480 * MiB
    assert cpuinfo.last_level_cache_bytes(tmp_path / "absent") == 0
    assert [cpuinfo.parse_cache_size(t) for t in ("32M", "512", "1G", "x", "")] == [32 * MiB, 512, 1 << 30, 0, 0]
    assert hardware.cold_bytes(96 * MiB, llc=480 * MiB) == 960 * MiB
    assert hardware.cold_bytes(96 * MiB, llc=32 * MiB) == 96 * MiB  # a laptop's L3: the floor already clears it
    assert hardware.cold_bytes(96 * MiB, llc=4096 * MiB) == hardware.COLD_CAP
    assert hardware.cold_bytes(96 * MiB, llc=0) == 96 * MiB

    seen = []
    real = hardware.expert_units

    def spy(hidden, intermediate, bits=16, dtype="float16", n=2, device="cpu"):
        seen.append(n)
        return real(hidden, intermediate, bits, dtype, n, device)

    monkeypatch.setattr(hardware, "expert_units", spy)
    monkeypatch.setattr(cpuinfo, "last_level_cache_bytes", lambda root=None: 8 * MiB)
    one = 3 * 64 * 128 * 2  # a 16-bit 64 x 128 expert: 48 KiB
    hardware.expert_call_seconds(64, 128, 16, "float16", repeat=1, max_units=10_000)
    assert 1 + seen[1] == -(-96 * MiB // one)  # the 96 MiB floor clears an 8 MiB cache
    seen.clear()
    monkeypatch.setattr(cpuinfo, "last_level_cache_bytes", lambda root=None: 64 * MiB)
    hardware.expert_call_seconds(64, 128, 16, "float16", repeat=1, max_units=10_000)
    assert 1 + seen[1] == -(-128 * MiB // one)  # twice a 64 MiB cache
