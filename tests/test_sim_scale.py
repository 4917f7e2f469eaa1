"""The time model's real-width terms (an expert call timed through the engine's unit, the embedding table not
streamed, the engine's exact expert bytes) by hand on the 4-token toy trace, and scripts/validate_scale.py's
arithmetic on a small bench folder."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from moe_offload.sim import HardwareProfile, Trace, calibrate, save_trace, simulate

# 2 MoE layers, 4 experts, top-1: with room for 2 experts of 100 bytes, LRU gives 2 hits and 6 misses
# (tests/test_sim.py works it through)
TOKENS = [[[0], [1]], [[0], [2]], [[1], [1]], [[0], [1]]]
CPU = HardwareProfile(name="cpu", description="", device="cpu", device_bytes=10**6, host_bytes=0, link_bw=0,
                      host_bw=1, disk_bw=10, device_bw=1000, cpu_bw=1000, cpu_flops=1, device_flops=1,
                      link_latency_s=0, disk_latency_s=0)


def load_script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "validate_scale.py"
    spec = importlib.util.spec_from_file_location("validate_scale", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_expert_calls_and_the_embedding_table_by_hand():
    from dataclasses import replace

    tr = Trace(experts=TOKENS, n_experts=4, expert_bytes=100, backbone_bytes=50)
    r = simulate(tr, replace(CPU, expert_call_s=0.5), memory=250, policy="lru", embed_bytes=20)
    assert (r.hits, r.misses) == (2, 6)
    # per token 30 backbone bytes read (50 - the 20-byte table) at 1000 B/s; 8 expert uses x 0.5 s; 6 misses x 10 s
    assert r.backbone_read_bytes == 30 and r.t_experts == pytest.approx(4.0)
    assert r.t_device == pytest.approx(4 * 30 / 1000 + 4.0) and r.t_disk == pytest.approx(60.0)
    # without a call time the uses are bytes at device_bw, as before
    assert simulate(tr, CPU, memory=250, policy="lru").t_experts == pytest.approx(8 * 100 / 1000)
    # decoding each missed blob into its unit: on the miss path, with the read
    r = simulate(tr, replace(CPU, miss_cpu_s=2.0), memory=250, policy="lru")
    assert r.t_disk == pytest.approx(60.0 + 6 * 2.0) and r.tok_s_serial == pytest.approx(4 / (r.t_device + 72.0))


def test_exact_engine_bytes_override_the_formula():
    # 64 weights at 4-bit: formula 36 bytes; say the engine stores 40 and holds 60 -> room for 2 of 60 at 50 + 120
    tr = Trace(experts=TOKENS, n_experts=4, expert_bytes=1, backbone_bytes=50, expert_params=64)
    r = simulate(tr, CPU, memory=50 + 120, policy="lru", expert_bits=4, stored_bytes=40, computed_bytes_each=60)
    assert (r.hits, r.misses, r.disk_bytes) == (2, 6, 6 * 40)
    assert r.t_device == pytest.approx((4 * 50 + 8 * 60) / 1000)
    r = simulate(tr, CPU, memory=50 + 119, policy="lru", expert_bits=4, stored_bytes=40, computed_bytes_each=60)
    assert r.hits == 0  # one expert's room only: every use misses


def test_compare_and_figures_scaled_to_the_run():
    v = load_script()
    assert v.compare(1.30, 1.02)["within"] is False and v.compare(1.30, 1.02)["ratio"] == pytest.approx(1.02 / 1.30)
    assert v.compare(4.90, 5.08)["within"] is True and v.compare(None, 1.0)["within"] is None
    limits = {"gemv_bw": 10e9, "disk_read_bw_by_method": {v.DISK_KEY: 2e9, "O_DIRECT 4 x 8 MiB reads in flight": 1.5e9,
                                                           "buffered 8 MiB reads (readahead)": 3e9}}
    now = {"gemv_bw": 5e9, "expert_call_s": 0.04, "token_overhead_s": 0.01, "miss_cpu_s": 0.06}
    f = v.run_figures(limits, now)  # the machine is half as fast now: the run's times are half of now's
    assert f["expert_call_s"] == pytest.approx(0.02) and f["token_overhead_s"] == pytest.approx(0.005)
    assert f["miss_cpu_s"] == pytest.approx(0.03)
    assert f["basis"]["expert_call_s"] == "now x 0.50"
    assert f["disk_bw"] == 1.5e9  # the loader's reads are concurrent: the run's probe with reads in flight
    del limits["disk_read_bw_by_method"]["O_DIRECT 4 x 8 MiB reads in flight"]
    assert v.run_figures(limits, now)["disk_bw"] == 2e9
    rec = v.run_figures({**limits, "expert_call_s": 0.03, "token_overhead_s": 0.002, "disk_loader_bw": 1e9}, None)
    assert (rec["expert_call_s"], rec["token_overhead_s"], rec["disk_bw"]) == (0.03, 0.002, 1e9)


TINY = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 128,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 100, "num_local_experts": 2, "num_experts_per_tok": 2, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False}


def bench_folder(tmp_path: Path) -> Path:
    """A bench --out folder: one 16-bit us row with every expert in memory, its figures recorded in limits."""
    expert, backbone, embed = 1000, 5000, 2000
    # token 0 (the warm-up) loads all 4 experts; tokens 1..3 hit them all: 4 uses per token
    experts = np.tile(np.array([[0, 1], [1, 0]]), (4, 1, 1))
    save_trace(tmp_path / "trace-round1.npz",
               Trace(experts=experts, n_experts=2, expert_bytes=expert, backbone_bytes=backbone, n_layers=2,
                     meta={"warmup_tokens": 1, "config": TINY}))
    sizes = {"backbone": backbone, "embed": embed, "expert": expert}
    res = {"dtype": "float16", "threads": 1, "sizes": sizes, "sizes_q": {},
           "limits": {"gemv_bw": 1e6, "expert_call_s": 0.01, "token_overhead_s": 0.002, "disk_loader_bw": 1e5},
           "rows": [{"system": "us", "ok": True, "label": "100 %", "config": "us-lru", "expert_bits": 16,
                     "memory": backbone + 4 * expert, "policy": "lru", "info": {"prefetch": "none"},
                     "summary": {"decode_tok_s": {"median": 20.0}, "hit_rate": 1.0}},
                    {"system": "us", "ok": False, "label": "50 %", "config": "us-lru", "error": "OOM-killed"},
                    {"system": "llamacpp", "ok": True, "label": "100 %"}]}
    (tmp_path / "results.json").write_text(json.dumps(res))
    return tmp_path


def test_validation_script_arithmetic_on_a_small_bench_folder(tmp_path, capsys):
    v = load_script()
    rows = v.validate(bench_folder(tmp_path), None, probe=False, cache={})
    assert [r["label"] for r in rows] == ["100 %", "50 %"]  # our rows only; the failed one listed, not predicted
    r = rows[0]
    # per token: (5000 - 2000) bytes / 1e6 B/s = 3 ms + 2 ms overhead + 4 calls x 10 ms = 45 ms -> 22.22 tok/s
    assert r["predicted_hit_rate"] == 1.0 and r["ms_disk"] == 0
    assert r["predicted_tok_s"] == pytest.approx(1 / 0.045)
    assert r["ratio"] == pytest.approx(20.0 * 0.045) and r["within"] is True
    assert rows[1]["predicted_tok_s"] is None and "OOM" in rows[1]["note"]
    assert v.main([str(tmp_path), "--no-probe", "--json", str(tmp_path / "v.json")]) == 0
    out = capsys.readouterr().out
    assert "| 100 % | 22.22 | 20.00 | 0.90 | yes |" in out
    assert json.loads((tmp_path / "v.json").read_text())[0]["predicted_tok_s"] == pytest.approx(1 / 0.045)
    assert v.main([str(tmp_path / "missing")]) == 2


def test_calibrate_times_a_4_bit_expert_call_through_the_engine_unit():
    import torch

    torch.set_num_threads(1)
    hw, embed = calibrate(CPU, TINY, "float32", bits=4)
    assert embed == 100 * 128 * 4  # the table in the compute dtype
    assert 0 < hw.expert_call_s < 1 and 0 < hw.token_overhead_s < 5 and 0 < hw.miss_cpu_s < 1
    assert "4-bit expert call at D=128 I=64" in hw.sources


def test_validation_without_a_term_is_the_older_model(tmp_path):
    v = load_script()
    folder = bench_folder(tmp_path)
    # without the expert call: 4 uses x 1000 bytes at 1e6 B/s = 4 ms instead of 40; without embed: 5 ms of backbone
    r = v.validate(folder, None, probe=False, cache={}, without={"expert-call", "embed"})[0]
    assert r["predicted_tok_s"] == pytest.approx(1 / (0.005 + 0.002 + 0.004))
    assert v.main([str(folder), "--no-probe", "--without", "nope"]) == 2


def test_model_probes_are_what_validate_scale_reads_from_a_run(tmp_path):
    import torch

    from moe_offload.sim import model_probes

    torch.set_num_threads(1)
    probes = model_probes(TINY, 4, "float32")
    assert set(probes) == {"expert_call_s", "miss_cpu_s", "token_overhead_s"} and all(v > 0 for v in probes.values())
    v = load_script()
    f = v.run_figures({"gemv_bw": 1e9, **probes}, None)
    assert all(f["basis"][k] == "run" for k in probes) and f["miss_cpu_s"] == probes["miss_cpu_s"]


def test_a_primed_replay_starts_as_warm_as_the_run():
    # every expert fits (memory 50 + 8 x 100): cold, the first use of each of the 4 (layer, expert) keys misses
    tr = Trace(experts=TOKENS, n_experts=4, expert_bytes=100, backbone_bytes=50)
    cold = simulate(tr, CPU, memory=850, policy="lru")
    assert (cold.hits, cold.misses) == (4, 4)
    # primed with routing the run did before the recorded tokens (its prefill): nothing left to miss
    warm = simulate(tr, CPU, memory=850, policy="lru", prime=[[[1], [2]], [[0], [1]]])
    assert (warm.hits, warm.misses, warm.tokens) == (8, 0, 4) and warm.t_disk == 0
    # under a tight budget the prime is exactly a prefix: the same counts as the doubled trace after T tokens
    doubled = Trace(experts=TOKENS + TOKENS, n_experts=4, expert_bytes=100, backbone_bytes=50)
    ref = simulate(doubled, CPU, memory=250, policy="lru", warmup=4)
    got = simulate(tr, CPU, memory=250, policy="lru", prime=TOKENS)
    assert (got.hits, got.misses, got.disk_bytes) == (ref.hits, ref.misses, ref.disk_bytes)
    assert got.hits != simulate(tr, CPU, memory=250, policy="lru").hits  # the prime changed the state
    with pytest.raises(Exception, match="expert ids"):
        simulate(tr, CPU, memory=850, prime=[[[9], [0]]])


def test_the_cpu_share_scaling_ignores_the_gemv_ratio():
    v = load_script()
    now = {"gemv_bw": 5e9, "expert_call_s": 0.04, "token_overhead_s": 0.01, "miss_cpu_s": 0.06, "cpu_cores": 2.0}
    # the run's own GEMV probe (10 or 2 GB/s: a loaded moment) no longer scales the per-token overhead
    a = v.run_figures({"gemv_bw": 10e9}, now, "cpu-share", row_cores=1.0)
    b = v.run_figures({"gemv_bw": 2e9}, now, "cpu-share", row_cores=1.0)
    assert a["token_overhead_s"] == b["token_overhead_s"] == pytest.approx(0.02)  # half the cores: twice the time
    assert a["expert_call_s"] == pytest.approx(0.08) and a["miss_cpu_s"] == pytest.approx(0.12)
    assert a["gemv_bw"] == pytest.approx(2.5e9) and a["basis"]["token_overhead_s"] == "now x 2.00 cores now/row"
    # the earlier model, kept as the ablation: times x the GEMV ratio
    g = v.run_figures({"gemv_bw": 10e9}, now, "gemv", row_cores=1.0)
    assert g["token_overhead_s"] == pytest.approx(0.005) and g["gemv_bw"] == 10e9
    # unknown share (an older bench row): the GEMV ratio, said so
    assert v.run_figures({"gemv_bw": 10e9}, now, "cpu-share", row_cores=None)["basis"]["expert_call_s"] == "now x 0.50"
    assert v.cpu_share_factor(1.0, 0.5) == 2.0 and v.cpu_share_factor(None, 1.0) is None


def test_validation_replays_warm_by_default(tmp_path):
    v = load_script()
    folder = bench_folder(tmp_path)
    # the warm-up token uses experts (0, 1) of layer 0 only; the measured tokens use both layers' 4 keys, which the
    # run's prefill had made resident (measured hit rate 1.0): a cold replay misses 2 of them
    experts = np.array([[[0, 1], [0, 1]], [[0, 1], [1, 0]], [[1, 0], [1, 0]], [[0, 1], [0, 1]]])
    experts[0, 1] = [0, 0]  # layer 1 of the warm-up token: expert 0 only (top-2 of one expert: one key)
    save_trace(folder / "trace-round1.npz",
               Trace(experts=experts, n_experts=2, expert_bytes=1000, backbone_bytes=5000, n_layers=2,
                     meta={"warmup_tokens": 1, "config": TINY}))
    warm = v.validate(folder, None, probe=False, cache={})[0]
    cold = v.validate(folder, None, probe=False, cache={}, without={"warm"})[0]
    assert warm["predicted_hit_rate"] == 1.0 == warm["measured_hit_rate"]
    assert cold["predicted_hit_rate"] == pytest.approx(11 / 12)  # 12 uses after the warm-up, layer 1's expert 1 missed


def test_the_runs_codec_is_told_by_its_stored_bytes():
    # the probe of a miss's decode must time the codec the run stored (8-bit scales/zeros expand on decode;
    # the later 16-bit default hardly costs): the bench's sizes count the 4096-aligned blob
    v = load_script()
    assert v.run_meta_bits(4096, 14336, 4, 93_929_472) == 8  # Mixtral-8x7B's expert in the real-width runs
    assert v.run_meta_bits(4096, 14336, 4, 99_090_432) == 16
    assert v.run_meta_bits(2048, 768, 4, 2_519_040) == 8  # Qwen3-30B-A3B's: 2,515,968 bytes, aligned up
    assert v.run_meta_bits(2048, 768, 4, 12345) is None and v.run_meta_bits(2048, 768, 16, 2_519_040) is None


def test_a_trace_with_the_prefills_routing_is_not_primed_again():
    v = load_script()
    tr = Trace(experts=TOKENS, n_experts=4, expert_bytes=100, meta={"prefill_rows": 2})
    assert v.prime_rows(tr, "trace") is None
    assert v.prime_rows(Trace(experts=TOKENS, n_experts=4, expert_bytes=100), "trace").shape == (4, 2, 1)
    assert v.prime_rows(Trace(experts=TOKENS, n_experts=4, expert_bytes=100), "none") is None


def test_a_preloaded_replay_misses_nothing_when_every_expert_fits():
    """The engine's --preload reads every expert at load (auto: when the budget holds them all); the replay of
    such a run starts with every expert resident, so a first use is a hit, as it was in the run."""
    tr = Trace(experts=TOKENS, n_experts=4, expert_bytes=100, backbone_bytes=50)
    cold = simulate(tr, CPU, memory=850, policy="lru")
    pre = simulate(tr, CPU, memory=850, policy="lru", preload=True)
    assert (cold.hits, cold.misses) == (4, 4) and (pre.hits, pre.misses, pre.tokens) == (8, 0, 4)
    assert pre.t_disk == 0 and pre.tok_s_serial > cold.tok_s_serial
    tight = simulate(tr, CPU, memory=250, policy="lru", preload=True)  # 2 of 8 fit: the preload is evicted
    assert tight.misses > 0
