"""The planner at real scale: full Mixtral-8x7B and Qwen3-30B-A3B by name (config only, no weights), on a fixed
16 GiB CPU-only profile with fixed timings, so every choice and figure is worked out by hand here; the
engine's expert bytes; the quantize-time estimate."""

import json
from dataclasses import replace

import pytest

from moe_offload.cli import main
from moe_offload.costmodel import quant_bytes
from moe_offload.plan import (PlanRefused, engine_expert_bytes, known_configs, make_plan, model_sizes,
                              quantize_rate, quantize_seconds, read_model_config, resolve_hardware)
from moe_offload.sim import PROFILES

GiB = 2**30
# the fixed machine: 16 GiB RAM (2 GiB reserve), GEMV 10 GB/s, disk 2 GB/s, fixed costs per expert call and token
CPU16 = replace(PROFILES["laptop-16gb-cpu"], device_bw=10e9, cpu_bw=10e9, disk_bw=2e9, disk_latency_s=0.0,
                expert_call_s=0.05, token_overhead_s=0.01)
# Mixtral-8x7B's expert (4096 x 14336) at 4-bit g64 as a store with 8-bit meta (the default before 16-bit meta)
# held it, a footprint the planner is handed here: 93,929,472 bytes stored (codes
# 88,080,384 + 8-bit scales/zeros, page-rounded: the bench's sizes_q), 104,939,520 in the CPU cache (+ bf16
# scales and zeros, 4 bytes per group of 64: 11,010,048); 2/3-bit are expanded to 4-bit nibbles on a CPU
MIXTRAL_4BIT = (93_929_472, 104_939_520)


def mixtral_footprint(bits):
    return {4: MIXTRAL_4BIT, 3: (71_909_376, 99_090_432), 2: (49_889_280, 99_090_432)}.get(bits)


def test_known_names_are_the_full_configs_without_weights():
    assert set(known_configs()) >= {"mixtral-8x7b", "qwen3-30b-a3b", "mixtral-8x7b-L4", "qwen3-30b-a3b-L8"}
    m, name = read_model_config("mixtral-8x7b")
    assert name == "mixtral-8x7b" and m["num_hidden_layers"] == 32 and m["intermediate_size"] == 14336
    q, _ = read_model_config("Qwen3-30B-A3B")
    assert q["num_hidden_layers"] == 48 and q["num_experts"] == 128 and q["moe_intermediate_size"] == 768
    assert read_model_config("qwen3-30b-a3b-L8")[0]["num_hidden_layers"] == 8
    s = model_sizes(m)
    assert s.n_routed == 256 and s.expert_params == 3 * 4096 * 14336 and s.total_params == 46_702_792_704
    s = model_sizes(q)
    assert s.n_routed == 48 * 128 and s.expert_params == 3 * 2048 * 768


def test_full_mixtral_on_16gib_cpu_streams_4_bit_experts_by_hand():
    s = model_sizes(read_model_config("mixtral-8x7b")[0])
    embed = 32000 * 4096 * 2
    p = make_plan(s, CPU16, model="mixtral-8x7b", min_bits=4, footprint=mixtral_footprint, embed_bytes=embed,
                  trace_tokens=16, warmup=4)
    usable = 16 * GiB - 2 * GiB
    kv = 131_072 * 4096  # 32 layers x 2 x 8 KV heads x 128 x 2 bytes per token
    # the 4-bit experts do not fit whole even beside a 4-bit backbone, so the backbone is held at 4 bits
    # (attention and lm_head; embeddings, norms, routers 16-bit) and its bytes go to the expert cache
    D, L, V = 4096, 32, 32000
    attn, fixed = D * D + 2 * D * 1024 + D * D, L * (8 * D + 2 * D) + D + 2 * V * D
    assert 2 * (L * attn + fixed) == 2 * 1_605_636_096  # at 16 bits
    backbone = quant_bytes(L * attn, 4) + quant_bytes(V * D, 4) + 2 * (fixed - V * D)
    assert backbone == 1_093_476_352
    dev_free = usable - backbone - kv
    assert dev_free == 13_402_038_272
    assert p.feasible and p.expert_bits == 4 and p.backbone_bits == 4
    assert any("--attn-bits 4 --head-bits 4" in n for n in p.notes)
    r = p.row
    assert (r.expert_bytes, r.resident_bytes) == MIXTRAL_4BIT
    assert r.on_device == dev_free // 104_939_520 == 127 and r.on_disk == 256 - 127
    assert p.memory == backbone + 127 * 104_939_520
    assert any("stream from disk at 4-bit" in n for n in p.notes)
    # the time model, by hand from the replay's counts
    q = p.prediction
    assert q.backbone_read_bytes == backbone - embed
    assert q.t_experts == pytest.approx(q.accesses * 0.05)
    per_token = (backbone - embed + kv) / 10e9 + 0.01
    assert q.t_device == pytest.approx(q.tokens * per_token + q.accesses * 0.05)
    assert q.disk_bytes == q.misses * 93_929_472 and q.t_disk == pytest.approx(q.disk_bytes / 2e9)
    assert q.tok_s_serial == pytest.approx(q.tokens / (q.t_device + q.t_disk))
    # deterministic: the same plan twice
    p2 = make_plan(s, CPU16, model="mixtral-8x7b", min_bits=4, footprint=mixtral_footprint, embed_bytes=embed,
                   trace_tokens=16, warmup=4)
    assert p2.prediction.to_dict() == q.to_dict()


def test_the_engines_footprint_holds_fewer_experts_than_the_formula():
    s = model_sizes(read_model_config("mixtral-8x7b")[0])
    formula = make_plan(s, CPU16, min_bits=4, predict=False)
    exact = make_plan(s, CPU16, min_bits=4, predict=False, footprint=mixtral_footprint)
    assert formula.row.resident_bytes == 99_090_432 and formula.row.on_device == 135
    assert exact.row.on_device == 127  # a footprint of 1.12x the stored bytes (8-bit meta): 8 fewer experts fit


def test_engine_expert_bytes_from_the_codec():
    stored, resident = engine_expert_bytes(4096, 14336, 4)
    # the default 4-bit codec (16-bit meta): the span the formula counts, and the cached unit is a view of it
    assert stored == resident == 99_090_432
    assert engine_expert_bytes(4096, 14336, 16) is None and engine_expert_bytes(4096, 14336, 8) is None


def test_full_qwen3_on_16gib_cpu_and_its_384_expert_calls_per_token():
    s = model_sizes(read_model_config("qwen3-30b-a3b")[0])
    p = make_plan(s, CPU16, model="qwen3-30b-a3b", min_bits=4, trace_tokens=8, warmup=2)
    assert p.expert_bits == 4 and p.backbone_bits == 4 and p.row.on_disk > 0
    assert p.prediction.accesses == 8 * 48 * 8  # 384 expert calls per token, each costs expert_call_s
    assert p.prediction.t_experts == pytest.approx(8 * 384 * 0.05)


def test_refused_with_numbers_when_ram_is_below_the_backbone():
    for name, bb4 in (("mixtral-8x7b", "1.1 GB"), ("qwen3-30b-a3b", "1.3 GB")):  # lm_head at 4 bits too
        hw = resolve_hardware(CPU16, ram=3 * GiB)
        with pytest.raises(PlanRefused) as e:
            make_plan(model_sizes(read_model_config(name)[0]), hw, model=name)
        msg = str(e.value)
        assert f"backbone ({bb4} even at 4-bit)" in msg and "1.1 GB usable (3.2 GB RAM - 2.1 GB reserve)" in msg
        assert "\n" not in msg


def test_quantize_estimate_scales_with_the_models_expert_bytes():
    mix = model_sizes(read_model_config("mixtral-8x7b")[0])
    qwen = model_sizes(read_model_config("qwen3-30b-a3b")[0])
    rate = 44.9e6  # the bench's measured rtn rate (docs/benchmarks.md)
    assert quantize_seconds(mix, rate) == pytest.approx(2 * 45_097_156_608 / rate)  # ~33.5 min
    assert quantize_seconds(mix, rate) / quantize_seconds(qwen, rate) == pytest.approx(
        mix.routed_params / qwen.routed_params)
    l4 = model_sizes(read_model_config("mixtral-8x7b-L4")[0])
    assert quantize_seconds(mix, rate) == pytest.approx(8 * quantize_seconds(l4, rate))  # 32 vs 4 layers
    assert quantize_seconds(l4, rate, read_bw=2e9) == pytest.approx(l4.routed_params * 2 * (1 / rate + 1 / 2e9))


def test_quantize_rate_probe_is_quick_and_sized():
    import time

    t0 = time.perf_counter()
    r = quantize_rate(256, 640, 4, "rtn", budget_s=0.2)
    assert time.perf_counter() - t0 < 5
    assert r["rows"] % 64 == 0 and 64 <= r["rows"] <= 640 and r["bytes"] == 3 * 256 * r["rows"] * 2
    assert r["rate"] == pytest.approx(r["bytes"] / r["seconds"])


def test_cli_plan_by_name_on_a_profile(capsys):
    assert main(["plan", "--model", "mixtral-8x7b", "--hardware", "laptop-16gb-cpu", "--min-bits", "4",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == "mixtral-8x7b" and d["recommended"]["expert_bits"] == 4 and d["layers"] == 32
    row = next(r for r in d["rows"] if r["bits"] == 4)
    assert row["expert_bytes"] == 99_090_432 and row["on_device"] + row["on_disk"] == 256  # the default codec's span
    assert main(["plan", "--model", "no-such-model", "--hardware", "laptop-16gb-cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mixtral-8x7b" in err


def test_streamed_precision_by_predicted_decode():
    from moe_offload.plan import best_streamed

    s = model_sizes(read_model_config("mixtral-8x7b")[0])
    kw = dict(model="mixtral-8x7b", footprint=mixtral_footprint, trace_tokens=8, warmup=2)
    p = make_plan(s, CPU16, **kw)
    assert p.expert_bits == 2 and p.row.on_disk  # the rule: the fewest bytes per read
    # a 2-bit miss decodes its codes into int4 nibbles: at 1 s per miss against 0.03 s at 4-bit, 4-bit wins
    slow2 = {2: 1.0, 3: 1.0, 4: 0.03}
    best = best_streamed(p, s, kw, [4, 3, 2], lambda b: replace(CPU16, miss_cpu_s=slow2[b]))
    assert best.expert_bits == 4 and "-> 4-bit (the rule 'fewest bytes per read' alone gives 2-bit)" in best.notes[-1]
    # with decoding free, the fewer bytes read win and the plan is kept
    same = best_streamed(p, s, kw, [4, 3, 2], lambda b: CPU16)
    assert same.expert_bits == 2 and same.notes[-1].endswith("-> 2-bit")


def test_quantize_first_a_4_bit_backbone_lets_every_4_bit_expert_fit():
    """Mixtral-8x7B on a CPU with room for its 4-bit experts beside a 4-bit backbone (attention and lm_head),
    not beside a 16-bit one: the plan quantizes the backbone rather than stream experts from disk; with room
    for the 16-bit backbone as well it keeps that."""
    s = model_sizes(read_model_config("mixtral-8x7b")[0])
    kv = s.kv_bytes_per_token * 4096
    experts = 256 * s.expert_bytes(4)
    tight = s.backbone_bytes(4) + kv + experts + 10**8
    assert tight < s.backbone_bytes(16) + kv + experts
    hw = replace(CPU16, device_bytes=tight, device_reserve=0)
    p = make_plan(s, hw, min_bits=4, predict=False)
    assert (p.expert_bits, p.backbone_bits, p.row.on_disk) == (4, 4, 0)
    assert any("--attn-bits 4 --head-bits 4" in n for n in p.notes)
    roomy = replace(hw, device_bytes=s.backbone_bytes(16) + kv + experts + 10**8)
    p = make_plan(s, roomy, min_bits=4, predict=False)
    assert (p.expert_bits, p.backbone_bits, p.row.on_disk) == (4, 16, 0) and not p.notes
