"""Matmul over quantized weights, per device: y [M, N] = x [M, K] @ W^T with W = (q − c)·s + m.

CPU, batch-1 decode (M <= dense_rows):
  b <= 4   native4: quant/native/q4.c, an AVX2+FMA kernel compiled on first use (cc, cached per user)
           and called through ctypes; codes in its row-major order "r64" (what quantize writes where it
           loads), the activations rounded to int8 per group inside (llama.cpp's Q8 approach: ~0.6 %
           relative output error on Gaussian data, perplexity in docs/quality.md). 1.3-3.3x torch's int4pack
           at M = 1 on the busy box (`scripts/native_q4_bench.py`, docs/perf.md). Used when it loads;
           MOE_OFFLOAD_NATIVE=0, no AVX2/FMA, no compiler or a failed build: silently the torch kernel
           below (a debug log line says why).
  b <= 4   torch.ops.aten._weight_int4pack_mm_for_cpu (bf16 activations; other dtypes are converted in and
           out, as fp32/fp16 activations run the kernel 30× slower). 2/3-bit codes are < 8, so they fit the
           int4 layout unchanged: the compact bit planes are expanded to nibbles once, when the unit is made.
           Codes of b <= 4 are stored in a kernel nibble order (`LAYOUTS`: torch's order differs per CPU
           build, AVX-512 / AVX2 / none); a 4-bit weight stored in this CPU's order (`host_layout`, what
           quantize writes) is a zero-copy view of the stored bytes, one in another order is reordered once
           per load into a copy that replaces it (`relayout`, a byte shuffle: no int32 expansion, nothing
           else kept). `python scripts/int4_miss_cost.py` measures both per miss.
  b = 8    torch.ops.aten._weight_int8pack_mm (one scale per row) plus m·Σx for the per-row offset.
Prefill (M > dense_rows), other devices (CUDA) and shapes the kernels refuse: dequantise into the compute
dtype, then one dense GEMM.

`python -m moe_offload.quant.bench --threads 1 --reps 3 --rows 1,4,16,64,256,1024` (14336×4096, 1 thread of
a shared 2-core EPYC, ms): dense bf16 F.linear M=1 6.8, M=256 91; int4pack M=1 1.6-2.1 (4/3/2-bit alike),
M=16 14-15, M=64 57-64, M=256 230-243; int8pack M=1 4.0, M=64 94, M=256 358; dequantise to bf16 90-153, so
dequantise + F.linear M=1 91-154, M=64 115-182, M=256 176-236. Making the unit on arrival: 4-bit and 8-bit
0 ms (views of the blob), 3-bit 9.7 ms, 2-bit 2.1 ms (nibble expansion).

Shape legend: M rows of activations, N output rows, K inputs, g group size, G = K/g.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.base import UPCAST_BLOCK, cpu_flags, upcast
from . import native
from .hqq import Quantized, affine_, centre
from .pack import nibbles, pack, unpack

INT4_GROUPS = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
# Above this many rows, dequantise once + dense GEMM beats the kernel (the crossovers of the run above:
# int4 between M=64 and 256, int8 between 64 and 256 but nearer 64). The native kernel still beats
# dequantise + fp32 GEMM at 1024 rows (108 against 130 ms at 4096x2048, 2 threads:
# docs/bench/kernels/native-vs-dequant-rows.txt, `python -m moe_offload.quant.bench --bits 4 --rows ...`).
DENSE_ROWS = {"int4pack": 192, "int8pack": 96, "native4": 1024}
# On a CPU with AMX-BF16, torch's bf16 GEMM runs on the tiles (4096x2048 at 512 rows in 6.5 ms at two threads,
# 1.3 TFLOP/s, on the Xeon of 2026-12-04), so for bf16 activations q4.c's dequantisation + that GEMM overtakes the
# native kernel near 32 rows: 16-40 over Qwen3's and Mixtral's expert and attention shapes at two threads
# (docs/bench/kernels/native-vs-dequant-rows-amx.txt: `python -m moe_offload.quant.bench --n N --k K --threads 2
# --rows 8,16,32,64,128,256,512 --bits 4`); at 512 rows 5.9 against 43.7 ms at 4096x2048.
AMX_ROWS = 32


def native_rows(dtype: torch.dtype) -> int:
    """Rows of `dtype` activations up to which the native 4-bit kernel beats dequantise + dense GEMM here."""
    return AMX_ROWS if dtype is torch.bfloat16 and "amx_bf16" in cpu_flags() else DENSE_ROWS["native4"]


# ---- the int4pack nibble orders -------------------------------------------------------------------------
# torch's `_convert_weight_to_int4pack_for_cpu` writes [N, K/2] bytes in an order that depends on the CPU
# build it dispatches to. Every one is blocks of B rows stored k-major, then a tail of N mod B rows:
#   "b64" (AVX-512)   B = 64: byte (k, j) of a block holds rows j (low nibble) and j + 32 (high), j < 32
#   "b32" (AVX2)      B = 32: byte (k, j) holds rows j and j + 16, j < 16
#   "p32" (no SIMD)   B = 32: byte (k, j) holds rows 2j and 2j + 1
# and the tail (16/32/48 rows) pairs rows n, n + 1 at byte (k, n/2). Stores record theirs in the codec spec
# ("layout"); one without the field holds "b64", the only order written before the field existed.
# The native kernel's order (quant/native/q4.c) is row-major instead:
#   "r64"             each row in chunks of 64 codes: byte j of a chunk holds codes j (low) and j + 32
#                     (high), so one 32-byte load unpacks to two 32-code blocks in natural order; a last
#                     chunk of 32 codes (K ≡ 32 mod 64) holds codes j and j + 16. Rows are independent: any
#                     N, K % 32 == 0.
#   "r64t"            r64's nibbles, and the bf16 meta in tiles of 4 rows, [N/4, G, 4, 2] instead of [G, N, 2]
#                     (when N % 4 == 0): the kernel's four-row tile reads its meta as one stream, not one
#                     16-byte load per group 2N·2 bytes apart (a page apart at Mixtral's 14336 rows; 1.22-1.28x
#                     there at one thread, docs/bench/kernels/native-r64t-vs-r64.txt). PackedMatrix.sz is then
#                     4-D; `meta()` gives
#                     the [G, n, 2] view every other reader wants.
#   "r64i"            r64t's meta, and the nibbles of each tile of 4 rows interleaved by 32-byte chunk (chunk c
#                     of the tile's row r at 128·c + 32·r): the kernel's tile reads one sequential stream instead
#                     of four rows K/2 bytes apart, which a core's prefetchers follow (cold weights, one thread:
#                     1.25-1.52x at Qwen3's widths and Mixtral's gate_up, 1.00x at its down;
#                     docs/bench/kernels/native-r64i-vs-r64t-cold.txt). Needs N % 4 == 0 and
#                     K % 64 == 0; a matrix of another shape is held in r64t (`effective_layout`).
LAYOUTS = {"b64": 64, "b32": 32, "p32": 32, "r64": 64, "r64t": 64, "r64i": 64}
TORCH_LAYOUTS = ("b64", "b32", "p32")
ROW_MAJOR = ("r64", "r64t")  # the same nibble order
NATIVE_LAYOUT = "r64i"
LEGACY_LAYOUT = "b64"


def effective_layout(layout: str, N: int, K: int) -> str:
    """The order an N×K matrix is held in when `layout` is asked for (r64i needs whole tiles and chunks)."""
    if layout == "r64i" and (N % 4 or K % 64):
        return "r64t"
    return layout


def tiles_meta(layout: str, N: int) -> bool:
    """Is the meta of an N-row matrix in `layout` stored in tiles of 4 rows?"""
    return layout in ("r64t", "r64i") and N % 4 == 0


def interleave(stream: torch.Tensor, N: int, K: int, unit: int) -> torch.Tensor:
    """r64 rows -> r64i tiles: [N/4, 4, K/64, unit] -> [N/4, K/64, 4, unit] (unit: 64 codes, or 32 bytes)."""
    return stream.reshape(N // 4, 4, K // 64, unit).transpose(1, 2).reshape(-1)


def deinterleave(stream: torch.Tensor, N: int, K: int, unit: int) -> torch.Tensor:
    return stream.reshape(N // 4, K // 64, 4, unit).transpose(1, 2).reshape(-1)


def tile_meta(sz: torch.Tensor) -> torch.Tensor:
    """sz [G, N, 2] -> a new [N/4, G, 4, 2] (N % 4 == 0)."""
    G, N, _ = sz.shape
    return sz.reshape(G, N // 4, 4, 2).permute(1, 0, 2, 3).contiguous()


def int4pack_ordered(N: int, K: int, bits: int, layout: str = LEGACY_LAYOUT) -> bool:
    """Codes of b <= 4 are stored in `layout`'s order when its rule allows (int4pack: N % 16 == 0; r64:
    K % 32 == 0); row-major otherwise."""
    if layout == "r64i":
        return bits <= 4 and N % 4 == 0 and K % 64 == 0
    if layout in ROW_MAJOR:
        return bits <= 4 and K % 32 == 0
    return bits <= 4 and N % 16 == 0 and K % 2 == 0


def _check(layout: str) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown int4 layout {layout!r}; choose from {sorted(LAYOUTS)}")
    return LAYOUTS[layout]


def int4pack_order(codes: torch.Tensor, layout: str = LEGACY_LAYOUT) -> torch.Tensor:
    """codes [N, K] -> flat stream r such that pack(r, 4) is what a CPU of `layout` converts codes to."""
    B = _check(layout)
    N, K = codes.shape
    layout = effective_layout(layout, N, K)
    if layout == "r64i":
        return interleave(int4pack_order(codes, "r64"), N, K, 64)
    if layout in ROW_MAJOR:  # [N, chunk, lh, j] -> [N, chunk, j, lh]
        full = codes[:, : K // 64 * 64].reshape(N, -1, 2, 32).transpose(-1, -2)
        tail = codes[:, K // 64 * 64:].reshape(N, -1, 2, 16).transpose(-1, -2)
        return torch.cat([full.reshape(N, -1), tail.reshape(N, -1)], 1).reshape(-1)
    nb = N // B
    if layout == "p32":
        full = codes[: nb * B].reshape(nb, B // 2, 2, K).permute(0, 3, 1, 2)  # [NB, K, j, lh]
    else:
        full = codes[: nb * B].reshape(nb, 2, B // 2, K).permute(0, 3, 2, 1)  # [NB, K, j, lh]
    tail = codes[nb * B:].reshape(-1, 2, K).permute(2, 0, 1)  # [K, n/2, lh]
    return torch.cat([full.reshape(-1), tail.reshape(-1)])


def int4pack_unorder(stream: torch.Tensor, N: int, K: int, layout: str = LEGACY_LAYOUT) -> torch.Tensor:
    """Inverse of `int4pack_order`: flat stream -> codes [N, K]."""
    B = _check(layout)
    layout = effective_layout(layout, N, K)
    if layout == "r64i":
        return int4pack_unorder(deinterleave(stream[: N * K], N, K, 64), N, K, "r64")
    if layout in ROW_MAJOR:
        r = stream[: N * K].reshape(N, K)
        full = r[:, : K // 64 * 64].reshape(N, -1, 32, 2).transpose(-1, -2)
        tail = r[:, K // 64 * 64:].reshape(N, -1, 16, 2).transpose(-1, -2)
        return torch.cat([full.reshape(N, -1), tail.reshape(N, -1)], 1)
    nb = N // B
    t = nb * B * K
    if layout == "p32":
        full = stream[:t].reshape(nb, K, B // 2, 2).permute(0, 2, 3, 1)
    else:
        full = stream[:t].reshape(nb, K, B // 2, 2).permute(0, 3, 2, 1)
    tail = stream[t: N * K].reshape(K, -1, 2).permute(1, 2, 0).reshape(-1, K)
    return torch.cat([full.reshape(nb * B, K), tail])


def _probe(layout: str) -> bool:
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 16, (80, 64), generator=g, dtype=torch.uint8)  # one full block + a tail
    ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(c.to(torch.int32), 1)
    return bool(torch.equal(pack(int4pack_order(c, layout), 4).view(80, 32), ref))


@functools.cache
def host_layout() -> str | None:
    """The order this torch's CPU int4 kernel reads (checked once on a probe); None if it is none of ours.
    (ATEN_CPU_CAPABILITY=default|avx2|avx512 picks torch's CPU build, hence the order, per process.)"""
    try:
        return next((lay for lay in TORCH_LAYOUTS if _probe(lay)), None)
    except (RuntimeError, AttributeError):
        return None


def native_available() -> bool:
    """The native AVX2 kernel is compiled and loaded (quant/native: else torch's int4pack path)."""
    return native.lib() is not None


def compute_layout() -> str | None:
    """The order this machine's 4-bit kernel reads: "r64" with the native kernel, else torch's
    (`host_layout`)."""
    return NATIVE_LAYOUT if native_available() else host_layout()


def write_layout() -> str:
    """The order a new store's 4-bit codes are written in: this machine's kernel's, so that decoding them is a
    view; MOE_OFFLOAD_INT4_LAYOUT=<layout> writes another (tests: the converting path on any machine)."""
    forced = os.environ.get("MOE_OFFLOAD_INT4_LAYOUT")
    if forced:
        _check(forced)
        return forced
    return compute_layout() or LEGACY_LAYOUT


SLAB = 1 << 18  # bytes of nibbles reordered at a time: temporaries stay small and are reused


def relayout(nib: torch.Tensor, N: int, K: int, src: str, dst: str) -> torch.Tensor:
    """A nibble stream [N*K/2] in order `src` -> a new one in order `dst`, in slabs of 64-row blocks (every
    order is block-local within 64 rows, and the rows past the last such block stand alone in each), so the
    temporaries are a few hundred KiB whatever the matrix. b64 <-> b32 is a byte shuffle per slab; the rest
    goes through the slab's row-major codes."""
    if src == dst:
        return nib.clone()
    _check(src), _check(dst)
    out = torch.empty(N * K // 2, dtype=torch.uint8, device=nib.device)
    per = 32 * K  # bytes of one 64-row block
    full = N // 64 * per
    step = max(1, SLAB // per) * per
    if {src, dst} == {"b64", "b32"}:
        t = torch.empty(min(step, full) // 2, dtype=torch.uint8, device=nib.device)
        for o in range(0, full, step):
            e = min(o + step, full)
            x, y = nib[o:e], out[o:e]
            nb = x.numel() // per
            if src == "b64":  # [nb, K, j // 16, j % 16] -> [nb, block of 32, K, d]
                xa, ya = x.view(nb, K, 2, 16), y.view(nb, 2, K, 16)
                x0, x1, y0, y1 = xa[:, :, 0], xa[:, :, 1], ya[:, 0], ya[:, 1]
            else:
                xa, ya = x.view(nb, 2, K, 16), y.view(nb, K, 2, 16)
                x0, x1, y0, y1 = xa[:, 0], xa[:, 1], ya[:, :, 0], ya[:, :, 1]
            tt = t[: nb * per // 2].view(x0.shape)
            torch.bitwise_and(x0, 0x0F, out=y0)  # low rows: low nibbles of both halves
            torch.bitwise_and(x1, 0x0F, out=tt)
            y0 |= tt.bitwise_left_shift_(4)
            torch.bitwise_right_shift(x0, 4, out=y1)  # high rows: the high nibbles
            torch.bitwise_and(x1, 0xF0, out=tt)
            y1 |= tt
        done = full
    else:
        done = 0
    for o in range(done, N * K // 2, step):  # whole slabs of 64-row blocks, then the tail, each standalone
        n = min(step, N * K // 2 - o) * 2 // K
        out[o:o + n * K // 2] = pack(int4pack_order(_unorder_tail(nib[o:o + n * K // 2], n, K, src), dst), 4)
    return out


def nibbles_in(pm: PackedMatrix, dst: str) -> torch.Tensor:
    """pm's b <= 4 codes as a nibble stream [N*K/2] in order `dst`: a view of pm.packed when it is one already
    (4-bit, stored in `dst`), else a new stream (2/3-bit codes expanded, reordered once)."""
    N, K = pm.N, pm.K
    dst = effective_layout(dst, N, K)
    nib = nibbles(pm.packed, pm.bits, N * K)
    if pm.ordered and int4pack_ordered(N, K, 4, dst):
        if pm.layout == dst or {pm.layout, dst} <= set(ROW_MAJOR):
            return nib
        if dst == "r64i":  # through r64 (a view, or the C pass from torch's orders), interleaved by one copy
            return interleave(nibbles_in(pm, "r64"), N, K, 32)
        if pm.layout == "r64i" and dst in ROW_MAJOR:
            return deinterleave(nib, N, K, 32)
        so = native.lib() if dst in ROW_MAJOR and pm.layout in TORCH_LAYOUTS else None
        if so is not None:  # torch's orders -> r64 in one C pass (the torch slabs below take ~20× longer)
            out = torch.zeros(N * K // 2, dtype=torch.uint8)
            rc = so.q4_to_r64(nib.data_ptr(), out.data_ptr(), N, K, LAYOUTS[pm.layout],
                              int(pm.layout == "p32"), torch.get_num_threads())
            if rc == 0:
                return out
        return relayout(nib, N, K, pm.layout, dst)
    c = pm.codes()  # a shape one of the two orders does not allow: through row-major codes (small matrices)
    return pack(int4pack_order(c, dst) if int4pack_ordered(N, K, 4, dst) else c, 4)


def _unorder_tail(nib: torch.Tensor, n: int, K: int, layout: str) -> torch.Tensor:
    c = torch.stack([nib & 15, nib >> 4], -1).view(-1)
    return int4pack_unorder(c, n, K, layout)


# ---- one stored matrix ----------------------------------------------------------------------------------

@dataclass
class PackedMatrix:
    """A quantized matrix as stored: packed codes (int4pack order `layout` for b <= 4 when allowed,
    row-major otherwise; 8-bit codes as int8 q − 128) and scales_and_zeros sz bf16 [G, N, 2]."""

    packed: torch.Tensor  # uint8 [packed_nbytes(N*K, bits)]
    sz: torch.Tensor  # bf16 [G, N, 2]; [N/4, G, 4, 2] when tiled (layouts r64t, r64i)
    bits: int
    N: int
    K: int
    layout: str = LEGACY_LAYOUT

    def __post_init__(self):
        self.layout = effective_layout(self.layout, self.N, self.K)

    @property
    def tiled(self) -> bool:
        return self.sz.dim() == 4

    @property
    def groups(self) -> int:
        return self.sz.shape[1] if self.tiled else self.sz.shape[0]

    @property
    def group_size(self) -> int:
        return self.K // self.groups

    def meta(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """(s, m) of rows start .. end as [G, n, 2]: a view of sz, or a copy of those rows when tiled."""
        end = self.N if end is None else end
        if not self.tiled:
            return self.sz[:, start:end]
        a, b = start // 4, -(-end // 4)
        t = self.sz[a:b].permute(1, 0, 2, 3).reshape(self.groups, 4 * (b - a), 2)
        return t[:, start - 4 * a:end - 4 * a]

    @property
    def ordered(self) -> bool:
        """The codes are in `layout`'s order (else row-major: a shape the order does not allow, or 8-bit)."""
        return int4pack_ordered(self.N, self.K, self.bits, self.layout)

    @classmethod
    def from_quantized(cls, q: Quantized, layout: str = LEGACY_LAYOUT) -> PackedMatrix:
        N, K = q.codes.shape
        c, sz, layout = q.codes, q.sz, effective_layout(layout, N, K)
        if int4pack_ordered(N, K, q.bits, layout):
            c = int4pack_order(c, layout)
            if tiles_meta(layout, N):
                sz = tile_meta(sz)
        elif q.bits == 8:
            c = c ^ 0x80  # int8 two's complement of q − 128
        return cls(pack(c, q.bits), sz, q.bits, N, K, layout)

    def codes(self) -> torch.Tensor:
        """uint8 [N, K] in row-major order (works on any device)."""
        n = self.N * self.K
        c = unpack(self.packed, self.bits, n)
        if self.ordered:
            return int4pack_unorder(c, self.N, self.K, self.layout)
        if self.bits == 8:
            c = c ^ 0x80
        return c.reshape(self.N, self.K)

    def dequantize(self, dtype=torch.float32, rows: int | None = None, out: torch.Tensor | None = None,
                   start: int = 0) -> torch.Tensor:
        """W [N, K] in `dtype`, equal to hqq.dequantize(codes, sz). On CPU it runs 64 rows at a time so the
        fp32 temporaries stay in cache (measured 6× faster than whole-matrix passes at 14336×4096).
        out [n, K]: rows start .. start + n of W written there instead (start a multiple of 64)."""
        N, K, dev = self.N, self.K, self.packed.device
        rows = rows or (64 if dev.type == "cpu" else N)
        G = self.groups
        if out is None:
            out, start = torch.empty(N, K, dtype=dtype, device=dev), 0
        if self._dequantize_native(out, start):
            return out
        end = start + out.shape[0]
        sz = self.meta(start, end)
        s = sz[..., 0].t().float()[..., None]  # [n, G, 1] for rows start .. end
        m0 = sz[..., 1].t().float()[..., None] - centre(self.bits) * s
        if self.ordered and self.layout != "p32":  # (p32: pairs; below)
            rows_of = self._ordered_rows(nibbles(self.packed, self.bits, N * K))
        elif self.bits == 8:
            rows_of = lambda r, n: self.packed[r * K:(r + n) * K].view(n, K) ^ 0x80  # noqa: E731
        else:
            c = self.codes()
            rows_of = lambda r, n: c[r:r + n]  # noqa: E731
        buf = torch.empty(min(rows, N), G, K // G, device=dev)
        for r in range(start, end, rows):
            n = min(rows, end - r)
            f = buf[:n]
            f.copy_(rows_of(r, n).view(n, G, K // G))
            affine_(f, s[r - start:r - start + n], m0[r - start:r - start + n])
            out[r - start:r - start + n].copy_(f.view(n, K))
        return out

    def _dequantize_native(self, out: torch.Tensor, start: int) -> bool:
        """Rows start .. start + len(out) into out by q4.c's q4_dequant (the same numbers in one pass) where it
        applies: 4-bit codes in a row-major order of its own (r64, r64t, r64i), bf16 meta, on CPU. False: the
        torch path runs."""
        code = native.DTYPES.get(out.dtype)
        if (self.bits != 4 or self.layout not in (*ROW_MAJOR, NATIVE_LAYOUT) or not self.ordered or code is None
                or self.packed.device.type != "cpu" or self.sz.dtype != torch.bfloat16 or not out.is_contiguous()
                or not self.packed.is_contiguous() or not self.sz.is_contiguous() or out.shape[-1:] != (self.K,)):
            return False
        so = native.lib()
        if so is None:
            return False
        return so.q4_dequant(ctypes.byref(self.native_matrix()), start, out.shape[0], out.data_ptr(), code,
                             torch.get_num_threads()) == 0

    def native_matrix(self) -> native.Matrix:
        """q4.c's q4_matrix over these tensors (which must outlive it): the codes in r64 / r64t / r64i, the bf16
        meta with its strides (bf16 elements): per group sg, per row sn, per four-row tile st."""
        sg, st = (8, 8 * self.groups) if self.tiled else (2 * self.N, 8)
        return native.Matrix(self.packed.data_ptr(), self.sz.data_ptr(), sg, 2, st, self.N, self.K, self.group_size,
                             int(self.layout == "r64i"))

    def _ordered_rows(self, nib: torch.Tensor):
        """rows_of(r, n) for the int4pack order: unpack + un-permute in one strided pass per nibble half."""
        N, K, B = self.N, self.K, LAYOUTS[self.layout]
        if self.layout == "r64i":  # a range of whole tiles is a byte range, de-interleaved
            def rows_r64i(r: int, n: int) -> torch.Tensor:
                b = deinterleave(nib[r * K // 2:(r + n) * K // 2], n, K, 32)
                return int4pack_unorder(torch.stack([b & 15, b >> 4], -1).view(-1), n, K, "r64")

            return rows_r64i
        if self.layout in ROW_MAJOR:  # row-major: a row range is a byte range
            def rows_r64(r: int, n: int) -> torch.Tensor:
                b = nib[r * K // 2:(r + n) * K // 2]
                return int4pack_unorder(torch.stack([b & 15, b >> 4], -1).view(-1), n, K, "r64")

            return rows_r64
        full = N // B * B
        blocks = nib[: full * K // 2].view(-1, K, B // 2).permute(0, 2, 1)  # [NB, j, K]
        tail: list[torch.Tensor] = []

        def rows_of(r: int, n: int) -> torch.Tensor:
            if r % B == 0 and n % B == 0 and r + n <= full:
                b = blocks[r // B:(r + n) // B]
                out = torch.empty(b.shape[0], 2, B // 2, K, dtype=torch.uint8, device=nib.device)
                torch.bitwise_and(b, 15, out=out[:, 0])
                torch.bitwise_right_shift(b, 4, out=out[:, 1])
                return out.view(n, K)
            if not tail:  # rare: the tail rows, odd chunkings (unordered once)
                c = torch.stack([nib & 15, nib >> 4], -1).view(-1)
                tail.append(int4pack_unorder(c, N, K, self.layout))
            return tail[0][r:r + n]

        return rows_of


# ---- callables: x [M, K] -> [M, N] in x's dtype ----------------------------------------------------------

class DequantLinear:
    """Dequantise into the activation dtype on every call, then dense GEMMs (CUDA, prefill, fallback). On CPU
    the weights are dequantised CHUNK_BYTES at a time into one buffer, so a prefill's transient stays bounded
    (a whole 14336×4096 matrix is 235 MB in bf16, 470 MB in fp32) instead of a matrix per call."""

    kind = "dense"
    CHUNK_BYTES = 16 * 2**20

    def __init__(self, pm: PackedMatrix):
        self.pm = pm

    @property
    def nbytes(self) -> int:
        return self.pm.packed.numel() + self.pm.sz.numel() * 2

    def tensors(self) -> list[torch.Tensor]:
        """The stored matrix's tensors and the kernel's own (its layout of the codes, scales it split off)."""
        own = [t for t in vars(self).values() if isinstance(t, torch.Tensor)]
        return [self.pm.packed, self.pm.sz, *own]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [M, K] -> [M, N]
        pm = self.pm
        if pm.packed.device.type != "cpu":
            return F.linear(x, pm.dequantize(x.dtype))
        # many 16-bit rows on a CPU without native half GEMMs: fp32 GEMMs (4-7x faster there), rounded once
        # (models.base.upcast), over fp32 blocks of UPCAST_BLOCK weights that stay in cache
        up = upcast(x)
        xc, dt = (x.float(), torch.float32) if up else (x, x.dtype)
        rows = max(64, (UPCAST_BLOCK * 4 if up else self.CHUNK_BYTES) // (pm.K * dt.itemsize) // 64 * 64)
        if rows >= pm.N:
            y = F.linear(xc, pm.dequantize(dt))
            return y.to(x.dtype) if up else y
        y = x.new_empty(x.shape[0], pm.N)
        w = torch.empty(rows, pm.K, dtype=dt)
        for r in range(0, pm.N, rows):
            n = min(rows, pm.N - r)
            y[:, r:r + n] = F.linear(xc, pm.dequantize(dt, out=w[:n], start=r))
        return y


class Int4Linear(DequantLinear):
    """CPU int4pack kernel for b <= 4, over nibbles in the order this CPU's kernel reads (`host_layout`):
    4-bit codes stored in that order are a view of the stored bytes; otherwise (2/3-bit codes expanded to
    nibbles, or codes in another CPU's order) one new stream in the host's order replaces them, and the
    unit keeps no view of the stored bytes (its meta is copied if it was one)."""

    kind = "int4pack"

    def __init__(self, pm: PackedMatrix, dense_rows: int = DENSE_ROWS["int4pack"]):
        self.dense_rows = dense_rows
        host = host_layout()
        if host is None:  # an order none of ours: torch converts, once; the codes stay for dequantize
            self.w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(pm.codes().to(torch.int32), 1)
            self.sz = pm.meta().contiguous()
            super().__init__(pm)
            return
        nib, sz = in_order(pm, host)
        self.w, self.sz = nib.view(pm.N, pm.K // 2), sz
        super().__init__(PackedMatrix(nib, sz, 4, pm.N, pm.K, host))  # codes < 8 are nibbles: same values

    @property
    def nbytes(self) -> int:
        return super().nbytes + (0 if _shares(self.w, self.pm.packed) else self.w.numel())

    def __call__(self, x):
        if x.shape[0] > self.dense_rows:
            return super().__call__(x)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        return mm(x.to(torch.bfloat16), self.w, self.pm.group_size, self.sz).to(x.dtype)


class NativeQ4Linear(DequantLinear):
    """The native AVX2 kernel (quant/native/q4.c) for b <= 4, over nibbles in its row-major order "r64": 4-bit
    codes stored in that order are a view of the stored bytes; other orders and 2/3-bit codes become one new
    r64 stream that replaces them (as in Int4Linear). The activations are rounded to int8 per group inside
    the kernel (as llama.cpp's Q8 activations): outputs differ from the fp32 dequantised reference by that
    rounding, ~0.6 % relative on Gaussian data (tests/test_native_q4.py). Prefill rows (past rows(dtype)) take
    the dequantise + dense path."""

    kind = "native4"

    def __init__(self, pm: PackedMatrix, dense_rows: int | None = None, layout: str = NATIVE_LAYOUT):
        """layout: the order the kernel reads (r64i, or r64 / r64t: scripts/native_q4_bench.py compares them)."""
        self.dense_rows = DENSE_ROWS["native4"] if dense_rows is None else dense_rows
        self.by_machine = dense_rows is None  # rows(): this CPU's crossover for the activations' dtype
        self.lib = native.lib()
        nib, sz = in_order(pm, layout)
        self.w, self.sz = nib, sz
        super().__init__(PackedMatrix(nib, sz, 4, pm.N, pm.K, layout))
        self.N, self.call = pm.N, self.lib.q4_call  # the call's fixed arguments, bound once
        self.matrix = self.pm.native_matrix()
        self.args, self.addr = ctypes.byref(self.matrix), ctypes.addressof(self.matrix)

    def rows(self, dtype: torch.dtype) -> int:
        """Rows up to which a call runs the kernel (more: dequantise + dense GEMM): the dense_rows given, else this
        CPU's crossover for `dtype` (native_rows)."""
        return native_rows(dtype) if self.by_machine else self.dense_rows

    def __call__(self, x):  # [M, K] -> [M, N]
        M = x.shape[0]
        if M > self.rows(x.dtype) or M == 0:
            return super().__call__(x)
        dt = x.dtype
        xc, code = native.activations(x)
        y = xc.new_empty(M, self.N)
        rc = self.call(xc.data_ptr(), y.data_ptr(), code, M, self.args, torch.get_num_threads())
        if rc:
            pm = self.pm
            raise RuntimeError(f"native q4 kernel refused {pm.N}x{pm.K} g{pm.group_size} (code {rc})")
        return y if y.dtype is dt else y.to(dt)


def fused_expert(gate_up: NativeQ4Linear, down: NativeQ4Linear, x: torch.Tensor) -> torch.Tensor:
    """y [M, D] = down(silu(g) * u), [g | u] = gate_up(x), in one native call (q4.c's q4_expert): one parallel
    region for the three steps instead of two kernel calls and the Python ops between them (decode at Qwen3's
    128 small experts runs 64 experts a token). The intermediate stays fp32 inside the call."""
    dt = x.dtype
    xc, code = native.activations(x)
    y = xc.new_empty(x.shape[0], down.N)
    rc = gate_up.lib.q4_expert(xc.data_ptr(), y.data_ptr(), code, x.shape[0], gate_up.args, down.args,
                               torch.get_num_threads())
    if rc:
        raise RuntimeError(f"native q4 kernel refused the expert {gate_up.N}x{gate_up.K} / {down.N}x{down.K} "
                           f"(code {rc})")
    return y if y.dtype is dt else y.to(dt)


def fused_moe(experts: list[tuple[NativeQ4Linear, NativeQ4Linear]], x: torch.Tensor, weights: list[float],
              each: bool = False) -> torch.Tensor | None:
    """One token through a layer's 4-bit SwiGLU experts in one native call (q4.c's q4_moe): x [1, D], experts
    (gate_up, down) in ascending expert order, weights the fp32 values torch would multiply each output by.
    -> [1, D], the weighted outputs summed in that order with every step rounded to x's dtype, as
    experts._dispatch_one sums them (bit for bit); each=True: [A, D], each expert's weighted output. None when
    the kernel refuses the group (shapes, group sizes, x's dtype): the caller runs the experts one by one."""
    code = native.DTYPES.get(x.dtype)
    if code is None or x.shape[0] != 1:
        return None
    A = len(experts)
    xc = x.contiguous()
    y = xc.new_empty(A if each else 1, x.shape[-1])
    gate_up = experts[0][0]
    gus = (ctypes.c_void_p * A)(*(g.addr for g, _ in experts))
    dns = (ctypes.c_void_p * A)(*(d.addr for _, d in experts))
    rc = gate_up.lib.q4_moe(xc.data_ptr(), y.data_ptr(), code, A, gus, dns, (ctypes.c_float * A)(*weights),
                            int(each), torch.get_num_threads())
    if rc == -1:
        return None
    if rc:
        raise RuntimeError(f"native q4 kernel failed on {A} experts {gate_up.N}x{gate_up.K} (code {rc})")
    return y


def in_order(pm: PackedMatrix, dst: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(nibbles, sz) a b <= 4 kernel keeps for pm in order `dst`: views of the stored bytes when they are in
    that order already; else a new nibble stream, and sz copied out of the blob too, so the unit keeps no view
    of it."""
    dst = effective_layout(dst, pm.N, pm.K)
    nib = nibbles_in(pm, dst)
    native_order = dst in (*ROW_MAJOR, "r64i")
    if _shares(nib, pm.packed) and (native_order or not pm.tiled):
        return nib, pm.sz if native_order else pm.sz.contiguous()  # the kernel reads both orders of meta
    sz = tile_meta(pm.meta()) if tiles_meta(dst, pm.N) else pm.meta().contiguous()
    if _shares(sz, pm.packed):
        sz = sz.clone()
    return nib, sz


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class Int8Linear(DequantLinear):
    """CPU int8pack kernel (one group per row): y = s·(x @ (q − 128)^T) + m·Σx."""

    kind = "int8pack"

    def __init__(self, pm: PackedMatrix, dense_rows: int = DENSE_ROWS["int8pack"]):
        super().__init__(pm)
        self.dense_rows = dense_rows
        self.w = pm.packed[: pm.N * pm.K].view(torch.int8).view(pm.N, pm.K)
        self.s = pm.meta()[0, :, 0].contiguous()  # bf16 [N]
        self.m = pm.meta()[0, :, 1].float()  # [N]

    def __call__(self, x):
        if x.shape[0] > self.dense_rows:
            return super().__call__(x)
        xb = x.to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(xb, self.w, self.s).float()
        return (y + xb.float().sum(-1, keepdim=True) * self.m).to(x.dtype)


def _has(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


def native_ok(K: int, g: int) -> bool:
    """Shapes q4.c takes: K % 32 == 0, groups of 32 or a multiple of 64 up to 256."""
    return K % 32 == 0 and K % g == 0 and (g == 32 or (g % 64 == 0 and g <= 256))


def kernel_for(pm: PackedMatrix, device: torch.device) -> str:
    """The fastest path this matrix can take on `device`: native4, int4pack, int8pack or dense."""
    if device.type != "cpu":
        return "dense"
    if pm.bits <= 4 and native_ok(pm.K, pm.group_size) and native_available():
        return "native4"
    if pm.bits <= 4 and pm.group_size in INT4_GROUPS and pm.N % 16 == 0:
        return "int4pack" if _has("_weight_int4pack_mm_for_cpu") else "dense"
    if pm.bits == 8 and pm.group_size == pm.K and pm.K % 16 == 0 and _has("_weight_int8pack_mm"):
        return "int8pack"  # (other K crash the kernel in torch 2.13)
    return "dense"


def make_linear(pm: PackedMatrix, kernel: str = "auto", dense_rows: int | None = None):
    """A callable for `pm` (already on its device). kernel: auto | dense. dense_rows: see DENSE_ROWS."""
    k = kernel_for(pm, pm.packed.device) if kernel == "auto" else kernel
    if k == "native4":
        return NativeQ4Linear(pm, dense_rows)
    if k == "int4pack":
        return Int4Linear(pm, dense_rows or DENSE_ROWS[k])
    if k == "int8pack":
        return Int8Linear(pm, dense_rows or DENSE_ROWS[k])
    if k == "dense":
        return DequantLinear(pm)
    raise ValueError(f"unknown kernel {kernel!r}: auto, dense, native4, int4pack or int8pack")

