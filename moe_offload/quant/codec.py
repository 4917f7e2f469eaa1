"""The quantized expert codec: one expert's three matrices -> ONE contiguous blob -> a callable unit.

    spec = {"name": "hqq", "bits": 4, "group_size": 64, "meta_bits": 8, "rank": 0, "quantizer": "hqq",
            "layout": "b32"}

"layout" (b <= 4; quantize writes it for 4-bit): the int4pack nibble order of the codes, the one the CPU
that wrote the store reads (kernels.LAYOUTS; absent: "b64", all that stores held before the field). A CPU of
that order computes on a view of the blob; another reorders the codes once per load (kernels.relayout, a
byte shuffle of the blob's size) and keeps only the reordered copy.

Blob layout (every section starts on a 64-byte boundary; the blob is padded to 64 bytes):

    gate_up [2I, D]   codes (pack.py; int4pack nibble order for b <= 4) | meta (hqq.py: bf16 [G, N, 2], or
                      8-bit s and z codes + fp32 (min, step) per 128)
    down    [D, I]    the same
    rank r > 0: the activation-aware rank-r correction of each matrix's quantization residual (lowrank.py),
                      W ≈ Ŵ + U V, with V [r, K] and U [N, r] stored as 8-bit, one group per row:
                      gate_up.V | gate_up.U | down.V | down.U
    biases (experts with biases, gpt-oss): gate | up | down biases, fp32 [2I + D], kept exact

The group size is per matrix: the largest divisor of its input dim K not above `group_size` (0: whole row).
Defaults: 2-bit g32 and 3-bit g64 with 8-bit meta, 4-bit g64 and 8-bit one group per row with bf16 meta:
2.53 / 3.27 / 4.5 / 8.01 bits per weight (hqq.py). 4-bit stores bf16 meta because that is what the int4pack
kernel reads: a loaded 4-bit unit is then a view of its stored bytes and holds nothing else (8-bit meta,
0.23 bits/weight less on disk, was expanded to bf16 at every load beside the blob that stays referenced:
1.12× the stored bytes resident, issue 16; `python scripts/unit_bytes.py STORE` shows it per expert).
`decode` picks the kernel per matrix and device (kernels.py); the unit's `nbytes` is what it holds resident.
On CPU a 2/3-bit unit holds its codes expanded to nibbles plus bf16 meta, i.e. about as much as a 4-bit unit
(more for 2-bit g32: 35.0 vs 31.5 MiB per 14336×4096 matrix, quant/bench.py, measured with 4-bit's former
8-bit meta): 2/3 bits save disk and transfer, not cache RAM.

Shape legend: D hidden, I expert intermediate, N output rows, K inputs, G groups per row, r rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import MoeError
from ..experts import GLUS, ExpertShape
from ..models.base import ACTIVATIONS, linear
from . import lowrank
from .hqq import META_BLOCK, decode_meta, group_size_for, importance_weights, quantize
from .kernels import (
    LAYOUTS,
    LEGACY_LAYOUT,
    NativeQ4Linear,
    PackedMatrix,
    compute_layout,
    fused_expert,
    fused_moe,
    tiles_meta,
    make_linear,
    write_layout,
)
from .pack import packed_nbytes

ALIGN = 64
DEFAULT_GROUP = {2: 32, 3: 64, 4: 64, 8: 0}  # 0: one group per row (what the int8 kernel takes)
DEFAULT_META = {2: 8, 3: 8, 4: 16, 8: 16}  # 4: the int4 kernel's own meta, loaded as a view
FACTOR = {"bits": 8, "group_size": 0, "meta_bits": 16}  # how low-rank factors are stored


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def matrix_sections(N: int, K: int, bits: int, g: int, meta_bits: int) -> list[tuple]:
    """(key, nbytes, dtype, shape) of one matrix's sections, in blob order."""
    G = K // g
    secs = [("codes", packed_nbytes(N * K, bits), torch.uint8, (packed_nbytes(N * K, bits),))]
    if meta_bits == 16:
        secs.append(("sm", G * N * 4, torch.bfloat16, (G, N, 2)))
    else:
        B = -(-G * N // META_BLOCK)
        secs += [("s8", G * N, torch.uint8, (G * N,)), ("z8", G * N, torch.uint8, (G * N,)),
                 ("s8_minstep", B * 8, torch.float32, (B, 2)), ("z8_minstep", B * 8, torch.float32, (B, 2))]
    return secs


def stored_meta(t: dict[str, torch.Tensor], N: int, G: int, bits: int, layout: str) -> torch.Tensor:
    """A matrix's meta as PackedMatrix holds it: bf16 meta stored in tiles of 4 rows (r64t) is a view
    [N/4, G, 4, 2] of the stored bytes; otherwise [G, N, 2] (8-bit meta: decoded, in that order)."""
    if "sm" in t and bits <= 4 and tiles_meta(layout, N):
        return t["sm"].reshape(N // 4, G, 4, 2)
    return decode_meta(t, N, G, bits)


def glu_of(act: str | ExpertShape) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(g, u) -> h: act(g) * u for an ACTIVATIONS name; an ExpertShape's own gated unit (GLUS included:
    gpt-oss's clamped SwiGLU with its alpha and limit)."""
    if isinstance(act, ExpertShape):
        if act.act in GLUS:
            fn, alpha, limit = GLUS[act.act], act.swiglu_alpha, act.swiglu_limit
            return lambda g, u: fn(g, u, alpha, limit)
        act = act.act
    fn = ACTIVATIONS[act]
    return lambda g, u: fn(g) * u


FUSED_ROWS = 192  # rows up to which an expert runs as one native call: its fp32 intermediate [M, 2I] is the
# call's transient (22 MB at Mixtral's I = 14336); more rows go matrix by matrix


class QuantExpert:
    """y = down(glu(gate x, up x)) over quantized linears (each x [n, K] -> [n, N] in x's dtype), plus the
    biases when the expert has them (gate_up_bias [2I], down_bias [D], fp32)."""

    __slots__ = ("gate_up", "down", "glu", "gate_up_bias", "down_bias", "fused")

    def __init__(self, gate_up: Callable, down: Callable, act: str | ExpertShape = "silu",
                 gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None):
        self.gate_up, self.down, self.glu = gate_up, down, glu_of(act)
        self.gate_up_bias, self.down_bias = gate_up_bias, down_bias
        name = act.act if isinstance(act, ExpertShape) else act
        self.fused = (name == "silu" and gate_up_bias is None and down_bias is None
                      and isinstance(gate_up, NativeQ4Linear) and isinstance(down, NativeQ4Linear))

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    def tensors(self) -> list[torch.Tensor]:
        biases = [b for b in (self.gate_up_bias, self.down_bias) if b is not None]
        return [*self.gate_up.tensors(), *self.down.tensors(), *biases]

    @property
    def kinds(self) -> tuple[str, str]:
        return self.gate_up.kind, self.down.kind

    @staticmethod
    def run_group(x: torch.Tensor, units: list, weights: list[float], each: bool) -> torch.Tensor | None:
        """One token through several experts in one native call (kernels.fused_moe; experts._dispatch_one
        calls it with a group in ascending expert order); None unless every unit is a fused 4-bit expert."""
        if not all(type(u) is QuantExpert and u.fused for u in units):
            return None
        return fused_moe([(u.gate_up, u.down) for u in units], x, weights, each)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [n, D] -> [n, D]
        if self.fused and 0 < x.shape[0] <= min(FUSED_ROWS, self.gate_up.rows(x.dtype)):
            return fused_expert(self.gate_up, self.down, x)
        gu = self.gate_up(x)
        if self.gate_up_bias is not None:
            gu = gu + self.gate_up_bias.to(gu.dtype)
        g, u = gu.chunk(2, dim=-1)
        y = self.down(self.glu(g, u))
        return y if self.down_bias is None else y + self.down_bias.to(y.dtype)


class LowRankLinear:
    """base(x) + U(V(x)): a quantized matrix plus its rank-r residual correction."""

    __slots__ = ("base", "V", "U")

    def __init__(self, base, V, U):
        self.base, self.V, self.U = base, V, U

    @property
    def kind(self) -> str:
        return f"{self.base.kind}+lowrank"

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + self.V.nbytes + self.U.nbytes

    def tensors(self) -> list[torch.Tensor]:
        return [*self.base.tensors(), *self.V.tensors(), *self.U.tensors()]

    def __call__(self, x):
        return self.base(x) + self.U(self.V(x))


class DenseLinear:
    """x @ W^T over a dense matrix (converted to `dtype` once if it differs)."""

    kind = "dense"

    def __init__(self, w: torch.Tensor, dtype: torch.dtype):
        self.w = w if w.dtype == dtype else w.to(dtype)

    @property
    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size()

    def tensors(self) -> list[torch.Tensor]:
        return [self.w]

    def __call__(self, x):
        return linear(x, self.w.to(x.dtype))  # many 16-bit rows on CPU: an fp32 GEMM (models/base.py)


def factor_linear(pm: PackedMatrix) -> DenseLinear:
    """A low-rank factor no kernel takes (on CPU: U [N, r] with r % 16 != 0, which int8pack refuses):
    dequantised once, it is small (N·r weights), then F.linear. Dequantising it on every call made a 2b+r8
    expert call take 316 µs instead of 68 µs at D=256, I=384 (docs/quality.md). Owned: keeps no view of the
    blob."""
    return DenseLinear(pm.dequantize(torch.float32), torch.float32)


def expert_spec(bits: int, group_size: int | None = None, quantizer: str = "hqq", rank: int = 0,
                meta_bits: int | None = None) -> dict:
    """The hqq codec spec `quantize` writes for an expert at `bits` on this machine (every probe of an expert's
    size, decode or call builds its codec from this). group_size applies to 2/3/4 bits (8-bit keeps one group
    per row: the int8 kernel); None, like meta_bits None: the defaults (DEFAULT_GROUP, DEFAULT_META)."""
    spec = {"name": "hqq", "bits": bits, "quantizer": quantizer}
    if bits == 4:  # the codes in this machine's 4-bit kernel order (2/3-bit codes are expanded at load anyway)
        spec["layout"] = write_layout()
    if group_size is not None and bits < 8:
        spec["group_size"] = group_size
    if rank:
        spec["rank"] = rank
    if meta_bits:
        spec["meta_bits"] = meta_bits
    return spec


class HQQCodec:
    """Quantized experts: HQQ (or RTN) codes at 2/3/4/8 bits, optional low-rank residual correction."""

    def __init__(self, spec: dict, kernel: str = "auto", dense_rows: int | None = None):
        bits = int(spec.get("bits", 4))
        if bits not in DEFAULT_GROUP:
            raise MoeError(f"hqq codec: bits must be 2, 3, 4 or 8, got {bits}")
        gs = int(spec.get("group_size", DEFAULT_GROUP[bits]) or 0)
        meta = int(spec.get("meta_bits", DEFAULT_META[bits]))
        rank = int(spec.get("rank", 0) or 0)
        quantizer = spec.get("quantizer", "hqq")
        layout = spec.get("layout", LEGACY_LAYOUT)
        if (gs < 0 or meta not in (8, 16) or rank < 0 or quantizer not in ("hqq", "rtn")
                or layout not in LAYOUTS or ("layout" in spec and bits > 4)):
            raise MoeError(f"hqq codec: bad spec {spec}")
        self.spec = {"name": "hqq", "bits": bits, "group_size": gs, "meta_bits": meta, "rank": rank,
                     "quantizer": quantizer}
        if "layout" in spec:
            self.spec["layout"] = layout
        self.order = layout  # the int4pack nibble order of b <= 4 codes (kernels.LAYOUTS)
        self.kernel, self.dense_rows = kernel, dense_rows

    # ---- layout ------------------------------------------------------------------------------------
    def matrices(self, shape: ExpertShape) -> list[tuple[str, int, int, int, int, int]]:
        """(name, N, K, bits, group, meta_bits) in blob order."""
        D, I = shape.hidden, shape.intermediate
        b, gs, mb, r = (self.spec[k] for k in ("bits", "group_size", "meta_bits", "rank"))
        mats = [("gate_up", 2 * I, D, b, group_size_for(D, gs), mb),
                ("down", D, I, b, group_size_for(I, gs), mb)]
        if r:
            for name, N, K in (("gate_up", 2 * I, D), ("down", D, I)):
                mats += [(f"{name}.V", r, K, 8, K, 16), (f"{name}.U", N, r, 8, r, 16)]
        return mats

    def layout(self, shape: ExpertShape) -> tuple[list[list[tuple[str, int, int, torch.dtype, tuple]]], int]:
        """Per matrix: [(key, offset, nbytes, dtype, shape)], then (shape.bias) the biases' section; and the
        blob's total size."""
        off, out = 0, []
        for _, N, K, b, g, mb in self.matrices(shape):
            secs = []
            for key, n, dt, shp in matrix_sections(N, K, b, g, mb):
                secs.append((key, off, n, dt, shp))
                off = _align(off + n)
            out.append(secs)
        if shape.bias:
            B = 2 * shape.intermediate + shape.hidden
            out.append([("bias", off, 4 * B, torch.float32, (B,))])
            off = _align(off + 4 * B)
        return out, off

    def nbytes(self, shape: ExpertShape) -> int:
        return self.layout(shape)[1]

    # ---- encode ------------------------------------------------------------------------------------
    def encode(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
               x: torch.Tensor | None = None, act: str | ExpertShape = "silu", act_aware: bool = False,
               gate_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None,
               down_bias: torch.Tensor | None = None) -> torch.Tensor:
        """gate, up [I, D], down [D, I] (biases [I], [I], [D]: all or none, stored exact in fp32) -> uint8
        [nbytes]. x [n, D]: calibration inputs of this expert. The low-rank correction is fitted to the output
        error on x (and on h = glu(gate x, up x)); with act_aware the HQQ scales and zeros are fitted to the
        error weighted per input column by E[x_j²] (gate_up) and E[h_j²] (down) — same format, other s and z
        (hqq.importance_weights). act: an activation name, or the ExpertShape (its gated unit)."""
        b, gs, mb, r = (self.spec[k] for k in ("bits", "group_size", "meta_bits", "rank"))
        method = self.spec["quantizer"]
        biases = [t for t in (gate_bias, up_bias, down_bias) if t is not None]
        if len(biases) not in (0, 3):
            raise MoeError("hqq codec: an expert has all three biases (gate, up, down) or none")
        Ws = [torch.cat([gate, up]).float(), down.float()]
        xf = hm = None
        if x is not None and (r or act_aware):
            xf = x.float()
            g, u = xf @ gate.float().t(), xf @ up.float().t()
            if biases:
                g, u = g + gate_bias.float(), u + up_bias.float()
            hm = glu_of(act)(g, u)
        imps = [None, None]
        if act_aware and xf is not None and len(xf) and method == "hqq":
            imps = [importance_weights(xf), importance_weights(hm)]
        qs = [quantize(W, b, gs, mb, method, importance=h) for W, h in zip(Ws, imps)]
        if r:
            Ls = [None, None]
            if xf is not None:
                Ls = [lowrank.whitener(xf), lowrank.whitener(hm)]
            for W, q, L in zip(Ws, list(qs), Ls):
                U, V = lowrank.factor(W - q.dequantize(), r, L)
                qs += [quantize(V, method=method, **FACTOR), quantize(U, method=method, **FACTOR)]
        layout, total = self.layout(ExpertShape(gate.shape[1], gate.shape[0], bias=bool(biases)))
        blob = torch.zeros(total, dtype=torch.uint8)
        for q, secs in zip(qs, layout):
            pm = PackedMatrix.from_quantized(q, self.order)
            tensors = {"codes": pm.packed, **q.meta}
            if "sm" in tensors:
                tensors["sm"] = pm.sz  # (in tiles of 4 rows for r64t)
            for key, off, n, _, _ in secs:
                t = tensors[key].contiguous().view(-1).view(torch.uint8)
                assert t.numel() == n, (key, t.numel(), n)
                blob[off:off + n] = t
        if biases:
            (_, off, n, _, _), = layout[-1]
            blob[off:off + n] = torch.cat([t.reshape(-1).float() for t in biases]).view(torch.uint8)
        return blob

    def biases(self, blob: torch.Tensor, shape: ExpertShape) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gate_up_bias [2I], down_bias [D]) fp32 views of the blob, or None for an expert without biases."""
        if not shape.bias:
            return None
        (_, off, n, dt, shp), = self.layout(shape)[0][-1]
        b = blob[off:off + n].view(dt)
        return b[: 2 * shape.intermediate], b[2 * shape.intermediate:]

    # ---- decode ------------------------------------------------------------------------------------
    def packed(self, blob: torch.Tensor, shape: ExpertShape) -> list[PackedMatrix]:
        """Views of the blob's matrices (on the blob's device); meta8 is expanded to bf16 here."""
        layout, total = self.layout(shape)
        if blob.numel() < total:
            raise ValueError(f"hqq blob has {blob.numel()} bytes, the spec needs {total}")
        pms = []
        for (_, N, K, b, g, _), secs in zip(self.matrices(shape), layout):
            t = {key: blob[off:off + n].view(dt).view(shp) for key, off, n, dt, shp in secs}
            pms.append(PackedMatrix(t.pop("codes"), stored_meta(t, N, K // g, b, self.order), b, N, K, self.order))
        return pms

    def decode(self, blob: torch.Tensor, shape: ExpertShape, dtype=torch.bfloat16) -> QuantExpert:
        """A callable unit; it computes in the dtype of its input (the engine's compute dtype)."""
        if blob.device.type == "meta":  # the kernel, hence the resident size, depends on the real device
            raise NotImplementedError("hqq decode needs a real device")
        pms = self.packed(blob, shape)
        lins = [make_linear(pm, self.kernel, self.dense_rows) for pm in pms[:2]]
        for pm in pms[2:]:  # low-rank factors
            if self.spec["bits"] < 4 or self.order != compute_layout():  # the base holds copies (expanded or
                # reordered), so views would keep the blob alive
                pm = PackedMatrix(pm.packed.clone(), pm.sz.clone(), pm.bits, pm.N, pm.K)  # for small factors
            lin = make_linear(pm, self.kernel, self.dense_rows)
            lins.append(factor_linear(pm) if lin.kind == "dense" and self.kernel == "auto" else lin)
        gate_up, down = lins[:2]
        if self.spec["rank"]:
            gate_up, down = LowRankLinear(gate_up, lins[2], lins[3]), LowRankLinear(down, lins[4], lins[5])
        b = self.biases(blob, shape)
        if b is not None:  # copies: a view would keep the whole blob alive
            return QuantExpert(gate_up, down, shape, b[0].clone(), b[1].clone())
        return QuantExpert(gate_up, down, shape)

    def dequantize(self, blob: torch.Tensor, shape: ExpertShape) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights the unit computes with, fp32: gate_up [2I, D], down [D, I] (low-rank included)."""
        W = [pm.dequantize() for pm in self.packed(blob, shape)]
        if self.spec["rank"]:
            W[0] = W[0] + W[3] @ W[2]
            W[1] = W[1] + W[5] @ W[4]
        return W[0], W[1]


def encode_checked(codec: HQQCodec, gate, up, down, x: torch.Tensor | None = None,
                   act: str | ExpertShape = "silu", act_aware: bool = False,
                   **biases) -> tuple[torch.Tensor, float]:
    """One expert as `quantize` writes it: its blob, and the error of that blob (`expert_error`, on the
    calibration rows x where given). -> (blob, error)"""
    blob = codec.encode(gate, up, down, x=x, act=act, act_aware=act_aware, **biases)
    return blob, expert_error(gate, up, down, codec, blob, x, act, biases=biases)


def expert_error(gate, up, down, codec: HQQCodec, blob: torch.Tensor | None = None,
                 x: torch.Tensor | None = None, act: str | ExpertShape = "silu",
                 w: torch.Tensor | None = None, act_aware: bool = False, biases: dict | None = None) -> float:
    """Relative error of one encoded expert: Frobenius over its three matrices together, or, with
    calibration inputs x [n, D], of its output on x. With x and the router's weights w [n] of this expert on
    those tokens: the absolute Σ_t w_t² ||y_t − ŷ_t||², what it adds to its layer's squared output error.
    biases: {gate_bias, up_bias, down_bias} of an expert that has them (exact in the blob: they shift the
    unit's inputs, not the error of the weights)."""
    biases = biases or {}
    shape = ExpertShape(gate.shape[1], gate.shape[0], bias=bool(biases))
    blob = codec.encode(gate, up, down, x, act, act_aware, **biases) if blob is None else blob
    gu_hat, dn_hat = codec.dequantize(blob, shape)
    gu, dn = torch.cat([gate, up]).float(), down.float()
    if x is None:
        num = (gu - gu_hat).pow(2).sum() + (dn - dn_hat).pow(2).sum()
        return float((num / (gu.pow(2).sum() + dn.pow(2).sum()).clamp_min(1e-30)).sqrt())
    xf = x.float()
    glu = glu_of(act)
    b_gu = torch.cat([biases["gate_bias"], biases["up_bias"]]).float() if biases else 0.0
    b_dn = biases["down_bias"].float() if biases else 0.0

    def run(a, b):
        g, u = (xf @ a.t() + b_gu).chunk(2, dim=-1)
        return glu(g, u) @ b.t() + b_dn

    y = run(gu, dn)
    if w is not None:
        return float(((y - run(gu_hat, dn_hat)).pow(2).sum(-1) * w.float().pow(2)).sum())
    return float((y - run(gu_hat, dn_hat)).norm() / y.norm().clamp_min(1e-30))

