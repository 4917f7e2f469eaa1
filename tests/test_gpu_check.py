"""scripts/gpu_check.sh and scripts/gpu_bench.py on the CPU: argument handling, the phase runner's timeout and
failure records, pytest summary parsing, the goals and tables from fabricated results, the scaled 12 GB
budget, and the whole check end to end on a tiny model (--cpu-smoke)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CHILD_ENV

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


check, bench = _module("gpu_check"), _module("gpu_bench")


def sh(*args, env=None):
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args],
        capture_output=True,
        text=True,
        env={**CHILD_ENV, "PYTHON": sys.executable, **(env or {})},
        timeout=1200,
    )


# ---- arguments ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [[], [""], ["--cpu-smoke"]])
def test_missing_outdir_is_one_line_and_exit_2(args):
    r = sh(*args)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("usage: scripts/gpu_check.sh OUTDIR")
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""


def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    for argv in (
        [str(a_file)],
        [str(tmp_path / "o"), "--layers", "0"],
        [str(tmp_path / "o"), "--bogus"],
        [str(tmp_path / "o"), "--layers", "two"],
    ):
        try:
            code = check.main(argv)
        except SystemExit as e:  # argparse errors exit through _Parser.error
            code = e.code
        err = capsys.readouterr().err.strip()
        assert code == 2, argv
        assert len(err.splitlines()) == 1 and err.startswith("gpu_check: "), (argv, err)
    assert not (tmp_path / "o").exists()  # nothing created for a refused command
    assert a_file.read_text() == "x"


# ---- the phase runner --------------------------------------------------------------------------------------


def test_phase_runner_records_success_failure_and_timeout(tmp_path):
    py = sys.executable
    ok = check.run_phase(check.Phase("ok", [py, "-c", "print('hello')"], 30), tmp_path)
    assert ok["ok"] and ok["rc"] == 0 and not ok["timed_out"]
    assert "hello" in (tmp_path / "ok.log").read_text()
    bad = check.run_phase(check.Phase("bad", [py, "-c", "raise SystemExit(3)"], 30), tmp_path)
    assert not bad["ok"] and bad["rc"] == 3 and not bad["timed_out"]
    t0 = time.monotonic()
    slow = check.run_phase(check.Phase("slow", ["bash", "-c", "sleep 60 & sleep 60"], 1), tmp_path)
    assert time.monotonic() - t0 < 30  # stopped, with its child
    assert slow["timed_out"] and not slow["ok"]
    assert "stopped after its timeout of 1 s" in (tmp_path / "slow.log").read_text()
    gone = check.run_phase(check.Phase("gone", [str(tmp_path / "no-such-program")], 5), tmp_path)
    assert not gone["ok"] and gone["rc"] is None and "error" in gone


def test_phases_fit_the_eight_minutes():
    gpu = check.phases(Path("/o"), Path("/w"), smoke=False, layers=2)
    assert [p.name for p in gpu] == ["tests", "bench", "consumer"]
    assert sum(p.timeout for p in gpu) <= 480
    smoke = check.phases(Path("/o"), Path("/w"), smoke=True, layers=2)
    assert all("--cpu-smoke" in p.argv for p in smoke[1:])


# ---- parsing and rendering ---------------------------------------------------------------------------------


def test_parse_pytest_summary_and_failures():
    text = (
        "....F.s\nFAILED tests/test_cuda.py::test_offloaded[shadow-mixtral_gqa] - AssertionError: x\n"
        "ERROR tests/test_cuda.py::test_resident[olmoe_gqa_clip] - RuntimeError\n"
        "SKIPPED [18] tests/test_cuda.py:87: needs a CUDA device\n"
        "3 failed, 70 passed, 5 skipped, 1 error in 12.34s\n"
    )
    got = check.parse_pytest(text)
    assert (got["passed"], got["failed"], got["skipped"], got["errors"]) == (70, 3, 5, 1)
    assert got["failed_tests"] == [
        "tests/test_cuda.py::test_offloaded[shadow-mixtral_gqa]",
        "tests/test_cuda.py::test_resident[olmoe_gqa_clip]",
    ]
    assert got["finished"]
    cut = check.parse_pytest("....\n[gpu_check] tests: stopped after its timeout of 170 s\n")
    assert not cut["finished"] and cut["passed"] == 0


def _us(pct, prefetch, tok_s, bits=16, **kw):
    return {
        "system": "us",
        "bits": bits,
        "pct": pct,
        "prefetch": prefetch,
        "ok": True,
        "decode_tok_s": tok_s,
        "hit_rate": 0.5,
        "stall_ms_per_token": 10.0,
        "stall_share": 0.2,
        "link_gbs": 20.0,
        **kw,
    }


BENCH = {
    "layers": 2,
    "new_tokens": 24,
    "accelerate_tokens": 6,
    "widths": {
        "hidden_size": 4096,
        "num_local_experts": 8,
        "intermediate_size": 14336,
        "num_experts_per_tok": 2,
    },
    "machine": {
        "link_gbs": 50.0,
        "device_copy_gbs": 4000.0,
        "expert_gemv_gbs": 3000.0,
        "token_overhead_ms": 2.0,
        "disk_gbs": 3.0,
    },
    "rows": [
        _us(50, "lookahead", 7.0, sim_tok_s_serial=5.0, sim_tok_s_overlap=8.0),
        {"system": "accelerate", "bits": 16, "pct": 50, "prefetch": None, "ok": True, "decode_tok_s": 2.0},
        _us(50, "none", 5.0, sim_tok_s_serial=4.0, sim_tok_s_overlap=9.0),
        _us(50, "auto", 9.0, bits=4, sim_tok_s_serial=4.0, sim_tok_s_overlap=10.0),
        {
            "system": "us",
            "bits": 16,
            "pct": 25,
            "prefetch": "lookahead",
            "ok": False,
            "error": "OutOfMemoryError: CUDA out of memory",
        },
    ],
    "failures": [
        {"system": "us", "bits": 16, "pct": 25, "prefetch": "lookahead", "error": "OutOfMemoryError"}
    ],
}


def test_goals_from_fabricated_rows():
    g = {x["goal"]: x for x in check.goals(BENCH)}
    at50 = g["16-bit decode ÷ accelerate at 50 %"]
    assert at50["value"] == pytest.approx(3.5) and at50["met"] is True  # the best 16-bit row: 7 / 2
    assert "lookahead" in at50["detail"]
    assert g["16-bit decode ÷ accelerate at 25 %"]["met"] is None  # nothing measured there
    stall = g["stall share of decode time, lookahead, 16-bit, 50 %"]
    assert stall["value"] == pytest.approx(0.2) and stall["met"] is True
    sim = g["measured ÷ simulator, worst us row"]  # 7/8 (overlap), 5/4 (serial), 9/10 (overlap)
    assert sim["value"] == pytest.approx(1.25) and sim["met"] is True and sim["detail"] == "3 rows"
    assert all(x["met"] is None for x in check.goals(None))


def test_render_tables_from_a_results_dict():
    res = {
        "mode": "gpu",
        "command": "scripts/gpu_check.sh out",
        "gpu": "NVIDIA H200",
        "started": "a",
        "finished": "b",
        "phases": [
            {"name": "tests", "ok": False, "timed_out": True, "rc": -15, "seconds": 170.2, "log": "tests.log"}
        ],
        "tests": check.parse_pytest("1 failed, 2 passed in 3s\nFAILED tests/test_cuda.py::t - x\n"),
        "bench": BENCH,
        "goals": check.goals(BENCH),
        "consumer": {
            "profile": "rtx3060-12gb",
            "memory": 123,
            "store_bits": 4,
            "plan": {
                "recommended": {"expert_bits": 4, "prefetch": True, "cpu_misses": True},
                "predicted_hit_rate": 0.529,
                "predicted_tok_s_serial": 7.33,
                "predicted_tok_s_overlap": 8.57,
                "trace": "synthetic",
            },
            "scaled": {
                "device_share": 81 / 256,
                "host_share": 175 / 256,
                "disk_share": 0.0,
                "on_device": 5,
                "experts": 16,
            },
            "rows": [
                _us(
                    None,
                    "lookahead",
                    3.0,
                    cpu_experts_per_token=1.5,
                    sim_tok_s_overlap=4.0,
                    card_sim_tok_s_serial=1.0,
                    card_sim_tok_s_overlap=2.0,
                )
            ],
        },
    }
    md = check.render(res)
    assert "| tests | timed out | 170 | tests.log |" in md
    assert "1 passed" not in md and "2 passed, 1 failed" in md and "- FAILED tests/test_cuda.py::t" in md
    assert "| 50.0 GB/s | 4000 GB/s | 3000 GB/s | 2.00 ms | 3.0 GB/s |" in md
    assert "| 50 % | us | 16 | lookahead | 7.00 | 3.5x | 0.500 | 10.00 | 20% | 20.0 | 8.00 | 0.88 |" in md
    assert "| 50 % | accelerate | 16 | - | 2.00 | - |" in md
    assert "| 25 % | us | 16 | lookahead | failed: OutOfMemoryError: CUDA out of memory |" in md
    assert "| 16-bit decode ÷ accelerate at 50 % | >= 3x | 3.50 (prefetch lookahead) | yes |" in md
    assert "| 16-bit decode ÷ accelerate at 25 % | >= 3x | - | not measured |" in md
    assert "31.6% of them on the device" in md and "7.33 .. 8.57 tok/s" in md
    assert "| 3.00 | 0.500 | 1.50 | 20% | 4.00 | 0.75 | 1.00 .. 2.00 |" in md
    assert "## Failures" in md


# ---- the bench's arithmetic --------------------------------------------------------------------------------


def test_budget_and_decode_deltas():
    assert bench.budget(50, 100, 1000, 64, 10) == 100 + 64 + 500
    assert bench.budget(1, 100, 1000, 0, 300) == 400  # never below one layer's active experts
    pre = {"expert_hits": 2, "expert_misses": 2, "bytes_to_device": 100, "stall_seconds": 0.5}
    end = {
        "expert_hits": 8,
        "expert_misses": 4,
        "bytes_to_device": 4100,
        "stall_seconds": 1.5,
        "bytes_read_disk": 0,
    }
    d = bench.decode_deltas(pre, end, tokens=4, seconds=4.0)
    assert d["hit_rate"] == pytest.approx(6 / 8)
    assert d["stall_ms_per_token"] == pytest.approx(250.0) and d["stall_share"] == pytest.approx(0.25)
    assert d["link_bytes_per_token"] == 1000 and d["link_gbs"] == pytest.approx(1e-6)
    assert bench.decode_deltas({}, {}, 0, 0.0)["hit_rate"] is None


def test_grid_puts_the_goal_rows_first():
    items = bench.grid([50, 25, 100], ["lookahead", "none", "auto"], [16, 4])
    assert items[:4] == [
        ("us", 16, 50, "lookahead"),
        ("accelerate", 16, 50, None),
        ("us", 16, 50, "none"),
        ("us", 16, 50, "auto"),
    ]
    assert items[4:6] == [("us", 16, 25, "lookahead"), ("accelerate", 16, 25, None)]
    assert len(items) == 3 * 3 * 2 + 3 and all(b == 4 for _, b, _, _ in items[-9:])


def test_scaled_consumer_budget_from_the_planner():
    plan = bench.consumer_plan("rtx3060-12gb")  # Mixtral-8x7B on the 12 GB card: 4-bit, 81 + 175 of 256
    s = bench.scaled_consumer(plan, moe_layers=2, n_experts=8)
    row = next(r for r in plan["rows"] if r["bits"] == plan["recommended"]["expert_bits"])
    assert s["bits"] == row["bits"] and s["device_share"] == row["on_device"] / 256
    assert s["on_device"] == row["on_device"] * 16 // 256
    assert s["in_host"] == -(-row["in_host"] * 16 // 256) and row["on_disk"] == s["on_disk"] == 0
    fake = {
        "moe_layers": 32,
        "n_experts": 8,
        "rows": [{"bits": 16, "on_device": 22, "in_host": 87, "on_disk": 147}],
        "recommended": {"expert_bits": 16, "prefetch": True, "cpu_misses": False},
    }
    s = bench.scaled_consumer(fake, moe_layers=4, n_experts=8)
    assert (s["on_device"], s["in_host"], s["on_disk"]) == (
        2,
        11,
        19,
    )  # 22*32//256, ceil(87*32/256), the rest
    assert s["prefetch"] is True and s["cpu_misses"] is False


# ---- the whole check, on the CPU ---------------------------------------------------------------------------


def test_cpu_smoke_runs_every_phase(tmp_path):
    out = tmp_path / "out"
    r = sh(str(out), "--cpu-smoke", "--work", str(tmp_path / "work"))
    assert r.returncode == 0, r.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "bench.json",
        "bench.log",
        "consumer.json",
        "consumer.log",
        "results.json",
        "summary.md",
        "tests.log",
    ]  # at most 8 come back from the device machine
    res = json.loads((out / "results.json").read_text())
    assert [p["name"] for p in res["phases"] if p["ok"]] == ["tests", "bench", "consumer"]
    assert res["tests"]["finished"] and res["tests"]["failed"] == 0 and res["tests"]["passed"] >= 2
    rows = res["bench"]["rows"]
    assert len(rows) == 5 and all(r["ok"] for r in rows), res["bench"]["failures"]
    assert all(r["sim_tok_s_serial"] > 0 and r["tokens"] == 1 for r in rows if r["system"] == "us")
    assert [r["ok"] for r in res["consumer"]["rows"]] == [True]
    md = (out / "summary.md").read_text()
    assert "## Goals" in md and "| 50 % | us | 16 | lookahead |" in md and "rtx3060-12gb" in md


def test_missing_pytest_is_reported_or_installed_from_wheels(tmp_path):
    env = dict(CHILD_ENV)
    got, note = check.ensure_pytest(sys.executable, env, tmp_path, wheels=tmp_path / "none")
    assert got is env and note == "pytest found"
    fake = tmp_path / "python"  # an interpreter without pytest
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    got, note = check.ensure_pytest(str(fake), env, tmp_path, wheels=tmp_path / "none")
    assert got is env and "pytest is not installed" in note and "holds no wheels" in note
