"""Matmul over quantized weights, per device: y [M, N] = x [M, K] @ W^T with W = (q − c)·s + m.

CPU, batch-1 decode (M <= dense_rows):
  b <= 4   torch.ops.aten._weight_int4pack_mm_for_cpu (bf16 activations; other dtypes are converted in and
           out, as fp32/fp16 activations run the kernel 30× slower). 2/3-bit codes are < 8, so they fit the
           int4 layout unchanged: the compact bit planes are expanded to nibbles once, when the unit is made.
           Codes of b <= 4 are stored in the kernel's own nibble order (see `int4pack_order`), so a 4-bit
           weight is a zero-copy view of the stored bytes.
  b = 8    torch.ops.aten._weight_int8pack_mm (one scale per row) plus m·Σx for the per-row offset.
Prefill (M > dense_rows), other devices (CUDA) and shapes the kernels refuse: dequantise into the compute
dtype, then one dense GEMM.

Shape legend: M rows of activations, N output rows, K inputs, g group size, G = K/g.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .hqq import Quantized, dequantize
from .pack import nibbles, pack, unpack

INT4_GROUPS = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
DENSE_ROWS = 32  # above this many rows, dequantise + dense GEMM beats the CPU int4/int8 kernels


# ---- the int4pack nibble order -------------------------------------------------------------------------

def int4pack_ordered(N: int, K: int, bits: int) -> bool:
    """Codes of b <= 4 are stored in int4pack order when the kernel's N % 16 rule allows it."""
    return bits <= 4 and N % 16 == 0 and K % 2 == 0


def int4pack_order(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] -> flat stream r such that pack(r, 4) is `_convert_weight_to_int4pack_for_cpu(codes)`
    (AVX-512 layout: blocks of 64 rows; byte (k, h, d) of a block holds rows 16h+d (low) and 16h+d+32 (high);
    a tail block of 16/32/48 rows pairs rows n, n+1 at byte (k, n/2))."""
    N, K = codes.shape
    nb = N // 64
    full = codes[: nb * 64].reshape(nb, 2, 2, 16, K).permute(0, 4, 2, 3, 1)  # [NB, K, h, d, lh]
    tail = codes[nb * 64:].reshape(-1, 2, K).permute(2, 0, 1)  # [K, n/2, lh]
    return torch.cat([full.reshape(-1), tail.reshape(-1)])


def int4pack_unorder(stream: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Inverse of `int4pack_order`: flat stream -> codes [N, K]."""
    nb = N // 64
    t = nb * 64 * K
    full = stream[:t].reshape(nb, K, 2, 16, 2).permute(0, 4, 2, 3, 1).reshape(nb * 64, K)
    tail = stream[t: N * K].reshape(K, -1, 2).permute(1, 2, 0).reshape(-1, K)
    return torch.cat([full, tail])


@functools.cache
def int4pack_native() -> bool:
    """Does this torch's CPU kernel use the layout `int4pack_order` writes? (Checked once on a probe.)"""
    try:
        g = torch.Generator().manual_seed(0)
        c = torch.randint(0, 16, (80, 64), generator=g, dtype=torch.uint8)  # one full block + a tail
        ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(c.to(torch.int32), 1)
        return bool(torch.equal(pack(int4pack_order(c), 4).view(80, 32), ref))
    except (RuntimeError, AttributeError):
        return False


# ---- one stored matrix ----------------------------------------------------------------------------------

@dataclass
class PackedMatrix:
    """A quantized matrix as stored: packed codes (int4pack order for b <= 4 when allowed, row-major
    otherwise; 8-bit codes as int8 q − 128) and scales_and_zeros sz bf16 [G, N, 2]."""

    packed: torch.Tensor  # uint8 [packed_nbytes(N*K, bits)]
    sz: torch.Tensor
    bits: int
    N: int
    K: int

    @property
    def group_size(self) -> int:
        return self.K // self.sz.shape[0]

    @classmethod
    def from_quantized(cls, q: Quantized) -> PackedMatrix:
        N, K = q.codes.shape
        c = q.codes
        if int4pack_ordered(N, K, q.bits):
            c = int4pack_order(c)
        elif q.bits == 8:
            c = c ^ 0x80  # int8 two's complement of q − 128
        return cls(pack(c, q.bits), q.sz, q.bits, N, K)

    def codes(self) -> torch.Tensor:
        """uint8 [N, K] in row-major order (works on any device)."""
        n = self.N * self.K
        c = unpack(self.packed, self.bits, n)
        if int4pack_ordered(self.N, self.K, self.bits):
            return int4pack_unorder(c, self.N, self.K)
        if self.bits == 8:
            c = c ^ 0x80
        return c.reshape(self.N, self.K)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.codes(), self.sz, self.bits, dtype)


# ---- callables: x [M, K] -> [M, N] in x's dtype ----------------------------------------------------------

class DequantLinear:
    """Dequantise into the activation dtype on every call, then one dense GEMM (CUDA, prefill, fallback)."""

    kind = "dense"

    def __init__(self, pm: PackedMatrix):
        self.pm = pm

    @property
    def nbytes(self) -> int:
        return self.pm.packed.numel() + self.pm.sz.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.pm.dequantize(x.dtype))


class Int4Linear(DequantLinear):
    """CPU int4pack kernel for b <= 4 (2/3-bit expanded to nibbles here, once)."""

    kind = "int4pack"

    def __init__(self, pm: PackedMatrix, dense_rows: int = DENSE_ROWS):
        self.dense_rows = dense_rows
        self.sz = pm.sz.contiguous()
        if int4pack_native():  # hold nibbles only: a view of the stored bytes for 4-bit, expanded for 2/3
            nib = nibbles(pm.packed, pm.bits, pm.N * pm.K)
            pm = PackedMatrix(nib, self.sz, 4, pm.N, pm.K)  # same centre, same values: codes < 8 are nibbles
            self.w = nib.view(pm.N, pm.K // 2)
        else:  # another CPU layout: let torch convert (slower, once); keep the compact codes for prefill
            self.w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(pm.codes().to(torch.int32), 1)
        super().__init__(pm)

    @property
    def nbytes(self) -> int:
        return super().nbytes + (0 if self.w.data_ptr() == self.pm.packed.data_ptr() else self.w.numel())

    def __call__(self, x):
        if x.shape[0] > self.dense_rows:
            return super().__call__(x)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.w, self.pm.group_size, self.sz)
        return y.to(x.dtype)


class Int8Linear(DequantLinear):
    """CPU int8pack kernel (one group per row): y = s·(x @ (q − 128)^T) + m·Σx."""

    kind = "int8pack"

    def __init__(self, pm: PackedMatrix, dense_rows: int = DENSE_ROWS):
        super().__init__(pm)
        self.dense_rows = dense_rows
        self.w = pm.packed[: pm.N * pm.K].view(torch.int8).view(pm.N, pm.K)
        self.s = pm.sz[0, :, 0].contiguous()  # bf16 [N]
        self.m = pm.sz[0, :, 1].float()  # [N]

    def __call__(self, x):
        if x.shape[0] > self.dense_rows:
            return super().__call__(x)
        xb = x.to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(xb, self.w, self.s).float()
        return (y + xb.float().sum(-1, keepdim=True) * self.m).to(x.dtype)


def kernel_for(pm: PackedMatrix, device: torch.device) -> str:
    """The fastest path this matrix can take on `device`: int4pack, int8pack or dense."""
    if device.type != "cpu":
        return "dense"
    if pm.bits <= 4 and pm.group_size in INT4_GROUPS and pm.N % 16 == 0:
        return "int4pack"
    if pm.bits == 8 and pm.group_size == pm.K and pm.K % 16 == 0:  # other K crash the kernel (torch 2.13)
        return "int8pack"
    return "dense"


def make_linear(pm: PackedMatrix, kernel: str = "auto", dense_rows: int = DENSE_ROWS):
    """A callable for `pm` (already on its device). kernel: auto | dense."""
    k = kernel_for(pm, pm.packed.device) if kernel == "auto" else kernel
    if k == "int4pack":
        return Int4Linear(pm, dense_rows)
    if k == "int8pack":
        return Int8Linear(pm, dense_rows)
    if k == "dense":
        return DequantLinear(pm)
    raise ValueError(f"unknown kernel {kernel!r}: auto or dense")

