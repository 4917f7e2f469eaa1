"""The native RMSNorm and RoPE (models/base.py: native_rms_norm, native_rope) give torch's bits, are used only
where they were checked, and step aside for what they do not cover."""

from __future__ import annotations

import pytest
import torch

from moe_offload.models import base
from moe_offload.quant.kernels import native_available

needs_native = pytest.mark.skipif(not native_available() or base.glue_lanes() is None,
                                  reason="no C compiler / AVX2+FMA here, or an unknown torch CPU capability")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rows(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 10 ** (torch.rand(*shape[:-1], 1, generator=g) * 8 - 4)
    return x.to(dtype)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 2048), (1, 1, 32, 128), (3, 4096), (2, 200), (1, 1, 7168), (5, 36)])
def test_rms_norm_bits(dtype, shape):
    x = rows(shape, dtype)
    w = (torch.rand(shape[-1]) * 2).to(dtype)
    got = base.native_rms_norm(x, w, 1e-6)
    assert got is not None
    assert torch.equal(got.view(torch.uint8), base.rms_norm(x, w, 1e-6).view(torch.uint8))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 32, 1, 128), (1, 4, 1, 128), (2, 8, 3, 64), (1, 2, 1, 36)])
def test_rope_bits(dtype, shape):
    x = rows(shape, dtype)
    cos, sin = rows(shape[-2:], dtype, 1), rows(shape[-2:], dtype, 2)
    got = base.native_rope(x, cos, sin)
    assert got is not None
    assert torch.equal(got.view(torch.uint8), base.rope_torch(x, cos, sin).view(torch.uint8))


@needs_native
def test_modules_take_the_native_path_with_the_same_bits(monkeypatch):
    norm = base.RMSNorm(2048, 1e-5).to(torch.bfloat16)
    norm.weight.data = torch.rand(2048).to(torch.bfloat16)
    x = rows((1, 1, 2048), torch.bfloat16)
    calls = []
    real = base._glue_call
    monkeypatch.setattr(base, "_glue_call", lambda op, *a: calls.append(op) or real(op, *a))
    assert torch.equal(norm(x), base.rms_norm(x, norm.weight, 1e-5))
    q = rows((1, 8, 1, 64), torch.bfloat16)
    cos, sin = rows((1, 64), torch.bfloat16, 1), rows((1, 64), torch.bfloat16, 2)
    assert torch.equal(base.apply_rope(q, cos, sin), base.rope_torch(q, cos, sin))
    assert calls == ["rms", "rope"]


@needs_native
def test_a_wrong_summation_order_is_caught(monkeypatch):
    """With the vector width of another CPU the sums come out in another order: the check must refuse it."""
    monkeypatch.setattr(base, "_lanes", 16 if base.glue_lanes() == 8 else 8)
    base.glue_exact.cache_clear()
    try:
        assert not base.glue_exact("rms", torch.float32, 2048)
        assert not base.glue_exact("rms", torch.bfloat16, 128)
        assert base.glue_exact("rope", torch.bfloat16, 128)  # no reduction: any width gives the same bits
    finally:
        base.glue_exact.cache_clear()


@needs_native
def test_the_summation_width_is_found_not_assumed(monkeypatch):
    """glue_lanes() is the width whose order gives torch's bits here (torch's AVX-512 build sums in 8 lanes); with
    no width that does, the glue is off and torch's ops run."""
    assert base.glue_lanes() in base.LANES
    monkeypatch.setattr(base, "LANES", (16 if base.glue_lanes() == 8 else 8,))
    monkeypatch.setattr(base, "_glue_lib", None)
    monkeypatch.setattr(base, "_lanes", base._lanes)  # restored after the test, as _glue_lib
    base.glue_exact.cache_clear()
    try:
        assert base.glue_lanes() is None
        x = rows((1, 1, 2048), torch.float32)
        assert base.native_rms_norm(x, torch.rand(2048), 1e-6) is None
    finally:
        base.glue_exact.cache_clear()


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_gives_torchs_bits_at_widths_whose_tail_depends_on_the_vector_width(dtype):
    """n = 16..47 puts values in torch's scalar tail at one width and in its vector loop at the other."""
    for n in (8, 16, 17, 24, 40, 47, 768):
        assert base.silu_exact(dtype, n) in base.LANES, n


def test_what_the_native_calls_do_not_cover_runs_torch():
    w = torch.rand(64)
    assert base.native_rms_norm(torch.randn(4, 64).t().contiguous().t(), w, 1e-6) is None  # not contiguous
    assert base.native_rms_norm(torch.randn(4, 64), w.double(), 1e-6) is None  # weight of another dtype
    assert base.native_rms_norm(torch.randn(600, 64), w, 1e-6) is None  # past torch's serial reduction
    x = torch.randn(1, 2, 3, 16).transpose(1, 2)  # prefill's q: a strided view
    assert base.native_rope(x, torch.randn(2, 16), torch.randn(2, 16)) is None
    gpt_oss_norm = base.RMSNorm(64, 1e-6, weight_in_fp32=True).to(torch.bfloat16)
    gpt_oss_norm.weight.data = gpt_oss_norm.weight.data.float()
    x = torch.randn(2, 64).to(torch.bfloat16)
    xf = x.float()
    want = (gpt_oss_norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6))).to(x.dtype)
    assert torch.equal(gpt_oss_norm(x), want)


@needs_native
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("H,K,Hd,S", [(32, 4, 128, 64), (32, 8, 128, 300), (8, 8, 64, 5), (6, 3, 16, 40),
                                      (16, 2, 32, 1)])
def test_native_one_query_attention_matches_torch(dtype, H, K, Hd, S):
    g = torch.Generator().manual_seed(S)
    cache_k, cache_v = (torch.randn(1, K, S + 17, Hd, generator=g).to(dtype) for _ in range(2))  # spare capacity
    q = torch.randn(1, H, 1, Hd, generator=g).to(dtype)
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]
    got = base.native_attend_one(q, k, v, None, None)
    assert got is not None and got.dtype == dtype and got.shape == q.shape
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    torch_err = (base.attend_one(q, k, v, None, None).float() - ref).abs().max()
    assert (got.float() - ref).abs().max() <= 2 * torch_err + 1e-6  # as close as torch's own 16-bit path
    if S > 1:  # (one key: softmax is 1 whatever the scale)
        assert not torch.equal(base.native_attend_one(q, k, v, 0.5 * Hd ** -0.5, None), got)


@needs_native
def test_decode_attention_takes_the_native_call(monkeypatch):
    from types import SimpleNamespace

    args = SimpleNamespace(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6)
    attn = base.Attention(args, qk_norm="head").to(torch.bfloat16)
    cache = base.KVCache(1, 2, 32, 16, torch.bfloat16, "cpu")
    cos, sin = (t[:12].to(torch.bfloat16) for t in base.rope_table(16, 32, 10000.0))
    x = torch.randn(1, 12, 64).to(torch.bfloat16)
    attn.attend(x[:, :11], cos[:11], sin[:11], cache, 0, base.attention_mask(0, 11, None, "cpu"))
    calls = []
    real = base.native_attend_one
    monkeypatch.setattr(base, "native_attend_one", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(base, "ONE_QUERY_WORK_HALF", 0)
    y = attn.attend(x[:, 11:], cos[11:], sin[11:], cache, 11, None)
    monkeypatch.setattr(base, "native_attend_one", lambda *a: None)  # torch's path, same cache state
    want = attn.attend(x[:, 11:], cos[11:], sin[11:], cache, 11, None)
    assert calls == [1]
    assert torch.allclose(y.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_native_attention_leaves_what_it_does_not_cover():
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 5, 16)
    assert base.native_attend_one(q, k, k, None, None) is None  # fp32: tokens checked against transformers
    qb, kb = q.to(torch.bfloat16), k.to(torch.bfloat16)
    assert base.native_attend_one(qb, kb, kb, None, torch.ones(1, 5, dtype=torch.bool)) is None  # a mask
    assert base.native_attend_one(qb.expand(2, -1, -1, -1), kb.expand(2, -1, -1, -1), kb.expand(2, -1, -1, -1),
                                  None, None) is None  # a batch of sequences


@needs_native
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("x_dtype", ("same", torch.float32))
@pytest.mark.parametrize("D,I,A", [(64, 40, 3), (128, 96, 8), (32, 17, 2)])
def test_16bit_experts_in_one_call_give_the_one_by_one_bits(dtype, x_dtype, D, I, A):
    """experts._dispatch_one over 16-bit DenseExperts: a group (a cache's hits) through native_moe16 and the same
    experts one by one (misses: the native GEMV, torch's SiLU and products) sum to the same bits, so a token does
    not depend on what was cached."""
    from moe_offload.experts import DenseExpert, _dispatch_one

    xdt = dtype if x_dtype == "same" else x_dtype
    g = torch.Generator().manual_seed(D + I + A)
    units = [DenseExpert((torch.randn(2 * I, D, generator=g) * 0.1).to(dtype),
                         (torch.randn(D, I, generator=g) * 0.1).to(dtype)) for _ in range(A)]
    x = (torch.randn(1, D, generator=g) * 3).to(xdt)
    w = torch.rand(1, A, generator=g).to(xdt)
    idx = torch.randperm(A, generator=g).view(1, A)
    assert base.silu_exact(xdt, I)
    calls = []
    real = base.native_moe16
    base_fn = lambda *a: calls.append(1) or real(*a)  # noqa: E731
    import moe_offload.experts as experts_mod
    try:
        experts_mod.native_moe16 = base_fn
        grouped = _dispatch_one(x, idx, w, lambda need: iter([[(e, units[e]) for e in need]]))
        one_by_one = _dispatch_one(x, idx, w, lambda need: ([(e, units[e])] for e in need))
        split = _dispatch_one(x, idx, w, lambda need: iter([[(e, units[e]) for e in need[:2]],
                                                            *[[(e, units[e])] for e in need[2:]]]))
    finally:
        experts_mod.native_moe16 = real
    assert calls and torch.equal(grouped.view(torch.uint8), one_by_one.view(torch.uint8))
    assert torch.equal(split.view(torch.uint8), one_by_one.view(torch.uint8))


def test_16bit_group_leaves_other_activations_to_torch():
    from moe_offload.experts import DenseExpert

    units = [DenseExpert(torch.randn(8, 4).half(), torch.randn(4, 4).half(), act="gelu") for _ in range(2)]
    assert DenseExpert.run_group(torch.randn(1, 4).half(), units, [0.5, 0.5], False) is None
    fp32 = [DenseExpert(torch.randn(8, 4), torch.randn(4, 4)) for _ in range(2)]
    assert DenseExpert.run_group(torch.randn(1, 4), fp32, [0.5, 0.5], False) is None  # fp32 weights: torch


@needs_native
def test_moe_offload_native_0_turns_the_glue_off_too(monkeypatch):
    """MOE_OFFLOAD_NATIVE=0 means no native code (quant/native), also after the glue found the library once."""
    x, w = rows((1, 64), torch.float32), torch.rand(64)
    assert base.native_rms_norm(x, w, 1e-6) is not None
    monkeypatch.setenv("MOE_OFFLOAD_NATIVE", "0")
    assert base.native_rms_norm(x, w, 1e-6) is None
    q = rows((1, 4, 1, 16), torch.bfloat16)
    assert base.native_attend_one(q, q[:, :2], q[:, :2], None, None) is None


def test_glue_dtype_codes_are_the_kernels():
    """base.GLUE_DTYPES repeats quant.native.DTYPES (base cannot import quant at module level: quant imports it)."""
    from moe_offload.quant import native

    assert base.GLUE_DTYPES == native.DTYPES
