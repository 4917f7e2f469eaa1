"""A cached 4-bit expert holds its stored bytes once: codes in the order this CPU's int4 kernel reads are a
view of the blob; codes in another CPU build's order are reordered once per load into a copy that replaces
them (no second layout kept, no int32 expansion). Every order is tested on any machine: blobs are written in
each, and a child process with ATEN_CPU_CAPABILITY=default runs torch's no-SIMD build (its order: "p32")."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch

from moe_offload.errors import MoeError
from moe_offload.codecs import make_codec
from moe_offload.experts import ExpertShape
from moe_offload.quant.codec import HQQCodec
from moe_offload.quant.ggml import GGUFCodec
from moe_offload.quant.kernels import LAYOUTS, host_layout, int4pack_order, relayout
from moe_offload.quant.pack import pack
from moe_offload.store.cache import storage_bytes, unit_bytes

# D = 352 rows of down: 5 blocks of 64 + a tail of 32 (a b32 block, b64 pairs); I = 256; groups of 32
SHAPE = ExpertShape(352, 256)

pytestmark = pytest.mark.skipif(host_layout() is None, reason="this torch's int4 order is none of ours")


@pytest.fixture(autouse=True)
def torch_int4(monkeypatch):
    """This file tests torch's int4pack path (and its orders); tests/test_native_q4.py the native kernel's."""
    monkeypatch.setenv("MOE_OFFLOAD_NATIVE", "0")


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    D, I = SHAPE.hidden, SHAPE.intermediate
    return [torch.randn(n, k, generator=g) * 0.05 for n, k in ((I, D), (I, D), (D, I))]


@pytest.mark.parametrize("slab", [1 << 18, 4096])  # one slab; slabs of 1-2 blocks (K = 64 / 32)
def test_relayout_between_every_pair_of_orders_is_exact(monkeypatch, slab):
    from moe_offload.quant import kernels

    monkeypatch.setattr(kernels, "SLAB", slab)
    g = torch.Generator().manual_seed(0)
    for N, K in [(16, 64), (48, 32), (64, 64), (80, 64), (96, 32), (176, 64), (352, 32), (304, 64)]:
        c = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
        for src, dst in itertools.product(LAYOUTS, LAYOUTS):
            got = relayout(pack(int4pack_order(c, src), 4), N, K, src, dst)
            assert torch.equal(got, pack(int4pack_order(c, dst), 4)), (N, K, src, dst)


@pytest.mark.parametrize("meta_bits", [8, 16])
def test_a_4bit_unit_holds_the_blob_once_in_every_stored_order(meta_bits):
    x = torch.randn(3, SHAPE.hidden, generator=torch.Generator().manual_seed(1))
    outs, deq = {}, {}
    for layout in LAYOUTS:
        codec = HQQCodec({"bits": 4, "group_size": 32, "meta_bits": meta_bits, "quantizer": "rtn",
                          "layout": layout})
        blob = codec.encode(*weights())
        unit = codec.decode(blob, SHAPE)
        assert unit.kinds == ("int4pack", "int4pack")
        tensors = unit.tensors()
        views = [t for t in tensors if t.untyped_storage().data_ptr() == blob.untyped_storage().data_ptr()]
        codes = sum(pm.N * pm.K // 2 for pm in codec.packed(blob, SHAPE))
        meta = sum(pm.sz.numel() * 2 for pm in codec.packed(blob, SHAPE))  # bf16 [G, N, 2] the kernel takes
        if layout == host_layout():  # a view of the blob (+ the bf16 meta decoded from 8-bit meta)
            assert views and storage_bytes(tensors) == blob.numel() + (meta if meta_bits == 8 else 0)
        else:  # reordered: the codes' copy and the meta, nothing of the blob
            assert not views and storage_bytes(tensors) == codes + meta
        assert unit_bytes(unit, tensors) == storage_bytes(tensors)
        if meta_bits == 16:  # the kernel's meta is stored as is: the unit is the blob's bytes
            assert unit_bytes(unit, tensors) <= blob.numel() * 1.05
        outs[layout] = unit(x.to(torch.bfloat16))
        deq[layout] = codec.dequantize(blob, SHAPE)
    for layout in LAYOUTS:  # the same codes, the same kernel: the same numbers
        assert torch.equal(outs[layout], outs[host_layout()])
        assert all(torch.equal(a, b) for a, b in zip(deq[layout], deq[host_layout()]))


@pytest.mark.parametrize("bits", [2, 3])
def test_low_bit_units_keep_no_view_of_the_blob_in_any_order(bits):
    for layout in LAYOUTS:
        codec = HQQCodec({"bits": bits, "group_size": 32, "meta_bits": 16, "quantizer": "rtn",
                          "layout": layout})
        blob = codec.encode(*weights())
        tensors = codec.decode(blob, SHAPE).tensors()
        assert all(t.untyped_storage().data_ptr() != blob.untyped_storage().data_ptr() for t in tensors)


def test_gguf_q4_unit_is_a_view_of_its_blob_in_the_host_order():
    for layout in LAYOUTS:
        codec = GGUFCodec({"gate_up": "q4", "down": "q4", "layout": layout})
        blob = codec.encode(*weights())
        tensors = codec.decode(blob, SHAPE).tensors()
        assert storage_bytes(tensors) <= blob.numel()  # bf16 meta is stored: the unit holds ≤ the blob


def test_specs_without_a_layout_are_the_legacy_order_and_bad_layouts_are_refused():
    old = {"name": "hqq", "bits": 4, "group_size": 64, "meta_bits": 8, "rank": 0, "quantizer": "hqq"}
    assert make_codec(old).order == "b64" and "layout" not in make_codec(old).spec  # stores before the field
    new = {**old, "layout": "b32"}
    assert make_codec(json.loads(json.dumps(make_codec(new).spec))).spec == new
    a = HQQCodec({**old, "quantizer": "rtn"}).encode(*weights())
    b = HQQCodec({**old, "quantizer": "rtn", "layout": "b64"}).encode(*weights())
    assert torch.equal(a, b)
    for bad in ({**old, "layout": "avx9"}, {**old, "bits": 8, "layout": "b32"}):
        with pytest.raises(MoeError):
            make_codec(bad)
    with pytest.raises(MoeError):
        make_codec({"name": "gguf", "gate_up": "q4", "down": "q4", "layout": "x"})


def test_quantize_writes_4bit_codes_in_the_host_order_or_a_forced_one(tiny_checkpoint, tmp_path, monkeypatch):
    from moe_offload.cli import main
    from moe_offload.store.format import open_store

    hf = tiny_checkpoint("mixtral_gqa")
    other = next(lay for lay in LAYOUTS if lay != host_layout())
    for out, forced in ((tmp_path / "host", None), (tmp_path / "other", other)):
        if forced:
            monkeypatch.setenv("MOE_OFFLOAD_INT4_LAYOUT", forced)
        assert main(["quantize", "--model", str(hf), "--out", str(out), "--expert-bits", "4", "--quiet"]) == 0
    stores = [open_store(tmp_path / "host"), open_store(tmp_path / "other")]
    assert {e.codec["layout"] for e in stores[0].entries.values()} == {host_layout()}
    assert {e.codec["layout"] for e in stores[1].entries.values()} == {other}
    toks = []
    for s in stores:  # offloaded under a budget: the converting path and the native one give the same tokens
        r = subprocess.run([sys.executable, "-m", "moe_offload", "generate", "--model", str(s.path),
                            "--memory", "60%", "--prompt-ids", "1,2,3,4,5", "-n", "6", "--json"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        toks.append(json.loads(r.stdout)["token_ids"] if r.stdout.lstrip().startswith("{") else r.stdout)
    assert toks[0] == toks[1]


CHILD = """
import torch
from moe_offload.experts import ExpertShape
from moe_offload.quant.codec import HQQCodec
from moe_offload.quant.kernels import LAYOUTS, host_layout
from tests.test_memory_layout import SHAPE, weights
x = torch.randn(2, SHAPE.hidden, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
outs = []
for layout in LAYOUTS:
    c = HQQCodec({"bits": 4, "group_size": 32, "quantizer": "rtn", "layout": layout})
    blob = c.encode(*weights())
    u = c.decode(blob, SHAPE)
    views = any(t.untyped_storage().data_ptr() == blob.untyped_storage().data_ptr()
                for t in (u.gate_up.w, u.down.w))
    assert views == (layout == host_layout()), (layout, host_layout())
    outs.append(u(x))
assert all(torch.equal(o, outs[0]) for o in outs)
print(torch.backends.cpu.get_cpu_capability(), host_layout())
"""


def test_torchs_no_simd_build_reads_p32_natively_and_converts_the_others(child_env):
    env = {**child_env, "ATEN_CPU_CAPABILITY": "default", "MOE_OFFLOAD_NATIVE": "0"}
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["DEFAULT", "p32"]


def test_prefill_dequantises_in_bounded_chunks_with_the_same_result(monkeypatch):
    """M > dense_rows: W is dequantised CHUNK_BYTES at a time into one buffer, not a whole [N, K] per call."""
    from moe_offload.quant import hqq
    from moe_offload.quant.kernels import DequantLinear, PackedMatrix

    W = torch.randn(352, 256, generator=torch.Generator().manual_seed(4))
    for bits, layout in ((4, host_layout()), (3, "b64"), (8, "b64")):
        pm = PackedMatrix.from_quantized(hqq.quantize(W, bits, 0 if bits == 8 else 64), layout)
        x = torch.randn(7, 256, generator=torch.Generator().manual_seed(5))
        whole = x @ pm.dequantize().t()
        seen = []
        real = PackedMatrix.dequantize
        monkeypatch.setattr(PackedMatrix, "dequantize",
                            lambda self, *a, **k: seen.append(k.get("out")) or real(self, *a, **k))
        monkeypatch.setattr(DequantLinear, "CHUNK_BYTES", 128 * 256 * 4)  # 128 rows of fp32 per chunk
        y = DequantLinear(pm)(x)
        monkeypatch.undo()
        assert [t.shape[0] for t in seen] == [128, 128, 96] and len({t.data_ptr() for t in seen}) == 1
        assert torch.allclose(y, whole, rtol=1e-5, atol=1e-5)
