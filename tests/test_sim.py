"""Trace simulator: hit counts and times computed by hand on a 4-token trace, trace files, profiles, CLI."""

import json

import numpy as np
import pytest

from moe_offload.cli import main
from moe_offload.errors import MoeError, UsageError
from moe_offload.sim import (PROFILES, HardwareProfile, Trace, get_profile, load_trace, measure_disk_read,
                             save_trace, simulate, synthetic_trace)

# 2 MoE layers, 4 experts, top-1. Accesses in order: (0,0) (1,1) | (0,0) (1,2) | (0,1) (1,1) | (0,0) (1,1)
TOKENS = [[[0], [1]], [[0], [2]], [[1], [1]], [[0], [1]]]


def toy_trace(**kw):
    return Trace(experts=TOKENS, n_experts=4, expert_bytes=100, backbone_bytes=50, **kw)


# bytes/s chosen so times are round: device 1000 B/s, link 100 B/s, disk 10 B/s, CPU 50 B/s, no latency
TOY = HardwareProfile(name="toy", description="", device="cuda", device_bytes=10**6, host_bytes=10**6,
                      link_bw=100, host_bw=1, disk_bw=10, device_bw=1000, cpu_bw=50, cpu_flops=1,
                      device_flops=1, link_latency_s=0, disk_latency_s=0)


@pytest.mark.parametrize("policy", ["lru", "lru-global"])
def test_lru_hits_and_time_by_hand(policy):
    # memory 250 = backbone 50 + room for 2 experts of 100.
    # t0: (0,0) miss, (1,1) miss | t1: (0,0) hit, (1,2) miss evicts (1,1) | t2: (0,1) miss evicts (0,0),
    # (1,1) miss evicts (1,2) | t3: (0,0) miss evicts (0,1), (1,1) hit  -> 2 hits, 6 misses (both LRUs agree)
    r = simulate(toy_trace(), TOY, memory=250, policy=policy)
    assert (r.hits, r.misses, r.accesses, r.disk_reads) == (2, 6, 8, 0)
    assert r.expert_capacity == 200
    # device: 4 tokens x 50 backbone + 8 uses x 100 = 1000 bytes at 1000 B/s = 1 s; link: 6 x 100 / 100 = 6 s
    assert r.t_device == pytest.approx(1.0) and r.t_link == pytest.approx(6.0) and r.t_disk == 0
    assert r.tok_s_serial == pytest.approx(4 / 7)  # no prefetch: 1 + 6 s
    assert r.tok_s_overlap == pytest.approx(4 / 6)  # transfers hidden: max(1, 6) s
    assert r.bound == "link"


def test_token_overhead_adds_to_device_time_per_token():
    from dataclasses import replace

    r = simulate(toy_trace(), replace(TOY, token_overhead_s=0.25), memory=250, policy="lru")
    assert r.t_device == pytest.approx(1.0 + 4 * 0.25)  # 4 tokens x 0.25 s beside the 1 s of bytes


def test_toy_architecture_keeps_layers_heads_and_experts_and_times_a_decode_step():
    from moe_offload.sim import _toy_config, measure_token_overhead
    from tests import tiny

    cfg = tiny.hf_config("qwen2_moe_shared_dense").to_dict()
    toy = _toy_config(cfg)
    for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "num_experts", "num_experts_per_tok"):
        assert toy[k] == cfg[k]
    assert toy["intermediate_size"] == toy["moe_intermediate_size"] == 64 and toy["vocab_size"] == 512
    assert 0 < measure_token_overhead(cfg, "float32", tokens=3, context=4) < 5


def test_lfu_and_opt_by_hand():
    # LFU: t1 (1,2) evicts (1,1) (count 1 < (0,0)'s 2); t2 (0,1) evicts (1,2) (count 1 < 2), then (1,1)
    # evicts (0,1) (count 1 < 2) -> t3 hits (0,0) and (1,1): 3 hits
    assert simulate(toy_trace(), TOY, memory=250, policy="lfu").hits == 3
    # Belady with bypass: (1,2) and (0,1) are never used again, so they are streamed, not cached: 4 hits
    r = simulate(toy_trace(), TOY, memory=250, policy="opt")
    assert (r.hits, r.misses) == (4, 4)
    assert r.t_link == pytest.approx(4.0)


def test_warmup_is_subtracted():
    # warm-up = t0 (2 misses): 3 tokens left with 2 hits and 4 misses
    r = simulate(toy_trace(), TOY, memory=250, policy="lru-global", warmup=1)
    assert (r.tokens, r.hits, r.misses) == (3, 2, 4)
    assert r.t_device == pytest.approx((3 * 50 + 6 * 100) / 1000)
    assert r.time_serial == pytest.approx(0.75 + 4.0)


def test_disk_reads_when_device_plus_host_cannot_hold_all_experts():
    # 8 experts x 100 = 800 bytes > device 200 + host 100: device + host behave as one LRU of 300 bytes.
    # Global LRU of 3 over (0,0) (1,1) (0,0) (1,2) (0,1) (1,1) (0,0) (1,1): hits (0,0)@t1 and (1,1)@t3 -> 6 reads
    r = simulate(toy_trace(), TOY, memory=250, host_memory=100, policy="lru-global")
    assert (r.hits, r.misses, r.disk_reads, r.disk_bytes) == (2, 6, 6, 600)
    assert r.t_disk == pytest.approx(600 / 10)
    assert r.time_serial == pytest.approx(1 + 6 + 60)
    # with room for all 8 in device + host nothing is read from disk while decoding
    assert simulate(toy_trace(), TOY, memory=250, host_memory=600, policy="lru-global").disk_reads == 0


def test_cpu_misses_pin_the_hottest_experts():
    # uses: (0,0) x3, (1,1) x3, (1,2) x1, (0,1) x1 -> pin (0,0) and (1,1): 6 hits; the 2 misses run on the CPU
    r = simulate(toy_trace(), TOY, memory=250, cpu_misses=True)
    assert (r.hits, r.misses, r.link_bytes) == (6, 2, 0)
    assert r.t_device == pytest.approx((4 * 50 + 6 * 100) / 1000)
    assert r.t_cpu == pytest.approx(2 * 100 / 50)
    assert r.time_overlap == pytest.approx(4.0)


def test_cpu_only_profile_reads_misses_from_disk_and_expands_low_bits():
    cpu = HardwareProfile(name="cpu", description="", device="cpu", device_bytes=10**6, host_bytes=0, link_bw=0,
                          host_bw=1, disk_bw=10, device_bw=1000, cpu_bw=1000, cpu_flops=1, device_flops=1,
                          link_latency_s=0, disk_latency_s=0)
    r = simulate(toy_trace(), cpu, memory=250, policy="lru-global")
    assert (r.hits, r.misses, r.disk_reads, r.link_bytes, r.t_link) == (2, 6, 6, 0, 0)
    assert r.t_disk == pytest.approx(6 * 100 / 10)
    # experts of 64 weights: 2-bit g64 = 16 + 4 = 20 bytes on disk, 4-bit = 32 + 4 = 36 bytes in RAM and read by
    # the GEMV. memory 50 + 72 holds two 4-bit experts -> same 2 hits / 6 misses as above
    r2 = simulate(toy_trace(expert_params=64), cpu, memory=50 + 72, policy="lru-global", expert_bits=2)
    assert (r2.hits, r2.misses, r2.disk_bytes) == (2, 6, 6 * 20)
    assert r2.t_device == pytest.approx((4 * 50 + 8 * 36) / 1000)
    with pytest.raises(UsageError, match="CPU-only"):
        simulate(toy_trace(), cpu, memory=250, host_memory=100)


def test_refusals_carry_numbers():
    with pytest.raises(MoeError, match="backbone alone is"):
        simulate(toy_trace(), TOY, memory=40)
    with pytest.raises(UsageError, match="unknown cache policy"):
        simulate(toy_trace(), TOY, memory=250, policy="fifo")
    with pytest.raises(UsageError, match="expert_params"):
        simulate(toy_trace(), TOY, memory=250, expert_bits=4)


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_trace_roundtrip(tmp_path, suffix):
    tr = Trace(experts=TOKENS, n_experts=4, expert_bytes=[[100, 110, 120, 130], [200, 210, 220, 230]],
               layers=[1, 3], n_layers=4, expert_params=64, backbone_bytes=50, kv_bytes_per_token=8,
               predicted=[[[0, 1], [1, 2]]] * 4, meta={"model": "toy"})
    back = load_trace(save_trace(tmp_path / f"t{suffix}", tr))
    assert np.array_equal(back.experts, tr.experts) and np.array_equal(back.predicted, tr.predicted)
    assert np.array_equal(back.expert_bytes, tr.expert_bytes)
    assert (back.layers, back.n_layers, back.top_k, back.tokens) == ([1, 3], 4, 1, 4)
    assert (back.expert_params, back.backbone_bytes, back.kv_bytes_per_token, back.meta) == (64, 50, 8, {"model": "toy"})
    assert back.entries()[:2] == [[(1, 0)], [(3, 1)]]
    assert back.size_fn()((3, 2)) == 220


def test_trace_validation(tmp_path):
    with pytest.raises(MoeError, match="outside 0..3"):
        Trace(experts=[[[4]]], n_experts=4, expert_bytes=1)
    with pytest.raises(MoeError, match="expert_bytes"):
        Trace(experts=[[[0]]], n_experts=4, expert_bytes=[1, 2])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else", "experts": [], "expert_bytes": 1}))
    with pytest.raises(MoeError, match="not a routing trace"):
        load_trace(bad)
    with pytest.raises(UsageError, match="suffix"):
        save_trace(tmp_path / "t.txt", toy_trace())


def test_predictor_recall_and_synthetic_trace():
    # predicted vs used: t0 0/0 1/1, t1 1/0 1/2, t2 1/1 1/1, t3 3/0 3/1 -> 4 of 8 uses predicted
    pred = [[[0], [1]], [[1], [1]], [[1], [1]], [[3], [3]]]
    assert simulate(toy_trace(predicted=pred), TOY, memory=250).prefetch_recall == 0.5
    s = synthetic_trace(50, [0, 2], 16, 4, expert_bytes=10, zipf_s=1.0, seed=1)
    assert s.experts.shape == (50, 2, 4) and s.n_layers == 3
    assert all(len(set(row)) == 4 for row in s.experts.reshape(-1, 4).tolist())  # distinct per token


def test_profiles_and_bad_name():
    assert {"rtx3060-12gb", "t4-16gb", "rtx4090-24gb", "laptop-16gb-cpu"} <= set(PROFILES)
    p = PROFILES["rtx3060-12gb"]
    assert p.device_bytes == 12 * 2**30 and p.device_bw == 360e9 and p.link_bw == pytest.approx(0.8 * 31.5e9)
    assert PROFILES["t4-16gb"].link_bw == pytest.approx(0.8 * 15.75e9)
    assert PROFILES["laptop-16gb-cpu"].host_bytes == 0
    with pytest.raises(UsageError, match="unknown hardware profile 'nope'"):
        get_profile("nope")


def test_cli_list_and_errors(capsys, tmp_path):
    assert main(["simulate", "--hardware", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in (*PROFILES, "this-machine"))
    path = save_trace(tmp_path / "t.json", toy_trace())
    assert main(["simulate", "--hardware", "nope", "--trace", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown hardware profile 'nope'" in err
    assert main(["simulate", "--hardware", "t4-16gb", "--trace", str(tmp_path / "missing.json")]) == 2
    capsys.readouterr()
    assert main(["simulate", "--hardware", "this-machine", "--trace", str(path), "--read-streams", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--read-streams and --threads must be >= 1" in err


def test_cli_json_matches_hand_count(capsys, tmp_path):
    path = save_trace(tmp_path / "t.npz", toy_trace())
    assert main(["simulate", "--hardware", "rtx3060-12gb", "--trace", str(path), "--memory", "250",
                 "--cache-policy", "lru-global", "--warmup", "0", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["hits"], d["misses"], d["hit_rate"]) == (2, 6, 0.25)
    assert d["link_bytes"] == 600 and d["t_link"] == pytest.approx(600 / (0.8 * 31.5e9) + 6 * 10e-6)


def test_disk_measurement_is_positive(tmp_path):
    bw, method = measure_disk_read(str(tmp_path), nbytes=4 << 20, chunk=1 << 20)
    assert bw > 0 and method.startswith(("O_DIRECT", "buffered after POSIX_FADV_DONTNEED"))
    bw, method = measure_disk_read(str(tmp_path), nbytes=4 << 20, chunk=(1 << 20) + 100, streams=2)
    assert bw > 0 and method.endswith("1.0 MiB reads x2 in flight")  # rounded up to whole pages
    assert not list(tmp_path.iterdir())  # the temp file is gone


def test_toy_of_a_model_with_a_set_head_size_keeps_its_projections_small():
    """The overhead probe times the toy's ops, not its weights: Qwen3-30B-A3B's toy (head_dim 128, 32 heads) had
    hidden 256, so q and o were 256 x 4096 (2 MiB each at 16 bits) and streaming them was half the "overhead"."""
    from moe_offload.models.known import QWEN3_30B_A3B
    from moe_offload.sim import _toy_config

    toy = _toy_config(QWEN3_30B_A3B)
    assert toy["head_dim"] == 128 and toy["num_attention_heads"] == 32 and toy["num_key_value_heads"] == 4
    assert toy["hidden_size"] * toy["num_attention_heads"] * toy["head_dim"] <= 1 << 16
