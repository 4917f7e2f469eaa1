"""The machine: hardware profiles (built-in figures, or this machine measured now) and the probes that
measure it. One module below the store, the simulator, the planner and bench, which all read it.

Two device reserves, two meanings:
- GPU_RESERVE (1 GiB): the planner's and simulator's allowance of device bytes that are not weights at all
  (CUDA context, activations, allocator slack), taken off a profile's device memory before planning.
- DEVICE_RESERVE (64 MiB on CUDA, 0 on CPU): bytes of the user's --memory kept out of the expert cache at
  run time: slack for the caching allocator's rounding and fragmentation, which the byte counts do not see.
  CPU: 0, the accounting is exact (each cached expert is its own page-rounded mmap, counted whole).
"""

from __future__ import annotations

import mmap
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

from .errors import UsageError
from .utils import best_time, drop_page_cache

DEVICE_RESERVE = {"cpu": 0, "cuda": 64 << 20}


MiB, GiB = 1 << 20, 1 << 30
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
    expert_call_s: float = 0.0  # one expert call at the model's shapes and precision, the engine's own unit and
    # kernel (expert_call_seconds); 0: unknown, expert bytes are timed at device_bw
    miss_cpu_s: float = 0.0  # CPU time per expert read from disk beyond the read: the codec's decode of the blob
    # into a callable unit (expert_decode_seconds; 4-bit: the 8-bit meta expanded to the kernel's bf16 scales)
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


# ---- probes: disk, RAM, CPU GEMV ----------------------------------------------------------------------------
# One implementation per figure: the simulator's and planner's `this-machine` profile and bench's limits both
# time the same code.


def _timings(fn, repeat: int) -> list[float]:
    """Seconds of each of `repeat` calls of `fn`."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _rates(nbytes: float, times: list[float]) -> dict:
    """bytes/s at the fastest and at the median time (on a shared machine the best is the capability, the
    median what a run saw)."""
    return {"best": nbytes / min(times), "median": nbytes / statistics.median(times)}


@contextmanager
def cold_file(directory, nbytes: int, chunk: int, prefix: str = ".moe-offload-diskbw-"):
    """A fresh temp file of `nbytes` random bytes (written in `chunk` blocks, fsync'd) on `directory`'s
    filesystem, removed on exit. Yields its path."""
    block = os.urandom(chunk)
    fd, path = tempfile.mkstemp(prefix=prefix, dir=None if directory is None else str(directory))
    try:
        try:
            for _ in range(nbytes // chunk):
                os.write(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)
        yield path
    finally:
        os.unlink(path)


def read_cold(path: str, nbytes: int, chunk: int, streams: int = 1, direct: bool = True) -> float:
    """Cold read bytes/s of `path`'s first `nbytes`: its pages dropped from the page cache (fsync, then
    POSIX_FADV_DONTNEED), then `chunk`-byte preadv calls, `streams` in flight (threads), each into its own
    page-aligned buffer, faulted in and reused (the way the engine's loader reads experts). `direct`: O_DIRECT,
    OSError where the platform or the filesystem refuses it; else buffered reads (kernel readahead)."""
    from concurrent.futures import ThreadPoolExecutor

    if direct and not hasattr(os, "O_DIRECT"):
        raise OSError("no O_DIRECT on this platform")
    drop_page_cache(path, sync=True)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    bufs = [mmap.mmap(-1, chunk) for _ in range(streams)]  # page-aligned, as O_DIRECT needs
    try:
        for b in bufs:
            b.write(b"\1" * chunk)  # fault the pages in now, as a reused read buffer has them
        offsets = range(0, nbytes, chunk)
        t0 = time.perf_counter()
        if streams == 1:
            done = sum(os.preadv(fd, [bufs[0]], off) for off in offsets)
        else:
            with ThreadPoolExecutor(streams) as ex:
                done = sum(ex.map(lambda io: os.preadv(fd, [bufs[io[0] % streams]], io[1]), enumerate(offsets)))
        return done / (time.perf_counter() - t0)
    finally:
        os.close(fd)
        for b in bufs:
            b.close()


def measure_disk_read(directory: str | None = None, nbytes: int = 128 << 20, chunk: int = 8 << 20,
                      streams: int = 1) -> tuple[float, str]:
    """Cold read bandwidth of a fresh temp file (cold_file, read_cold): O_DIRECT, or buffered after the page
    cache drop where O_DIRECT is refused, in `chunk`-byte reads (rounded up to whole pages), `streams` in flight.
    Returns (bytes/s, method)."""
    chunk = -(-chunk // 4096) * 4096
    nbytes = max(chunk * streams, nbytes // chunk * chunk)
    with cold_file(directory, nbytes, chunk) as path:
        try:
            bw, method = read_cold(path, nbytes, chunk, streams, direct=True), "O_DIRECT"
        except OSError:  # O_DIRECT refused at open or at the first read (EINVAL): buffered
            bw, method = read_cold(path, nbytes, chunk, streams, direct=False), "buffered after POSIX_FADV_DONTNEED"
    return bw, method + (f", {chunk / 2**20:.1f} MiB reads" + (f" x{streams} in flight" if streams > 1 else ""))


def measure_disk(directory, nbytes: int, chunk: int = 8 * MiB, streams: int = 4) -> dict[str, float]:
    """Cold read bytes/s of a fresh `nbytes` file on `directory`'s filesystem (cold_file; read_cold drops it
    from the page cache before each method), by method: O_DIRECT in `chunk` reads one at a time, O_DIRECT with
    `streams` reads in flight, and buffered reads (kernel readahead); an O_DIRECT method this filesystem refuses
    is left out. The best is the disk's limit here."""
    nbytes = max(chunk, nbytes // chunk * chunk)
    out = {}
    with cold_file(directory, nbytes, chunk, prefix=".moe-offload-bench-disk-") as path:
        for name, direct, workers in ((f"O_DIRECT {chunk // MiB} MiB reads", True, 1),
                                      (f"O_DIRECT {streams} x {chunk // MiB} MiB reads in flight", True, streams),
                                      (f"buffered {chunk // MiB} MiB reads (readahead)", False, 1)):
            try:
                out[name] = read_cold(path, nbytes, chunk, workers, direct)
            except OSError:  # O_DIRECT refused by this filesystem
                pass
    return out


def measure_ram_read(threads: int | None, nbytes: int = 512 * MiB, repeat: int = 9) -> dict:
    """RAM read bytes/s of torch sums over an fp32 buffer far larger than the caches: {best, median} of
    `repeat`. `threads`: torch's thread count to set first (None: as it is)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    return _rates(x.numel() * 4, _timings(lambda: x.sum(), repeat))


def _gemv_weights(dtype: str, rows: int, cols: int, total: int) -> list:
    """Distinct [rows, cols] matrices of `dtype` totalling `total` bytes (at least 2): beyond the caches, as a
    decode step streams them."""
    import torch

    dt = getattr(torch, dtype)
    return [torch.full((rows, cols), 0.01, dtype=dt) for _ in range(max(2, total // (rows * cols * dt.itemsize)))]


def _matmul_times(ws: list, m: int, repeat: int) -> list[float]:
    """Seconds of each of `repeat` passes of x [m, cols] times every W [rows, cols] of `ws`, through the engine's
    own linear (models.base.linear: the native 16-bit GEMV for a few rows where q4.c loads, an fp32 GEMM for many
    16-bit rows on a CPU without half GEMMs), so the probe times what decode and prefill run there. torch's
    F.linear alone read float16 weights at 11.3 GB/s on the Xeon of 2026-12-04 against 21.7 for bfloat16 (the
    bench's probes of 17:35 and 17:44), a rate the engine's float16 decode does not run at."""
    from .models.base import linear

    x = ws[0].new_full((m, ws[0].shape[1]), 0.5)
    return _timings(lambda: [linear(x, w) for w in ws], repeat)


def measure_gemv(threads: int | None, dtype: str, rows: int, cols: int, total: int = 384 * MiB,
                 repeat: int = 5) -> dict:
    """Weight bytes/s of decode GEMVs (x [1, cols] times W [rows, cols]) at `dtype` over distinct matrices
    totalling `total` bytes (_gemv_weights): what the engine's GEMV reaches here (_matmul_times), the practical
    ceiling below the RAM bandwidth. {best, median} of `repeat`; `threads` as in measure_ram_read."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    ws = _gemv_weights(dtype, rows, cols, total)
    return _rates(sum(w.numel() * w.element_size() for w in ws), _matmul_times(ws, 1, repeat))


_GEMV_K = 8192


def _ram_read_bw(nbytes: int) -> float:
    return measure_ram_read(None, nbytes, 3)["best"]


def _cpu_gemv(nbytes: int, dtype: str = "bfloat16") -> tuple[float, float]:
    """(bytes/s of a 1 x K GEMV, FLOP/s of a 64 x K GEMM) over `nbytes` of `dtype` weights (two K-wide
    matrices, as measure_gemv times them)."""
    import torch

    rows = max(1, nbytes // getattr(torch, dtype).itemsize // _GEMV_K // 2)
    ws = _gemv_weights(dtype, rows, _GEMV_K, nbytes)
    n = sum(w.numel() for w in ws)
    return (n * ws[0].element_size() / min(_matmul_times(ws, 1, 5)), 2 * 64 * n / min(_matmul_times(ws, 64, 2)))


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
    head (16 in all where the head size is set on its own), intermediate sizes 64, vocabulary 512."""
    toy = dict(config)
    for k, v in config.items():
        if k.endswith("intermediate_size") and isinstance(v, int) and v > 0:
            toy[k] = 64
    heads = config.get("num_attention_heads") or 1
    toy["hidden_size"] = 16 if config.get("head_dim") else 16 * heads  # a set head size keeps its width and the
    # attention its ops and paths; hidden 256 there made Qwen3-30B-A3B's q and o projections 2 MiB each, and
    # streaming them was half the "overhead" measured (docs/simulator.md)
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
    least 1 GiB: past any L2; on the CPU past twice its last-level cache, `cold_bytes`); best of 5 passes."""
    import torch

    from .experts import DenseExpert

    dt, dev = getattr(torch, dtype), torch.device(device)
    total = max(total, 1 << 30) if dev.type == "cuda" else cold_bytes(total)
    one = 3 * hidden * intermediate * dt.itemsize
    n = max(2, -(-total // one))
    units = [DenseExpert(torch.full((2 * intermediate, hidden), 0.01, dtype=dt, device=dev),
                         torch.full((hidden, intermediate), 0.01, dtype=dt, device=dev)) for _ in range(n)]
    x = torch.full((1, hidden), 0.5, dtype=dt, device=dev)

    def run():
        for unit in units:
            unit(x)

    return n * one / best_time(run, 5, torch.cuda.synchronize if dev.type == "cuda" else (lambda: None))


def expert_units(hidden: int, intermediate: int, bits: int = 16, dtype: str = "float16", n: int = 2,
                 device: str = "cpu") -> tuple[list, int]:
    """`n` distinct expert units as the engine decodes them from a store (16-bit: `DenseExpert`; b < 16: the
    4-bit store's codec, `HQQCodec.decode`, whose `make_linear` picks this machine's kernel), over zero
    weights; and the bytes one of them occupies as stored."""
    import torch

    from .experts import DenseExpert, ExpertShape

    dt, dev = getattr(torch, dtype), torch.device(device)
    if bits >= 16:
        one = 3 * hidden * intermediate * dt.itemsize
        return [DenseExpert(torch.full((2 * intermediate, hidden), 0.01, dtype=dt, device=dev),
                            torch.full((hidden, intermediate), 0.01, dtype=dt, device=dev)) for _ in range(n)], one
    from .quant.codec import HQQCodec, expert_spec

    codec, shape = HQQCodec(expert_spec(bits, quantizer="rtn")), ExpertShape(hidden, intermediate)
    one = codec.nbytes(shape)
    return [codec.decode(torch.zeros(one, dtype=torch.uint8, device=dev), shape, dt) for _ in range(n)], one


COLD_CAP = 1 << 30  # the most bytes a probe allocates to get past the CPU's caches


def cold_bytes(floor: int, llc: int | None = None) -> int:
    """Bytes a probe should cycle through so that they come from RAM, not the last-level cache: `floor`, or
    twice the cache where that is more (at most COLD_CAP). Server CPUs keep hundreds of MiB (this project's
    Xeon: 480 MiB of L3), where a fixed 96 MiB stays in cache and times a 4-bit expert call 1.6x too fast."""
    from .cpuinfo import last_level_cache_bytes

    llc = last_level_cache_bytes() if llc is None else llc
    return max(floor, min(2 * llc, COLD_CAP))


def expert_call_seconds(hidden: int, intermediate: int, bits: int = 16, dtype: str = "float16",
                        total: int | None = None, device: str = "cpu", repeat: int = 5, max_units: int = 512) -> float:
    """Seconds of one decode call (M = 1) of an expert at these widths and bits, through the unit and kernel
    the engine runs (`expert_units`), cycling through enough experts that their weights come from RAM, not
    cache (`total` bytes, default `cold_bytes(96 MiB)`; at most `max_units` experts: tiny experts stay tiny),
    what a token pays per expert it uses, kernel and call overhead together. Best of `repeat` passes."""
    import torch

    if total is None:
        total = cold_bytes(96 << 20) if device == "cpu" else 96 << 20
    probe, one = expert_units(hidden, intermediate, bits, dtype, 1, device)
    n = min(max_units, max(2, -(-total // one)))
    units = probe + expert_units(hidden, intermediate, bits, dtype, n - 1, device)[0]
    x = torch.full((1, hidden), 0.5, dtype=getattr(torch, dtype), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        for unit in units:
            unit(x)

    run()  # first touch
    return best_time(run, repeat, sync) / n


def expert_decode_seconds(hidden: int, intermediate: int, bits: int = 16, dtype: str = "float16",
                          repeat: int = 3, meta_bits: int | None = None) -> float:
    """CPU seconds to turn one stored expert (its bytes already in RAM) into the callable unit the engine
    caches: what every miss pays besides the read (`HQQCodec.decode` through make_linear for b < 16; dense 16-bit
    units are views, ~0). meta_bits: the codec's scale/zero bits (default the codec's). Median of `repeat`, after
    one untimed decode."""
    import torch

    from .experts import ExpertShape

    dt = getattr(torch, dtype)
    shape = ExpertShape(hidden, intermediate)
    if bits >= 16:
        from .experts import DenseCodec

        codec = DenseCodec(dt)
    else:
        from .quant.codec import HQQCodec, expert_spec

        codec = HQQCodec(expert_spec(bits, quantizer="rtn", meta_bits=meta_bits))
    blob = torch.zeros(codec.nbytes(shape), dtype=torch.uint8)
    codec.decode(blob, shape, dt)
    times = _timings(lambda: codec.decode(blob, shape, dt), repeat)
    return statistics.median(times)


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
           f"over {ram_bytes >> 20} MiB; CPU GEMV = {dtype} 1x{k} over {gemv_bytes >> 20} MiB, the engine's linear; "
           f"CPU FLOP/s = {dtype} 64x{k} GEMM, the same; disk = cold read of a {disk_bytes >> 20} MiB temp file ({method})")
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
