"""Each family's quirks live in its own file: checkpoint layout tables (collected by models.family_table) and
hooks declared once with defaults (models.base.FamilyHooks), read by every caller as plain attributes."""

import pytest
import torch

from moe_offload import checkpoint
from moe_offload.models import SUPPORTED, build, family_table, get_module

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=24, moe_intermediate_size=16, num_experts_per_tok=2, num_local_experts=4,
            num_experts=4, n_routed_experts=4, max_position_embeddings=64, kv_lora_rank=8, q_lora_rank=None,
            qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1, head_dim=8)


def meta_model(model_type: str, **over):
    with torch.device("meta"):
        return build({"model_type": model_type, **TINY, **over})[1]


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_every_family_file_holds_its_checkpoint_layout(model_type):
    mod = get_module(model_type)
    keys, router = mod.CONFIG_KEYS
    assert "{layer}" in router and len(keys) == 2 and checkpoint.FAMILY_KEYS[model_type] == mod.CONFIG_KEYS
    per_expert, stacked = hasattr(mod, "EXPERT_NAMES"), hasattr(mod, "STACKED_EXPERT_NAMES")
    assert per_expert != stacked  # one layout table, per-expert or stacked
    if per_expert:
        template, parts = mod.EXPERT_NAMES
        assert set(parts) == set(checkpoint.PARTS) and checkpoint.EXPERT_NAMES[model_type] is mod.EXPERT_NAMES
        assert checkpoint.parse_expert_key(model_type, checkpoint.expert_key(model_type, 3, 5, "down")) == \
            (3, 5, "down")
    else:
        assert checkpoint.STACKED_EXPERT_NAMES[model_type] is mod.STACKED_EXPERT_NAMES
    assert set(family_table("CONFIG_KEYS")) == set(SUPPORTED)


def test_hook_defaults_are_declared_on_the_base_model():
    m = meta_model("mixtral")
    assert (m.fp32_keys, m.stored_dtype_keys, m.kv_kind) == ((), (), "gqa")
    assert not m.skip_checkpoint_key("model.layers.9.mlp.gate.weight")
    assert m.backbone_dtype("model.norm.weight", torch.float32, torch.bfloat16) == torch.bfloat16


def test_family_hooks_override_the_defaults():
    oss = meta_model("gpt_oss", sliding_window=4)
    assert oss.backbone_dtype("model.norm.weight", torch.bfloat16, torch.bfloat16) == torch.float32
    assert oss.backbone_dtype("model.layers.0.self_attn.q_proj.weight", torch.float32, torch.bfloat16) == \
        torch.bfloat16
    oss.stored_dtype_keys = (".qweight",)  # what quant.backbone sets on a model with quantized attention
    assert oss.backbone_dtype("model.layers.0.self_attn.q_proj.qweight", torch.uint8, torch.bfloat16) == torch.uint8
    v3 = meta_model("deepseek_v3", first_k_dense_replace=1)
    assert v3.skip_checkpoint_key("model.layers.2.mlp.gate.weight")  # the MTP layer past num_hidden_layers
    assert not v3.skip_checkpoint_key("model.layers.1.mlp.gate.weight")
    assert v3.backbone_dtype("model.layers.1.mlp.gate.e_score_correction_bias", torch.bfloat16,
                             torch.bfloat16) == torch.float32


def test_kv_bytes_per_token_follow_the_family_cache():
    L, K, Hd = TINY["num_hidden_layers"], TINY["num_key_value_heads"], TINY["head_dim"]
    assert meta_model("mixtral").kv_bytes_per_token(torch.bfloat16) == L * 2 * K * Hd * 2
    ds = meta_model("deepseek_v2")
    assert ds.kv_kind == "mla"
    assert ds.kv_bytes_per_token(torch.float32) == L * (TINY["kv_lora_rank"] + TINY["qk_rope_head_dim"]) * 4


@pytest.mark.parametrize("spec,dtype", [("mixtral_gqa", "float32"), ("qwen2_moe_shared_dense", "bfloat16"),
                                        ("gpt_oss_swa_yarn_clamped", "bfloat16"),
                                        ("deepseek_v3_group_lora_yarn", "float32")])
def test_bench_sizes_are_what_the_engine_holds(tiny_checkpoint, tmp_path, spec, dtype):
    """bench's sizes come from the planner's counts (models.sizes): the backbone (gpt-oss: fp32 norms in a bf16
    run) and KV bytes (DeepSeek: the latent cache, not the GQA arithmetic bench used to do itself) the engine
    really holds for the store."""
    from moe_offload import bench
    from moe_offload.runtime.load import load
    from moe_offload.store.format import convert

    from .test_families import SPECS, make_checkpoint

    hf = make_checkpoint(tmp_path / "hf", spec) if spec in SPECS else tiny_checkpoint(spec)
    store = convert(hf, tmp_path / "store").path
    s = bench.model_sizes(store, dtype)
    engine = load(store, device="cpu", dtype=dtype)
    dt = getattr(torch, dtype)
    state = engine.model.state_dict()
    assert s.backbone == engine.info["backbone_bytes"] == sum(t.nbytes for t in state.values())
    assert s.embed == state["model.embed_tokens.weight"].nbytes
    assert s.kv_per_token == engine.model.kv_bytes_per_token(dt) == sum(
        c.nbytes for c in engine.model.make_cache(1, 1, dt, torch.device("cpu")))
    c = engine.model.args
    if engine.model.kv_kind == "gqa":
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        assert s.kv_per_token == 2 * c.num_key_value_heads * head_dim * dt.itemsize * c.num_hidden_layers
    else:
        assert s.kv_per_token == (c.kv_lora_rank + c.qk_rope_head_dim) * dt.itemsize * c.num_hidden_layers


@pytest.mark.parametrize("model_type", sorted(family_table("GGUF")))
def test_gguf_tables_name_tensors_the_family_has(model_type):
    from moe_offload.gguf_export import architectures
    from moe_offload.gguf_import import ARCHITECTURES

    t = get_module(model_type).GGUF
    assert callable(get_module(model_type).config_from_gguf)  # the family's config keys from a GGUF
    assert ARCHITECTURES[t["arch"]] == model_type and architectures()[model_type] == t["arch"]
    assert t["experts_key"] in ("num_local_experts", "num_experts", "n_routed_experts")
    full = {"deepseek_v2": {"q_lora_rank": 16, "n_shared_experts": 1}}.get(model_type, {})  # every optional part
    m = meta_model(model_type, shared_expert_intermediate_size=16, **full)
    layer = m.moe_blocks()[0][0]
    assert {f"model.layers.{layer}.{hf}" for hf in t["names"].values()} <= set(m.state_dict())
