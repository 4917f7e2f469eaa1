"""bench at real scale, held at tiny scale: the synthetic models' shape table against the real models' config.json
values, the streamed builder (a 1-layer tiny-width build that transformers and our loader both run), q4 budgets,
and the CPU capability record."""

from __future__ import annotations

import json

import pytest
import torch

from moe_offload import bench, cpuinfo
from moe_offload.bench import Sizes, budget_bytes, goal_rows, parse_budgets
from moe_offload.workload import kv_tokens
from moe_offload.errors import UsageError

# ---- the shape table ------------------------------------------------------------------------------------

# config.json of mistralai/Mixtral-8x7B-v0.1 and Qwen/Qwen3-30B-A3B on the Hub (the values the layers need)
MIXTRAL = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, rope_theta=1e6, rms_norm_eps=1e-5,
               num_hidden_layers=4, model_type="mixtral", tie_word_embeddings=False)
QWEN3 = dict(hidden_size=2048, moe_intermediate_size=768, num_attention_heads=32, num_key_value_heads=4,
             head_dim=128, num_experts=128, num_experts_per_tok=8, vocab_size=151936, rope_theta=1e6,
             rms_norm_eps=1e-6, norm_topk_prob=True, num_hidden_layers=8, model_type="qwen3_moe",
             tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[])


@pytest.mark.parametrize("name, real", [("mixtral-8x7b-L4", MIXTRAL), ("qwen3-30b-a3b-L8", QWEN3)])
def test_synthetic_configs_are_the_real_models_with_fewer_layers(name, real):
    c = bench.synthetic_config(name)
    for k, v in real.items():
        assert c[k] == v, k


def _params(shapes):
    n = 0
    for _, s in shapes:
        n += torch.Size(s).numel()
    return n


def test_tensor_shapes_count_the_real_models_parameters():
    # Mixtral-8x7B per layer: attention 2·4096² + 2·1024·4096, 8 experts of 3·4096·14336, router 8·4096, 2 norms
    layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 8 * 3 * 4096 * 14336 + 8 * 4096 + 2 * 4096
    ends = 2 * 32000 * 4096 + 4096
    assert _params(bench.tensor_shapes(bench.synthetic_config("mixtral-8x7b-L4"))) == 4 * layer + ends
    assert _params(bench.tensor_shapes(bench.MIXTRAL_8X7B)) == 32 * layer + ends  # 46.7 B, as published
    assert 46.6e9 < 32 * layer + ends < 46.8e9
    # Qwen3-30B-A3B per layer: q/o 4096x2048, k/v 512x2048, q/k norms of 128, 128 experts of 3·2048·768
    layer = 2 * 4096 * 2048 + 2 * 512 * 2048 + 2 * 128 + 128 * 3 * 2048 * 768 + 128 * 2048 + 2 * 2048
    ends = 2 * 151936 * 2048 + 2048
    assert _params(bench.tensor_shapes(bench.synthetic_config("qwen3-30b-a3b-L8"))) == 8 * layer + ends
    assert 30.4e9 < 48 * layer + ends < 30.6e9  # 30.5 B, as published
    shapes = dict(bench.tensor_shapes(bench.synthetic_config("qwen3-30b-a3b-L8")))
    assert shapes["model.layers.7.mlp.experts.127.down_proj.weight"] == (2048, 768)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (4096, 2048)  # 32 heads x 128 > hidden 2048
    assert shapes["model.layers.0.self_attn.k_norm.weight"] == (128,)


def test_shard_plan_bounds_what_the_builder_holds():
    shapes = [("a", (10,)), ("b", (30,)), ("c", (100,)), ("d", (5,)), ("e", (5,))]
    assert bench.shard_plan(shapes, 2, 80) == [[0, 1], [2], [3, 4]]  # c (200 B) alone, over the bound
    assert [i for s in bench.shard_plan(shapes, 2, 1) for i in s] == [0, 1, 2, 3, 4]


def _tiny(name: str) -> dict:
    c = bench.synthetic_config(name)
    return {**c, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 1,
            "vocab_size": 300, "head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_local_experts": 4 if "num_local_experts" in c else None, "num_experts": 8 if "num_experts" in c
            else None, "num_experts_per_tok": 2, "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.1}


@pytest.mark.parametrize("name", ["mixtral-8x7b-L4", "qwen3-30b-a3b-L8"])
def test_streamed_build_loads_in_transformers_and_ours_alike(name, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    import moe_offload

    config = {k: v for k, v in _tiny(name).items() if v is not None}
    hf = bench.build_streamed(config, tmp_path / "hf", shard_bytes=20_000)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in hf.glob("*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == {n for n, _ in bench.tensor_shapes(config)}
    # the bytes do not depend on the sharding (each tensor has its own seeded generator)
    one = bench.build_streamed(config, tmp_path / "one", shard_bytes=1 << 30)
    key = next(n for n, _ in bench.tensor_shapes(config) if "experts.1." in n)
    with safe_open(str(hf / index["weight_map"][key]), "pt") as a, \
            safe_open(str(one / "model-00001-of-00001.safetensors"), "pt") as b:
        assert torch.equal(a.get_tensor(key), b.get_tensor(key)) and a.get_tensor(key).dtype == torch.bfloat16
    assert not (tmp_path / "hf.tmp").exists()

    ref = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    ids = [3, 5, 7, 9, 11]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0, -1]
    engine = moe_offload.load(str(hf), dtype="float32")
    got = engine.generate(prompt_ids=ids, max_new_tokens=1, ignore_eos=True, temperature=0.0)
    assert got.token_ids[0] == int(want.argmax())


# ---- q4 budgets ----------------------------------------------------------------------------------------

def test_parse_budgets_16_bit_and_q4():
    assert parse_budgets("100,50,25") == [(16, 100.0), (16, 50.0), (16, 25.0)]
    assert parse_budgets("q4:100,50,25") == [(4, 100.0), (4, 50.0), (4, 25.0)]
    assert parse_budgets("100, q4:100,50, f16:25") == [(16, 100.0), (4, 100.0), (4, 50.0), (16, 25.0)]
    assert bench.budget_label(16, 50.0) == "50 %" and bench.budget_label(4, 50.0) == "q4 50 %"
    for bad in ("q5:50", "q4:abc", "0", "q4:150", "", "q4:"):
        with pytest.raises(UsageError):
            parse_budgets(bad)


def test_q4_budget_is_the_4_bit_backbone_plus_a_share_of_the_4_bit_experts():
    s16 = Sizes(backbone=1000, embed=300, hidden=10, itemsize=2, expert=400, moe_layers=2, n_experts=4, top_k=2,
                kv_per_token=5)
    s4 = Sizes(backbone=1000, embed=300, hidden=10, itemsize=2, expert=108, moe_layers=2, n_experts=4, top_k=2,
               kv_per_token=5)
    # q4:100 fits the whole 4-bit model, 25 % of the 16-bit model's does not hold it
    assert budget_bytes(100, s4.backbone, s4.experts) == 1000 + 864
    assert budget_bytes(50, s4.backbone, s4.experts) == 1000 + 432
    assert budget_bytes(25, s16.backbone, s16.experts) == 1000 + 800 < budget_bytes(100, s4.backbone, s4.experts)


def test_memory_budgets_count_the_4_bit_model_when_only_4_bit_rows_run():
    s16 = Sizes(backbone=1000, embed=300, hidden=10, itemsize=2, expert=400, moe_layers=2, n_experts=4, top_k=2,
                kv_per_token=5)
    s4 = Sizes(backbone=1000, embed=300, hidden=10, itemsize=2, expert=100, moe_layers=2, n_experts=4, top_k=2,
               kv_per_token=5)
    budgets, bits = bench.memory_budgets([1800], {16: s16, 4: s4}, [4])
    assert budgets == [("0 MiB", 100.0, 1800)] and bits == {"0 MiB": 4}  # the whole 4-bit model fits
    budgets, bits = bench.memory_budgets([1800], {16: s16, 4: s4}, [16, 4])
    assert budgets[0][1] == 25.0 and bits == {"0 MiB": 16}


def test_goal_rows_a_16_bit_store_under_a_q4_budget_is_out_of_core():
    def row(config, bits, tok_s, budget_bits=4):
        return {"label": "q4 100 %", "budget_pct": 100.0, "budget_bits": budget_bits, "system": config.split("-")[0],
                "config": config, "ok": True, "expert_bits": bits, "summary": {"decode_tok_s": {"median": tok_s}}}

    rows = [row("us-lru-q4", 4, 6.0), row("us-lru", 16, 2.0), row("llamacpp-q4_0", 16, 4.0),
            row("llamacpp-f16", 16, 1.0)]
    limits = {"per_budget": {"q4 100 %": {"tok_s": 10.0, "bits": 4}}}
    g = {(r["us"], r["goal"]): r for r in goal_rows(rows, limits)}
    assert g[("us-lru-q4", "decode tok/s ÷ RAM-bandwidth limit")]["measured"] == pytest.approx(0.6)  # fits
    assert g[("us-lru-q4", "decode tok/s ÷ llama.cpp (same precision)")]["target"] == 0.8
    assert g[("us-lru", "decode tok/s ÷ llama.cpp (same precision)")]["target"] == 3.0  # out of core
    assert ("us-lru", "decode tok/s ÷ disk-bandwidth limit") not in g  # the limit counts 4-bit bytes


# ---- CPU capabilities ----------------------------------------------------------------------------------

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni vaes vpclmulqdq
processor\t: 1
flags\t\t: fpu avx512f
"""
SAPPHIRE_RAPIDS = """model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: fpu sse avx fma f16c avx2 avx512f avx512bw avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_tile amx_int8
"""
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm sve i8mm bf16
CPU implementer\t: 0x41
"""


def test_cpuinfo_zen3_is_avx2_only():
    p = cpuinfo.parse_cpuinfo(ZEN3)
    assert p["model_name"] == "AMD EPYC 7B13 64-Core Processor"
    caps = cpuinfo.capabilities(p["flags"])  # the first processor's flags only
    assert caps["avx2"] and caps["fma"] and caps["f16c"]
    assert not any(caps[k] for k in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "neon"))
    assert cpuinfo.best_isa(caps) == "avx2"


def test_cpuinfo_avx512_amx_and_arm():
    caps = cpuinfo.capabilities(cpuinfo.parse_cpuinfo(SAPPHIRE_RAPIDS)["flags"])
    assert caps["avx512f"] and caps["avx512_bf16"] and caps["avx512_vnni"] and caps["amx_bf16"] and caps["amx_int8"]
    assert cpuinfo.best_isa(caps) == "amx"
    assert cpuinfo.best_isa({**caps, "amx_bf16": False, "amx_int8": False}) == "avx512_bf16"
    arm = cpuinfo.capabilities(cpuinfo.parse_cpuinfo(GRAVITON3)["flags"])
    assert arm["neon"] and arm["sve"] and arm["i8mm"] and arm["bf16_arm"] and not arm["avx2"]
    assert cpuinfo.best_isa(arm) == "neon"


def test_machine_info_from_a_file_and_without_one(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text(ZEN3)
    info = cpuinfo.machine_info(f)
    assert info["model_name"].startswith("AMD EPYC") and info["isa"] == "avx2" and info["flags"]["avx2"]
    assert info["torch_cpu_capability"] == str(torch.backends.cpu.get_cpu_capability())
    assert "avx2" in cpuinfo.describe(info) and "avx512f" not in cpuinfo.describe(info)
    missing = cpuinfo.machine_info(tmp_path / "nope")
    assert missing["flags"]["avx2"] is False and json.dumps(missing)  # recordable as JSON


# ---- the command: 4-bit rows under q4 budgets, no 16-bit store -----------------------------------------

@pytest.mark.slow  # quantize + 2 child runs + the bandwidth probes: ~30 s idle, minutes when busy
def test_bench_quick_q4_budgets(tiny_checkpoint, tmp_path, child_env):
    import subprocess
    import sys

    hf = tiny_checkpoint("mixtral_gqa")
    cmd = [sys.executable, "-m", "moe_offload.cli", "bench", "--model", str(hf), "--quick", "--peers", "none",
           "--us-bits", "4", "--budgets", "q4:100,50", "--quantizer", "rtn", "--threads", "1", "--no-simulate",
           "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    q = res["sizes_q"]["4"]
    assert [(b["label"], b["bits"]) for b in res["budgets"]] == [("q4 100 %", 4), ("q4 50 %", 4)]
    kv = q["kv_per_token"] * kv_tokens(res["prompt_tokens"], res["new_tokens"] + 1)  # the run's KV cache
    assert kv > 0 and res["budgets"][0]["memory"] == q["backbone"] + q["experts"] + kv
    assert res["budgets"][1]["memory"] == q["backbone"] + q["experts"] // 2 + kv
    assert q["experts"] < res["sizes"]["experts"] / 2  # 4-bit experts (page-rounded) against the 16-bit sizes
    assert not list((tmp_path / "cache").rglob("store-float16"))  # no 16-bit store was needed
    assert [r["config"] for r in res["rows"]] == ["us-lru-q4", "us-lru-q4"] and all(r["ok"] for r in res["rows"])
    assert res["limits"]["per_budget"]["q4 50 %"]["bits"] == 4
    assert res["machine"]["flags"]["avx2"] == cpuinfo.machine_info()["flags"]["avx2"]
    assert res["quantize"]["4"]["bf16_expert_bytes_per_s"] > 0
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| q4 50 % | us-lru-q4 |" in md and "CPU: " in md and "Budgets prefixed q4" in md
    # the limits of q4 budgets count the 4-bit store's bytes, and results.md says so (it said "float16 bytes")
    touched4 = res["limits"]["per_budget"]["q4 100 %"]["touched_bytes_per_token"]
    assert touched4 < res["limits"]["touched_bytes_per_token"] and f"(4-bit: {touched4 / 2**20:.1f} MiB)" in md
    assert "float16 bytes" not in md
