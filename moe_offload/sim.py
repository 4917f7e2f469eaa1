"""Trace-driven simulator: replay a recorded routing trace through the cache policies (store/policies.py)
on a hardware profile and predict the expert hit rate and decode tokens/s. The time model is in
docs/simulator.md; `moe-offload simulate` is the command line.

A trace is one decode token per row: `experts[t, i, :]` = the expert ids the i-th MoE layer selected for
token t. `save_trace` / `load_trace` read and write it as .json or .npz (the format is below and in the docs).

Shape legend: T tokens, L MoE layers, K experts per token (top-k), P predicted experts, E experts per layer.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .costmodel import BITS, cpu_compute_bits, quant_bytes
from .errors import MoeError, UsageError
from .store.policies import POLICIES, belady_opt, replay
from .utils import best_time, parse_size

GiB = 1 << 30
GB = 1e9

# ---- hardware profiles -----------------------------------------------------------------------------------


def host_reserve_for(ram_bytes: int) -> int:
    """RAM kept for the OS, Python and torch (assumed): 10 % of the RAM, at least 2 GiB."""
    return max(2 * GiB, ram_bytes // 10)


GPU_RESERVE = 1 * GiB  # device bytes not for weights: CUDA context (~0.3-0.5 GiB), activations, allocator slack


@dataclass(frozen=True)
class HardwareProfile:
    """Sizes in bytes, bandwidths in bytes/s. On a CPU-only machine the "device" is the CPU with its RAM:
    device_bytes is the RAM, host_bytes and link_bw are 0 (no tier between RAM and disk)."""

    name: str
    description: str
    device: str  # "cuda" or "cpu"
    device_bytes: int  # memory of the compute device (GPU memory; RAM on CPU-only)
    host_bytes: int  # host RAM tier between disk and device (GPU machines; 0 on CPU-only)
    link_bw: float  # host -> device copy, pinned, effective (0 on CPU-only)
    host_bw: float  # RAM read bandwidth
    disk_bw: float  # cold sequential read of one expert's bytes (NVMe), page cache bypassed
    device_bw: float  # weight bytes/s a decode GEMV streams on the compute device (its memory bandwidth)
    cpu_bw: float  # weight bytes/s of a CPU GEMV (expert computed where it lies in RAM)
    cpu_flops: float  # CPU FLOP/s on batched expert matmuls (only batches use it)
    device_flops: float  # device FLOP/s (only batches use it)
    link_latency_s: float = 10e-6  # fixed cost per expert copy over the link (launch, DMA setup)
    disk_latency_s: float = 100e-6  # fixed cost per expert read from disk (NVMe request latency)
    token_overhead_s: float = 0.0  # fixed time per decode token beyond streaming weights (dispatch, small ops)
    device_reserve: int = 0  # device bytes not available for weights
    host_reserve: int = 0  # host bytes not available for experts
    sources: str = ""

    @property
    def device_usable(self) -> int:
        return max(0, self.device_bytes - self.device_reserve)

    @property
    def host_usable(self) -> int:
        return max(0, self.host_bytes - self.host_reserve)

    @property
    def has_disk(self) -> bool:
        return self.disk_bw > 0

    @property
    def has_bandwidths(self) -> bool:
        """Enough figures for a time prediction."""
        return self.device_bw > 0 and (self.device == "cpu" or self.link_bw > 0)


# Nominal published figures (NVIDIA product pages; PCI-SIG: PCIe 3.0 x16 = 15.75 GB/s, 4.0 x16 = 31.5 GB/s
# per direction; JEDEC DDR4-3200 / DDR5-5600 at 8 bytes x 2 channels) with three stated conversions:
#   link_bw   = 0.8 x PCIe nominal (TLP/protocol overhead; pinned cudaMemcpy typically reaches this)
#   cpu_bw    = 0.5 x DDR nominal (~0.7 of nominal is attainable read bandwidth, and a 4-bit CPU GEMV
#               reached ~0.7 of read bandwidth here: DESIGN.md, int4pack 1.55 ms on 33 MB vs 28-33 GB/s)
#   cpu_flops = cores x 86.6 GFLOP/s (DESIGN.md: int4pack at M=16 took ~7 x 1.55 ms for 2*16*58.7 M FLOP
#               on 2 cores)
# device_bw is the nominal GPU memory bandwidth (an upper bound: GEMV kernels reach a fraction of it),
# device_flops the nominal non-tensor FP32 rate (conservative). Host RAM size, disk and core counts
# describe an assumed typical machine around the GPU; override them with --ram / --disk-bw.
_PCIE3, _PCIE4 = 0.8 * 15.75 * GB, 0.8 * 31.5 * GB
_CORE_FLOPS = 86.6e9


def _gpu(name, description, vram_gib, vram_bw_gbs, fp32_tflops, link, ram_gib, ddr_gbs, cores, disk_gbs,
         sources) -> HardwareProfile:
    ram = ram_gib * GiB
    return HardwareProfile(
        name=name, description=description, device="cuda", device_bytes=vram_gib * GiB, host_bytes=ram,
        link_bw=link, host_bw=0.7 * ddr_gbs * GB, disk_bw=disk_gbs * GB, device_bw=vram_bw_gbs * GB,
        cpu_bw=0.5 * ddr_gbs * GB, cpu_flops=cores * _CORE_FLOPS, device_flops=fp32_tflops * 1e12,
        device_reserve=GPU_RESERVE, host_reserve=host_reserve_for(ram), sources=sources)


PROFILES: dict[str, HardwareProfile] = {p.name: p for p in (
    _gpu("rtx3060-12gb", "desktop: RTX 3060 12 GB on PCIe 4.0 x16, 32 GiB DDR4-3200 dual channel, 8 cores, "
         "PCIe 3.0 NVMe", 12, 360, 12.74, _PCIE4, 32, 51.2, 8, 3.5,
         "GPU: NVIDIA RTX 3060 spec (12 GB GDDR6, 192-bit, 15 Gbps = 360 GB/s, 12.74 TFLOPS FP32, PCIe 4.0 x16); "
         "disk: PCIe 3.0 x4 NVMe rated 3.5 GB/s sequential read (assumed); RAM/cores assumed"),
    _gpu("t4-16gb", "cloud VM: Tesla T4 16 GB on PCIe 3.0 x16, 32 GiB RAM (DDR4-2933 dual channel), 8 vCPU, "
         "1 GB/s SSD", 16, 320, 8.1, _PCIE3, 32, 46.9, 4, 1.0,
         "GPU: NVIDIA T4 datasheet (16 GB GDDR6, 320 GB/s, 8.1 TFLOPS FP32, PCIe 3.0 x16); "
         "8 vCPU counted as 4 cores; RAM size/speed and 1 GB/s cloud SSD assumed"),
    _gpu("rtx4090-24gb", "desktop: RTX 4090 24 GB on PCIe 4.0 x16, 64 GiB DDR5-5600 dual channel, 16 cores, "
         "PCIe 4.0 NVMe", 24, 1008, 82.6, _PCIE4, 64, 89.6, 16, 7.0,
         "GPU: NVIDIA RTX 4090 spec (24 GB GDDR6X, 384-bit, 21 Gbps = 1008 GB/s, 82.6 TFLOPS FP32, PCIe 4.0 x16); "
         "disk: PCIe 4.0 NVMe rated ~7 GB/s sequential read (assumed); RAM/cores assumed"),
    HardwareProfile(
        name="laptop-16gb-cpu", description="CPU only: 16 GiB RAM at ~40 GB/s read, 8 cores, NVMe at ~3 GB/s",
        device="cpu", device_bytes=16 * GiB, host_bytes=0, link_bw=0.0, host_bw=40 * GB, disk_bw=3 * GB,
        device_bw=0.7 * 40 * GB, cpu_bw=0.7 * 40 * GB, cpu_flops=8 * _CORE_FLOPS, device_flops=8 * _CORE_FLOPS,
        link_latency_s=0.0, device_reserve=host_reserve_for(16 * GiB), host_reserve=0,
        sources="assumed typical laptop (dual-channel DDR4-3200 = 51.2 GB/s nominal, ~40 GB/s read; "
                "PCIe 3.0 NVMe ~3 GB/s); CPU GEMV = 0.7 x read bandwidth as measured in DESIGN.md"),
)}
THIS_MACHINE = "this-machine"


def profile_names() -> list[str]:
    return [*PROFILES, THIS_MACHINE]


def get_profile(name: str | HardwareProfile, **measure_kw) -> HardwareProfile:
    """A built-in profile by name, or `this-machine` measured now (< 5 s)."""
    if isinstance(name, HardwareProfile):
        return name
    if name == THIS_MACHINE:
        return measure_this_machine(**measure_kw)
    if name not in PROFILES:
        raise UsageError(f"unknown hardware profile {name!r}; choose one of: {', '.join(profile_names())} "
                         "(or --hardware list)")
    return PROFILES[name]


def measure_disk_read(directory: str | None = None, nbytes: int = 128 << 20, chunk: int = 8 << 20,
                      streams: int = 1) -> tuple[float, str]:
    """Cold read bandwidth of a fresh temp file: written, fsync'd, dropped from the page cache with
    POSIX_FADV_DONTNEED, then read with O_DIRECT (or buffered after the drop where O_DIRECT is refused) in
    `chunk`-byte preadv calls, `streams` at a time (threads, each into its own page-aligned buffer, reused: the
    way the engine's loader reads experts). Returns (bytes/s, method)."""
    from concurrent.futures import ThreadPoolExecutor

    chunk = -(-chunk // 4096) * 4096
    nbytes = max(chunk * streams, nbytes // chunk * chunk)
    block = os.urandom(chunk)
    fd_w, path = tempfile.mkstemp(prefix=".moe-offload-diskbw-", dir=directory)
    bufs = [mmap.mmap(-1, chunk) for _ in range(streams)]  # page-aligned, as O_DIRECT needs
    for b in bufs:
        b.write(block)  # fault the pages in now, as a reused read buffer has them
    offsets = range(0, nbytes, chunk)

    def read_all(fd: int) -> float:
        t0 = time.perf_counter()
        if streams == 1:
            done = sum(os.preadv(fd, [bufs[0]], off) for off in offsets)
        else:
            with ThreadPoolExecutor(streams) as ex:
                done = sum(ex.map(lambda io: os.preadv(fd, [bufs[io[0] % streams]], io[1]), enumerate(offsets)))
        return done / (time.perf_counter() - t0)

    try:
        for _ in range(nbytes // chunk):
            os.write(fd_w, block)
        os.fsync(fd_w)
        os.posix_fadvise(fd_w, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd_w)
        fd_w = -1
        method, fd = "buffered after POSIX_FADV_DONTNEED", None
        if hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                method = "O_DIRECT"
            except OSError:
                fd = None
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
        try:
            try:
                bw = read_all(fd)
            except OSError:  # O_DIRECT refused at the first read (EINVAL): fall back to buffered
                os.close(fd)
                fd, method = os.open(path, os.O_RDONLY), "buffered after POSIX_FADV_DONTNEED"
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                bw = read_all(fd)
        finally:
            os.close(fd)
        return bw, method + (f", {chunk / 2**20:.1f} MiB reads" + (f" x{streams} in flight" if streams > 1 else ""))
    finally:
        for b in bufs:
            b.close()
        if fd_w >= 0:
            os.close(fd_w)
        os.unlink(path)


_GEMV_K = 8192


def _ram_read_bw(nbytes: int) -> float:
    import torch

    x = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    return x.numel() * 4 / best_time(lambda: x.sum(), 3)


def _cpu_gemv(nbytes: int, dtype: str = "bfloat16") -> tuple[float, float]:
    """(bytes/s of a 1 x K GEMV, FLOP/s of a 64 x K GEMM) over `nbytes` of `dtype` weights."""
    import torch
    import torch.nn.functional as F

    dt = getattr(torch, dtype)
    w = torch.empty(nbytes // dt.itemsize // _GEMV_K, _GEMV_K, dtype=dt).fill_(0.01)
    v = torch.full((1, _GEMV_K), 0.5, dtype=dt)
    m = torch.full((64, _GEMV_K), 0.5, dtype=dt)
    return (w.numel() * dt.itemsize / best_time(lambda: F.linear(v, w), 5),
            2 * 64 * w.numel() / best_time(lambda: F.linear(m, w), 2))


def _cuda_figures(nbytes: int) -> tuple[float, float, float]:
    """(device copy bytes/s counting read + write, pinned host->device bytes/s, bf16 GEMM FLOP/s)."""
    import torch

    dev, sync = torch.device("cuda"), torch.cuda.synchronize
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    h = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    g = torch.empty(4096, 4096, dtype=torch.bfloat16, device=dev).fill_(0.01)
    copy = 2 * nbytes / best_time(lambda: b.copy_(a), 5, sync)  # a copy reads and writes every byte
    h2d = nbytes / best_time(lambda: a.copy_(h, non_blocking=True), 5, sync)
    return copy, h2d, 2 * 4096**3 / best_time(lambda: g @ g, 5, sync)


def _toy_config(config: dict) -> dict:
    """The same architecture at toy widths: every layer, head, expert and routing rule kept; hidden 16 per
    head (or 256 where the head size is set on its own), intermediate sizes 64, vocabulary 512."""
    toy = dict(config)
    for k, v in config.items():
        if k.endswith("intermediate_size") and isinstance(v, int) and v > 0:
            toy[k] = 64
    heads = config.get("num_attention_heads") or 1
    toy["hidden_size"] = 256 if config.get("head_dim") else 16 * heads
    toy["vocab_size"] = 512
    return toy


def measure_token_overhead(config: dict, dtype: str = "bfloat16", tokens: int = 24, context: int = 32,
                           device: str = "cpu") -> float:
    """Seconds per decode token of `config`'s architecture at toy widths (`_toy_config`), every expert
    resident on `device`: the per-token cost that does not grow with the weights (Python, dispatch, kernel
    launches, norms, routing, attention bookkeeping). Median over `tokens` steps after a `context`-token
    prefill."""
    import statistics

    import torch

    from .experts import LocalExperts, expert_unit
    from .models import build

    dt, dev = getattr(torch, dtype), torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    with torch.device("cpu"):
        _, model = build(_toy_config(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02 + ("norm" in name))
    model = model.to(dt)
    model.init_rope(torch.device("cpu"))
    shape = model.expert_shape
    D, I = shape.hidden, shape.intermediate
    for _, moe in model.moe_blocks():
        r = lambda *sz: (torch.randn(*sz, generator=gen) * 0.02).to(dt)  # noqa: E731
        bias = dict(gate_bias=r(I), up_bias=r(I), down_bias=r(D)) if shape.bias else {}
        moe.experts = LocalExperts([expert_unit(shape, *(t.to(dev) for t in (r(I, D), r(I, D), r(D, I))),
                                                **{k: t.to(dev) for k, t in bias.items()})
                                    for _ in range(model.n_experts)])
    model = model.to(dev).eval()
    model.init_rope(dev)
    cache = model.make_cache(1, context + tokens + 1, dt, dev)
    ids = torch.randint(3, 512, (1, context), generator=gen).to(dev)
    times = []
    with torch.inference_mode():
        logits = model(ids, 0, cache)
        for step in range(tokens):
            tok = logits[0, -1].argmax().view(1, 1)
            sync()
            t0 = time.perf_counter()
            logits = model(tok, context + step, cache)
            sync()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def expert_gemv_bw(hidden: int, intermediate: int, dtype: str = "bfloat16", total: int = 96 << 20,
                   device: str = "cpu") -> float:
    """Weight bytes/s of expert calls at M = 1, the engine's own unit (`DenseExpert`: gate_up [2I, D], then
    down [D, I]), cycling through enough experts to read `total` bytes from memory, not cache (on CUDA at
    least 1 GiB: past any L2); best of 5 passes."""
    import torch

    from .experts import DenseExpert

    dt, dev = getattr(torch, dtype), torch.device(device)
    total = max(total, 1 << 30) if dev.type == "cuda" else total
    one = 3 * hidden * intermediate * dt.itemsize
    n = max(2, -(-total // one))
    units = [DenseExpert(torch.full((2 * intermediate, hidden), 0.01, dtype=dt, device=dev),
                         torch.full((hidden, intermediate), 0.01, dtype=dt, device=dev)) for _ in range(n)]
    x = torch.full((1, hidden), 0.5, dtype=dt, device=dev)

    def run():
        for unit in units:
            unit(x)

    return n * one / best_time(run, 5, torch.cuda.synchronize if dev.type == "cuda" else (lambda: None))


def measure_this_machine(disk_dir: str | None = None, ram_bytes: int = 256 << 20, disk_bytes: int = 128 << 20,
                         gemv_bytes: int = 64 << 20, dtype: str = "bfloat16", read_bytes: int = 8 << 20,
                         read_streams: int = 1) -> HardwareProfile:
    """Measure this machine in a few seconds: RAM read (a torch sum over `ram_bytes`), a CPU GEMV over
    `gemv_bytes` of `dtype` weights (the compute dtype: float16 and bf16 GEMVs differ ~2x on some CPUs), CPU
    GEMM FLOP/s, cold disk read (measure_disk_read: `read_bytes` per read, `read_streams` in flight; give the
    expert size and the loader's workers to measure what the engine can get) and, with CUDA, device memory
    bandwidth (device copy), pinned host->device copy and device bf16 GEMM FLOP/s."""
    import psutil
    import torch

    t_start = time.perf_counter()
    ram = psutil.virtual_memory().total
    host_bw, (cpu_bw, cpu_flops) = _ram_read_bw(ram_bytes), _cpu_gemv(gemv_bytes, dtype)
    k = _GEMV_K
    disk_bw, method = measure_disk_read(disk_dir, disk_bytes, read_bytes, read_streams)
    src = (f"measured {time.strftime('%Y-%m-%d %H:%M')} with {torch.get_num_threads()} threads: RAM read = torch sum "
           f"over {ram_bytes >> 20} MiB; CPU GEMV = {dtype} F.linear 1x{k} over {gemv_bytes >> 20} MiB; CPU FLOP/s = "
           f"{dtype} 64x{k} GEMM; disk = cold read of a {disk_bytes >> 20} MiB temp file ({method})")
    common = dict(name=THIS_MACHINE, host_bw=host_bw, disk_bw=disk_bw, cpu_bw=cpu_bw, cpu_flops=cpu_flops)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device("cuda"))
        device_bw, link_bw, device_flops = _cuda_figures(ram_bytes)
        prof = HardwareProfile(
            description=f"this machine: {props.name} {props.total_memory / GiB:.1f} GiB, {ram / GiB:.1f} GiB RAM",
            device="cuda", device_bytes=props.total_memory, host_bytes=ram, link_bw=link_bw, device_bw=device_bw,
            device_flops=device_flops, device_reserve=GPU_RESERVE, host_reserve=host_reserve_for(ram),
            sources=src + f"; device = {ram_bytes >> 20} MiB device copy (2 x bytes), link = pinned H2D copy, "
                          "device FLOP/s = bf16 4096^3 GEMM", **common)
    else:
        prof = HardwareProfile(
            description=f"this machine: CPU only, {ram / GiB:.1f} GiB RAM, {os.cpu_count()} CPUs", device="cpu",
            device_bytes=ram, host_bytes=0, link_bw=0.0, device_bw=cpu_bw, device_flops=cpu_flops,
            link_latency_s=0.0, device_reserve=host_reserve_for(ram), sources=src, **common)
    return replace(prof, sources=prof.sources + f" (took {time.perf_counter() - t_start:.1f} s)")


def format_profiles(profiles: list[HardwareProfile]) -> str:
    rows = [("profile", "device", "memory", "host RAM", "link", "device bw", "CPU GEMV", "disk", "")]
    for p in profiles:
        rows.append((p.name, p.device, f"{p.device_bytes / GiB:.1f} GiB", f"{p.host_bytes / GiB:.1f} GiB",
                     f"{p.link_bw / GB:.1f} GB/s" if p.link_bw else "-", f"{p.device_bw / GB:.1f} GB/s",
                     f"{p.cpu_bw / GB:.1f} GB/s", f"{p.disk_bw / GB:.1f} GB/s", p.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# ---- traces --------------------------------------------------------------------------------------------------

TRACE_FORMAT, TRACE_VERSION = "moe-offload-trace", 1


@dataclass
class Trace:
    """Decode routing of one or more sequences, token after token.

    experts[t, i] are the K expert ids MoE layer `layers[i]` (a decoder-layer index, as in the store) selected
    for token t; `predicted[t, i]` optionally the P ids a look-ahead predictor proposed for that layer before
    it ran. `expert_bytes` is the size of one expert as stored (an int, or [L, E] per expert); the optional
    `expert_params` (weights per expert) lets the simulator re-price experts at other bits, `backbone_bytes`
    and `kv_bytes_per_token` complete the time model."""

    experts: np.ndarray  # [T, L, K] int
    n_experts: int
    expert_bytes: int | np.ndarray
    layers: list[int] | None = None  # decoder-layer index of each MoE layer; default 0..L-1
    n_layers: int | None = None  # decoder layers in the model; default max(layers) + 1
    expert_params: int | None = None
    backbone_bytes: int | None = None
    kv_bytes_per_token: int | None = None
    predicted: np.ndarray | None = None  # [T, L, P] int
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.experts = np.asarray(self.experts, dtype=np.int64)
        if self.experts.ndim != 3:
            raise MoeError(f"trace: experts must be [tokens, moe layers, top_k], got shape {self.experts.shape}")
        T, L, _ = self.experts.shape
        self.layers = list(range(L)) if self.layers is None else [int(x) for x in self.layers]
        if len(self.layers) != L or len(set(self.layers)) != L:
            raise MoeError(f"trace: {L} MoE layers in experts but layers = {self.layers}")
        self.n_layers = max(self.layers, default=-1) + 1 if self.n_layers is None else int(self.n_layers)
        if self.layers and (min(self.layers) < 0 or max(self.layers) >= self.n_layers):
            raise MoeError(f"trace: layers {self.layers} outside 0..{self.n_layers - 1}")
        self.n_experts = int(self.n_experts)
        if self.experts.size and (self.experts.min() < 0 or self.experts.max() >= self.n_experts):
            raise MoeError(f"trace: expert ids outside 0..{self.n_experts - 1}")
        if isinstance(self.expert_bytes, (list, tuple, np.ndarray)) and np.ndim(self.expert_bytes) > 0:
            self.expert_bytes = np.asarray(self.expert_bytes, dtype=np.int64)
            if self.expert_bytes.shape != (L, self.n_experts):
                raise MoeError(f"trace: expert_bytes must be one int or [{L}, {self.n_experts}], "
                               f"got shape {self.expert_bytes.shape}")
        else:
            self.expert_bytes = int(self.expert_bytes)
        if self.predicted is not None:
            self.predicted = np.asarray(self.predicted, dtype=np.int64)
            if self.predicted.ndim != 3 or self.predicted.shape[:2] != (T, L):
                raise MoeError(f"trace: predicted must be [{T}, {L}, P], got shape {self.predicted.shape}")

    @property
    def tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    def entries(self, start: int = 0, stop: int | None = None) -> list[list[tuple[int, int]]]:
        """policies.replay's trace: one entry per (token, MoE layer), the (layer, expert) keys it needs."""
        rows = self.experts[start:stop].tolist()
        return [[(la, e) for e in row] for tok in rows for la, row in zip(self.layers, tok)]

    def size_fn(self) -> Callable[[tuple[int, int]], int]:
        if isinstance(self.expert_bytes, int):
            b = self.expert_bytes
            return lambda key: b
        pos = {la: i for i, la in enumerate(self.layers)}
        table = self.expert_bytes
        return lambda key: int(table[pos[key[0]], key[1]])

    def all_expert_bytes(self) -> int:
        if isinstance(self.expert_bytes, int):
            return self.expert_bytes * len(self.layers) * self.n_experts
        return int(self.expert_bytes.sum())


def _header(tr: Trace) -> dict:
    return {"format": TRACE_FORMAT, "version": TRACE_VERSION, "n_layers": tr.n_layers, "layers": tr.layers,
            "n_experts": tr.n_experts, "top_k": tr.top_k, "tokens": tr.tokens,
            "expert_params": tr.expert_params, "backbone_bytes": tr.backbone_bytes,
            "kv_bytes_per_token": tr.kv_bytes_per_token, "meta": tr.meta}


def save_trace(path: str | os.PathLike, trace: Trace) -> Path:
    """Write `trace` as .json (readable) or .npz (compact); the suffix picks. Written to a temp name, then
    renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    if path.suffix == ".json":
        d = _header(trace)
        d["expert_bytes"] = trace.expert_bytes if isinstance(trace.expert_bytes, int) else trace.expert_bytes.tolist()
        d["experts"] = trace.experts.tolist()
        if trace.predicted is not None:
            d["predicted"] = trace.predicted.tolist()
        tmp.write_text(json.dumps(d))
    elif path.suffix == ".npz":
        arrays = {"header": np.array(json.dumps(_header(trace))), "experts": trace.experts.astype(np.int32),
                  "expert_bytes": np.asarray(trace.expert_bytes, dtype=np.int64)}
        if trace.predicted is not None:
            arrays["predicted"] = trace.predicted.astype(np.int32)
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    else:
        raise UsageError(f"trace file {path}: use a .json or .npz suffix")
    os.replace(tmp, path)
    return path


def _from_header(h: dict, experts, expert_bytes, predicted, path) -> Trace:
    if h.get("format") != TRACE_FORMAT:
        raise MoeError(f"{path}: not a routing trace (format {h.get('format')!r}, want {TRACE_FORMAT!r})")
    if h.get("version") != TRACE_VERSION:
        raise MoeError(f"{path}: trace version {h.get('version')!r} not supported (this build reads {TRACE_VERSION})")
    try:
        return Trace(experts=experts, n_experts=h["n_experts"], expert_bytes=expert_bytes, layers=h.get("layers"),
                     n_layers=h.get("n_layers"), expert_params=h.get("expert_params"),
                     backbone_bytes=h.get("backbone_bytes"), kv_bytes_per_token=h.get("kv_bytes_per_token"),
                     predicted=predicted, meta=h.get("meta") or {})
    except KeyError as e:
        raise MoeError(f"{path}: trace lacks {e}") from None
    except MoeError as e:
        raise MoeError(f"{path}: {e}") from None


def load_trace(path: str | os.PathLike) -> Trace:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"trace {path}: no such file")
    try:
        if path.suffix == ".json":
            d = json.loads(path.read_text())
            if "experts" not in d or "expert_bytes" not in d:
                raise MoeError(f"{path}: trace lacks 'experts' or 'expert_bytes'")
            return _from_header(d, d["experts"], d["expert_bytes"], d.get("predicted"), path)
        with np.load(path, allow_pickle=False) as z:
            h = json.loads(str(z["header"]))
            eb = z["expert_bytes"]
            return _from_header(h, z["experts"], int(eb) if eb.ndim == 0 else eb,
                                z["predicted"] if "predicted" in z.files else None, path)
    except (ValueError, OSError, KeyError) as e:  # bad JSON, not a zip, missing array
        raise MoeError(f"{path}: not a readable trace ({type(e).__name__}: {e})") from None


def synthetic_trace(n_tokens: int, layers: list[int], n_experts: int, top_k: int, expert_bytes: int,
                    zipf_s: float = 0.8, seed: int = 0, **fields_) -> Trace:
    """Zipf-like routing: in each layer expert popularity p ∝ 1 / rank^s over a random ranking, and each
    token draws its top_k distinct experts without replacement by p (Gumbel top-k). No temporal locality
    between tokens: a stand-in until a recorded trace exists."""
    rng = np.random.default_rng(seed)
    L = len(layers)
    logp = -zipf_s * np.log(np.arange(1, n_experts + 1, dtype=np.float64))
    ranks = np.argsort(rng.random((L, n_experts)), axis=1)  # ranks[i, e] = popularity rank of expert e
    scores = logp[ranks][None] + rng.gumbel(size=(n_tokens, L, n_experts))
    experts = np.argsort(-scores, axis=2)[:, :, :top_k]
    return Trace(experts=experts, n_experts=n_experts, expert_bytes=expert_bytes, layers=list(layers),
                 meta={"synthetic": {"zipf_s": zipf_s, "seed": seed}}, **fields_)


# ---- simulation --------------------------------------------------------------------------------------------


@dataclass
class SimResult:
    hardware: str
    policy: str
    tokens: int  # simulated decode tokens (after warm-up)
    warmup: int
    accesses: int  # (token, layer, expert) uses
    hits: int  # served from device memory
    misses: int  # not on the device
    disk_reads: int  # misses that came from disk (not in device + host)
    link_bytes: int  # bytes copied host -> device
    disk_bytes: int  # bytes read from disk
    expert_capacity: int  # device bytes for the expert cache
    host_capacity: int  # host bytes for experts (0: no host tier)
    backbone_bytes: int
    cpu_misses: bool
    t_device: float  # seconds over all simulated tokens, per resource
    t_cpu: float
    t_link: float
    t_disk: float
    prefetch_recall: float | None = None  # share of used experts the trace's predictor proposed
    notes: list[str] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.accesses)

    @property
    def time_serial(self) -> float:
        return self.t_device + self.t_cpu + self.t_link + self.t_disk

    @property
    def time_overlap(self) -> float:
        return max(self.t_device, self.t_cpu, self.t_link, self.t_disk)

    @property
    def tok_s_serial(self) -> float:
        return self.tokens / self.time_serial if self.time_serial > 0 else math.inf

    @property
    def tok_s_overlap(self) -> float:
        return self.tokens / self.time_overlap if self.time_overlap > 0 else math.inf

    @property
    def bound(self) -> str:
        """The resource that limits the overlapped time."""
        t = {"device compute": self.t_device, "CPU compute": self.t_cpu, "link": self.t_link, "disk": self.t_disk}
        return max(t, key=t.get)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(hit_rate=self.hit_rate, time_serial=self.time_serial, time_overlap=self.time_overlap,
                 tok_s_serial=self.tok_s_serial, tok_s_overlap=self.tok_s_overlap, bound=self.bound)
        return d


@dataclass
class _Counts:
    hits: int = 0
    misses: int = 0
    miss_bytes: int = 0


def _replay_counts(trace: Trace, sizes, capacity: int, policy: str, warmup: int) -> _Counts:
    """Hits / misses / bytes of the tokens after `warmup`, the cache starting empty before the warm-up.
    Online policies are deterministic, so the warm-up's own counts (a prefix replay) are subtracted exactly;
    for "opt" the subtraction is an approximation (the optimum on the prefix alone may differ)."""

    def run(entries):
        if policy == "opt":
            return belady_opt(entries, sizes, capacity, trace.n_layers, trace.n_experts)
        return replay(entries, sizes, capacity, policy, trace.n_layers, trace.n_experts)

    full = run(trace.entries())
    c = _Counts(full.hits, full.misses, full.bytes_loaded)
    if warmup:
        pre = run(trace.entries(0, warmup))
        c = _Counts(c.hits - pre.hits, c.misses - pre.misses, c.miss_bytes - pre.bytes_loaded)
    return c


def _static_hot(trace: Trace, sizes, capacity: int, warmup: int) -> tuple[set, _Counts]:
    """Pin the most used experts of the trace (ties: lower key) until `capacity` is full; count after warm-up."""
    freq = Counter(k for entry in trace.entries() for k in dict.fromkeys(entry))
    hot, used = set(), 0
    for key, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0])):
        if used + sizes(key) <= capacity:
            hot.add(key)
            used += sizes(key)
    c = _Counts()
    for entry in trace.entries(warmup):
        for key in dict.fromkeys(entry):
            if key in hot:
                c.hits += 1
            else:
                c.misses += 1
                c.miss_bytes += sizes(key)
    return hot, c


def simulate(trace: Trace, hw: HardwareProfile, *, memory: int | None = None, host_memory: int | None = None,
             policy: str = "lru", expert_bits: int | None = None, group_size: int = 64, context: int = 0,
             warmup: int = 0, cpu_misses: bool = False, backbone_bytes: int | None = None,
             kv_bytes_per_token: int | None = None) -> SimResult:
    """Replay `trace` on `hw` and apply the time model (docs/simulator.md).

    memory: device bytes for weights (backbone + expert cache), default the device's usable bytes minus the
    KV cache. host_memory: host RAM bytes for experts (GPU machines), default the usable host RAM.
    expert_bits: re-price experts at these bits from the trace's expert_params (default: the trace's bytes).
    cpu_misses: (GPU) pin the most used experts on the device and compute every miss on the CPU from RAM.
    """
    if policy != "opt" and policy not in POLICIES:
        raise UsageError(f"unknown cache policy {policy!r}; choose one of: {', '.join([*POLICIES, 'opt'])}")
    if not 0 <= warmup < trace.tokens:
        raise UsageError(f"warm-up must be 0..{trace.tokens - 1} tokens for a trace of {trace.tokens}, got {warmup}")
    if not hw.has_bandwidths:
        raise UsageError(f"hardware {hw.name!r} lacks bandwidths for a time prediction (device_bw / link_bw)")
    notes = []
    cpu_device = hw.device == "cpu"
    if expert_bits is not None:
        if trace.expert_params is None:
            raise UsageError("--expert-bits needs expert_params in the trace (weights per expert); this trace has none")
        stored = quant_bytes(trace.expert_params, expert_bits, group_size)
        # a CPU computes 2/3-bit experts expanded to 4-bit: that is what sits in its memory and what it reads
        computed = quant_bytes(trace.expert_params, cpu_compute_bits(expert_bits), group_size)
        resident = computed if cpu_device else stored
        resident_fn = lambda k: resident
        all_bytes = resident * len(trace.layers) * trace.n_experts
    else:
        resident_fn = trace.size_fn()
        all_bytes = trace.all_expert_bytes()
    backbone = backbone_bytes if backbone_bytes is not None else trace.backbone_bytes
    if backbone is None:
        backbone = 0
        notes.append("backbone bytes unknown (not in the trace, no --backbone-bytes): counted as 0")
    kv = kv_bytes_per_token if kv_bytes_per_token is not None else (trace.kv_bytes_per_token or 0)
    if context and not kv:
        notes.append("KV bytes per token unknown: the KV cache is counted as 0")
    kv_total = kv * context
    if memory is None:
        memory = hw.device_usable - kv_total
    capacity = memory - backbone
    if capacity < 0:
        raise MoeError(f"--memory {memory / GB:.2f} GB holds no expert: the backbone alone is {backbone / GB:.2f} GB")
    if memory + kv_total > hw.device_bytes:
        notes.append(f"--memory {memory / GB:.2f} GB + KV {kv_total / GB:.2f} GB exceeds the device's "
                     f"{hw.device_bytes / GB:.2f} GB")
    if cpu_device:
        if host_memory:
            raise UsageError(f"hardware {hw.name!r} is CPU-only: no host tier (--host-memory); --memory is its RAM")
        host_cap = 0
    else:
        host_cap = hw.host_usable if host_memory is None else host_memory
    if cpu_misses and cpu_device:
        raise UsageError("--cpu-misses is for GPU machines; on a CPU-only machine every expert is computed on the CPU")

    # device tier
    if cpu_misses:
        _, dev = _static_hot(trace, resident_fn, capacity, warmup)
    else:
        dev = _replay_counts(trace, resident_fn, capacity, policy, warmup)
    # disk tier: the host holds what the device evicts (exclusive tiers), so device + host act as one cache
    # of their combined size under the same policy; its misses are the disk reads.
    if cpu_device:
        disk = dev
    elif all_bytes <= capacity + host_cap:
        disk = _Counts()  # everything fits in device + host: loaded once, before decoding
    else:
        disk = _replay_counts(trace, resident_fn, capacity + host_cap, policy, warmup)
    disk_bytes = disk.misses * stored if expert_bits is not None else disk.miss_bytes  # disk holds stored bytes

    T = trace.tokens - warmup
    accesses = dev.hits + dev.misses
    entries = trace.entries(warmup)
    computed_bytes = sum(resident_fn(k) for entry in entries for k in dict.fromkeys(entry))
    t_device = T * ((backbone + kv_total) / hw.device_bw + hw.token_overhead_s)
    t_cpu = t_link = 0.0
    if cpu_misses:
        miss_read = dev.miss_bytes if expert_bits is None else dev.misses * computed
        t_device += (computed_bytes - dev.miss_bytes) / hw.device_bw
        t_cpu = miss_read / hw.cpu_bw
        link_bytes = 0
    else:
        t_device += computed_bytes / hw.device_bw
        link_bytes = 0 if cpu_device else dev.miss_bytes
        if not cpu_device:
            t_link = link_bytes / hw.link_bw + dev.misses * hw.link_latency_s
    t_disk = (disk_bytes / hw.disk_bw + disk.misses * hw.disk_latency_s) if disk.misses else 0.0
    if disk.misses and not hw.has_disk:
        raise MoeError(f"{disk.misses} expert reads from disk but hardware {hw.name!r} has no disk bandwidth")

    recall = None
    if trace.predicted is not None:
        got = sum(len(set(a) & set(p)) for a, p in zip(trace.experts[warmup:].reshape(-1, trace.top_k).tolist(),
                                                        trace.predicted[warmup:].reshape(T * len(trace.layers), -1).tolist()))
        recall = got / max(1, T * len(trace.layers) * trace.top_k)
    return SimResult(hardware=hw.name, policy="static-hot" if cpu_misses else policy, tokens=T, warmup=warmup,
                     accesses=accesses, hits=dev.hits, misses=dev.misses, disk_reads=disk.misses,
                     link_bytes=link_bytes, disk_bytes=disk_bytes, expert_capacity=capacity, host_capacity=host_cap,
                     backbone_bytes=backbone, cpu_misses=cpu_misses, t_device=t_device, t_cpu=t_cpu, t_link=t_link,
                     t_disk=t_disk, prefetch_recall=recall, notes=notes)


def format_result(r: SimResult) -> str:
    lines = [
        f"simulated {r.tokens} decode tokens (after {r.warmup} warm-up) on {r.hardware}, policy {r.policy}",
        f"expert cache: {r.expert_capacity / GB:.3f} GB on the device, host tier {r.host_capacity / GB:.3f} GB; "
        f"backbone {r.backbone_bytes / GB:.3f} GB",
        f"hit rate {r.hit_rate:.4f} ({r.hits} hits, {r.misses} misses of {r.accesses}); {r.disk_reads} reads from "
        f"disk ({r.disk_bytes / GB:.3f} GB), {r.link_bytes / GB:.3f} GB over the link",
        f"time per token: device {1e3 * r.t_device / r.tokens:.2f} ms (overhead included), CPU {1e3 * r.t_cpu / r.tokens:.2f} ms, "
        f"link {1e3 * r.t_link / r.tokens:.2f} ms, disk {1e3 * r.t_disk / r.tokens:.2f} ms",
        f"predicted decode: {r.tok_s_serial:.2f} tok/s serial (no prefetch) .. {r.tok_s_overlap:.2f} tok/s with "
        f"transfers fully hidden (prefetch; bound by {r.bound})",
    ]
    if r.prefetch_recall is not None:
        lines.append(f"trace predictor recall {r.prefetch_recall:.3f}")
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------------------


def parse_gbs(text: str | None, flag: str) -> float | None:
    if text is None:
        return None
    try:
        v = float(text)
    except ValueError:
        raise UsageError(f"{flag} takes GB/s as a number, got {text!r}") from None
    if v <= 0:
        raise UsageError(f"{flag} must be > 0 GB/s, got {text}")
    return v * GB


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default=None, help="routing trace (.json / .npz) written by `moe-offload profile`")
    p.add_argument("--hardware", required=True, help=f"profile: {', '.join(profile_names())}, or `list`")
    p.add_argument("--memory", default=None, help="device bytes for weights (backbone + expert cache), e.g. 10GiB")
    p.add_argument("--host-memory", default=None, help="host RAM bytes for experts (GPU machines)")
    p.add_argument("--cache-policy", default="lru", help=f"{', '.join(POLICIES)} or opt (offline optimum)")
    p.add_argument("--expert-bits", type=int, default=None, choices=BITS, help="re-price experts at these bits")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size (metadata per group)")
    p.add_argument("--backbone-bytes", default=None, help="override the trace's backbone bytes")
    p.add_argument("--context", type=int, default=0, help="KV cache tokens read per decode step")
    p.add_argument("--warmup", type=int, default=None, help="tokens excluded from the counts (default: T/4, "
                                                              "at most 64)")
    p.add_argument("--cpu-misses", action="store_true", help="pin hot experts; compute misses on the CPU")
    p.add_argument("--disk-bw", default=None, help="override the profile's disk read bandwidth, GB/s")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="this-machine: the compute dtype its GEMV is measured in (default bfloat16)")
    p.add_argument("--read-streams", type=int, default=2,
                   help="this-machine: reads in flight when measuring the disk (the loader's workers, default 2)")
    p.add_argument("--threads", type=int, default=None, help="this-machine: torch threads for the measurements")
    p.add_argument("--json", action="store_true", help="one JSON object")


def run(a) -> int:
    if a.hardware == "list":
        if a.json:
            print(json.dumps([asdict(p) for p in PROFILES.values()]))
        else:
            print(format_profiles(list(PROFILES.values())))
            print(f"{THIS_MACHINE}: measured when named (RAM, CPU GEMV, cold disk read; GPU when present), < 5 s")
        return 0
    if a.trace is None:
        raise UsageError("simulate: give --trace FILE (or --hardware list)")
    trace = load_trace(a.trace)
    if a.read_streams < 1 or (a.threads is not None and a.threads < 1):
        raise UsageError("--read-streams and --threads must be >= 1")
    if a.hardware == THIS_MACHINE:  # measured the way this trace's model would run here
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        sizes = np.asarray(trace.expert_bytes)
        one = int(sizes.mean())
        hw = measure_this_machine(dtype=a.dtype, read_bytes=one, read_streams=a.read_streams,
                                  disk_bytes=max(128 << 20, 4 * a.read_streams * one))
        config = (trace.meta or {}).get("config")
        if config:  # the trace names its model: time its expert shapes and its per-token fixed cost here
            try:
                from .models import build

                with torch.device("meta"):
                    _, skel = build(config)
                shape = skel.expert_shape
                # on CUDA: the GPU's own GEMV and per-token launch cost, not the CPU's
                bw = expert_gemv_bw(shape.hidden, shape.intermediate, a.dtype, device=hw.device)
                over = measure_token_overhead(config, a.dtype, device=hw.device)
            except Exception as e:  # an architecture the toy build cannot shrink: keep the generic profile
                print(f"simulate: note: per-token overhead not measured ({type(e).__name__}: {e})", file=sys.stderr)
            else:
                cpu_bw = bw if hw.device == "cpu" else hw.cpu_bw  # on CUDA the CPU GEMV stays the CPU's
                hw = replace(hw, device_bw=bw, cpu_bw=cpu_bw, token_overhead_s=over,
                             sources=hw.sources + f"; expert GEMV at D={shape.hidden} I={shape.intermediate} "
                             f"{bw / GB:.1f} GB/s; per-token overhead {1e3 * over:.2f} ms (the architecture at "
                             f"toy widths)")
    else:
        hw = get_profile(a.hardware)
    if a.disk_bw is not None:
        hw = replace(hw, disk_bw=parse_gbs(a.disk_bw, "--disk-bw"))
    warmup = min(64, trace.tokens // 4) if a.warmup is None else a.warmup
    r = simulate(trace, hw, memory=parse_size(a.memory), host_memory=parse_size(a.host_memory),
                 policy=a.cache_policy, expert_bits=a.expert_bits, group_size=a.group_size, context=a.context,
                 warmup=warmup, cpu_misses=a.cpu_misses, backbone_bytes=parse_size(a.backbone_bytes))
    if a.json:
        print(json.dumps(r.to_dict()))
    else:
        print(format_result(r))
    return 0


if __name__ == "__main__":  # pragma: no cover
    import runpy  # `python -m moe_offload.sim ARGS` is `moe-offload simulate ARGS`

    sys.argv[1:1] = ["simulate"]
    runpy.run_module("moe_offload", run_name="__main__")
