"""The fast paths of the forward give the numbers of the general ones: one-token MoE dispatch, one-query
attention, 16-bit GEMMs upcast to fp32 at many rows (docs/perf.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_offload.experts import moe_dispatch
from moe_offload.models import base
from moe_offload.models.base import attend_one, attention_mask, linear, one_query_pays


class RowWise:
    """An expert whose output row depends only on its input row (so any grouping gives the same rows)."""

    def __init__(self, g: torch.Generator, D: int, dtype):
        self.a = torch.randn(D, generator=g).to(dtype)
        self.b = torch.randn(D, generator=g).to(dtype)

    def __call__(self, x):
        return torch.tanh(x * self.a + self.b)


@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                          (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_one_token_dispatch_equals_the_grouped_dispatch(dtype, wdtype):
    g = torch.Generator().manual_seed(0)
    E, A, N, D = 16, 4, 12, 64
    units = [RowWise(g, D, dtype) for _ in range(E)]
    hidden = (4 * torch.randn(N, D, generator=g)).to(dtype)
    w, idx = torch.topk(torch.softmax(torch.randn(N, E, generator=g), -1), A)
    w = w.to(wdtype)

    def fetch(needed):  # a cache yields in its own order; the sum order must not depend on it
        return ([(e, units[e])] for e in reversed(needed))

    grouped = moe_dispatch(hidden, idx, w, fetch)
    one = torch.cat([moe_dispatch(hidden[i:i + 1], idx[i:i + 1], w[i:i + 1], fetch) for i in range(N)])
    assert one.dtype == grouped.dtype == dtype
    assert torch.equal(one, grouped)
    # the grouped sum is in ascending expert order: with the slots shuffled, still the same numbers
    perm = torch.randperm(A, generator=g)
    assert torch.equal(moe_dispatch(hidden, idx[:, perm], w[:, perm], fetch), grouped)


@pytest.mark.parametrize("H,K,window,pos", [(8, 8, None, 9), (8, 2, None, 30), (8, 4, 5, 20), (4, 1, 64, 3)])
def test_one_query_attention_equals_sdpa(H, K, window, pos):
    g = torch.Generator().manual_seed(1)
    Hd, S = 16, pos + 1
    q = torch.randn(1, H, 1, Hd, generator=g)
    k, v = torch.randn(1, K, S, Hd, generator=g), torch.randn(1, K, S, Hd, generator=g)
    mask = attention_mask(pos, 1, window, "cpu")
    for scale in (None, 0.3):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=K != H, scale=scale)
        torch.testing.assert_close(attend_one(q, k, v, scale, mask), want, atol=1e-6, rtol=1e-5)
    if window is not None and pos >= window:  # the mask is used: without it the result differs
        assert not torch.allclose(attend_one(q, k, v, None, None), want, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_many_row_half_linear_runs_in_fp32_in_bounded_blocks(dtype, monkeypatch):
    monkeypatch.setattr(base, "cpu_flags", lambda: frozenset())  # a CPU without native 16-bit matmul
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(100, 48, generator=g).to(dtype), torch.randn(100, generator=g).to(dtype)
    few = torch.randn(base.UPCAST_ROWS - 1, 48, generator=g).to(dtype)
    many = torch.randn(40, 48, generator=g).to(dtype)
    assert torch.equal(linear(few, w, b), F.linear(few, w, b))
    want = F.linear(many.float(), w.float(), b.float()).to(dtype)
    assert torch.equal(linear(many, w, b), want)
    assert torch.equal(linear(many[None], w)[0], F.linear(many.float(), w.float()).to(dtype))  # [B, T, K]
    assert torch.equal(linear(many.float(), w.float()), F.linear(many.float(), w.float()))  # fp32: as is
    monkeypatch.setattr(base, "UPCAST_BLOCK", 48 * 7)  # 7 weight rows at a time: 15 blocks, the last short
    torch.testing.assert_close(linear(many, w, b), want)  # narrower fp32 GEMMs may sum in another order


def test_one_query_path_only_where_it_pays():
    def qk(H, Hd, S, dtype):
        return torch.zeros(1, H, 1, Hd, dtype=dtype), torch.zeros(1, 1, S, Hd, dtype=dtype)

    assert not one_query_pays(*qk(8, 32, 40, torch.bfloat16))  # the bundled model: SDPA is faster
    assert one_query_pays(*qk(32, 128, 64, torch.bfloat16))  # real widths in 16 bits: from few keys
    assert not one_query_pays(*qk(32, 128, 64, torch.float32))
    assert one_query_pays(*qk(32, 128, 512, torch.float32))
