"""bench: its arithmetic on fixed inputs, the GGUF export read back by the `gguf` package (and run by llama.cpp
when llama-cpp-python is installed), and a `bench --quick` smoke run in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from moe_offload import bench
from moe_offload.bench import Sizes, decode_limit, goal_rows, summarize, summarize_runs
from moe_offload.utils import drop_page_cache
from moe_offload.errors import UsageError
from tests import tiny

SIZES = Sizes(backbone=1000, embed=300, hidden=10, itemsize=2, expert=100, moe_layers=4, n_experts=8, top_k=2,
              kv_per_token=5)


# ---- arithmetic ---------------------------------------------------------------------------------------

def test_summarize_median_min_max():
    assert summarize([3, 1, 2]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert summarize([4, 1, 2, 10])["median"] == 3.0  # even count: mean of the middle two
    assert summarize([]) == {"median": None, "min": None, "max": None, "n": 0}


def test_ratio_and_budget():
    assert bench.ratio(6.0, 2.0) == 3.0
    assert bench.ratio(None, 2.0) is None and bench.ratio(1.0, 0.0) is None
    assert bench.budget_bytes(50, backbone=100, experts=1000) == 600
    assert bench.budget_bytes(25, backbone=100, experts=1000) == 350
    assert bench.budget_bytes(100, backbone=100, experts=1000) == 1100


def test_sizes_bytes_a_token_touches():
    assert SIZES.experts == 100 * 4 * 8
    assert SIZES.active_experts == 100 * 4 * 2
    # backbone less the embedding table plus one row of it, top-2 experts of 4 layers, KV of 10 tokens
    assert SIZES.touched_per_token(10) == 1000 - 300 + 10 * 2 + 800 + 5 * 10
    assert bench.miss_bytes_per_token(SIZES, 0.75) == pytest.approx(200.0)
    assert bench.miss_bytes_per_token(SIZES, 1.0) == 0.0


def test_decode_limit_from_bandwidths():
    lim = decode_limit(touched=1570, miss_bytes=400, ram_bw=1570, disk_bw=200)
    assert lim["t_ram_s"] == pytest.approx(1.0) and lim["t_disk_s"] == pytest.approx(2.0)
    assert lim["tok_s"] == pytest.approx(0.5)  # overlapped: the slower of the two
    assert lim["tok_s_serial"] == pytest.approx(1 / 3)
    assert lim["bound"] == "disk"
    fits = decode_limit(touched=3e9, miss_bytes=0, ram_bw=30e9, disk_bw=2e9)
    assert fits["tok_s"] == pytest.approx(10.0) and fits["tok_s_serial"] == pytest.approx(10.0)
    assert fits["bound"] == "RAM"


def test_summarize_runs_bytes_per_token_and_hit_rate():
    runs = [dict(prefill_tok_s=100, decode_tok_s=4, decode_s=2.5, decode_disk_read_bytes=800, hits=30, misses=10,
                 bytes_read_disk=1000, stall_seconds=0.5),
            dict(prefill_tok_s=300, decode_tok_s=6, decode_s=1.5, decode_disk_read_bytes=1200, hits=10, misses=30,
                 bytes_read_disk=3000, stall_seconds=1.5),
            dict(prefill_tok_s=200, decode_tok_s=5, decode_s=2.0, decode_disk_read_bytes=1000, hits=20, misses=20,
                 bytes_read_disk=2000, stall_seconds=1.0)]
    s = summarize_runs(runs, tokens=10)
    assert s["decode_tok_s"] == {"median": 5.0, "min": 4.0, "max": 6.0, "n": 3}
    assert s["prefill_tok_s"]["median"] == 200.0
    assert s["disk_bytes_per_token"] == pytest.approx(3000 / 30)
    assert s["hit_rate"] == pytest.approx(60 / 120)  # pooled over runs, not a mean of rates
    assert s["expert_bytes_per_token"] == pytest.approx(6000 / 30)
    assert s["stall_s_per_token"] == pytest.approx(3.0 / 30)
    assert s["disk_read_bw"] == pytest.approx(3000 / 6.0)  # bytes over decode seconds, pooled
    peer = summarize_runs([dict(prefill_tok_s=1, decode_tok_s=2, decode_s=2.0, decode_disk_read_bytes=None)], tokens=4)
    assert peer["disk_bytes_per_token"] is None and peer["disk_read_bw"] is None and "hit_rate" not in peer


def test_leading_agreement():
    assert bench.leading_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert bench.leading_agreement([1, 2], [1, 2, 3]) == 2
    assert bench.leading_agreement([5], [6]) == 0


def _row(label, pct, config, tok_s, ok=True):
    return {"label": label, "budget_pct": pct, "system": config.split("-")[0], "config": config, "ok": ok,
            "summary": {"decode_tok_s": {"median": tok_s}}}


def test_goal_rows_ratios_against_targets():
    rows = [_row("100 %", 100, "us-lru", 8.0), _row("100 %", 100, "llamacpp-f16", 10.0),
            _row("50 %", 50, "us-lru", 3.0), _row("50 %", 50, "llamacpp-f16", 0.5),
            _row("50 %", 50, "accelerate", 0.1), _row("50 %", 50, "hf-eager", 0.0, ok=False)]
    limits = {"per_budget": {"100 %": {"tok_s": 10.0}, "50 %": {"tok_s": 12.0}}}
    g = {(r["budget"], r["goal"]): r for r in goal_rows(rows, limits)}
    fits_llama = g[("100 %", "decode tok/s ÷ llama.cpp (same precision)")]
    assert fits_llama["measured"] == pytest.approx(0.8) and fits_llama["met"] is True
    assert g[("100 %", "decode tok/s ÷ RAM-bandwidth limit")]["measured"] == pytest.approx(0.8)
    assert g[("50 %", "decode tok/s ÷ llama.cpp (same precision)")]["measured"] == pytest.approx(6.0)
    acc = g[("50 %", "decode tok/s ÷ accelerate")]
    assert acc["measured"] == pytest.approx(30.0) and acc["met"] is True
    disk = g[("50 %", "decode tok/s ÷ disk-bandwidth limit")]
    assert disk["measured"] == pytest.approx(0.25) and disk["met"] is False
    assert len(g) == 5


def test_goal_rows_for_a_4_bit_store_compare_with_q4_0_and_skip_the_float16_limits():
    q4 = dict(_row("50 %", 50, "us-lru-q4", 9.0), expert_bits=4)
    rows = [_row("50 %", 50, "us-lru", 3.0), q4, _row("50 %", 50, "llamacpp-f16", 0.5),
            _row("50 %", 50, "llamacpp-q4_0", 6.0), _row("50 %", 50, "accelerate", 0.1)]
    limits = {"per_budget": {"50 %": {"tok_s": 12.0}}}
    g = {(r["us"], r["goal"]): r for r in goal_rows(rows, limits)}
    assert g[("us-lru", "decode tok/s ÷ llama.cpp (same precision)")]["measured"] == pytest.approx(6.0)
    assert g[("us-lru-q4", "decode tok/s ÷ llama.cpp (same precision)")]["measured"] == pytest.approx(1.5)
    assert g[("us-lru-q4", "decode tok/s ÷ accelerate")]["measured"] == pytest.approx(90.0)
    assert ("us-lru-q4", "decode tok/s ÷ disk-bandwidth limit") not in g
    assert len(g) == 5


def test_llamacpp_without_its_repack_is_a_row_of_its_own_and_the_goal_falls_back_to_it():
    """Below its file's size llama.cpp's default run is OOM-killed (its CPU repack copies the weights into
    anonymous memory); --llamacpp-repack off|both adds llama.cpp with --no-repack (weights stay in the mmap'd
    file), and a budget whose default run failed takes the ratio against that one."""
    import argparse

    a = argparse.Namespace(us_bits=[], cache_policy=[], prefetch=[], peers=["llamacpp"], llamacpp_types=["q4_0"],
                           llamacpp_repack="both", embed_rows="resident", dtype="float16", threads=2,
                           new_tokens=4)
    prep = {"gguf": {"q4_0": "/x/model-q4_0.gguf"}}
    cfgs = bench.configs_for(a, prep, 50.0, 1 << 30, [[1, 2]], "t")
    assert [c.config for c in cfgs] == ["llamacpp-q4_0", "llamacpp-q4_0-norepack"]
    assert "repack" not in cfgs[0].spec and cfgs[1].spec["repack"] is False
    q4 = dict(_row("50 %", 50, "us-lru-q4", 9.0), expert_bits=4)
    rows = [q4, _row("50 %", 50, "llamacpp-q4_0", 0.0, ok=False), _row("50 %", 50, "llamacpp-q4_0-norepack", 1.5)]
    g = {(r["us"], r["goal"]): r for r in goal_rows(rows, {})}
    assert g[("us-lru-q4", "decode tok/s ÷ llama.cpp (same precision)")]["measured"] == pytest.approx(6.0)


def _measured(label, pct, config, samples, bits=16, hits=None):
    """A row as run_bench leaves it: repeated decode samples summarized, per-run cache counters (ours)."""
    runs = [{"decode_tok_s": v} for v in samples]
    if hits is not None:
        for r, (h, m) in zip(runs, hits):
            r.update(hits=h, misses=m)
    summary = {"decode_tok_s": summarize(samples)}
    if hits is not None:
        summary["hit_rate"] = sum(h for h, _ in hits) / sum(h + m for h, m in hits)
    return {"label": label, "budget_pct": pct, "system": config.split("-")[0], "config": config, "ok": True,
            "expert_bits": bits, "summary": summary, "runs": runs}


def test_plot_data_one_series_per_store_with_ranges_on_one_x_axis():
    rows = [_measured("100 %", 100.0, "us-lru", [9.0, 10.0, 12.0], hits=[(10, 0), (9, 1), (10, 0)]),
            _measured("50 %", 50.0, "us-lru", [4.0, 5.0, 7.0], hits=[(6, 4), (5, 5), (7, 3)]),
            _measured("50 %", 50.0, "us-lru-q4", [8.0, 8.5, 9.0], bits=4, hits=[(10, 0)] * 3),
            _measured("100 %", 100.0, "us-lru-q4", [11.0, 11.0, 13.0], bits=4, hits=[(10, 0)] * 3),
            _measured("50 %", 50.0, "hf-eager", [2.0, 3.0, 2.5]),
            {**_measured("100 %", 100.0, "hf-eager", [1.0]), "ok": False}]
    res = {"rows": rows, "replay": {"lru": {"100.0": 1.0, "50.0": 0.5, "12.5": None}, "opt": {"50.0": 0.6}},
           "limits": {"per_budget": {"100 %": {"pct": 100.0, "tok_s": 20.0},
                                     "50 %": {"pct": 50.0, "tok_s": 8.0}}}}
    d = bench.plot_data(res)
    # 16-bit and 4-bit stores are separate series (the 4-bit one fits more experts in the same bytes)
    assert set(d["speed"]) == {"us-lru (16-bit store)", "us-lru-q4 (4-bit store)", "hf-eager"}
    assert d["speed"]["us-lru (16-bit store)"] == [(50.0, 5.0, 4.0, 7.0), (100.0, 10.0, 9.0, 12.0)]  # min-max
    assert d["speed"]["hf-eager"] == [(50.0, 2.5, 2.0, 3.0)]  # the failed row is no point
    assert set(d["hits"]) == {"us-lru (16-bit store)", "us-lru-q4 (4-bit store)"}
    # the pooled hit rate, and the range of the runs'
    assert d["hits"]["us-lru (16-bit store)"][0] == pytest.approx((50.0, 0.6, 0.5, 0.7))
    assert d["hits"]["us-lru-q4 (4-bit store)"] == [(50.0, 1.0, 1.0, 1.0), (100.0, 1.0, 1.0, 1.0)]
    assert d["replay"] == {"lru": [(50.0, 0.5), (100.0, 1.0)], "opt": [(50.0, 0.6)]}
    assert d["limit"] == [(50.0, 8.0), (100.0, 20.0)]
    assert d["x_ticks"] == [50.0, 100.0] and "% of the 16-bit expert bytes" in d["x_label"]


def test_plot_axis_says_which_model_a_budget_percentage_counts():
    rows = [_measured("q4 50 %", 50.0, "us-lru-q4", [8.0], bits=4, hits=[(10, 0)])]
    res = {"rows": rows, "limits": {"per_budget": {"q4 50 %": {"pct": 50.0, "tok_s": 8.0}}},
           "budgets": [{"label": "q4 50 %", "pct": 50.0, "bits": 4}]}
    d = bench.plot_data(res)
    assert "4-bit expert bytes" in d["x_label"] and "16-bit" not in d["x_label"]
    assert d["limit_label"] == "bandwidth limit (4-bit bytes)"
    d = bench.plot_data({**res, "hf": "/x/model-q4_k_m.gguf", "budgets": [{"label": "900 MiB", "bits": 16}]})
    assert "converted store" in d["x_label"] and d["limit_label"] == "bandwidth limit (store bytes)"
    assert list(d["speed"]) == ["us-lru-q4 (store from the GGUF)"]
    res["budgets"].append({"label": "50 %", "pct": 50.0, "bits": 16})  # mixed: the 16-bit axis, as before
    assert "16-bit expert bytes" in bench.plot_data(res)["x_label"]


def test_plots_render_with_the_same_x_axis(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_measured("50 %", 50.0, "us-lru", [4.0, 5.0, 7.0], hits=[(6, 4)] * 3),
            _measured("100 %", 100.0, "us-lru", [9.0, 10.0], hits=[(10, 0)] * 2)]
    res = {"model": "m", "rows": rows, "replay": {"lru": {"50.0": 0.5, "100.0": 1.0}},
           "limits": {"per_budget": {"50 %": {"pct": 50.0, "tok_s": 8.0}}}}
    assert bench.plots(res, tmp_path) == ["tok_s_vs_budget.png", "hit_rate_vs_budget.png"]
    assert all((tmp_path / f).stat().st_size > 0 for f in ("tok_s_vs_budget.png", "hit_rate_vs_budget.png"))


def test_gguf_export_logs_go_to_the_run_log_not_the_terminal(tmp_path, monkeypatch, capfd):
    from moe_offload import gguf_export

    def noisy_export(hf, out, type_, threads=None):  # llama.cpp's quantizer logs from C, on fd 2
        os.write(2, b"llama_model_loader: loaded meta data with 27 key-value pairs\n")
        os.write(1, b"llama_model_quantize_impl: model size = 1.23 MB\n")
        out.write_bytes(b"GGUF")

    monkeypatch.setattr(gguf_export, "export_gguf", noisy_export)
    log = tmp_path / "runs" / "export-gguf-q4_0.log"
    path, err = bench._gguf_for({"dir": tmp_path, "hf": tmp_path}, "q4_0", 1, log)
    assert path == tmp_path / "model-q4_0.gguf" and err is None
    out = capfd.readouterr()
    assert "llama_model" not in out.err + out.out
    assert "loaded meta data" in log.read_text() and "model size" in log.read_text()
    os.write(2, b"after\n")  # the terminal is back
    assert capfd.readouterr().err == "after\n"


def test_prompts_are_fixed_and_in_vocab():
    a, b = bench.prompts_for(400, 8, 3), bench.prompts_for(400, 8, 3)
    assert a == b and len(a) == 3 and all(len(p) == 8 for p in a)
    assert len({tuple(p) for p in a}) == 3  # one prompt per repeat
    assert all(3 <= i < 400 for p in a for i in p)


def test_drop_page_cache_leaves_nothing_resident(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"x" * (1 << 20))
    f.read_bytes()
    drop_page_cache([tmp_path], sync=True)
    left = bench.resident_bytes([tmp_path])
    if left is None:
        pytest.skip("fincore (util-linux) is not installed: cannot check the page cache")
    assert left == 0


# ---- GGUF export --------------------------------------------------------------------------------------

def test_permute_rotary_interleaves_pairs():
    from moe_offload.gguf_export import permute_rotary

    w = np.arange(8 * 3).reshape(8, 3)  # 2 heads of head dim 4: rows (0,2),(1,3) pair -> adjacent
    got = permute_rotary(w, 2)
    assert got[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'moe-offload[bench]')")
    from moe_offload.gguf_export import export_gguf

    d = tmp_path_factory.mktemp("gguf")
    hf = tiny.make_checkpoint(d / "hf", "mixtral_gqa", tokenizer=True)
    export_gguf(hf, d / "tiny-f16.gguf", "f16")
    return hf, d / "tiny-f16.gguf"


def test_export_gguf_reads_back(tiny_gguf):
    import gguf

    from moe_offload.checkpoint import SafetensorsFolder
    from moe_offload.gguf_export import permute_rotary

    hf, path = tiny_gguf
    cfg = tiny.read_json(hf / "config.json")
    r = gguf.GGUFReader(str(path))
    t = {x.name: x for x in r.tensors}
    D, V, E, I = cfg["hidden_size"], cfg["vocab_size"], cfg["num_local_experts"], cfg["intermediate_size"]
    L, H, Hkv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    Hd = D // H
    assert len(t) == 3 + 10 * L
    F16, F32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    expect = {"token_embd.weight": ([D, V], F16), "output.weight": ([D, V], F16), "output_norm.weight": ([D], F32),
              "blk.1.attn_q.weight": ([D, H * Hd], F16), "blk.1.attn_k.weight": ([D, Hkv * Hd], F16),
              "blk.1.attn_norm.weight": ([D], F32), "blk.1.ffn_gate_inp.weight": ([D, E], F32),
              "blk.1.ffn_gate_exps.weight": ([D, I, E], F16), "blk.1.ffn_up_exps.weight": ([D, I, E], F16),
              "blk.1.ffn_down_exps.weight": ([I, D, E], F16)}
    for name, (shape, qtype) in expect.items():  # GGUF lists dims fastest first
        assert [int(x) for x in t[name].shape] == shape, name
        assert t[name].tensor_type == qtype, name

    def field(key):
        f = r.fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()

    assert field("general.architecture") == "llama"
    assert field("llama.expert_count") == E and field("llama.expert_used_count") == cfg["num_experts_per_tok"]
    assert field("llama.attention.head_count_kv") == Hkv and field("llama.rope.dimension_count") == Hd
    assert field("tokenizer.ggml.model") == "gpt2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == V and tokens[1] == "<s>" and field("tokenizer.ggml.bos_token_id") == 1
    assert len(field("tokenizer.ggml.merges")) > 0

    src = SafetensorsFolder(hf)
    q = src.get("model.layers.1.self_attn.q_proj.weight").numpy()
    np.testing.assert_array_equal(t["blk.1.attn_q.weight"].data, permute_rotary(q, H).astype(np.float16))
    up = np.stack([src.get(f"model.layers.1.block_sparse_moe.experts.{e}.w3.weight").numpy() for e in range(E)])
    np.testing.assert_array_equal(t["blk.1.ffn_up_exps.weight"].data, up.astype(np.float16))
    down = src.get("model.layers.0.block_sparse_moe.experts.2.w2.weight").numpy()
    np.testing.assert_array_equal(t["blk.0.ffn_down_exps.weight"].data[2], down.astype(np.float16))
    router = src.get("model.layers.0.block_sparse_moe.gate.weight").numpy()
    np.testing.assert_array_equal(t["blk.0.ffn_gate_inp.weight"].data, router)  # routers stay fp32


def test_export_gguf_synthetic_vocab_and_refusals(tmp_path):
    pytest.importorskip("gguf", reason="the gguf package is not installed")
    from moe_offload.gguf_export import export_gguf, tokenizer_vocab

    v = tokenizer_vocab(tmp_path, 1000, 1, 2)  # no tokenizer.json: byte-level vocabulary padded to the model's
    assert v["synthetic"] and len(v["tokens"]) == 1000 and len(set(v["tokens"])) == 1000
    assert v["merges"] and all(" " in m for m in v["merges"])
    qwen = tiny.make_checkpoint(tmp_path / "q", "qwen3_moe_gqa_dense")
    with pytest.raises(UsageError, match="dense layers"):  # llama.cpp's qwen3moe has experts in every layer
        export_gguf(qwen, tmp_path / "q.gguf")
    with pytest.raises(UsageError, match="--type"):
        export_gguf(qwen, tmp_path / "q.gguf", "q3_x")


def test_llama_cpp_first_token_logits_agree_with_transformers(tiny_gguf):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (builds llama.cpp from "
                                                         "source: pip install llama-cpp-python)")
    hf, path = tiny_gguf
    prompt = [1, 17, 250, 33, 96, 301, 5, 42]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, n_threads=1, n_threads_batch=1, verbose=False)
    llm.eval(prompt)
    theirs = np.array(bench.llama_last_logits(llm), dtype=np.float32)
    ref = tiny.load_hf(hf)
    with torch.no_grad():
        ours = ref(torch.tensor([prompt])).logits[0, -1].float().numpy()
    top_ref, top_llama = set(np.argsort(-ours)[:5].tolist()), set(np.argsort(-theirs)[:5].tolist())
    assert int(np.argmax(theirs)) == int(np.argmax(ours))
    assert len(top_ref & top_llama) >= 4, (top_ref, top_llama)
    np.testing.assert_allclose(theirs, ours, atol=0.1)  # F16 weights vs fp32: ~0.01 here; a wrong layout: ~3


# ---- the command ---------------------------------------------------------------------------------------

def test_bench_quick_smoke(tiny_checkpoint, tmp_path, child_env):
    hf = tiny_checkpoint("mixtral_gqa")
    out = tmp_path / "out"
    # relative paths mean the caller's directory, in the children too (a transformers peer given a path that
    # does not exist from its working directory looks it up on the Hub)
    cmd = [sys.executable, "-m", "moe_offload.cli", "bench", "--model", os.path.relpath(hf, tmp_path),
           "--quick", "--peers", "hf", "--hf-impls", "eager", "--threads", "1", "--no-simulate",
           "--cache-dir", "cache", "--out", "out"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bench: 4/4 runs (100 %)" in r.stderr and "runs/s, ETA" in r.stderr  # progress, not a terminal
    assert (tmp_path / "cache").is_dir()
    res = json.loads((out / "results.json").read_text())
    for key in ("model", "dtype", "sizes", "budgets", "limits", "rows", "goals", "replay", "trace", "prompts"):
        assert key in res, key
    assert [b["pct"] for b in res["budgets"]] == [100.0, 50.0]
    # the model's own time-model figures (sim.model_probes), so scripts/validate_scale.py needs no probe later
    assert res["limits"]["probe_bits"] == 16
    # each round's trace holds the warm-up's and the measured prompt's prefill routing, uncounted, before its
    # decode: a replay starts as warm as the run (one row per prompt token)
    from moe_offload.sim import load_trace

    tr = load_trace(out / "trace-round1.npz")
    n_prompt = len(res["prompts"][0])
    assert tr.meta["prefill_rows"] == 2 * n_prompt and 2 * n_prompt < tr.meta["warmup_tokens"] < tr.tokens
    assert "prefill_routes" not in res["rows"][0]["runs"][0]
    assert all(res["limits"][k] > 0 for k in ("expert_call_s", "token_overhead_s")), res["limits"]
    assert {(r["label"], r["config"]) for r in res["rows"]} == {
        ("100 %", "us-lru"), ("100 %", "hf-eager"), ("50 %", "us-lru"), ("50 %", "hf-eager")}
    for row in res["rows"]:
        assert row["ok"], row.get("error")
        assert row["summary"]["decode_tok_s"]["n"] == 1 and row["summary"]["decode_tok_s"]["median"] > 0
        assert len(row["tokens"][0]) == res["new_tokens"] + 1
    us50 = next(r for r in res["rows"] if r["label"] == "50 %" and r["system"] == "us")
    assert 0.0 <= us50["summary"]["hit_rate"] <= 1.0
    hf100 = next(r for r in res["rows"] if r["label"] == "100 %" and r["system"] == "hf")
    assert hf100["same_tokens"] == res["new_tokens"] + 1  # the same model, greedy: the same tokens
    s = res["sizes"]
    kv = s["kv_per_token"] * bench.kv_tokens(res["prompt_tokens"], res["new_tokens"] + 1)  # the run's KV cache
    assert kv > 0 and res["budgets"][1]["memory"] == s["backbone"] + s["experts"] // 2 + kv
    assert set(res["replay"]) >= {"lru", "opt"}
    # how our children's OpenMP threads waited (each chooses at import): recorded, and named in results.md
    waits = {rnd["info"]["omp_wait"] for r in res["rows"] if r["system"] == "us" for rnd in r["rounds"]}
    assert waits and all(w.startswith(("OMP_WAIT_POLICY=", "GOMP_SPINCOUNT=", "libgomp")) for w in waits), waits
    assert "OpenMP wait of our runs: " in (out / "results.md").read_text()
    # everything fits: no policy evicts, only first uses miss, so every policy equals the optimum
    assert {d["100.0"] for d in res["replay"].values()} == {res["replay"]["opt"]["100.0"]}
    assert (out / "trace.npz").is_file() and (out / "results.md").is_file()
    assert "| 50 % | us-lru |" in (out / "results.md").read_text()


def test_prefill_rows_one_per_prompt_token_across_chunks():
    from moe_offload.bench import prefill_rows

    # layers 1 and 3, a 3-token prompt prefilled in two chunks (2 + 1 tokens), top-2
    calls = [(1, [[0, 1], [2, 3]]), (3, [[4, 5], [6, 7]]), (1, [[1, 2]]), (3, [[5, 6]])]
    assert prefill_rows(calls, [1, 3]) == [[[0, 1], [4, 5]], [[2, 3], [6, 7]], [[1, 2], [5, 6]]]
    assert prefill_rows(calls[:3], [1, 3]) == []  # layer 3 lacks the last chunk: nothing rather than wrong rows
    assert prefill_rows([(2, [[0, 1]])], [1, 3]) == [] and prefill_rows(None, [1, 3]) == []


def test_bench_can_quantize_attention_and_lm_head_like_llamacpps_files(tiny_checkpoint, tmp_path):
    """--us-backbone-bits 8: the bench's 4-bit store holds attention and lm_head as 8-bit codes (llama.cpp's
    Q4_0 file holds them at 4-6 bits), in its own cache folder; the default stays 16-bit."""
    from moe_offload.cli import main
    from moe_offload.store.format import open_store

    hf = tiny_checkpoint("mixtral_gqa")
    assert bench.quantized_store_name("float16", 4, "rtn") == "store-float16-q4-rtn"
    assert bench.quantized_store_name("float16", 4, "rtn", 8) == "store-float16-q4-rtn-bb8"
    assert "--head-bits" not in bench.quantize_args(hf, tmp_path / "x", 4, "float16", "rtn")
    sizes = {}
    for bb in (16, 8):
        out = tmp_path / bench.quantized_store_name("float16", 4, "rtn", bb)
        assert main(bench.quantize_args(hf, out, 4, "float16", "rtn", bb)) == 0
        q = open_store(out).manifest["quantization"]
        assert (str(q["expert_bits"]), q["attn_bits"], q["head_bits"]) == ("4", bb, bb)
        sizes[bb] = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    assert sizes[8] < sizes[16]  # the backbone's bytes shrink


def test_a_cached_4bit_store_in_another_kernel_order_is_requantized(tiny_checkpoint, tmp_path, monkeypatch):
    """The bench reuses its quantized store only when its 4-bit experts are in the order this machine's kernel
    reads (quantize writes kernels.write_layout()): a store of an older order (r64 before r64t, b64 before
    either) is read by converting each expert at load, which is not what the bench means to measure."""
    from moe_offload.cli import main
    from moe_offload.quant.kernels import write_layout
    from moe_offload.store.format import open_store

    hf = tiny_checkpoint()
    stamp = 0.0
    for layout in ("b64", "r64", write_layout()):
        out = tmp_path / layout
        monkeypatch.setenv("MOE_OFFLOAD_INT4_LAYOUT", layout)
        assert main(["quantize", "--model", str(hf), "--out", str(out), "--expert-bits", "4", "--quantizer", "rtn",
                     "--quiet"]) == 0
        monkeypatch.delenv("MOE_OFFLOAD_INT4_LAYOUT")
        dtype = open_store(out).manifest["dtype"]
        assert bench._store_is_fresh(out, dtype, stamp) == (layout == write_layout()), layout
    out = tmp_path / "q8"
    assert main(["quantize", "--model", str(hf), "--out", str(out), "--expert-bits", "8", "--quiet"]) == 0
    assert bench._store_is_fresh(out, dtype, stamp)  # no 4-bit experts: no order to match


@pytest.mark.parametrize("attn,head", [(16, 16), (4, 8), (8, 4)])
def test_bench_sizes_count_the_backbone_the_engine_holds(tiny_checkpoint, tmp_path, attn, head):
    """The bench's budgets and RAM limits use the store's backbone as the engine holds it: with quantized
    attention / lm_head, their codes and meta, not the config's 16-bit count (which made q4 budgets larger and
    the RAM limit lower than the run's real bytes)."""
    from moe_offload.cli import main
    from moe_offload.runtime.load import load
    from moe_offload.store.format import open_store

    out = tmp_path / "q"
    args = ["--attn-bits", str(attn)] + (["--head-bits", str(head)] if head < 16 else [])
    assert main(["quantize", "--model", str(tiny_checkpoint()), "--out", str(out), "--expert-bits", "4",
                 "--quantizer", "rtn", *args, "--quiet"]) == 0
    dtype = open_store(out).manifest["dtype"]
    engine = load(out, device="cpu")
    engine.generate(prompt_ids=[3, 4, 5], max_new_tokens=2, temperature=0.0, ignore_eos=True)  # kernels built
    held = sum(t.numel() * t.element_size() for t in engine.model.state_dict().values())
    assert bench.model_sizes(out, dtype).backbone == engine.info["backbone_bytes"] == held


def test_the_16bit_sizes_read_from_a_quantized_store_count_a_16bit_backbone(tiny_checkpoint, tmp_path):
    """Without a 16-bit store the bench reads the 16-bit model's sizes from the quantized one: its backbone
    must then be the 16-bit count too, not the quantized attention's bytes beside 16-bit experts."""
    from moe_offload.cli import main
    from moe_offload.models.sizes import model_sizes as count
    from moe_offload.store.format import open_store

    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_checkpoint()), "--out", str(out), "--expert-bits", "4",
                 "--quantizer", "rtn", "--attn-bits", "4", "--quiet"]) == 0
    st = open_store(out)
    dtype = st.manifest["dtype"]
    full = count(st.config).resident_backbone_bytes(getattr(torch, dtype))
    assert bench.model_sizes(out, dtype, as_stored=False).backbone == full
    assert bench.model_sizes(out, dtype).backbone < full


def test_results_name_the_llamacpp_build_the_peer_rows_ran():
    """A llama.cpp built with AMX and one without run different kernels (the AMX build crashed on this project's
    Xeon): results.md says which build the peer rows were, from what the child recorded."""
    ours = _measured("100 %", 100.0, "us-lru", [9.0])
    assert bench.peer_builds([ours]) == []
    peer = {**_measured("100 %", 100.0, "llamacpp-q4_0", [5.0]),
            "info": {"llama_cpp_python": "0.3.36", "system_info": "CPU : AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 |"}}
    line = bench.peer_builds([ours, peer, peer])
    assert line == ["llama.cpp: llama-cpp-python 0.3.36, built with: CPU : AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 |",
                    ""]


def test_peers_run_with_libgomps_default_wait_and_ours_choose_their_own(monkeypatch):
    """Our import chose an OpenMP wait (MOE_OFFLOAD_OMP_WAIT names it): a peer's child gets libgomp's default spin,
    as its users run it, and ours drops it to choose again; a wait the caller set reaches both unchanged."""
    monkeypatch.setenv("MOE_OFFLOAD_OMP_WAIT", "OMP_WAIT_POLICY")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    peer, us = bench.child_env(2, "llamacpp"), bench.child_env(2, "us")
    assert peer["GOMP_SPINCOUNT"] == "300000" and "OMP_WAIT_POLICY" not in peer
    assert "OMP_WAIT_POLICY" not in us and "GOMP_SPINCOUNT" not in us
    assert "MOE_OFFLOAD_OMP_WAIT" not in peer and "MOE_OFFLOAD_OMP_WAIT" not in us and us["OMP_NUM_THREADS"] == "2"
    monkeypatch.delenv("MOE_OFFLOAD_OMP_WAIT")  # the caller's own setting
    assert bench.child_env(2, "llamacpp")["OMP_WAIT_POLICY"] == bench.child_env(2, "us")["OMP_WAIT_POLICY"] == "PASSIVE"


def test_results_say_how_our_openmp_threads_waited():
    assert bench.omp_wait_setting({"GOMP_SPINCOUNT": "10000", "MOE_OFFLOAD_OMP_WAIT": "GOMP_SPINCOUNT"}) == \
        "GOMP_SPINCOUNT=10000 (chosen at import)"
    assert bench.omp_wait_setting({"OMP_WAIT_POLICY": "ACTIVE"}) == "OMP_WAIT_POLICY=ACTIVE (the user's)"
    assert bench.omp_wait_setting({}) == "libgomp's default"
