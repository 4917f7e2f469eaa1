"""Issue 15: what the CLI does has a Python API, and the command is a thin wrapper over it: quantize (with the
mixed planner as a function), profile, eval. Each API run here is checked against the command's own output."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from moe_offload.cli import main
from moe_offload.errors import UsageError
from moe_offload.experts import ExpertShape
from moe_offload.quant import mixed
from moe_offload.quant.codec import HQQCodec
from moe_offload.quant.writer import quantize
from moe_offload.runtime.load import load
from moe_offload.store.format import convert, open_store

TEXT = "the router reads the weights of the experts it picks; a stitch in time saves nine. " * 6


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    return tiny_checkpoint("mixtral_gqa", tokenizer=True)


@pytest.fixture(scope="module")
def stats(tmp_path_factory):
    path = tmp_path_factory.mktemp("stats") / "routing_stats.json"
    counts = {"0": {"counts": [500, 5, 3, 1]}, "1": {"counts": [2, 400, 9, 4]}}
    path.write_text(json.dumps({"layers": counts}))
    return path


def test_quantize_api_writes_the_store_the_command_writes(hf, tmp_path):
    r = quantize(hf, tmp_path / "api", expert_bits=3, attn_bits=8)
    assert cli("quantize", "--model", str(hf), "--out", str(tmp_path / "cli"), "--expert-bits", "3",
               "--attn-bits", "8", "--quiet")[0] == 0
    ref = open_store(tmp_path / "cli")
    assert r.plan is None and r.mix() == {"3b": len(ref.entries)} and r.mean_error > 0
    assert r.store.manifest["quantization"] == ref.manifest["quantization"]
    for name in ("experts.bin", "backbone.safetensors"):
        assert (r.store.path / name).read_bytes() == (ref.path / name).read_bytes()


def test_plan_mixed_is_the_plan_quantize_writes(hf, stats, tmp_path):
    budget = 8 * HQQCodec({"bits": 3}).nbytes(ExpertShape(64, 48))
    plan = mixed.plan_mixed(hf, budget, counts=mixed.load_stats(stats))
    assert sum(o.nbytes for o in plan.chosen.values()) <= budget
    assert len({o.label for o in plan.chosen.values()}) > 1
    assert plan.chosen[0, 0].spec["bits"] == max(plan.chosen[0, e].spec["bits"] for e in range(4))
    seen = []
    r = quantize(hf, tmp_path / "api", expert_bits="mixed", budget=budget, stats=stats, on_plan=seen.append)
    assert [p.specs for p in seen] == [plan.specs] and r.plan.specs == plan.specs
    assert {k: e.codec for k, e in r.store.entries.items()} == plan.specs
    code, out, _ = cli("quantize", "--model", str(hf), "--out", str(tmp_path / "cli"), "--expert-bits",
                       "mixed", "--budget", str(budget), "--stats", str(stats), "--quiet")
    assert code == 0 and out.startswith(plan.format())  # the command prints the API's plan, then one line
    ref = open_store(tmp_path / "cli")
    assert {k: e.codec for k, e in ref.entries.items()} == {k: e.codec for k, e in r.store.entries.items()}


def test_quantize_api_refuses_bad_arguments_before_writing(hf, tmp_path):
    with pytest.raises(UsageError, match="needs --budget"):
        quantize(hf, tmp_path / "x", expert_bits="mixed")
    with pytest.raises(UsageError, match="expert bits must be"):
        quantize(hf, tmp_path / "x", expert_bits=5)
    with pytest.raises(UsageError, match="give --calib"):
        mixed.plan_mixed(hf, 10**6, plan_error="out")
    assert not (tmp_path / "x").exists()


def test_profile_api_writes_the_stats_the_command_writes(hf, tmp_path):
    from moe_offload.profile import predictor_recall, profile

    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    store = convert(hf, tmp_path / "store")
    engine = load(store.path)
    ids = engine.tokenizer.encode(TEXT)[:64]
    api = tmp_path / "api"
    api.mkdir()
    r = profile(engine, ids, api)
    assert r.recording.tokens == len(ids) and json.loads((api / "routing_stats.json").read_text()) == r.stats
    assert all(sum(v["counts"]) == len(ids) * engine.model.top_k for v in r.stats["layers"].values())
    p = predictor_recall(engine, r.recording)
    assert set(p.recall) == {1, 2} and p.shadow == {}
    code, out, _ = cli("profile", "-m", str(store.path), "--text", str(text), "--out", str(store.path),
                       "--max-tokens", "64", "--quiet")
    assert code == 0
    assert json.loads((store.path / "routing_stats.json").read_text()) == r.stats
    la, pt = p.recall[1]
    assert f"depth 1: lookahead recall {la:.3f}, previous-token recall {pt:.3f}" in out


def test_eval_api_rows_are_the_commands_rows(hf, tmp_path):
    from moe_offload.eval import compare

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    rows = compare([str(hf)], TEXT, max_tokens=64, window=32, gen_tokens=0)
    assert [r["model"] for r in rows] == [str(hf)] and rows[0]["tokens"] == 63
    code, out, _ = cli("eval", "-m", str(hf), "--text", str(text), "--max-tokens", "64", "--window", "32",
                       "--gen-tokens", "0", "--json", "--quiet")
    assert code == 0
    row = json.loads(out)
    assert row["perplexity"] == rows[0]["perplexity"] and row["tokens"] == rows[0]["tokens"]
