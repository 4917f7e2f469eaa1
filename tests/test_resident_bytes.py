"""A cached 4-bit expert holds exactly its stored bytes, so a budget of the store's bytes holds every expert
(issue 16: a 4-bit expert counted 1.12× its blob in resident_weight_bytes — its 8-bit scales and zeros were
expanded to the int4 kernel's bf16 pairs beside the blob that stayed referenced — and "q4 100 %" held 28 of
32 Mixtral experts)."""

from __future__ import annotations

import pytest
import torch

from moe_offload.quant.kernels import host_layout

pytestmark = pytest.mark.skipif(host_layout() is None, reason="this torch's int4 order is none of ours")

# hidden 128, 4 experts of width 192: g64 divides both input dims, the int4 kernel takes every matrix
SHAPE = dict(hidden_size=128, intermediate_size=192, num_attention_heads=4, vocab_size=256,
             max_position_embeddings=1024)


@pytest.fixture(scope="module")
def q4_store(tmp_path_factory):
    from moe_offload.cli import main
    from moe_offload.store.format import open_store
    from tests import tiny

    root = tmp_path_factory.mktemp("q4")
    hf = tiny.make_checkpoint(root / "hf", "mixtral_gqa", dtype="bfloat16", **SHAPE)
    assert main(["quantize", "--model", str(hf), "--out", str(root / "q4"), "--expert-bits", "4",
                 "--quantizer", "rtn", "--quiet"]) == 0  # the defaults of `quantize --expert-bits 4`
    return open_store(root / "q4")


def test_a_loaded_4bit_unit_holds_exactly_its_stored_bytes(q4_store):
    from moe_offload.codecs import make_codec
    from moe_offload.store.cache import footprints, storage_bytes, unit_bytes
    from moe_offload.store.tiers import DiskTier

    disk = DiskTier(q4_store.experts_path, pinned=False, verify="always")
    try:
        for e in q4_store.entries.values():
            buf = disk.read(e)  # the cache's read: a page-aligned buffer of e.span bytes
            unit = make_codec(e.codec).decode(buf[:e.nbytes], q4_store.expert_shape, q4_store.dtype)
            kind = unit.kinds[0]  # the native kernel where it builds, torch's int4pack otherwise
            assert kind in ("native4", "int4pack") and unit.kinds == (kind, kind)
            tensors = unit.tensors()
            assert {t.untyped_storage().data_ptr() for t in tensors} == {buf.untyped_storage().data_ptr()}
            assert storage_bytes(tensors) == unit_bytes(unit) == e.span  # no copy beside the stored bytes
    finally:
        disk.close()
    foot = footprints(q4_store, torch.device("cpu"), q4_store.dtype)
    assert all(foot[k].resident == foot[k].load == e.span for k, e in q4_store.entries.items())


def test_a_budget_of_the_stored_bytes_holds_every_4bit_expert(q4_store):
    """--memory = backbone + every expert's stored span + the KV cache of the run: after a warm-up that
    touches every expert, generating misses none and the resident weights are exactly those bytes."""
    from moe_offload.runtime.engine import kv_bytes_per_token
    from moe_offload.runtime.load import load
    from moe_offload.workload import kv_tokens

    spans = sum(e.span for e in q4_store.entries.values())
    probe = load(q4_store.path, device="cpu")  # everything resident: the backbone's and KV's bytes
    backbone = probe.info["backbone_bytes"]
    kv = kv_bytes_per_token(probe.model, probe.dtype) * kv_tokens(32, 9)
    del probe
    engine = load(q4_store.path, device="cpu", memory=backbone + spans + kv)
    warm = list(range(3, 35))  # 32 tokens × 2 layers × top-2 of 4 experts: every expert is used
    engine.generate(prompt_ids=warm, max_new_tokens=8, temperature=0.0, ignore_eos=True)
    assert len(engine.expert_cache.resident) == len(q4_store.entries)
    s = engine.generate(prompt_ids=warm[::-1], max_new_tokens=8, temperature=0.0, ignore_eos=True).stats
    assert s["expert_misses"] == 0 and s["evictions"] == 0 and s["expert_hits"] > 0
    assert s["resident_weight_bytes"] == backbone + spans


@pytest.mark.parametrize("prompt,new", [(32, 9), (5, 300)])
def test_kv_tokens_is_the_kv_cache_the_engine_holds(q4_store, prompt, new):
    """The bench adds this KV cache to every budget (workload.kv_tokens mirrors the engine's growth rule)."""
    from moe_offload.runtime.load import load
    from moe_offload.workload import kv_tokens

    engine = load(q4_store.path, device="cpu", memory="100%")
    r = engine.generate(prompt_ids=list(range(3, 3 + prompt)), max_new_tokens=new, temperature=0.0,
                        ignore_eos=True)
    assert len(r.token_ids) == new
    assert r.stats["kv_cache_bytes_peak"] == engine.kv_bytes_per_token * kv_tokens(prompt, new)


@pytest.mark.parametrize("bits", [8, 4])
def test_head_bits_store_lm_head_quantized_counted_and_the_same_tokens_offloaded(q4_store, bits, tmp_path):
    """quantize --head-bits: lm_head stored as codes + bf16 meta (like --attn-bits), counted in the backbone
    bytes the budget holds; resident and offloaded runs of the store give the same tokens."""
    from moe_offload.cli import main
    from moe_offload.quant.backbone import QuantLinear
    from moe_offload.runtime.load import load

    hf = q4_store.path.parent / "hf"
    out = tmp_path / f"h{bits}"
    assert main(["quantize", "--model", str(hf), "--out", str(out), "--expert-bits", "4", "--quantizer", "rtn",
                 "--head-bits", str(bits), "--quiet"]) == 0
    full = load(out, device="cpu")
    head = full.model.lm_head
    assert isinstance(head, QuantLinear) and head.bits == bits
    ref = load(q4_store.path, device="cpu")  # the same store with a 16-bit lm_head
    V, D = ref.model.lm_head.weight.shape
    saved = V * D * ref.model.lm_head.weight.element_size() - head.qweight.nbytes - head.qsz.nbytes
    assert saved > 0 and full.info["backbone_bytes"] == ref.info["backbone_bytes"] - saved
    ids = list(range(3, 30))
    a = full.generate(prompt_ids=ids, max_new_tokens=8, temperature=0.0, ignore_eos=True)
    off = load(out, device="cpu", memory="60%")
    b = off.generate(prompt_ids=ids, max_new_tokens=8, temperature=0.0, ignore_eos=True)
    assert a.token_ids == b.token_ids and b.stats["evictions"] > 0
    assert b.stats["resident_weight_bytes"] <= off.info["memory"]
    err = (full.logits(ids) - ref.logits(ids)).norm() / ref.logits(ids).norm()
    assert err < {8: 0.02, 4: 0.2}[bits]


@pytest.mark.parametrize("native", ["1", "0"])
def test_a_4bit_backbone_linear_holds_one_copy_of_its_codes(native, monkeypatch):
    """A 4-bit attention / lm_head QuantLinear is written in b64 order; a kernel that reads another order
    (the native r64, or torch's b32 on AVX2) makes one new stream on first use, and the module keeps that one
    only: every tensor its kernel reads is one of the module's buffers, its bytes are the stored bytes, and the
    output is what a kernel over the stored order computes. (It held both copies before.)"""
    import moe_offload.quant.native as native_mod
    from moe_offload.quant import kernels
    from moe_offload.quant.backbone import QuantLinear, quantize_weight

    monkeypatch.setenv("MOE_OFFLOAD_NATIVE", native)
    native_mod._load.cache_clear()
    torch.manual_seed(0)
    N, K = 96, 256
    parts = quantize_weight(torch.randn(N, K), 4, 64)
    q = QuantLinear(K, N, parts["qweight"].numel(), parts["qsz"].shape[0], bias=False)
    q.load_state_dict(parts)
    stored = parts["qweight"].nbytes + parts["qsz"].nbytes
    x = torch.randn(3, K)
    ref = kernels.make_linear(kernels.PackedMatrix(parts["qweight"], parts["qsz"], 4, N, K))(x)
    y = q(x)
    torch.testing.assert_close(y, ref)
    mine = {b.untyped_storage().data_ptr() for b in q.buffers()}
    assert {t.untyped_storage().data_ptr() for t in q._lin.tensors()} <= mine
    assert sum(b.nbytes for b in q.buffers()) == stored and q.bits == 4
    if q._lin.kind in ("native4", "int4pack") and q._lin.pm.layout != kernels.LEGACY_LAYOUT:
        assert q.layout == q._lin.pm.layout  # adopted
    lin = q._lin
    torch.testing.assert_close(q(x), y)
    assert q._lin is lin  # the adopted stream is not converted again
