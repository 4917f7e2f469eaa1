"""Bit packing of 2/3/4/8-bit codes into bytes, bit-exact both ways.

Every width <= 4 is defined through the *nibble stream* b: byte i holds codes 2i (low nibble) and 2i+1
(high nibble). 2- and 3-bit codes leave nibble bits unused, so they are stored as bit planes of that
stream, and turning them back into nibbles (what the int4 kernel eats) is a few whole-tensor byte ops,
no gather:

    4-bit  b                                                       n/2 bytes
    2-bit  P = b[:L/2] | b[L/2:] << 2         (L = n/2; codes < 4 use bits 0-1 and 4-5)  n/4 bytes
    3-bit  P = lo[:L/2] | lo[L/2:] << 2       lo = b & 0x33                               n/4 bytes
         + H = h[0q] | h[1q] << 1 | h[2q] << 2 | h[3q] << 3    h = (b >> 2) & 0x11,
                                                quarters of L                              n/8 bytes
    8-bit  the codes themselves                                    n bytes

n is padded with zero codes to a multiple of 8, so `packed_nbytes(n, bits) = ceil(n / 8) * bits`.
"""

from __future__ import annotations

import torch

BITS = (2, 3, 4, 8)


def packed_nbytes(n: int, bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"unsupported bit width {bits}; choose from {BITS}")
    return -(-n // 8) * bits


def _pad8(codes: torch.Tensor) -> torch.Tensor:
    flat = codes.reshape(-1)
    pad = -flat.numel() % 8
    return torch.cat([flat, flat.new_zeros(pad)]) if pad else flat


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (any shape, uint8 values < 2**bits) -> uint8 [packed_nbytes(numel, bits)]."""
    packed_nbytes(0, bits)
    c = _pad8(codes.to(torch.uint8))
    if bits == 8:
        return c.clone()
    b = c[0::2] | (c[1::2] << 4)  # nibble stream [n/2]
    if bits == 4:
        return b
    L = b.numel()
    if bits == 2:
        return b[: L // 2] | (b[L // 2:] << 2)
    lo, h = b & 0x33, (b >> 2) & 0x11
    q = L // 4
    planes = h[:q] | (h[q:2 * q] << 1) | (h[2 * q:3 * q] << 2) | (h[3 * q:] << 3)
    return torch.cat([lo[: L // 2] | (lo[L // 2:] << 2), planes])


def _words(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """uint8 tensors viewed as int64 words when all sizes and alignments allow: the masks below never let a
    bit cross a byte boundary, so word-wide ops equal byte-wide ones at 1/8 of the element count."""
    if all(t.numel() % 8 == 0 and t.storage_offset() % 8 == 0 and t.data_ptr() % 8 == 0 for t in ts):
        return tuple(t.view(torch.int64) for t in ts)
    return ts


def _rep(byte: int, t: torch.Tensor) -> int:
    return int.from_bytes(bytes([byte]) * t.element_size(), "little")


def nibbles(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Packed 2/3/4-bit codes -> the nibble stream uint8 [ceil(n/8) * 4] (a view for 4-bit)."""
    L = packed_nbytes(n, 4)
    if bits == 4:
        return packed[:L]
    if bits not in (2, 3):
        raise ValueError(f"nibbles() takes 2, 3 or 4 bits, got {bits}")
    out = torch.empty(L, dtype=torch.uint8, device=packed.device)
    h = L // 2
    P, lo, hi = _words(packed[:h], out[:h], out[h:])
    torch.bitwise_and(P, _rep(0x33, P), out=lo)
    torch.bitwise_and(P >> 2, _rep(0x33, P), out=hi)
    if bits == 3:
        q = L // 4
        H = packed[h:h + q]
        for j in range(4):
            Hw, part = _words(H, out[j * q:(j + 1) * q])
            part |= ((Hw >> j) & _rep(0x11, Hw)) << 2
    return out


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 codes [n]."""
    packed_nbytes(0, bits)
    if bits == 8:
        return packed[:n]
    b = nibbles(packed, bits, n)
    return torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(-1)[:n]
