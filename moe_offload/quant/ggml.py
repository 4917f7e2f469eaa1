"""GGUF (ggml) quantized blocks as our affine groups of 32, and the "gguf" expert codec that stores them.

    Q4_0  18 B / 32 w    d fp16, 16 B of nibbles (q_j low, q_j+16 high)      w = (q − 8)·d
    Q4_1  20 B / 32 w    d, m fp16, 16 B of nibbles                          w = q·d + m
    Q4_K  144 B / 256 w  d, dmin fp16, 12 B of 6-bit (sc, mn) for 8 groups,  w = d·sc·q − dmin·mn
                         128 B of nibbles (64 w per 32 B: low nibbles first)
    Q8_0  34 B / 32 w    d fp16, 32 int8                                     w = q·d

Every one is affine per group of 32 consecutive inputs, i.e. the int4/int8 kernels' w = (c − centre)·s + m
with bf16 (s, m) (quant/hqq.py, meta_bits=16): the codes are kept exactly, only s and m round to bf16.
Any other type is dequantized with the `gguf` package's own `gguf.quants.dequantize` and stored dense.

The "gguf" codec: one expert = gate_up [2I, D] and down [D, I], each in its own format, so a file that
mixes types (Q4_K_M: some down matrices Q6_K) keeps each matrix's own type:

    spec = {"name": "gguf", "gate_up": "q4", "down": "float16"}   formats: q4, q8, float16, bfloat16, float32
    (+ "layout": the q4 codes' int4pack nibble order, as in codec.py; written by the import for q4)

Blob: per matrix, the hqq sections (codes | sm) for q4/q8, or the dense [N, K] weights; each section on a
64-byte boundary (as quant/codec.py).

Shape legend: N output rows, K inputs, G = K/32 groups per row, B blocks per row.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import MoeError
from ..experts import ExpertShape
from ..utils import DTYPES
from .codec import ALIGN, DenseLinear, QuantExpert, matrix_sections, stored_meta
from .hqq import Quantized, quantize
from .kernels import LAYOUTS, LEGACY_LAYOUT, PackedMatrix, make_linear

GROUP = 32
QUANT_FORMATS = {"q4": 4, "q8": 8}
DENSE_FORMATS = ("float16", "bfloat16", "float32")
KEPT = {"Q4_0": "q4", "Q4_1": "q4", "Q4_K": "q4", "Q8_0": "q8"}  # GGML type -> our format, codes kept


def _f16(b: np.ndarray) -> np.ndarray:  # [..., 2] uint8 -> [...] fp32
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles32(qs: np.ndarray) -> np.ndarray:  # [..., 16] -> [..., 32]: low nibbles first, then high
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def affine_groups(type_name: str, blocks: np.ndarray, N: int, K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw blocks of one matrix (uint8, N rows of K/block_size blocks) -> codes uint8 [N, K], s [N, G], m [N, G]
    fp32 with w = (c − centre)·s + m (centre 8 for 4-bit, 128 for 8-bit): exactly the file's values."""
    b = np.asarray(blocks, dtype=np.uint8).reshape(N, -1)
    if type_name == "Q4_0":
        b = b.reshape(N, K // 32, 18)
        d = _f16(b[..., 0:2])
        return _nibbles32(b[..., 2:]).reshape(N, K), d, np.zeros_like(d)
    if type_name == "Q4_1":
        b = b.reshape(N, K // 32, 20)
        d, mn = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        return _nibbles32(b[..., 4:]).reshape(N, K), d, mn + 8 * d
    if type_name == "Q8_0":
        b = b.reshape(N, K // 32, 34)
        d = _f16(b[..., 0:2])
        return (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8).reshape(N, K), d, np.zeros_like(d)
    if type_name == "Q4_K":
        from gguf.quants import Q4_K

        b = b.reshape(-1, 144)  # [N·B, 144]
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))  # [N·B, 8] each
        qs = b[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 64 weights: low nibbles = group 2j, high = 2j+1
        codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(N, K)
        s = d[:, None] * sc.astype(np.float32)
        m = 8 * s - dmin[:, None] * mn.astype(np.float32)
        return codes, s.reshape(N, -1), m.reshape(N, -1)
    raise ValueError(f"{type_name} blocks are not affine groups of 32")


WRITTEN_BACK = {"Q4_0": ("q4", 18), "Q8_0": ("q8", 34)}  # GGML type -> (our format, bytes per block of 32)


def ggml_blocks(type_name: str, codes: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Codes uint8 [N, K] and scales fp32 [N, G] of a zero-offset matrix -> raw Q4_0 / Q8_0 blocks uint8
    [N, G·block bytes] with d = fp16(s), exact for a bf16 scale within fp16's range (the inverse of
    affine_groups for those types, up to the bf16 rounding of d that affine_groups' caller made)."""
    N, K = codes.shape
    d = s.astype(np.float16)
    if not np.array_equal(d.astype(np.float32), s.astype(np.float32)):
        raise ValueError("a scale is outside float16's range")
    c = codes.reshape(N, K // GROUP, GROUP)
    if type_name == "Q4_0":
        q = (c[..., :16] | (c[..., 16:] << 4)).astype(np.uint8)  # q_j low nibble, q_j+16 high
    elif type_name == "Q8_0":
        q = (c.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    else:
        raise ValueError(f"{type_name} is not written back from kept codes")
    return np.concatenate([d[..., None].view(np.uint8), q], axis=-1).reshape(N, -1)


def quantized_matrix(parts: list[tuple[str, np.ndarray, int]], K: int) -> Quantized:
    """Rows of several GGUF matrices (type name, raw blocks, rows) stacked into one Quantized [ΣN, K]."""
    fmt = {KEPT[t] for t, _, _ in parts}
    if len(fmt) != 1:
        raise ValueError(f"cannot stack {sorted(fmt)} into one matrix")
    bits = QUANT_FORMATS[fmt.pop()]
    got = [affine_groups(t, blk, n, K) for t, blk, n in parts]
    codes = torch.from_numpy(np.concatenate([c for c, _, _ in got]))
    s = torch.from_numpy(np.concatenate([s for _, s, _ in got]))
    m = torch.from_numpy(np.concatenate([m for _, _, m in got]))
    sm = torch.stack([s.t(), m.t()], -1).to(torch.bfloat16).contiguous()  # [G, N, 2]: hqq's meta_bits=16
    return Quantized(codes, {"sm": sm}, sm, bits, GROUP)


class GGUFCodec:
    """Experts from a GGUF file: gate_up and down each q4 / q8 (affine groups of 32, codes as in the file) or
    dense in a float dtype."""

    def __init__(self, spec: dict, kernel: str = "auto"):
        fmts = (spec.get("gate_up"), spec.get("down"))
        self.order = spec.get("layout", LEGACY_LAYOUT)  # the int4pack nibble order of q4 codes (codec.py)
        if any(f not in QUANT_FORMATS and f not in DENSE_FORMATS for f in fmts) or self.order not in LAYOUTS:
            raise MoeError(f"gguf codec: bad spec {spec}")
        self.spec = {"name": "gguf", "gate_up": fmts[0], "down": fmts[1]}
        if "layout" in spec:
            self.spec["layout"] = self.order
        if spec.get("source"):
            self.spec["source"] = dict(spec["source"])  # the GGML types it came from (informational)
        self.kernel = kernel

    def matrices(self, shape: ExpertShape) -> list[tuple[str, int, int, str]]:
        D, I = shape.hidden, shape.intermediate
        return [("gate_up", 2 * I, D, self.spec["gate_up"]), ("down", D, I, self.spec["down"])]

    def layout(self, shape: ExpertShape):
        off, out = 0, []
        for _, N, K, fmt in self.matrices(shape):
            if fmt in QUANT_FORMATS:
                if K % GROUP:
                    raise MoeError(f"gguf codec: {fmt} needs inputs in groups of {GROUP}, got {K}")
                secs = matrix_sections(N, K, QUANT_FORMATS[fmt], GROUP, 16)
            else:
                dt = DTYPES[fmt]
                secs = [("w", N * K * dt.itemsize, dt, (N, K))]
            placed = []
            for key, n, dt, shp in secs:
                placed.append((key, off, n, dt, shp))
                off = -(-(off + n) // ALIGN) * ALIGN
            out.append(placed)
        return out, off

    def nbytes(self, shape: ExpertShape) -> int:
        return self.layout(shape)[1]

    def _blob(self, shape: ExpertShape, mats: list) -> torch.Tensor:
        """mats: per matrix a Quantized (q4/q8) or a float tensor [N, K] (dense) -> uint8 blob."""
        if shape.bias:
            raise MoeError("gguf codec: experts with biases are not supported")
        layout, total = self.layout(shape)
        blob = torch.zeros(total, dtype=torch.uint8)
        for m, secs, (_, N, K, fmt) in zip(mats, layout, self.matrices(shape)):
            if fmt in QUANT_FORMATS:
                pm = PackedMatrix.from_quantized(m, self.order)
                tensors = {"codes": pm.packed, "sm": pm.sz}  # (meta in tiles of 4 rows for r64t)
            else:
                tensors = {"w": m.reshape(N, K).to(DTYPES[fmt])}
            for key, off, n, _, _ in secs:
                t = tensors[key].contiguous().view(-1).view(torch.uint8)
                assert t.numel() == n, (key, t.numel(), n)
                blob[off:off + n] = t
        return blob

    def encode(self, gate, up, down) -> torch.Tensor:
        """From float weights (round-to-nearest for q4/q8): for re-encoding; a GGUF file uses encode_blocks."""
        mats = []
        for (_, N, K, fmt), W in zip(self.matrices(ExpertShape(gate.shape[1], gate.shape[0])),
                                     [torch.cat([gate, up]).float(), down.float()]):
            mats.append(quantize(W, QUANT_FORMATS[fmt], GROUP, 16, "rtn") if fmt in QUANT_FORMATS else W)
        return self._blob(ExpertShape(gate.shape[1], gate.shape[0]), mats)

    def encode_blocks(self, shape: ExpertShape, parts: dict) -> torch.Tensor:
        """parts: gate / up / down -> (GGML type name, raw blocks of that expert, or a float tensor for a
        dense format). Quantized formats keep the file's codes."""
        mats = []
        for (name, N, K, fmt) in self.matrices(shape):
            names = ("gate", "up") if name == "gate_up" else ("down",)
            if fmt in QUANT_FORMATS:
                mats.append(quantized_matrix([(parts[p][0], parts[p][1], N // len(names)) for p in names], K))
            else:
                mats.append(torch.cat([torch.as_tensor(parts[p][1]).float().reshape(N // len(names), K)
                                       for p in names]))
        return self._blob(shape, mats)

    def _views(self, blob: torch.Tensor, shape: ExpertShape):
        layout, total = self.layout(shape)
        if blob.numel() < total:
            raise ValueError(f"gguf blob has {blob.numel()} bytes, the spec needs {total}")
        out = []
        for (_, N, K, fmt), secs in zip(self.matrices(shape), layout):
            t = {key: blob[off:off + n].view(dt).view(shp) for key, off, n, dt, shp in secs}
            out.append(PackedMatrix(t["codes"], stored_meta(t, N, t["sm"].shape[0], QUANT_FORMATS[fmt], self.order),
                                    QUANT_FORMATS[fmt], N, K, self.order)
                       if fmt in QUANT_FORMATS
                       else t["w"])
        return out

    def blocks(self, blob: torch.Tensor, shape: ExpertShape, part: str, type_name: str) -> np.ndarray:
        """Raw GGML blocks [N, ...] of one part (gate / up / down) of a q4 / q8 matrix with zero offsets (codes kept
        from a Q4_0 / Q8_0 file): the file's codes, d = the stored bf16 scale as fp16."""
        I = shape.intermediate
        pm = self._views(blob, shape)[1 if part == "down" else 0]
        rows = slice(None) if part == "down" else slice(0, I) if part == "gate" else slice(I, 2 * I)
        sz = pm.meta()
        s, m = sz[..., 0].t().float()[rows], sz[..., 1].t().float()[rows]  # [N, G]
        if not isinstance(pm, PackedMatrix) or (m != 0).any():
            raise ValueError(f"{part} is not a zero-offset q4/q8 matrix")
        return ggml_blocks(type_name, pm.codes()[rows].numpy(), s.numpy())

    def decode(self, blob: torch.Tensor, shape: ExpertShape, dtype=torch.bfloat16) -> QuantExpert:
        if blob.device.type == "meta":  # the kernel, hence the resident size, depends on the real device
            raise NotImplementedError("gguf decode needs a real device")
        lins = [make_linear(v, self.kernel) if isinstance(v, PackedMatrix) else DenseLinear(v, dtype)
                for v in self._views(blob, shape)]
        return QuantExpert(lins[0], lins[1], shape.act)

    def dequantize(self, blob: torch.Tensor, shape: ExpertShape) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [2I, D], down [D, I] fp32: the weights the unit computes with."""
        W = [v.dequantize() if isinstance(v, PackedMatrix) else v.float() for v in self._views(blob, shape)]
        return W[0], W[1]

