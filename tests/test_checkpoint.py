"""Checkpoint reading: the name-mapping table with `arange` tensors, key round-trips, config spellings."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe_offload import load
from moe_offload.checkpoint import (EXPERT_NAMES, PARTS, SafetensorsFolder, check_keys, expert_key,
                                    parse_expert_key)
from moe_offload.errors import MoeError
from tests import tiny

# Written from the checkpoints on the hub, independently of EXPERT_NAMES: (template, gate, up, down)
HUB_EXPERT_NAMES = {
    "mixtral": ("model.layers.{l}.block_sparse_moe.experts.{e}.{p}.weight", "w1", "w3", "w2"),
    "qwen2_moe": ("model.layers.{l}.mlp.experts.{e}.{p}.weight", "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("model.layers.{l}.mlp.experts.{e}.{p}.weight", "gate_proj", "up_proj", "down_proj"),
    "olmoe": ("model.layers.{l}.mlp.experts.{e}.{p}.weight", "gate_proj", "up_proj", "down_proj"),
}
PROMPT = [7, 30, 99, 4, 61, 12, 88, 5, 40]


def hub_name(model_type: str, layer: int, expert: int, part: str) -> str:
    template, *names = HUB_EXPERT_NAMES[model_type]
    return template.format(l=layer, e=expert, p=names[PARTS.index(part)])


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def linked_copy(src: Path, dst: Path) -> Path:
    """A folder whose files link to `src` (safetensors) or are copies (json), so configs can be edited."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f)
        else:
            shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("spec", list(tiny.SPECS))
def test_every_runtime_tensor_comes_from_its_checkpoint_tensor(tiny_checkpoint, tmp_path, spec):
    src = tiny_checkpoint(spec)
    names = read_all(src)
    # arange + a per-name offset: any swap, transpose or mix-up of two tensors changes some value
    arange = {k: (torch.arange(v.numel(), dtype=torch.float32).reshape(v.shape)
                  + float(zlib.crc32(k.encode()) % 4096) * 1e4) for k, v in names.items()}
    folder = tmp_path / spec
    folder.mkdir()
    shutil.copy(src / "config.json", folder / "config.json")
    save_file(arange, str(folder / "model.safetensors"))

    engine = load(folder, dtype="float32")
    model, model_type = engine.model, tiny.SPECS[spec][0]
    used = set()
    for k, v in model.state_dict().items():
        assert torch.equal(v, arange[k]), k
        used.add(k)
    moe_layers = [i for i in range(len(model.model.layers)) if hub_name(model_type, i, 0, "gate") in names]
    assert [i for i, _ in model.moe_blocks()] == moe_layers and moe_layers
    for layer, moe in model.moe_blocks():
        assert len(moe.experts.units) == model.n_experts
        for e, unit in enumerate(moe.experts.units):
            gate, up, down = (arange[hub_name(model_type, layer, e, p)] for p in PARTS)
            assert torch.equal(unit.gate_up, torch.cat([gate, up])), (layer, e)
            assert torch.equal(unit.down, down), (layer, e)
            used |= {hub_name(model_type, layer, e, p) for p in PARTS}
    if model.tie:
        assert "lm_head.weight" not in names or torch.equal(model.model.embed_tokens.weight, arange["model.embed_tokens.weight"])
        used |= {"lm_head.weight"} & set(names)
    assert used == set(names)  # every checkpoint tensor lands somewhere, exactly once


@pytest.mark.parametrize("model_type", list(HUB_EXPERT_NAMES))
def test_expert_key_round_trip(model_type):
    assert set(EXPERT_NAMES) >= set(HUB_EXPERT_NAMES)
    for layer in (0, 3, 47):
        for expert in (0, 9, 127):
            for part in PARTS:
                key = expert_key(model_type, layer, expert, part)
                assert key == hub_name(model_type, layer, expert, part)
                assert parse_expert_key(model_type, key) == (layer, expert, part)
    backbone = ["lm_head.weight", "model.embed_tokens.weight", "model.layers.0.mlp.gate.weight",
                "model.layers.0.block_sparse_moe.gate.weight", "model.layers.1.mlp.shared_expert.up_proj.weight",
                "model.layers.2.mlp.shared_expert_gate.weight", "model.layers.0.mlp.experts.gate_up_proj",
                "model.layers.0.mlp.experts.1.gate_proj.bias", "model.layers.x.mlp.experts.1.up_proj.weight",
                "model.layers.0.mlp.experts.1.w1.weight"]
    for name in backbone:
        assert parse_expert_key(model_type, name) is None, name


def hub_style(config: dict) -> dict:
    """config.json as found on the hub: rope_theta, torch_dtype, num_experts; no layer_types."""
    c = dict(config)
    rp = c.pop("rope_parameters")
    c["rope_theta"] = rp["rope_theta"]
    c["rope_scaling"] = None
    c["torch_dtype"] = c.pop("dtype")
    if "num_local_experts" in c and c["model_type"] != "mixtral":
        c["num_experts"] = c.pop("num_local_experts")
    c.pop("layer_types", None)
    return c


@pytest.mark.parametrize("spec", ["mixtral_mha_swa_tied", "qwen2_moe_mha_step2_tied", "qwen3_moe_gqa_dense",
                                  "olmoe_gqa_clip"])
def test_hub_config_spellings_give_the_same_model(tiny_checkpoint, tmp_path, spec):
    src = tiny_checkpoint(spec)
    folder = linked_copy(src, tmp_path / "hub")
    config = json.loads((src / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(hub_style(config)))
    ref = load(src, dtype="float32")
    hub = load(folder, dtype="float32")
    assert hub.model.rope_cos.shape == ref.model.rope_cos.shape
    torch.testing.assert_close(hub.logits(PROMPT * 2), ref.logits(PROMPT * 2), atol=0, rtol=0)


def test_tied_checkpoint_with_a_stored_lm_head_loads(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("olmoe_mha_tied")
    tensors = read_all(src)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    folder = tmp_path / "tied"
    folder.mkdir()
    shutil.copy(src / "config.json", folder)
    save_file(tensors, str(folder / "model.safetensors"))
    torch.testing.assert_close(load(folder, dtype="float32").logits(PROMPT), load(src, dtype="float32").logits(PROMPT),
                               atol=0, rtol=0)


def test_strict_keys_name_the_offender():
    with pytest.raises(MoeError, match=r"1 missing tensor\(s\), e.g. b.*1 unexpected tensor\(s\), e.g. c"):
        check_keys({"a", "c"}, {"a", "b"}, "ckpt")
    check_keys({"a", "c"}, {"a"}, "ckpt", ignore={"c"})


def test_index_that_lies_about_a_shard_is_an_error(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen2_moe_shared_dense", max_shard_size="20KB")
    folder = linked_copy(src, tmp_path / "lie")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][key] = shards[1]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MoeError, match="listed but not in their shard"):
        SafetensorsFolder(folder)
    assert SafetensorsFolder(src).get(key).shape == read_all(src)[key].shape
