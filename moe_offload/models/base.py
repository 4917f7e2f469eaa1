"""Shared pieces of every architecture: config base, norms, RoPE, static KV cache, attention, MoE block.

Shape legend: B batch, T new tokens, S cache length, D hidden, H query heads, K kv heads, Hd head dim,
E routed experts, A active experts per token, I expert intermediate size, V vocabulary.
"""

from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MoeError

# config.json spells some keys differently across transformers versions and hub checkpoints.
KEY_ALIASES = {
    "num_local_experts": "num_experts",
    "num_experts": "num_local_experts",
    "torch_dtype": "dtype",
    "dtype": "torch_dtype",
}


@dataclass
class BaseModelArgs:
    """Fields are config.json keys verbatim; unknown keys are dropped, derived values in __post_init__."""

    @classmethod
    def from_dict(cls, params: dict) -> "BaseModelArgs":
        names = {f.name for f in fields(cls)}
        kept = {k: v for k, v in params.items() if k in names}
        for k, alias in KEY_ALIASES.items():
            if k in names and k not in kept and alias in params:
                kept[k] = params[alias]
        return cls(**kept)

    def rope_theta_value(self) -> float:
        rp = getattr(self, "rope_parameters", None) or {}
        rope_type = rp.get("rope_type", rp.get("type", "default"))
        if rope_type != "default":
            raise MoeError(f"rope_type {rope_type!r} is not supported for {getattr(self, 'model_type', '?')}")
        return float(rp.get("rope_theta", getattr(self, "rope_theta", None) or 10000.0))


# A 16-bit GEMM of this many rows or more runs faster as fp32 on a CPU without native 16-bit matmul (Zen3,
# AVX2: a Mixtral expert on 4 rows 134 vs 152 ms, 16 rows 200 vs 525, 256 rows 1549 vs 8926;
# scripts/upcast_bench.py, docs/perf.md). Below it the 16-bit GEMV wins: it streams half the bytes.
UPCAST_ROWS = 4
HALF_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((l for l in text.splitlines() if l.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def upcast(x: torch.Tensor) -> bool:
    """Should a GEMM with activations x [.., K] run in fp32 (see UPCAST_ROWS)?"""
    return (x.dtype in HALF_FLAGS and x.device.type == "cpu" and x.numel() >= UPCAST_ROWS * x.shape[-1]
            and not cpu_flags() & set(HALF_FLAGS[x.dtype]))


UPCAST_BLOCK = 1 << 20  # weights converted at a time: 4 MiB of fp32 stay in cache for the GEMM (2-4x faster
# than converting a whole 14336x4096 matrix first, scripts/upcast_bench.py) and bound the transient


NATIVE_ROWS = 16  # rows up to which 16-bit weights run natively: it streams them once for all rows; past
# ~16-32 rows the fp32 GEMM of `upcast` wins (scripts/native_q4_bench.py --half; docs/bench/kernels/)


def native_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """y = x w^T through the native 16-bit kernel (quant/native: h16_mm) for a few rows of x on a CPU with it,
    fp32 accumulation, rounded once to x's dtype; None where it does not apply (the caller uses torch)."""
    from ..quant import native

    if (w.dtype not in native.HALF_WEIGHTS or x.dtype not in native.DTYPES or w.device.type != "cpu"
            or x.device.type != "cpu" or x.numel() > NATIVE_ROWS * x.shape[-1] or not w.is_contiguous()
            or x.shape[-1] != w.shape[1]):
        return None
    so = native.lib()
    if so is None:
        return None
    xc, code = native.activations(x.reshape(-1, w.shape[1]))
    y = xc.new_empty(xc.shape[0], w.shape[0])
    if so.h16_mm(xc.data_ptr(), y.data_ptr(), code, xc.shape[0], w.shape[0], w.shape[1], w.data_ptr(),
                 native.HALF_WEIGHTS[w.dtype], torch.get_num_threads()):
        return None
    return y.view(*x.shape[:-1], w.shape[0])


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; a many-row 16-bit GEMM on CPU computes in fp32 and rounds once to x's dtype (`upcast`),
    converting w [N, K] a block of rows at a time; a few rows over 16-bit weights run the native GEMV
    (`native_gemv`: torch's half GEMV streams ~0.6 of the RAM bandwidth on AVX2)."""
    y = native_gemv(x, w) if b is None else None
    if y is not None:
        return y
    if not upcast(x):
        return F.linear(x, w, b)
    xf = x.float()
    N, K = w.shape
    step = max(1, UPCAST_BLOCK // K)
    if step >= N:
        return F.linear(xf, w.float(), None if b is None else b.float()).to(x.dtype)
    y = x.new_empty(*x.shape[:-1], N)
    wf = torch.empty(step, K)  # one fp32 block, reused: no heap churn of per-block temporaries
    for r in range(0, N, step):
        n = min(step, N - r)
        wf[:n].copy_(w[r:r + n])
        y[..., r:r + n] = F.linear(xf, wf[:n], None if b is None else b[r:r + n].float())
    return y


@functools.cache
def silu_exact(dtype: torch.dtype, n: int) -> int | None:
    """The fp32 width (of LANES) at which q4.c's SiLU (silu_rows: Sleef's expf as torch's vector code runs it,
    libm's on the tail) gives F.silu's bits for n values of `dtype`, or None. Random values over the range where
    SiLU bends, and far out on both sides. Tried, not assumed: torch's activations run at AVX-512's 16 lanes
    where its sum runs at 8, and the width moves which values take the tail."""
    lib = _glue_library()
    if not lib or dtype not in GLUE_DTYPES:
        return None
    g = torch.Generator().manual_seed(n)
    x = [(torch.randn(4, n, generator=g) * scale).to(dtype) for scale in (0.3, 3.0, 30.0)]
    for lanes in LANES:
        if all(_silu_same(lib, row, lanes) for rows in x for row in rows):
            return lanes
    return None


def _silu_same(lib, row: torch.Tensor, lanes: int) -> bool:
    y = torch.empty_like(row)
    return (lib.silu_rows(row.data_ptr(), y.data_ptr(), GLUE_DTYPES[row.dtype], row.numel(), lanes) == 0
            and torch.equal(y.view(torch.uint8), F.silu(row).view(torch.uint8)))


def native_moe16(x: torch.Tensor, gate_ups: list[torch.Tensor], downs: list[torch.Tensor], weights: list[float],
                 each: bool) -> torch.Tensor | None:
    """A decode token x [1, D] through A SwiGLU experts with 16-bit weights (gate_up [2I, D], down [D, I]) in one
    native call (q4.c: h16_moe): the weighted outputs summed in the order given, or each one ([A, D]) — the bits
    of running them one by one (experts.DenseExpert: the native GEMV, torch's SiLU and products) and summing as
    experts._dispatch_one does. None where it does not apply."""
    w0 = gate_ups[0]
    if (x.shape[0] != 1 or not x.is_cpu or x.dtype not in GLUE_DTYPES or w0.dtype not in (torch.bfloat16, torch.float16)
            or x.numel() > NATIVE_ROWS * x.shape[-1]):
        return None
    I2, D = w0.shape
    I = I2 // 2
    for gu, dn in zip(gate_ups, downs):
        if (gu.dtype != w0.dtype or dn.dtype != w0.dtype or gu.shape != w0.shape or dn.shape != (D, I)
                or not gu.is_contiguous() or not dn.is_contiguous() or not gu.is_cpu or not dn.is_cpu):
            return None
    lib = _glue_library()
    lanes = silu_exact(x.dtype, I) if lib and x.shape[-1] == D else None
    if not lanes:
        return None
    A = len(gate_ups)
    xc = x.contiguous()
    y = xc.new_empty(A if each else 1, D)
    ptrs = ctypes.c_void_p * A
    rc = lib.h16_moe(xc.data_ptr(), y.data_ptr(), GLUE_DTYPES[x.dtype], A, ptrs(*(g.data_ptr() for g in gate_ups)),
                     ptrs(*(d.data_ptr() for d in downs)), int(w0.dtype == torch.bfloat16), D, I,
                     (ctypes.c_float * A)(*weights), int(each), lanes, torch.get_num_threads())
    return y if rc == 0 else None


def router_logits_fp32(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Router logits in fp32: h [N, D] (any dtype) @ w^T (+ b), w's values exact in fp32. A few rows over
    16-bit weights run the native GEMV on the weights as stored (`native_gemv`, fp32 accumulation) instead
    of copying w to fp32 on every call (a decode token did that once per MoE layer: 1 MB at Qwen3's
    128 x 2048)."""
    hf = h.float()
    y = native_gemv(hf, w) if b is None and w.dtype != torch.float32 else None
    if y is not None:
        return y
    return F.linear(hf, w.float(), None if b is None else b.float())


class Linear(nn.Linear):
    """nn.Linear through `linear` (same parameters and checkpoint names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Statistics in fp32; the result is cast back before the weight (as transformers does), or after it
    with `weight_in_fp32` (gpt-oss)."""

    def __init__(self, dim: int, eps: float, weight_in_fp32: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.weight_in_fp32 = eps, weight_in_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_in_fp32:
            return (self.weight * rms_normed(x, self.eps)).to(x.dtype)
        y = native_rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps) if y is None else y


def rms_normed(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) in fp32: the statistics of every RMSNorm."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: statistics in fp32, cast back to x's dtype, then the weight."""
    return w * rms_normed(x, eps).to(x.dtype)


def rope_table(head_dim: int, max_pos: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_pos, Hd] in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rope_config(args) -> dict:
    """`rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (hub config.json) as one dict with
    `rope_type` and `rope_theta`; yarn's `original_max_position_embeddings` defaults to the context length."""
    rp = dict(getattr(args, "rope_parameters", None) or getattr(args, "rope_scaling", None) or {})
    rp["rope_type"] = rp.get("rope_type", rp.get("type", "default"))
    if rp.get("rope_theta") is None:
        rp["rope_theta"] = getattr(args, "rope_theta", None) or 10000.0
    if rp["rope_type"] == "yarn":
        rp.setdefault("original_max_position_embeddings", args.max_position_embeddings)
    return rp


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(args, dim: int) -> tuple[torch.Tensor, float]:
    """inv_freq [dim/2] fp32 and the factor cos/sin are scaled by, for rope_type default or yarn
    (transformers' `_compute_yarn_parameters` arithmetic, operation for operation)."""
    rp = rope_config(args)
    base, rope_type = float(rp["rope_theta"]), rp["rope_type"]
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    if rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    if rope_type != "yarn":
        raise MoeError(f"rope_type {rope_type!r} is not supported for {getattr(args, 'model_type', '?')}")
    orig = rp["original_max_position_embeddings"]
    factor = rp.get("factor") or args.max_position_embeddings / orig
    attention_factor = rp.get("attention_factor")
    mscale, mscale_all_dim = rp.get("mscale"), rp.get("mscale_all_dim")
    if attention_factor is None:
        attention_factor = (float(yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim))
                            if mscale and mscale_all_dim else yarn_get_mscale(factor))
    beta_fast, beta_slow = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1

    def correction_dim(rotations):  # the dimension whose wavelength makes `rotations` turns over `orig`
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rp.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


def rope_tables(args, dim: int, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_pos, dim] in fp32 for `rope_config(args)`, scaled like transformers' rotary embedding."""
    inv_freq, scale = rope_inv_freq(args, dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, H, T, Hd]; cos/sin [T, Hd] already in x's dtype
    y = native_rope(x, cos, sin)
    return rope_torch(x, cos, sin) if y is None else y


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ---- the same two ops in one native call each (quant/native/q4.c: rms_norm, rope), rounded as torch rounds ------
# A decode token at Qwen3-30B-A3B's widths runs 33 RMSNorms and 16 RoPEs: ~9 and ~6 torch ops each, 57-73 and
# 29-37 us a call on this CPU (scripts/decode_sections.py, docs/bench/qwen3-30b-a3b-L8-q4bb4-decode-sections-1543.txt).
# The native calls repeat torch's arithmetic step by step, the mean of squares summed in the order of torch's own
# reduction; they are used for a (op, dtype, width) only after matching torch bit for bit on random rows in this
# process (`glue_exact`), so tokens cannot move.

GLUE_MAX = 32768  # elements: torch reduces a tensor below its grain size on one thread, in the order copied
GLUE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # q4.c's dtype codes (native.DTYPES)
LANES = (8, 16)  # fp32 vector widths torch's sum may run in (AVX2, AVX-512)


def glue_lanes() -> int | None:
    """The fp32 vector width in whose order torch sums a row on this machine, found by trying each of LANES
    against torch's own mean of squares (None: neither matches, or no native library). Not read off the CPU
    capability: torch 2.13 registers its sum kernel without an AVX-512 variant, so an AVX-512 machine sums in
    8 lanes too (seen on a Xeon with AVX-512, 2026-12-04)."""
    return _lanes if _glue_library() is not None else None


_glue_lib = None  # the native library once resolved (False: none)
_native = None  # quant.native, imported on first use
_lanes = None  # glue_lanes(), found when the library is resolved


def rms_native(lib, x: torch.Tensor, w: torch.Tensor, eps: float, lanes: int) -> torch.Tensor | None:
    """q4.c's rms_norm over the rows of x (contiguous, a GLUE_DTYPES dtype; w of x's dtype) summing in the order
    of `lanes` fp32 lanes; None where it refuses."""
    y = torch.empty_like(x)
    D = x.shape[-1]
    rc = lib.rms_norm(x.data_ptr(), y.data_ptr(), GLUE_DTYPES[x.dtype], x.numel() // D, D, w.data_ptr(), eps, lanes)
    return y if rc == 0 else None


def _calibrate(lib) -> int | None:
    # a wrong order shows in only 10-25 of 64 random rows (scripts/glue_order_rows.py): 64 rows, magnitudes
    # spread per element
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4096 + 37, generator=g) * 10 ** (torch.rand(64, 4096 + 37, generator=g) * 3)
    w = torch.rand(x.shape[-1], generator=g) * 2
    want = rms_norm(x, w, 1e-6)
    for lanes in LANES:
        y = rms_native(lib, x, w, 1e-6, lanes)
        if y is not None and torch.equal(y.view(torch.int32), want.view(torch.int32)):
            return lanes
    return None


def _glue_library():
    """q4.c's library for the exact glue (None: no native code, MOE_OFFLOAD_NATIVE=0, or no summation order of
    LANES gives torch's bits here)."""
    global _glue_lib, _native, _lanes
    if _glue_lib is None:
        from ..quant import native

        lib = native.lib()
        _lanes = _calibrate(lib) if lib is not None else None
        _native, _glue_lib = native, (lib if _lanes else None) or False
    return _glue_lib if _glue_lib and _native.enabled() else None


def _glue_call(op: str, x: torch.Tensor, *args) -> torch.Tensor | None:
    if _glue_library() is None:
        return None
    if op == "rms":
        w, eps = args
        return rms_native(_glue_lib, x, w, eps, _lanes)
    y = torch.empty_like(x)
    cos, sin = args
    T, Hd = cos.shape
    rc = _glue_lib.rope(x.data_ptr(), y.data_ptr(), GLUE_DTYPES[x.dtype], x.numel() // Hd, T, Hd, cos.data_ptr(),
                        sin.data_ptr())
    return y if rc == 0 else None


@functools.cache
def glue_exact(op: str, dtype: torch.dtype, width: int) -> bool:
    """Does the native `op` ("rms" or "rope") give torch's bits for rows of `width` in `dtype` (and in fp32, where
    a different summation order shows in nearly every element)? Random rows spanning 12 decades."""
    g = torch.Generator().manual_seed(width)
    for dt in dict.fromkeys((torch.float32, dtype)):
        x = (torch.randn(64, width, generator=g) * 10 ** (torch.rand(64, 1, generator=g) * 12 - 6)).to(dt)
        if op == "rms":
            w = (torch.rand(width, generator=g) * 2).to(dt)
            want, got = rms_norm(x, w, 1e-6), _glue_call(op, x, w, 1e-6)
        else:
            cos, sin = (torch.randn(4, width, generator=g).to(dt) for _ in range(2))
            x = x.view(16, 4, width)
            want, got = rope_torch(x, cos, sin), _glue_call(op, x, cos, sin)
        if got is None or not torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8)):
            return False
    return True


def _glue_ok(x: torch.Tensor, *others: torch.Tensor) -> bool:
    return (x.is_cpu and x.dtype in GLUE_DTYPES and x.numel() < GLUE_MAX and x.is_contiguous()
            and all(t.dtype == x.dtype and t.is_cpu and t.is_contiguous() for t in others))


def native_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor | None:
    """`rms_norm` in one native call, or None where it does not apply (the caller runs torch's ops)."""
    if not _glue_ok(x, w) or w.shape != x.shape[-1:] or not glue_exact("rms", x.dtype, x.shape[-1]):
        return None
    return _glue_call("rms", x, w, eps)


def native_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """`rope_torch` in one native call for x [.., T, Hd] contiguous (a decode token's q and k), or None."""
    if (not _glue_ok(x, cos, sin) or x.dim() < 2 or cos.shape != x.shape[-2:] or sin.shape != cos.shape
            or not glue_exact("rope", x.dtype, x.shape[-1])):
        return None
    return _glue_call("rope", x, cos, sin)


class SeqCache(nn.Module):
    """One sequence's static cache written by position; `grow` copies it into longer buffers. `axes`: each
    buffer's time axis."""

    axes: dict[str, int] = {}

    @property
    def length(self) -> int:
        name, axis = next(iter(self.axes.items()))
        return getattr(self, name).shape[axis]

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.axes)

    def grow(self, length: int) -> None:
        for name, axis in self.axes.items():
            old = getattr(self, name)
            new = old.new_zeros(old.shape[:axis] + (length,) + old.shape[axis + 1:])
            new.narrow(axis, 0, old.shape[axis]).copy_(old)
            setattr(self, name, new)


class KVCache(SeqCache):
    """Static cache written by position: k, v [B, K, S, Hd]."""

    axes = {"k": 2, "v": 2}

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        self.k.narrow(2, pos, T).copy_(k)  # narrow: ~half the cost of slice assignment per call
        self.v.narrow(2, pos, T).copy_(v)
        return self.k.narrow(2, 0, pos + T), self.v.narrow(2, 0, pos + T)


@dataclass(frozen=True)
class Packed:
    """A batch of sequences packed one after another along T (tokens [1, N]): sequence i brings `lens[i]` new
    tokens at positions `starts[i]`... Attention runs per sequence on its own cache (`attend`); every other
    op runs on all N rows at once, so a MoE layer routes the whole batch in one dispatch."""

    starts: tuple[int, ...]
    lens: tuple[int, ...]

    @property
    def offsets(self) -> list[int]:  # each sequence's first row in N
        return [sum(self.lens[:i]) for i in range(len(self.lens))]

    def positions(self, device) -> torch.Tensor:  # [N]
        return torch.cat([torch.arange(p, p + t, device=device) for p, t in zip(self.starts, self.lens)])

    def last_rows(self) -> list[int]:
        return [o + t - 1 for o, t in zip(self.offsets, self.lens)]

    def masks(self, window: int | None, device) -> list[torch.Tensor | None]:
        return [attention_mask(p, t, window, device) for p, t in zip(self.starts, self.lens)]

    def attend(self, fn: Callable, x, cos, sin, caches, masks) -> torch.Tensor:
        """x [1, N, D], cos/sin [N, Hd], one cache and mask per sequence -> [1, N, D]."""
        if len(self.lens) == 1:  # one sequence: no slicing, no concatenation
            return fn(x, cos, sin, caches[0], self.starts[0], masks[0])
        out = [fn(x[:, o:o + t], cos[o:o + t], sin[o:o + t], c, p, m)
               for o, t, p, c, m in zip(self.offsets, self.lens, self.starts, caches, masks)]
        return torch.cat(out, dim=1)


def attention_mask(pos: int, t: int, window: int | None, device) -> torch.Tensor | None:
    """Bool [T, pos+T]: True where query pos+i may attend key j. None when plain causal decode suffices."""
    if t == 1 and (window is None or pos < window):
        return None
    q = torch.arange(pos, pos + t, device=device)[:, None]
    k = torch.arange(pos + t, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask


class SeqAttention(nn.Module):
    """Attention of one sequence (`attend`); a packed batch (`pos` is a Packed) runs it once per sequence."""

    def forward(self, x, cos, sin, cache, pos, mask) -> torch.Tensor:
        if isinstance(pos, Packed):
            return pos.attend(self.attend, x, cos, sin, cache, mask)
        return self.attend(x, cos, sin, cache, pos, mask)


class Attention(SeqAttention):
    """GQA attention with optional q/k norm: qk_norm=None | 'head' (per head, Qwen3) | 'full' (OLMoE)."""

    def __init__(self, args, qkv_bias=False, o_bias=False, qk_norm=None, clip_qkv=None, window=None, scale=None):
        super().__init__()
        D, H, K = args.hidden_size, args.num_attention_heads, args.num_key_value_heads
        Hd = getattr(args, "head_dim", None) or D // H
        self.n_heads, self.n_kv, self.head_dim, self.window, self.clip_qkv = H, K, Hd, window, clip_qkv
        self.scale = scale  # softmax scale; None = 1/sqrt(Hd)
        self.q_proj = Linear(D, H * Hd, bias=qkv_bias)
        self.k_proj = Linear(D, K * Hd, bias=qkv_bias)
        self.v_proj = Linear(D, K * Hd, bias=qkv_bias)
        self.o_proj = Linear(H * Hd, D, bias=o_bias)
        self.qk_norm = qk_norm
        if qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(Hd, args.rms_norm_eps), RMSNorm(Hd, args.rms_norm_eps)
        elif qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(H * Hd, args.rms_norm_eps), RMSNorm(K * Hd, args.rms_norm_eps)

    def attend(self, x, cos, sin, cache: KVCache, pos: int, mask) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H|K, T, Hd]
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = cache.update(pos, k, v)  # [B, K, pos+T, Hd]
        if T == 1 and one_query_pays(q, k):
            y = native_attend_one(q, k, v, self.scale, mask)
            if y is None:
                y = attend_one(q, k, v, self.scale, mask)
        else:
            if mask is None:
                mask = attention_mask(pos, T, None, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads,
                                               scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


# Work (H·S·Hd) from which `attend_one` beats SDPA for one query (1 thread, Zen3): bf16 H8 Hd32 at S=40 134 vs
# 52 us, S=500 224 vs 400 us; H32 Hd128 S=512 850 vs 5581 us; fp32 there 503 vs 720 us, at S=500 H8 Hd32 163 vs
# 91 us. Below it the ~10 small ops of `attend_one` cost more than SDPA's one call.
ONE_QUERY_WORK = {torch.float32: 1 << 20}
ONE_QUERY_WORK_HALF = 1 << 16


def one_query_pays(q: torch.Tensor, k: torch.Tensor) -> bool:
    """q [B, H, 1, Hd], k [B, K, S, Hd]: is `attend_one` the faster path?"""
    work = q.shape[1] * k.shape[2] * q.shape[3]
    return q.device.type == "cpu" and work >= ONE_QUERY_WORK.get(q.dtype, ONE_QUERY_WORK_HALF)


def attend_one(q, k, v, scale: float | None, mask: torch.Tensor | None) -> torch.Tensor:
    """One query per sequence: q [B, H, 1, Hd] over k, v [B, K, S, Hd] (mask bool [1, S] or None) ->
    [B, H, 1, Hd]. Two matmuls and a softmax in fp32: SDPA costs ~10x more per call for a single query
    (1.91 vs 0.17 ms at 512 keys, issue 16)."""
    B, H, _, Hd = q.shape
    K = k.shape[1]
    qg = q.float().reshape(B, K, H // K, Hd)  # [B, K, H/K, Hd]: query head h reads kv head h // (H/K)
    s = torch.matmul(qg, k.float().transpose(-1, -2))  # [B, K, H/K, S]
    s = s * (Hd ** -0.5 if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    y = torch.matmul(torch.softmax(s, dim=-1), v.float())  # [B, K, H/K, Hd]
    return y.reshape(B, H, 1, Hd).to(q.dtype)


def native_attend_one(q, k, v, scale: float | None, mask) -> torch.Tensor | None:
    """`attend_one` in one native call (q4.c: attend1) over a 16-bit cache as stored: q [1, H, 1, Hd] contiguous,
    k, v [1, K, S, Hd] views of the cache (rows of Hd, any capacity); None where it does not apply. Not bit-equal
    to attend_one (its sums run in another order; neither is transformers' bits at 16 bits), so fp32 models,
    whose tokens are checked against transformers, keep torch's path."""
    if (q.dtype not in (torch.bfloat16, torch.float16) or not q.is_cpu or q.shape[0] != 1 or mask is not None
            or k.dtype != q.dtype or v.dtype != q.dtype or not q.is_contiguous() or k.stride() != v.stride()
            or k.stride(-1) != 1 or k.stride(-2) != q.shape[-1] or k.shape != v.shape):
        return None
    lib = _glue_library()
    if lib is None:
        return None
    H, Hd, K, S = q.shape[1], q.shape[-1], k.shape[1], k.shape[2]
    y = torch.empty_like(q)
    rc = lib.attend1(q.data_ptr(), k.data_ptr(), v.data_ptr(), y.data_ptr(), GLUE_DTYPES[q.dtype], H, K, S, Hd,
                     k.stride(1), Hd ** -0.5 if scale is None else scale, torch.get_num_threads())
    return y if rc == 0 else None


class MLP(nn.Module):
    """Dense SwiGLU: dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


ACTIVATIONS: dict[str, Callable] = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class MoE(nn.Module):
    """Router + routed experts (+ optional shared expert). Tiers live behind `self.experts`.

    `route(logits_fp32) -> (top_k_index [N, A], top_k_weights [N, A])` is a pure function from routing.py.
    `self.experts(hidden [N, D], top_k_index, top_k_weights) -> [N, D]` is any backend (experts.py, store/).
    """

    def __init__(self, dim: int, n_experts: int, route: Callable, shared: nn.Module | None = None,
                 shared_gate: bool = False, cast_weights: bool = True):
        super().__init__()
        self.cast_weights = cast_weights  # Qwen/OLMoE cast routing weights to the hidden dtype; Mixtral keeps fp32
        self.gate = nn.Linear(dim, n_experts, bias=False)
        self.route = route
        self.experts = None  # attached by the loader
        self.shared_expert = shared
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if shared_gate else None

    def router_logits(self, h: torch.Tensor) -> torch.Tensor:
        return router_logits_fp32(h, self.gate.weight)  # [N, E] fp32

    def router_linear(self) -> nn.Linear:
        """The router's linear layer (weight [E, D]), whatever the family's checkpoint calls it."""
        return self.gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # [N, D]
        idx, w = self.route(self.router_logits(h))
        y = self.experts(h, idx, w.to(h.dtype) if self.cast_weights else w)
        if self.shared_expert is not None:
            s = self.shared_expert(h)
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(self.shared_expert_gate(h)) * s
            y = y + s
        return y.reshape(shape)


class DecoderLayer(nn.Module):
    def __init__(self, args, attn: Attention, mlp: nn.Module, mlp_name: str = "mlp"):
        super().__init__()
        self.self_attn = attn
        self.mlp_name = mlp_name
        setattr(self, mlp_name, mlp)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    @property
    def ffn(self) -> nn.Module:
        return getattr(self, self.mlp_name)

    def forward(self, x, cos, sin, cache, pos, masks):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pos, masks.get(self.self_attn.window))
        return h + self.ffn(self.post_attention_layernorm(h))


class Inner(nn.Module):
    def __init__(self, args, layers: list[DecoderLayer]):
        super().__init__()
        # _weight: no random init. Under torch.device("meta") (build) nn.Embedding's normal_ runs through
        # torch._refs and imports torch._dynamo and sympy: 66 MiB of RSS for nothing (scripts/rss_phases.py)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size,
                                         _weight=torch.empty(args.vocab_size, args.hidden_size))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


# ---- family hooks: what a family may override, declared once with the default every caller can rely on ----


class FamilyHooks:
    """Per-family quirks of loading and sizing, read as plain attributes (a family file overrides them)."""

    fp32_keys: tuple[str, ...] = ()  # state-dict name suffixes held in fp32 whatever the dtype
    stored_dtype_keys: tuple[str, ...] = ()  # suffixes held as stored (quantized codes and their meta)
    kv_kind: str = "gqa"  # the KV cache's layout, as the planner names it ("mla": DeepSeek's latent cache)

    def skip_checkpoint_key(self, name: str) -> bool:
        """True for checkpoint tensors the family never uses (DeepSeek-V3's multi-token-prediction layer)."""
        return False

    def backbone_dtype(self, name: str, stored: torch.dtype, dtype: torch.dtype) -> torch.dtype:
        """The dtype backbone tensor `name` (stored as `stored`) is held in when the model runs in `dtype`."""
        if name.endswith(self.stored_dtype_keys):
            return stored
        return torch.float32 if name.endswith(self.fp32_keys) else dtype

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """KV cache bytes one token adds over all layers, from the family's own cache (built on meta)."""
        return sum(c.nbytes for c in self.make_cache(1, 1, dtype, torch.device("meta")))


class CausalLM(FamilyHooks, nn.Module):
    """`model.*` and `lm_head` named as in Hugging Face checkpoints, so the backbone maps by identity."""

    def __init__(self, args, layers: list[DecoderLayer]):
        super().__init__()
        self.args = args
        self.model = Inner(args, layers)
        self.tie = bool(getattr(args, "tie_word_embeddings", False))
        if not self.tie:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        if torch.empty(0).is_meta:  # built on meta (runtime/engine.build_model calls init_rope again after the
            # weights): the tables are computed on the CPU and moved to meta, since computing them on meta runs
            # torch._refs, which imports torch._dynamo and sympy (66 MiB of RSS, scripts/rss_phases.py)
            with torch.device("cpu"):
                self.init_rope("meta")
        else:
            self.init_rope(None)

    def init_rope(self, device) -> None:
        """RoPE tables in fp32; called again after loading weights onto a model built on `meta`."""
        cos, sin = rope_table(self.model.layers[0].self_attn.head_dim, self.args.max_position_embeddings,
                              self.args.rope_theta_value())
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.args.max_position_embeddings

    def moe_blocks(self) -> list[tuple[int, MoE]]:
        return [(i, l.ffn) for i, l in enumerate(self.model.layers) if isinstance(l.ffn, MoE)]

    def make_cache(self, batch: int, max_len: int, dtype, device) -> list[KVCache]:
        return [KVCache(batch, l.self_attn.n_kv, max_len, l.self_attn.head_dim, dtype, device)
                for l in self.model.layers]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """final hidden [.., D] (normed) -> logits [.., V] fp32."""
        if self.tie:
            return linear(x, self.model.embed_tokens.weight).float()
        return self.lm_head(x).float()

    def forward(self, tokens: torch.Tensor, pos: int | Packed, cache: list) -> torch.Tensor:
        """tokens [B, T] at positions pos..pos+T-1 -> logits [B, T, V] in fp32. A packed batch: tokens [1, N],
        cache[layer][sequence] -> logits [1, S, V] at each sequence's last token."""
        B, T = tokens.shape
        x = self.embed(tokens)
        windows = {l.self_attn.window for l in self.model.layers}
        if isinstance(pos, Packed) and len(pos.lens) > 1:
            at = pos.positions(x.device)
            cos, sin = self.rope_cos[at].to(x.dtype), self.rope_sin[at].to(x.dtype)
        else:  # one sequence: a slice of the tables
            p = pos.starts[0] if isinstance(pos, Packed) else pos
            cos, sin = self.rope_cos[p:p + T].to(x.dtype), self.rope_sin[p:p + T].to(x.dtype)
        if isinstance(pos, Packed):
            masks = {w: pos.masks(w, x.device) for w in windows}
        else:
            masks = {w: attention_mask(pos, T, w, x.device) for w in windows}
        for layer, c in zip(self.model.layers, cache):
            x = layer(x, cos, sin, c, pos, masks)
        if isinstance(pos, Packed):
            x = x[:, pos.last_rows()]
        return self.head(self.model.norm(x))
