"""The native 4-bit kernel (quant/native/q4.c, kind "native4") and its row-major order "r64".

Its outputs differ from the fp32 dequantised reference only by the int8 rounding of the activations, per
group (as llama.cpp's Q8 activations): emulating that rounding in torch reproduces the kernel to fp32
summation error, and against the unrounded reference the error stays below 1.5 % relative (Gaussian data;
~0.6 % measured). Without a compiler, AVX2 or with MOE_OFFLOAD_NATIVE=0 the torch int4pack path is used.
"""

from __future__ import annotations

import itertools
import stat

import pytest
import torch

from moe_offload.experts import ExpertShape
from moe_offload.quant import hqq, native
from moe_offload.quant.codec import HQQCodec, expert_spec
from moe_offload.quant.kernels import (
    LAYOUTS,
    NATIVE_LAYOUT,
    ROW_MAJOR,
    PackedMatrix,
    host_layout,
    int4pack_order,
    int4pack_unorder,
    kernel_for,
    make_linear,
    native_available,
    nibbles_in,
    write_layout,
)
from moe_offload.quant.pack import pack
from moe_offload.store.cache import storage_bytes, unit_bytes

needs_native = pytest.mark.skipif(not native_available(), reason="no C compiler / AVX2+FMA here")
CPU = torch.device("cpu")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def rounded(x: torch.Tensor, g: int) -> torch.Tensor:
    """x [M, K] as the kernel sees it: int8 per group of g, scale amax/127, round half to even."""
    M, K = x.shape
    xg = x.float().view(M, K // g, g)
    amax = xg.abs().amax(-1, keepdim=True)
    q = (xg * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))).round()
    return (q * (amax / 127)).view(M, K)


SHAPES = [(37, 96, 32), (100, 128, 64), (70, 256, 128), (45, 224, 32), (24, 512, 256)]  # N, K, g


@needs_native
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("N,K,g", SHAPES)
def test_native_kernel_matches_the_reference_up_to_activation_rounding(N, K, g, bits):
    W = torch.randn(N, K, generator=gen(N * K + bits))
    q = hqq.quantize(W, bits, g)
    ref = q.dequantize()
    lin = make_linear(PackedMatrix.from_quantized(q, NATIVE_LAYOUT))
    assert lin.kind == "native4"
    for M in (1, 3, 16):
        x = torch.randn(M, K, generator=gen(M))
        y = lin(x)
        assert y.dtype == torch.float32 and y.shape == (M, N)
        assert rel(y, rounded(x, g) @ ref.t()) < 2e-6  # the kernel is exact but for x's rounding
        assert rel(y, x @ ref.t()) < 1.5e-2
        yb = lin(x.to(torch.bfloat16))
        assert yb.dtype == torch.bfloat16
        assert rel(yb, rounded(x.to(torch.bfloat16), g) @ ref.t()) < 8e-3  # + bf16 output rounding
        yh = lin(x.half())  # fp16 in and out, rounded once (as torch's .to(float16))
        assert yh.dtype == torch.float16 and torch.equal(yh, lin(x.half().float()).half())
        assert torch.equal(lin(x.double()), lin(x).double())  # other dtypes go through fp32


@needs_native
def test_native_kernel_is_deterministic_across_threads_and_prefill_takes_the_dense_path():
    W = torch.randn(1100, 512, generator=gen(5))  # 275 KiB of codes: past q4.c's one-thread size
    q = hqq.quantize(W, 4, 64)
    lin = make_linear(PackedMatrix.from_quantized(q, NATIVE_LAYOUT), dense_rows=8)
    x = torch.randn(9, 512, generator=gen(6))
    before = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs += [lin(x[:1]), lin(x[:8])]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])  # rows split over threads, each
    # row summed by one thread in a fixed order
    assert rel(lin(x), x @ q.dequantize().t()) < 1e-6  # 9 > dense_rows: dequantise + dense GEMM


def test_r64_order_round_trips_and_relayouts_from_and_to_every_order():
    for N, K in [(16, 64), (37, 96), (80, 32), (64, 224)]:
        c = torch.randint(0, 16, (N, K), generator=gen(N + K), dtype=torch.uint8)
        s = int4pack_order(c, NATIVE_LAYOUT)
        assert torch.equal(int4pack_unorder(s, N, K, NATIVE_LAYOUT), c)
        b = pack(s, 4).view(N, K // 2)  # byte j of a 64-code chunk: codes j (low) and j + 32 (high)
        if K >= 64:
            assert torch.equal(b[:, :32] & 15, c[:, :32]) and torch.equal(b[:, :32] >> 4, c[:, 32:64])
        if K % 64:  # a last 32-code chunk: codes j and j + 16
            assert torch.equal(b[:, -16:] & 15, c[:, -32:-16]) and torch.equal(b[:, -16:] >> 4, c[:, -16:])
        q = hqq.Quantized(c, {}, torch.ones(K // 32, N, 2, dtype=torch.bfloat16), 4, 32)
        for src, dst in itertools.product(LAYOUTS, LAYOUTS):  # incl. orders a shape leaves row-major (N = 37)
            pm = PackedMatrix.from_quantized(q, src)
            assert torch.equal(pm.codes(), c)
            got = nibbles_in(pm, dst)
            assert torch.equal(PackedMatrix(got, q.sz, 4, N, K, dst).codes(), c), (N, K, src, dst)


def test_native_off_or_no_compiler_falls_back_to_torch(monkeypatch, tmp_path):
    """MOE_OFFLOAD_NATIVE=0, a missing compiler or one that fails: torch's path, silently, same process."""
    W = torch.randn(96, 128, generator=gen(7))
    q = hqq.quantize(W, 4, 64)
    x = torch.randn(2, 128, generator=gen(8))
    bogus = tmp_path / "bogus-cc"
    bogus.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo bogus 1.0; exit 0; }\n"
                     "echo broken >&2; exit 1\n")
    bogus.chmod(bogus.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("MOE_OFFLOAD_NATIVE_CACHE", str(tmp_path / "cache"))
    for env in ({"MOE_OFFLOAD_NATIVE": "0"}, {"CC": "false"}, {"CC": str(tmp_path / "no-such-cc")},
                {"CC": str(bogus)}):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert native.lib() is None, env
            assert write_layout() == (host_layout() or "b64")
            pm = PackedMatrix.from_quantized(q, NATIVE_LAYOUT)  # an r64 store read without the kernel
            expect = "int4pack" if host_layout() is not None else "dense"
            assert kernel_for(pm, CPU) == expect
            lin = make_linear(pm)
            assert lin.kind == expect and rel(lin(x), x @ q.dequantize().t()) < 1e-2
    assert not list((tmp_path / "cache").glob("*.tmp*"))  # a failed build leaves nothing half-written


@needs_native
@pytest.mark.parametrize("meta_bits", [8, 16])
def test_a_native_4bit_unit_holds_the_blob_once_and_every_order_agrees(meta_bits):
    shape = ExpertShape(352, 256)  # K = 352: a last 32-code chunk in gate_up's rows
    g = gen(9)
    w = [torch.randn(n, k, generator=g) * 0.05 for n, k in ((256, 352), (256, 352), (352, 256))]
    x = torch.randn(3, 352, generator=gen(10)).to(torch.bfloat16)
    outs = {}
    for layout in LAYOUTS:
        codec = HQQCodec({"bits": 4, "group_size": 32, "meta_bits": meta_bits, "quantizer": "rtn",
                          "layout": layout})
        blob = codec.encode(*w)
        unit = codec.decode(blob, shape)
        assert unit.kinds == ("native4", "native4")
        tensors = unit.tensors()
        views = [t for t in tensors if t.untyped_storage().data_ptr() == blob.untyped_storage().data_ptr()]
        meta = sum(pm.sz.numel() * 2 for pm in codec.packed(blob, shape))
        codes = sum(pm.N * pm.K // 2 for pm in codec.packed(blob, shape))
        if layout == NATIVE_LAYOUT:  # a view of the blob: resident == stored bytes (+ decoded 8-bit meta)
            assert views and storage_bytes(tensors) == blob.numel() + (meta if meta_bits == 8 else 0)
        elif layout in ROW_MAJOR:  # gate_up (K = 352: no whole 64-code chunks for r64i) is read as stored;
            # down is interleaved into r64i once
            assert views and storage_bytes(tensors) > blob.numel()
        else:  # reordered once: the codes' copy and the meta, nothing of the blob
            assert not views and storage_bytes(tensors) == codes + meta
        assert unit_bytes(unit, tensors) == storage_bytes(tensors)
        outs[layout] = unit(x)
    assert all(torch.equal(o, outs[NATIVE_LAYOUT]) for o in outs.values())


@needs_native
def test_quantize_writes_r64_when_the_native_kernel_loads(monkeypatch):
    monkeypatch.delenv("MOE_OFFLOAD_INT4_LAYOUT", raising=False)
    assert write_layout() == NATIVE_LAYOUT


@needs_native
def test_concurrent_first_builds_share_one_cached_library(tmp_path, child_env):
    """Two processes compiling into an empty cache at once: both load a kernel, one .so, no temporary left."""
    import subprocess
    import sys

    env = {**child_env, "MOE_OFFLOAD_NATIVE_CACHE": str(tmp_path)}
    code = "from moe_offload.quant import native; assert native.lib() is not None; print('ok')"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 and o.strip() == "ok" for p, (o, _) in zip(procs, outs)), outs
    assert len(list(tmp_path.glob("q4-*.so"))) == 1 and not list(tmp_path.glob("*.tmp"))


@needs_native
@pytest.mark.parametrize("D,I,g", [(352, 256, 32), (256, 384, 64), (512, 128, 128)])
def test_a_fused_expert_is_one_native_call_computing_down_silu_gate_times_up(D, I, g):
    """A SwiGLU 4-bit expert of two native matrices runs as one call (q4.c's q4_expert) for the rows the kernel
    takes: the same rounding of x and of the fp32 intermediate h = silu(g)·u as the two matrices' kernels see
    them, so it equals that emulation to fp32 summation error; threads do not change it; prefill rows still take
    the dequantise + dense path; an expert with biases or another activation keeps the unfused path."""
    from moe_offload.quant.codec import QuantExpert, expert_spec

    gn = gen(D + I)
    gate, up, down = (torch.randn(I, D, generator=gn) * 0.05, torch.randn(I, D, generator=gn) * 0.05,
                      torch.randn(D, I, generator=gn) * 0.05)
    codec = HQQCodec({**expert_spec(4, g, "rtn"), "layout": NATIVE_LAYOUT})
    unit = codec.decode(codec.encode(gate, up, down), ExpertShape(D, I), torch.float32)
    assert isinstance(unit, QuantExpert) and unit.fused
    Wgu, Wd = unit.gate_up.pm.dequantize(), unit.down.pm.dequantize()
    for M in (1, 5):
        x = torch.randn(M, D, generator=gen(M))
        h = rounded(x, g) @ Wgu.t()
        a = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        expect = rounded(a, g) @ Wd.t()
        before = torch.get_num_threads()
        try:
            outs = []
            for t in (1, 2):
                torch.set_num_threads(t)
                outs.append(unit(x))
        finally:
            torch.set_num_threads(before)
        assert torch.equal(outs[0], outs[1])
        assert rel(outs[0], expect) < 1e-5
        yh = unit(x.half())
        assert yh.dtype == torch.float16 and torch.equal(yh, unit(x.half().float()).half())
    big = torch.randn(unit.gate_up.dense_rows + 1, D, generator=gen(3))
    dense = torch.nn.functional.linear
    ref = dense(torch.nn.functional.silu(dense(big, Wgu[:I])) * dense(big, Wgu[I:]), Wd)
    assert rel(unit(big), ref) < 1e-5  # past dense_rows: the unfused dequantise + dense path
    from moe_offload.quant.codec import FUSED_ROWS

    mid = torch.randn(FUSED_ROWS + 1, D, generator=gen(4))  # past FUSED_ROWS: matrix by matrix, native
    assert FUSED_ROWS < unit.gate_up.dense_rows
    h = unit.gate_up(mid)
    assert torch.equal(unit(mid), unit.down(torch.nn.functional.silu(h[:, :I]) * h[:, I:]))
    gelu = codec.decode(codec.encode(gate, up, down), ExpertShape(D, I, act="gelu"), torch.float32)
    assert not gelu.fused


@needs_native
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_one_token_through_a_layers_4bit_experts_is_one_native_call_equal_to_the_per_expert_sum(dtype, wdtype):
    """Decode through a layer's resident 4-bit experts: one native call (q4.c's q4_moe) for the token's A
    experts, their outputs weighted and summed in ascending expert order with each step rounded as torch
    rounds it, so the token's output equals the per-expert calls + torch's sum bit for bit (any dtype of the
    routing weights, any thread count). A group that is part of the token's experts (hits, while misses load)
    comes back per expert, weighted; a group the kernel cannot take (another group size) runs expert by expert."""
    from moe_offload.experts import LocalExperts, moe_dispatch
    from moe_offload.quant import kernels
    from moe_offload.quant.codec import QuantExpert, expert_spec

    D, I, E, A = 256, 256, 6, 4
    gn = gen(7)
    codec = HQQCodec({**expert_spec(4, 64, "rtn"), "layout": NATIVE_LAYOUT})
    units = [codec.decode(codec.encode(*(torch.randn(*s, generator=gn) * 0.05 for s in ((I, D), (I, D), (D, I)))),
                          ExpertShape(D, I), dtype) for _ in range(E)]
    assert all(type(u) is QuantExpert and u.fused for u in units)
    calls = []
    real = kernels.native.lib().q4_moe

    class Counting:  # the ctypes function, counted
        def __getattr__(self, name):
            return getattr(native.lib(), name)

        @staticmethod
        def q4_moe(*a):
            calls.append(a[3])
            return real(*a)

    for u in units:
        u.gate_up.lib = Counting()
    x = torch.randn(1, D, generator=gn).to(dtype)
    idx = torch.tensor([[4, 1, 5, 2]])
    w = torch.softmax(torch.randn(1, A, generator=gn), -1).to(wdtype)

    def one_by_one(needed):
        return ([(e, units[e])] for e in reversed(needed))

    want = moe_dispatch(x, idx, w, one_by_one)  # per-expert calls, torch's weighted sum
    assert not calls
    before = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(LocalExperts(units)(x, idx, w))
    finally:
        torch.set_num_threads(before)
    assert calls == [A, A] and all(o.dtype == dtype and torch.equal(o, want) for o in outs)

    def hits_then_misses(needed):  # a cache's order: hits as one group, then each miss
        yield [(e, units[e]) for e in needed[:3]]
        yield [(needed[3], units[needed[3]])]

    assert torch.equal(moe_dispatch(x, idx, w, hits_then_misses), want) and calls[-1] == 3
    odd = codec.decode(codec.encode(*(torch.randn(*s, generator=gn) for s in ((I, D), (I, D), (D, I)))),
                       ExpertShape(D, I), dtype)
    mixed = HQQCodec({**expert_spec(4, 128, "rtn"), "layout": NATIVE_LAYOUT})
    units[5] = mixed.decode(mixed.encode(*odd.gate_up.pm.dequantize().chunk(2), odd.down.pm.dequantize()),
                            ExpertShape(D, I), dtype)
    n = len(calls)
    y = LocalExperts(units)(x, idx, w)  # group sizes differ: the kernel refuses, the experts run one by one
    assert calls[n:] == [A] and torch.equal(y, moe_dispatch(x, idx, w, one_by_one))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantised_prefill_gemms_of_16bit_rows_run_in_fp32_on_a_cpu_without_half_gemms(dtype, monkeypatch):
    """Past dense_rows a quantized matrix (a 4-bit attention projection or lm_head, an expert's prefill rows)
    is dequantised and multiplied densely; with 16-bit activations on a CPU without native half GEMMs (AVX2:
    fp16 GEMMs at 10 GFLOP/s against 47-73 in fp32) that GEMM runs in fp32 and is rounded once, as
    models.base.linear does for 16-bit weights. (It ran in the activations' dtype before.)"""
    from moe_offload.models import base
    from moe_offload.quant import kernels

    monkeypatch.setattr(base, "cpu_flags", lambda: frozenset())  # this CPU, as far as upcast() is concerned
    seen = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(kernels.F, "linear", lambda x, w, b=None: seen.append((x.dtype, w.dtype)) or real(x, w, b))
    N, K = 600, 256  # 600 rows of fp32 weights = 600 KiB: two blocks of UPCAST_BLOCK
    monkeypatch.setattr(kernels, "UPCAST_BLOCK", 512 * K)
    q = hqq.quantize(torch.randn(N, K, generator=gen(11)), 4, 64)
    lin = kernels.DequantLinear(PackedMatrix.from_quantized(q))
    x = torch.randn(40, K, generator=gen(12)).to(dtype)
    y = lin(x)
    assert y.dtype == dtype and seen and all(s == (torch.float32, torch.float32) for s in seen) and len(seen) == 2
    torch.testing.assert_close(y, (x.float() @ q.dequantize().t()).to(dtype))
    seen.clear()
    lin(x[:1])  # one row: no upcast
    assert seen == [(dtype, dtype)]


@pytest.mark.parametrize("layout", ["r64t", "r64i"])
@pytest.mark.parametrize("N,K,g", [(96, 256, 64), (100, 128, 32), (37, 96, 32), (40, 96, 32)])
def test_r64t_and_r64i_hold_the_meta_in_tiles_of_four_rows_and_compute_what_r64_does(N, K, g, layout):
    """r64t: r64's nibbles, the bf16 meta [N/4, G, 4, 2] (N % 4 == 0; else [G, N, 2] as r64). r64i: r64t's meta
    and each tile's rows interleaved by 32-byte chunk (N % 4 == 0 and K % 64 == 0; else held as r64t). Every
    reader sees the same codes and (s, m) (codes(), meta()); dequantise and the native kernel give r64's
    numbers exactly; the kernel reads the layout it computes in where it is stored."""
    q = hqq.quantize(torch.randn(N, K, generator=gen(N + K)), 4, g)
    a, b = PackedMatrix.from_quantized(q, "r64"), PackedMatrix.from_quantized(q, layout)
    il = layout == "r64i" and N % 4 == 0 and K % 64 == 0
    assert b.layout == ("r64i" if il else "r64t") and torch.equal(b.codes(), q.codes)
    assert torch.equal(a.packed, b.packed) != il and b.tiled == (N % 4 == 0) and b.groups == K // g
    if il:  # chunk c of the tile's row r at 128·c + 32·r
        assert torch.equal(b.packed[32:64], a.packed[K // 2:K // 2 + 32])
        assert torch.equal(b.packed[128:160], a.packed[32:64])
    assert torch.equal(b.meta(), q.sz) and torch.equal(b.meta(8, 21), q.sz[:, 8:21])
    if b.tiled:
        assert b.sz.shape == (N // 4, K // g, 4, 2) and torch.equal(b.sz[1, 2, 3], q.sz[2, 7])
    assert torch.equal(b.dequantize(), q.dequantize()) and torch.equal(b.dequantize(), a.dequantize())
    if native_available():
        la, lb = make_linear(a), make_linear(b)
        native = PackedMatrix(b.packed, b.sz, 4, N, K, NATIVE_LAYOUT).layout  # what the kernel reads here
        assert lb.pm.tiled == b.tiled and lb.pm.layout == native
        if b.layout == native:  # read where it is stored
            assert lb.pm.sz.data_ptr() == b.sz.data_ptr() and lb.pm.packed.data_ptr() == b.packed.data_ptr()
        for M in (1, 6):
            x = torch.randn(M, K, generator=gen(M))
            assert torch.equal(la(x), lb(x))
    if host_layout() is not None and g in (32, 64) and N % 16 == 0:  # torch's int4pack reads [G, N, 2]
        from moe_offload.quant.kernels import Int4Linear

        x = torch.randn(2, K, generator=gen(1))
        t = Int4Linear(b)
        assert not t.pm.tiled and torch.equal(t.sz, q.sz)
        assert rel(t(x), x @ q.dequantize().t()) < 1e-2


@needs_native
@pytest.mark.parametrize("wdt", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("xdt", [torch.float32, torch.float16, torch.bfloat16])
def test_native_16bit_gemv_is_the_fp32_dot_product_rounded_once(wdt, xdt):
    """models.base.linear runs a few rows over 16-bit weights through q4.c's h16_mm: each output is the fp32
    dot product of the row with x (as fp32), rounded once to x's dtype, the same for any thread count; more
    rows, or a bias, go to torch."""
    from moe_offload.models.base import NATIVE_ROWS, linear, native_gemv

    for N, K in [(37, 100), (64, 256), (9, 7)]:  # tails: N % 4, K % 8
        w = torch.randn(N, K, generator=gen(N)).to(wdt)
        for M in (1, 3):
            x = torch.randn(M, K, generator=gen(M + K)).to(xdt)
            ref = (x.double() @ w.double().t())
            before = torch.get_num_threads()
            try:
                outs = []
                for t in (1, 2):
                    torch.set_num_threads(t)
                    outs.append(native_gemv(x, w))
            finally:
                torch.set_num_threads(before)
            y = outs[0]
            assert y is not None and y.dtype == xdt and torch.equal(y, outs[1])
            torch.testing.assert_close(y.double(), ref.to(xdt).double(), rtol=2e-5 if xdt == torch.float32 else 1e-2,
                                       atol=1e-4)
            assert torch.equal(linear(x, w), y)
    w = torch.randn(8, 16).half()
    assert native_gemv(torch.randn(NATIVE_ROWS + 1, 16).half(), w) is None  # many rows: torch (or fp32 upcast)
    assert native_gemv(torch.randn(1, 16).half(), w.t().contiguous().t()) is None  # not row-contiguous


@needs_native
@pytest.mark.parametrize("wdt", [torch.float16, torch.bfloat16])
def test_router_logits_over_16bit_weights_use_them_as_stored(wdt, monkeypatch):
    """A decode token's router (models.base.router_logits_fp32: MoE, granitemoe) reads its 16-bit weight through the
    native GEMV in fp32 instead of copying the weight to fp32 on every call; many rows, fp32 weights or a bias
    (gpt-oss) keep F.linear on the fp32 copy. The logits are fp32 either way and agree to fp32 summation."""
    from moe_offload.models import base

    calls = []
    real = base.native_gemv
    monkeypatch.setattr(base, "native_gemv", lambda x, w: calls.append(tuple(x.shape)) or real(x, w))
    w = torch.randn(64, 256, generator=gen(5)).to(wdt)
    h = torch.randn(1, 256, generator=gen(6)).to(wdt)
    y = base.router_logits_fp32(h, w)
    ref = torch.nn.functional.linear(h.float(), w.float())
    assert calls == [(1, 256)] and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    many = torch.randn(base.NATIVE_ROWS + 1, 256, generator=gen(7)).to(wdt)
    assert torch.equal(base.router_logits_fp32(many, w), torch.nn.functional.linear(many.float(), w.float()))
    b = torch.randn(64, generator=gen(8))
    n = len(calls)
    assert torch.equal(base.router_logits_fp32(h, w, b), torch.nn.functional.linear(h.float(), w.float(), b))
    assert torch.equal(base.router_logits_fp32(h.float(), w.float()), ref) and len(calls) == n  # fp32 / bias: torch


@needs_native
@pytest.mark.parametrize("g", [32, 64, 128])
def test_the_vnni_build_gives_the_avx2_builds_bits(g, monkeypatch):
    """Where the CPU has VNNI (native.isa_flags()), q4.c is built with it: one instruction for the int8 dot's
    int32 sums, the same integers as AVX2's maddubs + madd, so the same bits for matrices (four-row tiles, their
    tail rows, K ≡ 32 mod 64) and for a layer's experts in one call. Elsewhere both builds are the AVX2 one."""
    flags = native.isa_flags()
    monkeypatch.setenv("MOE_OFFLOAD_NATIVE_VNNI", "0")
    assert native.isa_flags() == ()
    monkeypatch.delenv("MOE_OFFLOAD_NATIVE_VNNI")
    base_lib, isa_lib = native.lib(()), native.lib()
    assert base_lib.q4_vnni() == 0 and isa_lib.q4_vnni() == int(bool(flags))
    for N, K in [(100, 512), (64, 256 + 32 * (g == 32))]:
        q = hqq.quantize(torch.randn(N, K, generator=gen(N + g)), 4, g)
        lin = make_linear(PackedMatrix.from_quantized(q, NATIVE_LAYOUT), dense_rows=8)
        for M in (1, 3):
            x = torch.randn(M, K, generator=gen(M)).to(torch.bfloat16)
            outs = []
            for lib in (base_lib, isa_lib):
                lin.call = lib.q4_call
                outs.append(lin(x))
            assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16)), (N, K, M)
    from moe_offload.quant.kernels import fused_moe

    codec = HQQCodec({**expert_spec(4, g, "rtn"), "layout": NATIVE_LAYOUT})
    D, I = 256, 128
    units = [codec.decode(codec.encode(*(torch.randn(n, k, generator=gen(e + n)) * 0.05
                                        for n, k in ((I, D), (I, D), (D, I)))), ExpertShape(D, I), torch.bfloat16)
             for e in range(3)]
    x = torch.randn(1, D, generator=gen(9)).to(torch.bfloat16)
    outs = []
    for lib in (base_lib, isa_lib):
        units[0].gate_up.lib = lib
        outs.append(fused_moe([(u.gate_up, u.down) for u in units], x, [0.5, 0.3, 0.2]))
    assert outs[0] is not None and torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))


@needs_native
@pytest.mark.parametrize("layout", ["r64", "r64t", "r64i"])
@pytest.mark.parametrize("N,K,g", [(64, 256, 64), (100, 512, 32), (37, 96, 32), (40, 96, 32), (96, 256, 128)])
def test_dequantise_natively_gives_the_torch_paths_bits(N, K, g, layout, monkeypatch):
    """PackedMatrix.dequantize by q4.c (q4_dequant: one pass, prefill's dequantise + dense GEMM) and by the torch
    ops (q·s, then + m0, in fp32, rounded once) give the same bits in every dtype, whole or a row range, in every
    row-major layout (tiles, their tail rows, K ≡ 32 mod 64)."""
    q = hqq.quantize(torch.randn(N, K, generator=gen(N + K + g)), 4, g)
    pm = PackedMatrix.from_quantized(q, layout)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert pm._dequantize_native(torch.empty(2, K, dtype=dt), 0)  # the native path applies here
        native_w = pm.dequantize(dt)
        part = torch.empty(5, K, dtype=dt)
        pm.dequantize(dt, out=part, start=3)
        with monkeypatch.context() as m:
            m.setattr(PackedMatrix, "_dequantize_native", lambda self, out, start: False)
            torch_w = pm.dequantize(dt)
        bits = torch.int32 if dt == torch.float32 else torch.int16
        assert torch.equal(native_w.view(bits), torch_w.view(bits)), dt
        assert torch.equal(part.view(bits), torch_w[3:8].view(bits))
    assert torch.equal(pm.dequantize(torch.float32), q.dequantize())


@needs_native
def test_bf16_rows_past_the_amx_crossover_take_dequantise_and_the_dense_gemm(monkeypatch):
    """On a CPU with AMX-BF16 torch's bf16 GEMM is ~6x its fp32 one, so bf16 activations leave the native kernel
    past AMX_ROWS rows (elsewhere past DENSE_ROWS); a dense_rows given explicitly still decides."""
    from moe_offload.quant import kernels

    for flags, want in ((frozenset({"avx2", "amx_bf16"}), kernels.AMX_ROWS), (frozenset({"avx2"}), 1024)):
        monkeypatch.setattr(kernels, "cpu_flags", lambda flags=flags: flags)
        assert kernels.native_rows(torch.bfloat16) == want
        assert kernels.native_rows(torch.float16) == kernels.native_rows(torch.float32) == 1024
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    q = hqq.quantize(torch.randn(96, 256, generator=gen(7)), 4, 64)
    pm = PackedMatrix.from_quantized(q, NATIVE_LAYOUT)
    lin, forced = make_linear(pm), make_linear(pm, dense_rows=1024)
    dense = make_linear(pm, "dense")
    for M in (kernels.AMX_ROWS, kernels.AMX_ROWS + 1):
        x = torch.randn(M, 256, generator=gen(M)).to(torch.bfloat16)
        assert torch.equal(lin(x), dense(x)) == (M > kernels.AMX_ROWS)  # the kernel rounds x to int8: differs
        assert not torch.equal(forced(x), dense(x))
    x = torch.randn(40, 256, generator=gen(1))  # fp32 rows keep the kernel
    assert not torch.equal(lin(x), dense(x))
