"""A GGUF-born store keeps its backbone near the file's precision: attention and lm_head that the file holds
quantized go into the store as 8-bit codes (one scale/offset per row, quant/backbone.py) instead of bfloat16;
`--backbone-bits 16` keeps the old dequantized backbone. Tiny GGUF files written here (test_gguf's helpers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")

from gguf.quants import dequantize

from moe_offload import load
from moe_offload.errors import UsageError
from moe_offload.gguf_import import convert_gguf, open_gguf
from moe_offload.quant.kernels import PackedMatrix
from moe_offload.store.format import BACKBONE
from tests.test_gguf import PROMPT, cli, rewrite_gguf
from tests.test_gguf import family  # noqa: F401, F811  (a fixture the tests take by name)

T = gguf.GGMLQuantizationType
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(autouse=True)
def _store_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOE_OFFLOAD_CACHE", str(tmp_path_factory.getbasetemp() / "store-cache"))


def quantized_file(f16, dst):
    """Every 2-D tensor quantized as a llama.cpp file would: experts Q4_0, attention Q4_0 / Q8_0, lm_head and
    the embedding Q8_0."""
    def qtype(name):
        if "_exps" in name or name.endswith(("attn_q.weight", "attn_k.weight")):
            return T.Q4_0
        return T.Q8_0 if name.endswith(("attn_v.weight", "attn_output.weight", "output.weight",
                                        "token_embd.weight")) else None
    return rewrite_gguf(f16, dst, qtype)


def backbone_keys(store) -> set[str]:
    return set(store.backbone().keys())


def decoded(store, stem: str) -> torch.Tensor:
    """The weight W [N, K] that a stored `<stem>.qweight` / `.qsz` pair computes with."""
    bb = store.backbone()
    qsz = bb.get(f"{stem}.qsz")
    N = qsz.shape[1]
    qw = bb.get(f"{stem}.qweight")
    return PackedMatrix(qw, qsz, 8, N, qw.numel() // N).dequantize().float()


def test_quantized_backbone_becomes_8_bit_codes_and_16_keeps_bfloat16(family, tmp_path):  # noqa: F811  (the imported fixture)
    hf, f16 = family("mixtral")
    path = quantized_file(f16, tmp_path / "q.gguf")
    auto = convert_gguf(path, tmp_path / "auto", quiet=True)
    old = convert_gguf(path, tmp_path / "b16", quiet=True, backbone_bits=16)
    L = auto.config["num_hidden_layers"]
    coded = {f"model.layers.{i}.self_attn.{p}" for i in range(L) for p in ATTN} | {"lm_head"}
    keys = backbone_keys(auto)
    assert {f"{s}.qweight" for s in coded} <= keys and not any(f"{s}.weight" in keys for s in coded)
    assert "model.embed_tokens.weight" in keys  # the embedding stays as it is (bfloat16)
    assert set(auto.manifest["source"]["backbone_8bit"]) == {f"{s}.weight" for s in coded}
    assert not any(k.endswith(".qweight") for k in backbone_keys(old))  # --backbone-bits 16: the old store
    assert old.manifest["source"]["backbone_8bit"] == []
    small = (auto.path / BACKBONE).stat().st_size
    big = (old.path / BACKBONE).stat().st_size
    assert small < 0.8 * big, (small, big)
    # the 8-bit codes requantize the file's values: within half a row step of what the file computes
    g = open_gguf(path)
    for stem, gname in (("model.layers.1.self_attn.v_proj", "blk.1.attn_v.weight"), ("lm_head", "output.weight")):
        t = g.tensors[gname]
        ref = torch.from_numpy(dequantize(np.asarray(t.data), t.tensor_type))
        W = decoded(auto, stem)
        step = (ref.amax(1) - ref.amin(1)) / 255
        assert ((W - ref).abs() <= step[:, None] * 0.51 + 2e-2 * ref.abs().amax(1, keepdim=True)).all(), stem
        rel = ((W - ref).norm() / ref.norm()).item()
        assert rel < 0.01, rel
    # the old behaviour: dequantized to bfloat16, exactly the file's values
    t = g.tensors["blk.1.attn_v.weight"]
    want = torch.from_numpy(dequantize(np.asarray(t.data), t.tensor_type)).bfloat16()
    assert torch.equal(old.backbone().get("model.layers.1.self_attn.v_proj.weight"), want)


def test_8_bit_backbone_store_runs_the_same_tokens_resident_and_offloaded(family, tmp_path):  # noqa: F811  (the imported fixture)
    _, f16 = family("mixtral")
    path = quantized_file(f16, tmp_path / "q.gguf")
    store = convert_gguf(path, tmp_path / "auto", quiet=True)
    full = load(store.path)
    want = full.generate(prompt_ids=PROMPT, max_new_tokens=12, ignore_eos=True).token_ids
    assert type(full.model.get_submodule("model.layers.0.self_attn.q_proj")).__name__ == "QuantLinear"
    off = load(store.path, memory="300KiB")
    got = off.generate(prompt_ids=PROMPT, max_new_tokens=12, ignore_eos=True)
    assert got.token_ids == want and got.stats["expert_misses"] > 0


def test_model_gguf_cache_is_keyed_by_backbone_bits(family, tmp_path, capsys):  # noqa: F811  (the imported fixture)
    _, f16 = family("mixtral")
    path = quantized_file(f16, tmp_path / "q.gguf")
    a = load(path)
    b = load(path, backbone_bits=16)
    assert a.path != b.path
    assert any(k.endswith(".qweight") for k in a.model.state_dict())
    assert not any(k.endswith(".qweight") for k in b.model.state_dict())
    assert load(path).path == a.path  # cached: the same store again
    gen = ["generate", "--model", path, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", 3,
           "--ignore-eos", "--backbone-bits", "16"]
    rc, out, err = cli(capsys, *gen)
    assert rc == 0 and "converting" not in err  # the --backbone-bits 16 store made above


def test_float_file_keeps_its_backbone_unless_8_is_asked(family, tmp_path, capsys):  # noqa: F811  (the imported fixture)
    hf, f16 = family("mixtral")
    auto = convert_gguf(f16, tmp_path / "auto", quiet=True)
    assert not any(k.endswith(".qweight") for k in backbone_keys(auto))
    eight = convert_gguf(f16, tmp_path / "eight", quiet=True, backbone_bits="8")
    assert "model.layers.0.self_attn.o_proj.qweight" in backbone_keys(eight)
    with pytest.raises(UsageError, match="backbone bits"):
        convert_gguf(f16, tmp_path / "never", quiet=True, backbone_bits=4)
    assert not (tmp_path / "never").exists()
    rc, out, err = cli(capsys, "convert", "--model", hf, "--out", tmp_path / "x", "--backbone-bits", "8")
    assert rc != 0 and "--backbone-bits applies to GGUF files" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
