"""Planner: parameter and byte arithmetic from published config.json values, derived tensor by tensor here,
and the plans / refusals that follow from it."""

import json

import pytest

from moe_offload.cli import main
from moe_offload.costmodel import quant_bytes
from moe_offload.errors import MoeError
from moe_offload.models.deepseek_v2 import config_sizes as deepseek_sizes
from moe_offload.plan import PlanRefused, make_plan, model_sizes, plan_for, read_model_config, resolve_hardware
from moe_offload.sim import PROFILES

GiB = 2**30

# config.json as published on the hub (keys that matter; the rest of the files are tokenizer/training settings)
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
    "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "attention_bias": False, "tie_word_embeddings": False,
    "use_sliding_window": False, "sliding_window": None, "hidden_act": "silu", "torch_dtype": "bfloat16",
}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "vocab_size": 129280, "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
    "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                          "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                          "type": "yarn"},
    "attention_bias": False, "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
}


def write(tmp_path, name, cfg):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_mixtral_8x7b_counts():
    D, I, L, V, E = 4096, 14336, 32, 32000, 8
    expert = 3 * D * I  # w1, w3 [I, D]; w2 [D, I]
    attn = D * D + 2 * D * 1024 + D * D  # q, k, v (8 kv heads x 128), o
    fixed = L * (E * D + 2 * D) + D + 2 * V * D  # router, 2 norms per layer, final norm, embed + lm_head
    s = model_sizes(MIXTRAL_8X7B)
    assert (s.expert_params, s.n_routed, s.top_k, s.moe_layers) == (expert, 256, 2, tuple(range(32)))
    assert (s.backbone_linear, s.backbone_fixed) == (L * attn, fixed)
    assert s.total_params == L * attn + fixed + L * E * expert == 46_702_792_704  # "46.7 B"
    assert s.active_params == L * attn + fixed + L * 2 * expert == 12_879_925_248  # "12.9 B"
    assert s.kv_bytes_per_token == L * 2 * 8 * 128 * 2 == 131_072
    assert s.backbone_bytes(16) == 2 * (L * attn + fixed)
    # at b < 16 bits the linears of the backbone, lm_head included (quantize --attn-bits b --head-bits b)
    assert s.head_params == V * D
    assert s.backbone_bytes(8) == quant_bytes(L * attn, 8) + quant_bytes(V * D, 8) + 2 * (fixed - V * D)
    assert (s.embed_params, s.fp32_params, s.kv_kind) == (V * D, 0, "gqa")


def test_qwen3_30b_a3b_counts():
    D, L, V, E, Hd = 2048, 48, 151936, 128, 128
    expert = 3 * D * 768
    attn = D * 32 * Hd + 2 * D * 4 * Hd + 32 * Hd * D  # q, k, v, o
    fixed = L * (2 * Hd + 2 * D + E * D) + D + 2 * V * D  # q/k norm, 2 norms, router per layer
    s = model_sizes(QWEN3_30B_A3B)
    assert (s.expert_params, s.n_routed) == (expert, 48 * 128)
    assert (s.backbone_linear, s.backbone_fixed) == (L * attn, fixed)
    assert s.total_params == L * attn + fixed + L * E * expert == 30_532_122_624  # "30.5 B"
    assert s.active_params == L * attn + fixed + L * 8 * expert == 3_353_032_704  # "3.3 B"
    assert s.kv_bytes_per_token == L * 2 * 4 * Hd * 2 == 98_304


def test_deepseek_v3_counts():
    D, V, L, H, R, Dr, Dn, Dv, Q = 7168, 129280, 61, 128, 512, 64, 128, 128, 1536
    attn_lin = (D * Q  # q_a_proj
                + Q * H * (Dn + Dr)  # q_b_proj
                + D * (R + Dr)  # kv_a_proj_with_mqa
                + R * H * (Dn + Dv)  # kv_b_proj
                + H * Dv * D)  # o_proj
    attn_fix = Q + R  # q_a_layernorm, kv_a_layernorm
    expert = 3 * D * 2048
    dense_mlp = 3 * D * 18432  # first_k_dense_replace = 3 layers
    n_moe = L - 3
    lin = L * attn_lin + 3 * dense_mlp + n_moe * expert  # + one shared expert per MoE layer
    fixed = L * (attn_fix + 2 * D) + n_moe * (256 * D + 256) + D + 2 * V * D  # router + e_score_correction_bias
    for s in (deepseek_sizes(DEEPSEEK_V3), model_sizes(DEEPSEEK_V3)):
        assert (s.expert_params, s.n_routed, s.top_k, s.moe_layers) == (expert, 58 * 256, 8, tuple(range(3, 61)))
        assert (s.backbone_linear, s.backbone_fixed) == (lin, fixed)
        assert s.total_params == lin + fixed + n_moe * 256 * expert == 671_026_419_200  # "671 B" (MTP layer not counted)
        assert s.active_params == lin + fixed + n_moe * 8 * expert == 37_552_297_472  # "37 B"
        assert s.kv_bytes_per_token == L * (R + Dr) * 2 == 70_272  # MLA: compressed kv + rope key, 16-bit
        assert s.kv_kind == "mla"
        assert (s.embed_params, s.fp32_params) == (V * D, n_moe * 256)  # e_score_correction_bias kept fp32


def test_mixtral_on_12gb_vram_and_64gb_ram_is_planned_at_8_bit():
    hw = resolve_hardware(vram=12 * 10**9, ram=64 * 10**9)
    p = make_plan(model_sizes(MIXTRAL_8X7B), hw, context=4096)
    # device: 12e9 - 1 GiB reserve - KV 131072 x 4096 - backbone 2 x 1,605,636,096 = 7,178,115,072 for experts
    dev_free = 12 * 10**9 - GiB - 131_072 * 4096 - 2 * 1_605_636_096
    assert dev_free == 7_178_115_072
    host = 64 * 10**9 - 64 * 10**8  # 10 % reserve (> 2 GiB)
    e16, e8 = 2 * 176_160_768, 176_160_768 + 4 * 176_160_768 // 64
    assert 256 * e16 > dev_free + host  # 90.2 GB of 16-bit experts do not fit in 64.8 GB
    assert p.expert_bits == 8 and p.backbone_bits == 16 and p.feasible
    assert dev_free // e8 == 38  # whole experts on the device, the other 218 in host RAM
    assert (p.row.on_device, p.row.in_host, p.row.on_disk) == (38, 218, 0)
    assert p.memory == 2 * 1_605_636_096 + 38 * e8 == 10_323_763_200
    assert p.host_memory == 218 * e8 == 40_803_237_888
    assert p.prefetch and p.prediction is None  # no bandwidths known without a profile
    assert any("no tok/s prediction" in n for n in p.notes)


def test_cpu_miss_decision_on_the_rtx3060_profile_by_hand():
    hw = resolve_hardware("rtx3060-12gb", ram=64 * 10**9)
    p = make_plan(model_sizes(MIXTRAL_8X7B), hw, trace_tokens=8, warmup=2)
    e8 = 187_170_816
    cpu = e8 / (0.5 * 51.2e9)  # 7.31 ms: 8-bit expert read by a CPU GEMV at 25.6 GB/s
    dev = 10e-6 + e8 / (0.8 * 31.5e9) + e8 / 360e9  # 7.96 ms: copy over PCIe 4.0 + GEMV at 360 GB/s
    assert p.cpu_miss_cost["cpu_s"] == pytest.approx(cpu) and p.cpu_miss_cost["device_s"] == pytest.approx(dev)
    assert p.cpu_misses is True
    assert p.prediction is not None and p.prediction.cpu_misses and p.prediction.tokens == 8


def test_deepseek_v3_on_32gb_vram_64gb_ram_at_2_bit_is_refused_with_numbers():
    hw = resolve_hardware(vram=32 * 10**9, ram=64 * 10**9)
    with pytest.raises(PlanRefused) as e:
        make_plan(model_sizes(DEEPSEEK_V3), hw, expert_bits=2, model="DeepSeek-V3")
    msg = str(e.value)
    experts = 58 * 256 * (3 * 7168 * 2048 // 4 + 4 * 3 * 7168 * 2048 // 64)  # 2-bit codes + g64 fp16 scale/zero
    assert experts == 204_346_490_880
    usable = (32 * 10**9 - GiB) + (64 * 10**9 - 64 * 10**8)  # 30.9 + 57.6
    assert "204.3 GB" in msg and f"{usable / 1e9:.1f} GB" == "88.5 GB" and "= 88.5 GB" in msg
    assert "no disk tier" in msg and "\n" not in msg
    # nothing fits at any backbone precision: the refusal counts the backbone at its fewest bits (4), the case
    # most favourable to fitting (the 16-bit one, 34.2 GB, exceeds the device anyway)
    assert e.value.plan.backbone_bits == 4


def test_deepseek_v3_streams_from_disk_when_a_disk_is_known():
    hw = resolve_hardware("rtx4090-24gb", vram=32 * 10**9, ram=64 * 10**9)
    p = make_plan(model_sizes(DEEPSEEK_V3), hw, trace_tokens=4, warmup=1)
    assert p.feasible and p.expert_bits == 2 and p.row.on_disk > 0
    assert p.prediction.disk_reads > 0 and p.prediction.tok_s_serial > 0


def test_backbone_that_cannot_fit_is_refused():
    with pytest.raises(PlanRefused, match=r"11.1 GB even at 4-bit"):  # attention and lm_head at 4 bits
        make_plan(model_sizes(DEEPSEEK_V3), resolve_hardware(vram=12 * 10**9, ram=64 * 10**9))


def test_cpu_only_holds_low_bit_experts_expanded_to_4_bit():
    p = make_plan(model_sizes(QWEN3_30B_A3B), PROFILES["laptop-16gb-cpu"], trace_tokens=4, warmup=1)
    rows = {r.bits: r for r in p.rows}
    assert rows[2].resident_bytes == rows[4].resident_bytes == quant_bytes(3 * 2048 * 768, 4)
    assert rows[2].on_device == rows[4].on_device and rows[2].expert_bytes < rows[4].expert_bytes
    assert p.host_memory is None and not p.cpu_misses


def test_cli_plan_json_and_refusal(tmp_path, capsys):
    m = write(tmp_path, "Mixtral-8x7B", MIXTRAL_8X7B)
    assert main(["plan", "--model", str(m), "--vram", "12GB", "--ram", "64GB", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["feasible"] and d["recommended"]["expert_bits"] == 8 and d["params"]["total"] == 46_702_792_704
    assert d["kv"]["bytes_per_1k_tokens"] == 131_072_000
    ds = write(tmp_path, "DeepSeek-V3", DEEPSEEK_V3)
    assert main(["plan", "--model", str(ds), "--vram", "32GB", "--ram", "64GB", "--expert-bits", "2"]) == 1
    out, err = capsys.readouterr()
    assert "bits" in out and err.count("\n") == 1 and err.startswith("error: DeepSeek-V3 does not fit")


def test_plan_for_hook_and_config_sources(tmp_path):
    m = write(tmp_path, "mixtral", MIXTRAL_8X7B)
    r = plan_for(m, resolve_hardware(vram=12 * 10**9, ram=64 * 10**9))
    assert r == dict(memory=10_323_763_200, host_memory=40_803_237_888, expert_bits=8, group_size=64,
                     backbone_bits=16, prefetch=True, cpu_misses=False, cache_policy="lru")
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps({"format": "moe-offload-store", "config": QWEN3_30B_A3B}))
    assert read_model_config(store)[0]["model_type"] == "qwen3_moe"
    with pytest.raises(MoeError, match="not supported by the planner"):
        model_sizes({"model_type": "llama"})


def test_recorded_trace_drives_the_prediction():
    from moe_offload.sim import synthetic_trace

    hw = resolve_hardware("rtx3060-12gb", ram=64 * 10**9)
    s = model_sizes(MIXTRAL_8X7B)
    tr = synthetic_trace(12, list(range(32)), 8, 2, expert_bytes=1, seed=3)  # bytes re-priced from the model
    p = make_plan(s, hw, trace=tr)
    assert p.trace_source.startswith("recorded trace, 9 tokens after 3 warm-up")
    assert p.prediction.tokens == 9 and p.prediction.accesses == 9 * 32 * 2
    with pytest.raises(MoeError, match="trace has 2 MoE layers"):
        make_plan(s, hw, trace=synthetic_trace(4, [0, 1], 8, 2, expert_bytes=1))
