"""Quantization library: packing, HQQ/RTN error bounds, kernels vs the dequantised reference, the hqq codec,
mixed-precision plans, low-rank residuals. Small matrices only: the whole file runs in seconds."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch

from moe_offload.errors import MoeError
from moe_offload.codecs import make_codec
from moe_offload.experts import DenseExpert, ExpertShape
from moe_offload.quant import hqq, lowrank, mixed
from moe_offload.quant.codec import HQQCodec, expert_error
from moe_offload.quant.kernels import (
    LAYOUTS,
    PackedMatrix,
    host_layout,
    int4pack_order,
    int4pack_unorder,
    make_linear,
)
from moe_offload.quant.pack import nibbles, pack, packed_nbytes, unpack


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


# ---- packing ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip_is_bit_exact(bits):
    for n in (1, 5, 8, 13, 64, 1000, 4104):
        codes = torch.randint(0, 2**bits, (n,), generator=gen(n), dtype=torch.uint8)
        p = pack(codes, bits)
        assert p.dtype == torch.uint8 and p.numel() == packed_nbytes(n, bits) == math.ceil(n / 8) * bits
        assert torch.equal(unpack(p, bits, n), codes)
        shifted = torch.zeros(p.numel() + 3, dtype=torch.uint8)  # an unaligned slice of a bigger buffer
        shifted[3:] = p
        assert torch.equal(unpack(shifted[3:], bits, n), codes)
        if bits < 8:  # 2/3-bit planes expand to exactly the 4-bit packing of the same codes
            assert torch.equal(nibbles(p, bits, n), pack(codes, 4))
    with pytest.raises(ValueError):
        pack(torch.zeros(8, dtype=torch.uint8), 5)


def test_int4pack_order_round_trip_and_torch_layout():
    for N, K in [(16, 64), (64, 32), (80, 64), (112, 96), (192, 128)]:
        c = torch.randint(0, 16, (N, K), generator=gen(N), dtype=torch.uint8)
        for layout in LAYOUTS:
            stream = int4pack_order(c, layout)
            assert torch.equal(int4pack_unorder(stream, N, K, layout), c)
            if layout == host_layout():
                ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(c.to(torch.int32), 1)
                assert torch.equal(pack(stream, 4).view(N, K // 2), ref)


# ---- quantizer ----------------------------------------------------------------------------------------

def _expected_max(g: int) -> float:
    """E[max of g standard normals] by numerical integration (for the RTN error model below)."""
    xs = torch.linspace(-8, 8, 20001, dtype=torch.float64)
    cdf = 0.5 * (1 + torch.erf(xs / math.sqrt(2)))
    pdf = torch.exp(-xs**2 / 2) / math.sqrt(2 * math.pi)
    return float(torch.trapezoid(xs * g * cdf ** (g - 1) * pdf, xs))


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (4, 64), (8, 0)])
def test_quantizer_error_bounds_on_gaussian(bits, group):
    """RTN error ≈ step/√12, step = E[group range]/(2^b − 1); HQQ must beat RTN; both under the model +5 %."""
    W = torch.randn(256, 512, generator=gen(1))
    g = hqq.group_size_for(512, group)
    model = 2 * _expected_max(g) / (2**bits - 1) / math.sqrt(12)
    errs = {m: hqq.rel_error(W, hqq.quantize(W, bits, group, method=m).dequantize()) for m in ("rtn", "hqq")}
    assert errs["rtn"] < 1.05 * model
    assert errs["hqq"] <= errs["rtn"]
    if bits < 8:
        assert errs["hqq"] < 0.97 * errs["rtn"]  # the fitted scale/zero is a real gain at low bits


def test_error_monotone_in_bits_and_meta8_costs_nothing_measurable():
    W = torch.randn(128, 256, generator=gen(2)) * 0.02
    errs = [hqq.rel_error(W, hqq.quantize(W, b, None if b == 8 else 64).dequantize()) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.01
    e8 = hqq.rel_error(W, hqq.quantize(W, 4, 64, meta_bits=8).dequantize())
    e16 = hqq.rel_error(W, hqq.quantize(W, 4, 64, meta_bits=16).dequantize())
    assert abs(e8 - e16) < 0.01 * e16


def test_quantize_codes_are_nearest_for_the_stored_meta():
    W = torch.randn(32, 128, generator=gen(3))
    q = hqq.quantize(W, 3, 64)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 7
    assert torch.equal(hqq.requantize(W, q.sz, 3), q.codes)
    # constant and all-zero groups reconstruct exactly
    C = torch.zeros(16, 128)
    C[:, :64] = 0.5
    assert torch.allclose(hqq.quantize(C, 2, 64).dequantize(), C)


def test_group_size_for():
    assert hqq.group_size_for(4096, 64) == 64
    assert hqq.group_size_for(48, 64) == 48 and hqq.group_size_for(96, 64) == 48
    assert hqq.group_size_for(100, 0) == 100


def test_our_hqq_matches_the_hqq_package():
    """Same algorithm (zero only, no scale refit): within 3 % of the reference quantizer's error."""
    quantize_mod = pytest.importorskip("hqq.core.quantize")
    W = torch.randn(256, 1024, generator=gen(4))
    for bits, g in [(4, 64), (3, 64), (2, 16)]:
        Wq, meta = quantize_mod.Quantizer.quantize(W, nbits=bits, group_size=g, axis=1, device="cpu",
                                                   bitpack=False, optimize=True)
        theirs = hqq.rel_error(W, quantize_mod.Quantizer.dequantize(Wq, meta))
        s, z = hqq.fit(W, bits, g, "hqq", opt_scale=False)
        Wg = W.view(256, -1, g)
        Q = torch.round(Wg / s[..., None] + z[..., None]).clamp(0, 2**bits - 1)
        ours = hqq.rel_error(W, (s[..., None] * (Q - z[..., None])).view_as(W))
        assert abs(ours - theirs) < 0.03 * theirs, (bits, g, ours, theirs)


def _group_err(W, What, h, g):
    """Σ_j h_j (w_ij − ŵ_ij)² per (row, group) [N, G]."""
    N, K = W.shape
    return ((W - What).pow(2) * h).view(N, K // g, g).sum(-1)


def test_weighted_hqq_with_uniform_importance_equals_unweighted():
    W = torch.randn(64, 256, generator=gen(20))
    for bits, g in ((2, 32), (2, 128), (3, 64), (4, 64)):
        s0, z0 = hqq.fit(W, bits, g)
        for c in (1.0, 3.0):  # any constant importance is the unweighted objective (without the range search)
            s1, z1 = hqq.fit(W, bits, g, importance=torch.full((256,), c), search=0)
            assert torch.allclose(s0, s1, rtol=1e-4, atol=1e-7)
            assert torch.allclose(z0, z1, rtol=1e-4, atol=1e-4)
        q0 = hqq.quantize(W, bits, g)
        q1 = hqq.quantize(W, bits, g, importance=torch.ones(256), search=0)
        assert (q0.codes != q1.codes).float().mean() < 1e-3
        # the range search starts from a shrunk range where that is better: not worse on the plain error
        q2 = hqq.quantize(W, bits, g, importance=torch.ones(256))
        assert hqq.rel_error(W, q2.dequantize()) <= hqq.rel_error(W, q0.dequantize()) * 1.001
    with pytest.raises(ValueError):
        hqq.fit(W, 2, 32, importance=torch.ones(255))


def test_weighted_hqq_lowers_the_weighted_error_it_targets():
    """With skewed column importance, the weighted fit beats the plain one on Σ_j h_j err_j (what the
    output sees when E[x_j²] = h_j), in total and in nearly every group; it pays on the plain error."""
    N, K = 128, 256
    W = torch.randn(N, K, generator=gen(21))
    h = torch.exp(2 * torch.randn(K, generator=gen(22)))  # log-normal: a few columns dominate
    for bits, g in ((2, 32), (2, 128), (3, 128), (4, 64)):
        plain = hqq.quantize(W, bits, g).dequantize()
        e_plain = _group_err(W, plain, h, g)
        for search, gain in ((0, 0.9), (11, 0.75)):  # weighting alone; with the range search (the default)
            aware = hqq.quantize(W, bits, g, importance=h, search=search).dequantize()
            e_aware = _group_err(W, aware, h, g)
            assert e_aware.sum() < gain * e_plain.sum(), (bits, g, search)
            assert hqq.rel_error(W, aware) > hqq.rel_error(W, plain)
        assert (e_aware <= e_plain * 1.02).float().mean() > 0.9  # in nearly every group
    # RTN takes its scale from min/max: the importance does not apply
    assert torch.equal(hqq.quantize(W, 2, 32, method="rtn", importance=h).codes,
                       hqq.quantize(W, 2, 32, method="rtn").codes)


def test_importance_weights():
    x = torch.randn(500, 64, generator=gen(23)) * torch.linspace(0.1, 3, 64)
    h = hqq.importance_weights(x)
    assert h.shape == (64,) and abs(float(h.mean()) - 1) < 1e-5
    assert h[-1] > 100 * h[0]
    hf = hqq.importance_weights(x, floor=1.0)
    assert abs(float(hf.mean()) - 1) < 1e-5 and hf[-1] / hf[0] < h[-1] / h[0]
    assert float(hqq.importance_weights(torch.zeros(4, 8)).min()) > 0  # dead inputs: no division by 0


# ---- kernels ------------------------------------------------------------------------------------------

CASES = [  # bits, group, N, K, the kernel auto picks on CPU
    (4, 64, 96, 128, "int4pack"), (3, 64, 80, 64, "int4pack"), (2, 32, 48, 64, "int4pack"),
    (4, 128, 32, 256, "int4pack"), (8, 0, 40, 64, "int8pack"),
    (4, 16, 64, 64, "dense"), (3, 64, 24, 128, "dense"), (8, 0, 16, 24, "dense"), (8, 64, 32, 128, "dense"),
]


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("bits,group,N,K,kind", CASES)
def test_kernels_match_the_dequantised_reference(bits, group, N, K, kind, native, monkeypatch):
    """native: the native kernel (quant/native) where it loads and takes the shape, else torch's int4pack."""
    from moe_offload.quant.kernels import native_available, native_ok

    monkeypatch.setenv("MOE_OFFLOAD_NATIVE", "1" if native else "0")
    if native and bits <= 4 and native_ok(K, group):  # (any N: its order is row-major)
        if not native_available():
            pytest.skip("the native kernel is not available here")
        kind = "native4"
    W = torch.randn(N, K, generator=gen(N + K))
    q = hqq.quantize(W, bits, group)
    pm = PackedMatrix.from_quantized(q)
    assert torch.equal(pm.codes(), q.codes)
    ref = q.dequantize()
    assert torch.equal(pm.dequantize(), ref)
    assert torch.equal(pm.dequantize(rows=N), ref) and torch.equal(pm.dequantize(rows=16), ref)
    lin = make_linear(pm, dense_rows=8)
    if kind != "int4pack" or host_layout() is not None:
        assert lin.kind == kind
    for M in (1, 5, 9):  # decode rows use the kernel, prefill rows (> dense_rows) dequantise + dense GEMM
        x = torch.randn(M, K, generator=gen(M))
        for dt in (torch.bfloat16, torch.float32):
            y = lin(x.to(dt))
            assert y.dtype == dt and y.shape == (M, N)
            assert rel(y, x.to(dt).float() @ ref.t()) < 1e-2
        assert rel(make_linear(pm, "dense")(x), x @ ref.t()) < 1e-6


@pytest.mark.parametrize("bits", [3, 4])
def test_int4_kernel_on_codes_of_another_cpus_layout_converts_and_agrees(bits, monkeypatch):
    """Codes stored in another CPU build's int4 order: the unit reorders them into this CPU's, same numbers,
    and keeps only the reordered copy (tests/test_memory_layout.py: every order, and the blob's bytes)."""
    if host_layout() is None:
        pytest.skip("this torch's int4 order is none of ours")
    monkeypatch.setenv("MOE_OFFLOAD_NATIVE", "0")  # torch's path (tests/test_native_q4.py: the native one)
    W = torch.randn(80, 128, generator=gen(12))
    q = hqq.quantize(W, bits, 64)
    native = make_linear(PackedMatrix.from_quantized(q, host_layout()))
    for other in set(LAYOUTS) - {host_layout()}:
        converted = make_linear(PackedMatrix.from_quantized(q, other))
        assert converted.kind == "int4pack"
        assert converted.nbytes == native.nbytes == 80 * 128 // 2 + q.sz.numel() * 2
        x = torch.randn(3, 128, generator=gen(13), dtype=torch.bfloat16)
        assert torch.equal(converted(x), native(x))


# ---- the codec ----------------------------------------------------------------------------------------

SPECS = [dict(bits=4), dict(bits=3), dict(bits=2), dict(bits=8), dict(bits=4, meta_bits=16),
         dict(bits=2, group_size=16), dict(bits=3, rank=8), dict(bits=4, quantizer="rtn")]


def expert(D, I, seed=0):
    g = gen(seed)
    return [torch.randn(*s, generator=g) * 0.05 for s in ((I, D), (I, D), (D, I))]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("D,I", [(128, 96), (64, 48)])
def test_codec_round_trip_through_bytes(spec, D, I):
    codec = make_codec({"name": "hqq", **spec})
    assert isinstance(codec, HQQCodec)
    assert make_codec(json.loads(json.dumps(codec.spec))).spec == codec.spec  # the manifest round trip
    shape = ExpertShape(D, I)
    gate, up, down = expert(D, I)
    blob = codec.encode(gate, up, down)
    assert blob.dtype == torch.uint8 and blob.numel() == codec.nbytes(shape)
    assert torch.equal(blob, codec.encode(gate, up, down))  # deterministic
    stored = torch.frombuffer(bytearray(blob.numpy().tobytes()), dtype=torch.uint8)  # as read from disk
    gu, dn = codec.dequantize(stored, shape)
    ref = DenseExpert(gu, dn)
    x = torch.randn(5, D, generator=gen(7))
    for dt in (torch.bfloat16, torch.float32):
        unit = codec.decode(stored, shape, dt)
        assert rel(unit(x.to(dt)), ref(x.to(dt).float())) < 2e-2
        assert unit.nbytes >= blob.numel() // 2
    dense_unit = HQQCodec(codec.spec, kernel="dense").decode(stored, shape, torch.float32)
    assert rel(dense_unit(x), ref(x)) < 1e-5
    err = expert_error(gate, up, down, codec, blob)
    assert 0 < err < {2: 0.45, 3: 0.25, 4: 0.12, 8: 0.01}[codec.spec["bits"]]


def test_codec_nbytes_is_exact_and_bits_per_weight():
    shape = ExpertShape(4096, 14336)
    n = 3 * 4096 * 14336
    bpw = {b: 8 * HQQCodec({"bits": b}).nbytes(shape) / n for b in (2, 3, 4, 8)}
    # codes + meta: b + 17/g with 8-bit meta (2: g32, 3: g64, 4: g64 when asked); 8-bit: one bf16 (s, m) per
    # row; 4-bit's default: bf16 (s, m) per group of 64, the int4 kernel's own meta
    for b, g in ((2, 32), (3, 64)):
        assert abs(bpw[b] - (b + 17 / g)) < 1e-3
    assert abs(8 * HQQCodec({"bits": 4, "meta_bits": 8}).nbytes(shape) / n - (4 + 17 / 64)) < 1e-3
    assert abs(bpw[8] - 8) < 0.01
    assert abs(bpw[4] - 4.5) < 1e-3
    assert abs(8 * HQQCodec({"bits": 4, "meta_bits": 16}).nbytes(shape) / n - 4.5) < 1e-3


def test_codec_bad_spec_and_short_blob():
    with pytest.raises(MoeError):
        make_codec({"name": "hqq", "bits": 5})
    with pytest.raises(MoeError):
        make_codec({"name": "hqq", "bits": 4, "meta_bits": 4})
    codec = HQQCodec({"bits": 4})
    with pytest.raises(ValueError):
        codec.decode(torch.zeros(10, dtype=torch.uint8), ExpertShape(64, 32), torch.float32)


def test_lowrank_correction_reduces_error_and_uses_calibration():
    D, I = 64, 64
    gate, up, down = expert(D, I, seed=3)
    mix = torch.randn(D, D, generator=gen(5))  # correlated activations: whitening matters
    x = torch.randn(256, D, generator=gen(6)) @ mix
    base = expert_error(gate, up, down, HQQCodec({"bits": 2}), x=x)
    plain = expert_error(gate, up, down, HQQCodec({"bits": 2, "rank": 16}), x=x,
                         blob=HQQCodec({"bits": 2, "rank": 16}).encode(gate, up, down))
    aware = expert_error(gate, up, down, HQQCodec({"bits": 2, "rank": 16}), x=x)
    assert aware < plain < base


def _skewed_inputs(n, D, seed):
    scale = torch.exp(1.5 * torch.randn(D, generator=gen(seed)))  # a few hidden dims carry most energy
    return torch.randn(n, D, generator=gen(seed + 1)) * scale, scale


AWARE_SPECS = [dict(bits=2), dict(bits=2, group_size=128), dict(bits=3, group_size=128), dict(bits=2, rank=8)]


@pytest.mark.parametrize("spec", AWARE_SPECS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_act_aware_codec_same_format_lower_output_error_on_unseen_inputs(spec):
    D, I = 128, 96
    codec = HQQCodec(spec)
    shape = ExpertShape(D, I)
    gate, up, down = expert(D, I, seed=24)
    x, scale = _skewed_inputs(600, D, 25)
    x_fit, x_test = x[:300], x[300:]  # same distribution, other rows
    plain = codec.encode(gate, up, down, x=x_fit)
    aware = codec.encode(gate, up, down, x=x_fit, act_aware=True)
    assert aware.numel() == plain.numel() == codec.nbytes(shape) and not torch.equal(aware, plain)
    assert torch.equal(aware, codec.encode(gate, up, down, x=x_fit, act_aware=True))  # deterministic
    # bit-exact through bytes: the stored codes are the nearest ones for the stored meta (as data-free), and
    # the unit computes with exactly the dequantised weights
    stored = torch.frombuffer(bytearray(aware.numpy().tobytes()), dtype=torch.uint8)
    gu, dn = codec.dequantize(stored, shape)
    unit = HQQCodec(codec.spec, kernel="dense").decode(stored, shape, torch.float32)
    assert rel(unit(x_test[:5]), DenseExpert(gu, dn)(x_test[:5])) < 1e-5
    for W, pm in zip((torch.cat([gate, up]), down), codec.packed(stored, shape)):
        assert torch.equal(pm.codes(), hqq.requantize(W, pm.sz, pm.bits))
    e_plain = expert_error(gate, up, down, codec, plain, x=x_test)
    e_aware = expert_error(gate, up, down, codec, aware, x=x_test)
    # the low-rank part is already fitted to x and takes most of the gain: there, only no loss is asked
    assert e_aware < (1.05 if spec.get("rank") else 0.9) * e_plain, (e_aware, e_plain)
    # data-free without x, whatever act_aware says
    assert torch.equal(codec.encode(gate, up, down, act_aware=True), codec.encode(gate, up, down))


def test_error_curve_act_aware_is_measured_on_rows_it_was_not_fitted_to():
    D, I = 64, 48
    gate, up, down = expert(D, I, seed=26)
    x, _ = _skewed_inputs(200, D, 27)
    specs = [{"name": "hqq", "bits": 2}, {"name": "hqq", "bits": 3}]
    aware = mixed.error_curve(gate, up, down, specs, x, act_aware=True)
    for spec, o in zip(specs, aware):
        c = HQQCodec(spec)
        blob = c.encode(gate, up, down, x=x[0::2], act_aware=True)
        assert o.err == pytest.approx(expert_error(gate, up, down, c, blob, x[1::2]))
    plain = mixed.error_curve(gate, up, down, specs, x)
    assert all(a.err < p.err for a, p in zip(aware, plain))
    assert [o.nbytes for o in aware] == [o.nbytes for o in plain]


# ---- low rank -----------------------------------------------------------------------------------------

def test_lowrank_error_falls_with_rank_and_whitening_wins_on_its_norm():
    W = torch.randn(64, 96, generator=gen(8))
    x = torch.randn(300, 96, generator=gen(9)) @ torch.randn(96, 96, generator=gen(10))
    L = lowrank.whitener(x)
    for Lw in (None, L):
        errs = []
        for r in (0, 4, 16, 32, 64):
            U, V = lowrank.factor(W, r, Lw) if r else (torch.zeros(64, 0), torch.zeros(0, 96))
            errs.append(lowrank.error(W, U @ V, Lw))
        assert all(a > b for a, b in zip(errs, errs[1:])) and errs[-1] < 1e-4
    Up, Vp = lowrank.factor(W, 16)
    Uw, Vw = lowrank.factor(W, 16, L)
    assert lowrank.error(W, Uw @ Vw, L) < lowrank.error(W, Up @ Vp, L)
    for target in (0.5, 0.2):
        r = lowrank.rank_for_error(W, W, target, L)
        U, V = lowrank.factor(W, r, L)
        assert lowrank.error(W, U @ V, L) <= target + 1e-6
        U, V = lowrank.factor(W, r - 1, L)
        assert lowrank.error(W, U @ V, L) > target
    assert lowrank.breakeven_rank(4096, 14336) == 4096 * 14336 // (4096 + 14336)


# ---- mixed precision ----------------------------------------------------------------------------------

BITS_BYTES = {2: 300, 3: 400, 4: 500, 8: 900}


def convex_curve(scale=1.0):
    return [mixed.Option({"name": "hqq", "bits": b}, n, scale * 2.0 ** -b) for b, n in BITS_BYTES.items()]


def test_mixed_never_exceeds_budget():
    rng = random.Random(0)
    for trial in range(30):
        keys = [(la, e) for la in range(3) for e in range(rng.randint(2, 6))]
        opts = {k: [mixed.Option({"bits": b}, rng.randint(50, 1000), rng.random()) for b in range(4)]
                for k in keys}
        freq = {k: rng.random() for k in keys}
        low = sum(min(o.nbytes for o in v) for v in opts.values())
        for budget in (low, low + rng.randint(0, 3000), 10**9):
            plan = mixed.allocate(opts, freq, budget)
            assert set(plan) == set(keys) and sum(o.nbytes for o in plan.values()) <= budget
        with pytest.raises(MoeError):
            mixed.allocate(opts, freq, low - 1)


def test_mixed_uniform_stats_and_identical_curves_give_uniform_plan():
    keys = [(la, e) for la in (0, 1) for e in range(8)]
    opts = {k: convex_curve() for k in keys}
    freq = mixed.frequencies({}, keys)
    assert all(abs(f - 1 / 8) < 1e-12 for f in freq.values())
    for b, n in BITS_BYTES.items():
        plan = mixed.allocate(opts, freq, n * len(keys))
        assert {o.spec["bits"] for o in plan.values()} == {b}


def test_mixed_hot_expert_never_gets_fewer_bytes_than_a_colder_twin():
    rng = random.Random(1)
    for trial in range(40):
        curve = {la: [mixed.Option({"bits": b}, n + rng.randint(0, 50), rng.random() * 2.0 ** -b)
                      for b, n in BITS_BYTES.items()] for la in range(2)}
        keys = [(la, e) for la in range(2) for e in range(6)]
        freq = {k: rng.random() for k in keys}
        budget = rng.randint(sum(min(o.nbytes for o in curve[k[0]]) for k in keys),
                             sum(max(o.nbytes for o in curve[k[0]]) for k in keys))
        plan = mixed.allocate({k: curve[k[0]] for k in keys}, freq, budget)
        for a, b in itertools.permutations(keys, 2):
            if a[0] == b[0] and freq[a] > freq[b]:
                assert plan[a].nbytes >= plan[b].nbytes


def test_mixed_beats_uniform_at_equal_bytes_when_routing_is_skewed():
    keys = [(0, e) for e in range(8)]
    counts = [100, 50, 20, 10, 5, 2, 1, 1]
    freq = mixed.frequencies(mixed.load_stats({"layers": {"0": {"counts": counts}}}), keys)
    opts = {k: convex_curve() for k in keys}
    uni = mixed.uniform(opts, "3b")
    plan = mixed.allocate(opts, freq, sum(o.nbytes for o in uni.values()))
    assert mixed.objective(plan, freq) < mixed.objective(uni, freq)
    assert plan[0, 0].spec["bits"] > plan[0, 7].spec["bits"]
    table = mixed.format_plan(plan, freq, budget=8 * 400)
    assert "Σ freq·err" in table and len(table.splitlines()) == 8 + 2
    assert len(mixed.format_plan(plan, freq, detail=False).splitlines()) == 3


def test_routing_stats_formats(tmp_path):
    a = mixed.load_stats({"layers": {"1": {"counts": [3, 1]}, "3": {"counts": [0, 0]}}})
    b = tmp_path / "s.json"
    b.write_text(json.dumps({"1": [3, 1], "3": [0, 0]}))
    assert a == mixed.load_stats(b) == {1: [3.0, 1.0], 3: [0.0, 0.0]}
    f = mixed.frequencies(a, [(1, 0), (1, 1), (3, 0), (3, 1), (5, 0)])
    assert f == {(1, 0): 0.75, (1, 1): 0.25, (3, 0): 0.5, (3, 1): 0.5, (5, 0): 1.0}
    with pytest.raises(MoeError):
        mixed.load_stats({"layers": {"0": {"count": [1]}}})


def test_error_curve_of_a_real_expert_is_monotone():
    gate, up, down = expert(64, 32, seed=11)
    curve = mixed.error_curve(gate, up, down, [{"name": "hqq", "bits": b} for b in (2, 3, 4, 8)])
    assert [o.nbytes for o in curve] == sorted(o.nbytes for o in curve)
    assert [o.err for o in curve] == sorted((o.err for o in curve), reverse=True)
    assert [o.label for o in curve] == ["2b", "3b", "4b", "8b"]


# ---- the quantize / eval commands and the store ------------------------------------------------------

def _quantize(hf, out, *flags):
    from moe_offload.cli import main

    assert main(["quantize", "--model", str(hf), "--out", str(out), *flags]) == 0
    from moe_offload.store.format import open_store

    return open_store(out)


def _min_memory(store, dtype, experts=None):
    """--memory for `experts` of the largest expert (default top_k: the least the engine takes)."""
    from moe_offload.runtime.load import load
    from moe_offload.store.cache import footprints

    backbone = load(store.path, dtype=dtype).info["backbone_bytes"]
    loads = sorted(f.load for f in footprints(store, torch.device("cpu"), getattr(torch, dtype)).values())
    return backbone + (experts or store.top_k) * loads[-1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_store_offloaded_gives_the_same_tokens_as_resident(tiny_checkpoint, tmp_path, dtype):
    from moe_offload.quant.backbone import QuantLinear
    from moe_offload.runtime.load import load

    hf = tiny_checkpoint("mixtral_gqa")
    store = _quantize(hf, tmp_path / "q", "--expert-bits", "3", "--attn-bits", "4")
    spec = {"name": "hqq", "bits": 3, "group_size": 64, "meta_bits": 8, "rank": 0, "quantizer": "hqq"}
    assert all(e.codec == spec for e in store.entries.values())
    keys = set(store.backbone().keys())
    assert "model.layers.0.self_attn.q_proj.qweight" in keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    for dense in ("model.embed_tokens.weight", "model.layers.0.block_sparse_moe.gate.weight",
                  "model.norm.weight", "model.layers.1.input_layernorm.weight", "lm_head.weight"):
        assert dense in keys
    assert store.manifest["quantization"]["attn_bits"] == 4
    prompt = [3, 17, 42, 9, 77, 5]
    resident = load(store.path, dtype=dtype)
    assert isinstance(resident.model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert resident.model.model.layers[0].self_attn.q_proj._lin is not None  # its kernel built at load
    ref = resident.generate(prompt_ids=prompt, max_new_tokens=12, ignore_eos=True).token_ids
    memory = _min_memory(store, dtype)
    offloaded = load(store.path, dtype=dtype, memory=memory)
    r = offloaded.generate(prompt_ids=prompt, max_new_tokens=12, ignore_eos=True)
    assert r.token_ids == ref
    assert r.stats["expert_misses"] > 0 and r.stats["resident_weight_bytes"] <= memory


def test_quantize_mixed_plan_respects_budget_and_routing(tiny_checkpoint, tmp_path, capsys):
    hf = tiny_checkpoint("mixtral_gqa")
    stats = tmp_path / "routing_stats.json"
    counts = {"0": {"counts": [500, 5, 3, 1]}, "1": {"counts": [2, 400, 9, 4]}}
    stats.write_text(json.dumps({"layers": counts}))
    shape = ExpertShape(64, 48)
    budget = 8 * HQQCodec({"bits": 3}).nbytes(shape)  # 2 layers × 4 experts at 3 bits on average
    store = _quantize(hf, tmp_path / "m", "--expert-bits", "mixed", "--budget", str(budget),
                      "--stats", str(stats))
    out = capsys.readouterr().out
    assert "Σ freq·err" in out and f"of budget {budget}" in out
    bits = {k: e.codec["bits"] for k, e in store.entries.items()}
    assert sum(e.nbytes for e in store.entries.values()) <= budget
    assert len(set(bits.values())) > 1
    assert bits[0, 0] == max(bits[0, e] for e in range(4)) and bits[1, 1] == max(bits[1, e] for e in range(4))
    assert json.loads((store.path / "routing_stats.json").read_text()) == json.loads(stats.read_text())


def test_quantize_8bit_is_close_to_dense_and_eval_compares(tiny_checkpoint, tmp_path, capsys):
    from moe_offload.cli import main
    from moe_offload.runtime.load import load

    hf = tiny_checkpoint("mixtral_gqa", tokenizer=True)
    store = _quantize(hf, tmp_path / "q8", "--expert-bits", "8", "--attn-bits", "8")
    q4 = _quantize(hf, tmp_path / "q4", "--expert-bits", "4", "--attn-bits", "4")
    ids = list(range(5, 60))
    ref = load(hf, dtype="float32").logits(ids)
    err8 = rel(load(store.path, dtype="float32").logits(ids), ref)
    err4 = rel(load(q4.path, dtype="float32").logits(ids), ref)
    assert err8 < 0.1 and err8 < err4 / 2  # this random tiny model amplifies weight noise (8-bit: ~0.5 %)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    capsys.readouterr()
    assert main(["eval", "--compare", str(hf), str(store.path), "--text", str(text), "--dtype", "float32",
                 "--gen-tokens", "4", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["model"] for r in rows] == [str(hf), str(store.path)]
    assert abs(rows[1]["perplexity"] / rows[0]["perplexity"] - 1) < 0.05
    assert rows[1]["expert_bytes"] < rows[0]["expert_bytes"]
    assert rows[1]["backbone_bytes"] < rows[0]["backbone_bytes"]


def test_quantize_usage_errors(tiny_checkpoint, tmp_path):
    from moe_offload.cli import main

    hf = str(tiny_checkpoint("mixtral_gqa"))
    assert main(["quantize", "--model", hf, "--out", str(tmp_path / "x"), "--expert-bits", "mixed"]) == 2
    assert main(["quantize", "--model", hf, "--out", str(tmp_path / "x"), "--budget", "1MiB"]) == 2
    assert main(["quantize", "--model", hf, "--out", str(tmp_path / "x"), "--lowrank", "auto"]) == 2
    assert not (tmp_path / "x").exists()


def test_quantize_mixed_with_calibration_uses_its_routing_counts(tiny_checkpoint, tmp_path, capsys):
    from moe_offload.profile import record
    from moe_offload.runtime.load import load

    hf = tiny_checkpoint("mixtral_gqa", tokenizer=True)
    text = tmp_path / "calib.txt"
    text.write_text("a stitch in time saves nine; " * 30)
    budget = 8 * HQQCodec({"bits": 4}).nbytes(ExpertShape(64, 48))
    store = _quantize(hf, tmp_path / "c", "--expert-bits", "mixed", "--budget", str(budget),
                      "--calib", str(text), "--calib-tokens", "200", "--lowrank", "auto")
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split()[:1] in (["0"], ["1"])]
    engine = load(hf, dtype="float32")
    ids = engine.tokenizer.encode(text.read_text())[:200]
    counts = record(engine, ids, window=min(256, engine.context_length)).counts()
    for layer, e, f, *_ in rows:
        assert abs(float(f) - counts[int(layer)][int(e)] / sum(counts[int(layer)])) < 1e-4
    assert len(rows) == 8 and sum(e.nbytes for e in store.entries.values()) <= budget
    assert store.manifest["quantization"]["calibration_tokens"] == 200


@pytest.mark.parametrize("plan_error", ["out", "rel", "nll"])
def test_quantize_mixed_plan_error_modes_respect_the_budget(tiny_checkpoint, tmp_path, capsys, plan_error):
    """Each --plan-error mode at uniform 2-bit's bytes (the MENU has cheaper 2-bit groups, so there is
    something to trade): within budget, the mode recorded, nll measures per-layer sensitivity."""
    hf = tiny_checkpoint("mixtral_gqa", tokenizer=True)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog; a stitch in time saves nine. " * 12)
    budget = 8 * HQQCodec({"bits": 2}).nbytes(ExpertShape(64, 48))
    store = _quantize(hf, tmp_path / plan_error, "--expert-bits", "mixed", "--budget", str(budget),
                      "--calib", str(text), "--calib-tokens", "300", "--plan-error", plan_error)
    captured = capsys.readouterr()
    assert sum(e.nbytes for e in store.entries.values()) <= budget
    q = store.manifest["quantization"]
    assert q["plan_error"] == plan_error and q["act_aware"] is True
    assert ("Σ weight·err" in captured.out) == (plan_error != "rel")
    assert ("layer sensitivity" in captured.err) == (plan_error == "nll")
    labels = {mixed.Option(e.codec, 0, 0).label for e in store.entries.values()}
    assert labels <= {"2b", "2bg64", "2bg128", "3b", "3bg128", "4b", "4bg128", "8b"}


def test_mixed_menu_plan_never_exceeds_budget_and_identical_experts_get_a_uniform_plan():
    from moe_offload.quant.mixed import MENU, expert_spec

    D, I = 128, 96
    gate, up, down = expert(D, I, seed=28)
    specs = [expert_spec(b, g, "hqq") for b in (2, 3, 4, 8) for g in MENU[b]]
    curve = mixed.error_curve(gate, up, down, specs)
    assert len({o.nbytes for o in curve}) == len(specs) == 8
    keys = [(la, e) for la in range(2) for e in range(4)]
    opts = {k: curve for k in keys}
    freq = mixed.frequencies({}, keys)
    pts = mixed.hull(curve)
    assert len(pts) >= 4 and pts[0].label == "2bg128"
    for o in pts:  # at n × the bytes of a hull option, identical experts all get that option
        plan = mixed.allocate(opts, freq, len(keys) * o.nbytes)
        assert {p.label for p in plan.values()} == {o.label}
    rng = random.Random(2)
    noisy = {k: [mixed.Option(o.spec, o.nbytes, o.err * rng.uniform(0.5, 2)) for o in curve] for k in keys}
    low = sum(min(o.nbytes for o in v) for v in noisy.values())
    for budget in range(low, len(keys) * max(o.nbytes for o in curve) + 1, 9973):
        plan = mixed.allocate(noisy, {k: rng.random() for k in keys}, budget)
        assert sum(o.nbytes for o in plan.values()) <= budget


def test_quantize_uniform_act_aware_same_format_other_scales(tiny_checkpoint, tmp_path):
    from moe_offload.cli import main

    hf = tiny_checkpoint("mixtral_gqa", tokenizer=True)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 10)
    cal = ("--calib", str(text), "--calib-tokens", "200")
    aware = _quantize(hf, tmp_path / "a", "--expert-bits", "2", *cal)
    plain = _quantize(hf, tmp_path / "p", "--expert-bits", "2", *cal, "--act-aware", "off")
    free = _quantize(hf, tmp_path / "f", "--expert-bits", "2")
    assert aware.manifest["quantization"]["act_aware"] is True
    assert plain.manifest["quantization"]["act_aware"] is False is free.manifest["quantization"]["act_aware"]
    assert {k: e.codec for k, e in aware.entries.items()} == {k: e.codec for k, e in free.entries.items()}
    assert [e.nbytes for e in aware.entries.values()] == [e.nbytes for e in free.entries.values()]
    blob = (aware.path / "experts.bin").read_bytes()
    assert blob != (free.path / "experts.bin").read_bytes() == (plain.path / "experts.bin").read_bytes()
    assert main(["quantize", "--model", str(hf), "--out", str(tmp_path / "x"), "--expert-bits", "2",
                 "--act-aware", "on"]) == 2
    assert main(["quantize", "--model", str(hf), "--out", str(tmp_path / "x"), "--expert-bits", "mixed",
                 "--budget", "1MiB", "--plan-error", "out"]) == 2
    assert not (tmp_path / "x").exists()


def test_best_per_group_is_the_exact_knapsack_optimum():
    rng = random.Random(3)
    for trial in range(20):
        opts = {g: [mixed.Option({"i": i}, rng.randint(10, 100), rng.random())
                    for i in range(rng.randint(1, 4))] for g in range(rng.randint(1, 4))}
        low = sum(min(o.nbytes for o in v) for v in opts.values())
        for budget in (low, low + rng.randint(0, 150), 10**6):
            best = mixed.best_per_group(opts, budget)
            assert sum(o.nbytes for o in best.values()) <= budget
            brute = min(sum(o.err for o in combo) for combo in itertools.product(*opts.values())
                        if sum(o.nbytes for o in combo) <= budget)
            assert sum(o.err for o in best.values()) == pytest.approx(brute)
        with pytest.raises(MoeError):
            mixed.best_per_group(opts, low - 1)


def test_quantize_layer_plan_is_uniform_within_layers(tiny_checkpoint, tmp_path, capsys):
    hf = tiny_checkpoint("mixtral_gqa", tokenizer=True)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog; a stitch in time saves nine. " * 12)
    shape = ExpertShape(64, 48)
    budget = 4 * HQQCodec({"bits": 2}).nbytes(shape) + 4 * HQQCodec({"bits": 4}).nbytes(shape)
    store = _quantize(hf, tmp_path / "l", "--expert-bits", "mixed", "--budget", str(budget),
                      "--calib", str(text), "--calib-tokens", "300", "--plan-error", "layer")
    err = capsys.readouterr().err
    assert sum(e.nbytes for e in store.entries.values()) <= budget
    assert "calibration NLL rise, each layer alone" in err
    for layer in (0, 1):
        assert len({json.dumps(e.codec) for k, e in store.entries.items() if k[0] == layer}) == 1
    from moe_offload.cli import main

    assert main(["quantize", "--model", str(hf), "--out", str(tmp_path / "x"), "--expert-bits", "mixed",
                 "--budget", str(budget), "--calib", str(text), "--plan-error", "layer",
                 "--lowrank", "auto"]) == 2


# ---- experts with biases (gpt-oss) ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    from tests.test_families import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("gpt-oss"), "gpt_oss_mha_layer_types")  # D 64, I 32


def test_hqq_codec_keeps_biases_exact_and_computes_the_clamped_glu():
    from moe_offload.experts import expert_unit

    D, I = 64, 32
    shape = ExpertShape(D, I, act="swiglu_clamp", bias=True, swiglu_alpha=1.2, swiglu_limit=0.8)
    g = gen(3)
    parts = {"gate": torch.randn(I, D, generator=g) * 0.2, "up": torch.randn(I, D, generator=g) * 0.2,
             "down": torch.randn(D, I, generator=g) * 0.2, "gate_bias": torch.randn(I, generator=g),
             "up_bias": torch.randn(I, generator=g), "down_bias": torch.randn(D, generator=g)}
    x = torch.randn(40, D, generator=g)
    ref = expert_unit(shape, **parts)(x)
    for spec, aware in (({"bits": 8}, False), ({"bits": 4}, True)):
        c = HQQCodec(spec)
        blob = c.encode(x=x if aware else None, act=shape, act_aware=aware, **parts)
        bias_bytes = 64 * math.ceil(4 * (2 * I + D) / 64)  # fp32, its own 64-byte aligned section
        assert blob.numel() == c.nbytes(shape) == c.nbytes(ExpertShape(D, I)) + bias_bytes
        gu_b, dn_b = c.biases(blob, shape)
        assert torch.equal(gu_b, torch.cat([parts["gate_bias"], parts["up_bias"]]))
        assert torch.equal(dn_b, parts["down_bias"])
        assert rel(c.decode(blob, shape)(x), ref) < (0.02 if spec["bits"] == 8 else 0.1)
    with pytest.raises(MoeError, match="all three biases"):
        HQQCodec({"bits": 8}).encode(parts["gate"], parts["up"], parts["down"], gate_bias=parts["gate_bias"])


@pytest.mark.parametrize("bits", ["8", "mixed"])
def test_quantize_gpt_oss_keeps_biases_and_its_8_bit_tokens_match_the_16_bit_store(gpt_oss, tmp_path, bits):
    from moe_offload.checkpoint import SafetensorsFolder, expert_tensors
    from moe_offload.runtime.load import load
    from moe_offload.store.format import convert

    dense = convert(gpt_oss, tmp_path / "dense", torch.bfloat16)
    budget = ["--budget", str(sum(e.nbytes for e in dense.entries.values()) // 3)] if bits == "mixed" else []
    store = _quantize(gpt_oss, tmp_path / "q", "--expert-bits", bits, "--dtype", "bfloat16", *budget)
    shape = store.expert_shape
    assert shape.bias and shape.act == "swiglu_clamp"
    blob = torch.frombuffer(bytearray((store.path / "experts.bin").read_bytes()), dtype=torch.uint8)
    source = SafetensorsFolder(gpt_oss)
    for (layer, e), entry in store.entries.items():  # every bias as in the checkpoint, bit for bit
        c = make_codec(entry.codec)
        gu_b, dn_b = c.biases(blob[entry.offset:entry.offset + entry.nbytes], shape)
        p = expert_tensors(source, "gpt_oss", layer, e)
        assert torch.equal(gu_b, torch.cat([p["gate_bias"], p["up_bias"]]).float())
        assert torch.equal(dn_b, p["down_bias"].float())
    prompt = [3, 17, 42, 9, 77, 5]
    q = load(store.path, dtype="float32").generate(prompt_ids=prompt, max_new_tokens=8, ignore_eos=True)
    if bits == "8":
        ref = load(dense.path, dtype="float32").generate(prompt_ids=prompt, max_new_tokens=8, ignore_eos=True)
        assert q.token_ids == ref.token_ids
    memory = _min_memory(store, "float32")  # offloaded: the same tokens as resident
    assert load(store.path, dtype="float32", memory=memory).generate(
        prompt_ids=prompt, max_new_tokens=8, ignore_eos=True).token_ids == q.token_ids


def test_eval_table_shows_the_hit_rates_when_offloaded(tiny_checkpoint, tmp_path, capsys):
    from moe_offload.cli import main
    from moe_offload.runtime.load import load
    from moe_offload.store.format import convert

    hf = tiny_checkpoint("mixtral_gqa", tokenizer=True)
    store = convert(hf, tmp_path / "s")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    memory = _min_memory(store, "float32", 6)  # 6 of the 8 experts: hits and misses
    capsys.readouterr()
    args = ["--text", str(text), "--dtype", "float32", "--gen-tokens", "6", "--quiet"]
    assert main(["eval", "--compare", str(hf), str(store.path), *args]) == 0
    assert main(["eval", "--model", str(store.path), "--memory", str(memory), *args, "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "decode tok/s score hit decode hit" in out[0]
    resident, stored = (line.split() for line in out[1:3])
    assert resident[5:7] == ["-", "-"]  # every expert resident: no cache, no hit rate
    assert all(0.0 < float(v) <= 1.0 for v in stored[5:7])
    row = json.loads(out[3])
    assert 0.0 < row["score_hit_rate"] < 1.0 and 0.0 <= row["hit_rate"] < 1.0
    assert load(store.path, dtype="float32", memory=memory).expert_stats is not None


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_probes_codec_spec_is_the_one_quantize_writes(tiny_checkpoint, tmp_path, bits):
    """hardware's call/decode probes, store/cache.engine_expert_bytes and plan.quantize_rate build their codec
    from quant.codec.expert_spec: it must be what `quantize --expert-bits B --quantizer rtn` stores (before, the
    probes wrote their own: 2/3-bit codes in the 4-bit kernel's order, 8-bit with groups of 64)."""
    from moe_offload.cli import main
    from moe_offload.quant.codec import HQQCodec, expert_spec
    from moe_offload.store.format import open_store

    hf = tiny_checkpoint("mixtral_gqa")
    out = tmp_path / f"q{bits}"
    assert main(["quantize", "--model", str(hf), "--out", str(out), "--expert-bits", str(bits),
                 "--quantizer", "rtn", "--quiet"]) == 0
    stored = {json.dumps(e.codec, sort_keys=True) for e in open_store(out).entries.values()}
    assert stored == {json.dumps(HQQCodec(expert_spec(bits, quantizer="rtn")).spec, sort_keys=True)}
