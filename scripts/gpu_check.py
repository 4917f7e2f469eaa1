"""Issue 20's GPU check in one command (docs/gpu.md): `scripts/gpu_check.sh OUTDIR [--cpu-smoke]`.

Phases, each a subprocess under its own timeout (a phase that fails or runs out of time is recorded and the
next one runs):
  tests     pytest tests/test_cuda.py: every family on CUDA against transformers on CUDA (float32)
  bench     scripts/gpu_bench.py bench: Mixtral widths, budgets 50/25/100 %, us vs transformers + accelerate
  consumer  scripts/gpu_bench.py consumer: the rtx3060-12gb plan for Mixtral-8x7B scaled to these layers
OUTDIR gets tests.log, bench.log, consumer.log, bench.json, consumer.json, results.json and summary.md (the
tables). --cpu-smoke runs the same phases on a tiny model on the CPU with 1 decoded token (a test does).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
USAGE = "usage: scripts/gpu_check.sh OUTDIR [--cpu-smoke] [--work DIR] [--layers N]"
GOAL_SPEEDUP, GOAL_STALL, GOAL_SIM = 3.0, 0.30, 0.25  # the goals


@dataclass(frozen=True)
class Phase:
    name: str
    argv: list[str]
    timeout: float  # seconds


def phases(out: Path, work: Path, smoke: bool, layers: int, python: str = sys.executable) -> list[Phase]:
    """The three phases; on the GPU their timeouts add up to 460 s (the check has 8 minutes)."""
    bench = [python, str(REPO / "scripts" / "gpu_bench.py")]
    common = ["--work", str(work), "--layers", str(layers)]
    if smoke:
        common += [
            "--cpu-smoke",
            "--new-tokens",
            "1",
            "--warm-tokens",
            "1",
            "--prompt-tokens",
            "4",
            "--accelerate-tokens",
            "1",
        ]
    grid = ["--budgets", "50", "--prefetch", "lookahead,none", "--bits", "16,4"] if smoke else []
    t = (300, 300, 300) if smoke else (190, 210, 60)  # smoke: only a hang stops it (a loaded CI box is slow)
    return [
        # -q comes from pyproject's addopts (a second one would drop the summary line parse_pytest reads)
        Phase(
            "tests", [python, "-m", "pytest", "tests/test_cuda.py", "-rfEs", "-p", "no:cacheprovider"], t[0]
        ),
        Phase("bench", [*bench, "bench", "--out", str(out / "bench.json"), *common, *grid], t[1]),
        Phase("consumer", [*bench, "consumer", "--out", str(out / "consumer.json"), *common], t[2]),
    ]


def run_phase(phase: Phase, out: Path, env: dict | None = None) -> dict:
    """Run one phase into OUT/<name>.log; a phase past its timeout is stopped (its own process group)."""
    log = out / f"{phase.name}.log"
    t0 = time.monotonic()
    timed_out = False
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(phase.argv)}\n")
        f.flush()
        try:
            proc = subprocess.Popen(
                phase.argv, stdout=f, stderr=subprocess.STDOUT, cwd=str(REPO), env=env, start_new_session=True
            )
        except OSError as e:
            f.write(f"could not start: {e}\n")
            return {
                "name": phase.name,
                "rc": None,
                "timed_out": False,
                "seconds": 0.0,
                "ok": False,
                "log": log.name,
                "error": str(e),
            }
        try:
            rc = proc.wait(timeout=phase.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                rc = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
            f.write(f"\n[gpu_check] {phase.name}: stopped after its timeout of {phase.timeout:.0f} s\n")
    return {
        "name": phase.name,
        "rc": rc,
        "timed_out": timed_out,
        "seconds": time.monotonic() - t0,
        "ok": rc == 0 and not timed_out,
        "log": log.name,
    }


def ensure_pytest(
    python: str, env: dict, work: Path, wheels: Path = REPO / "shared" / "wheels"
) -> tuple[dict, str]:
    """The tests phase's environment: as is when pytest imports; else pytest installed from wheels the repo
    carries (shared/wheels, e.g. `pip download pytest -d shared/wheels`) into WORK/pydeps.
    Returns (env, note)."""
    probe = [python, "-c", "import pytest"]
    if subprocess.run(probe, env=env, capture_output=True, check=False).returncode == 0:
        return env, "pytest found"
    if not list(wheels.glob("*.whl")):
        return env, f"pytest is not installed and {wheels} holds no wheels: the CUDA tests cannot run"
    target = work / "pydeps"
    pip = [
        python,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--find-links",
        str(wheels),
        "--target",
        str(target),
        "pytest",
    ]
    r = subprocess.run(pip, env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return (
            env,
            f"pytest is not installed; installing it from {wheels} failed: {(r.stderr or r.stdout)[-300:]}",
        )
    env = {**env, "PYTHONPATH": os.pathsep.join([env.get("PYTHONPATH", ""), str(target)]).strip(os.pathsep)}
    return env, f"pytest installed from {wheels} into {target}"


# ---- parsing -----------------------------------------------------------------------------------------------

_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def parse_pytest(text: str) -> dict:
    """Counts from pytest's last summary line, and the FAILED / ERROR test ids (-rfE)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    summary = [ln for ln in text.splitlines() if _COUNT.search(ln) and " in " in ln]
    if summary:
        for n, kind in _COUNT.findall(summary[-1]):
            kind = "errors" if kind.startswith("error") else kind
            counts[kind] = counts.get(kind, 0) + int(n)
    failed = [
        ln.split()[1]
        for ln in text.splitlines()
        if ln.startswith(("FAILED ", "ERROR ")) and len(ln.split()) > 1
    ]
    return {**counts, "failed_tests": failed, "finished": bool(summary)}


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def sim_for(row: dict) -> float | None:
    """The prediction a row is held to: transfers serial without prefetch, hidden with it."""
    return (
        row.get("sim_tok_s_serial") if row.get("prefetch") in (None, "none") else row.get("sim_tok_s_overlap")
    )


def _row(rows, **kw) -> dict | None:
    return next((r for r in rows if r.get("ok") and all(r.get(k) == v for k, v in kw.items())), None)


def goals(bench: dict | None) -> list[dict]:
    """The issue's goals against the bench rows: measured value, target, met (None: not measured)."""
    rows = (bench or {}).get("rows", [])
    out = []
    for pct in (50, 25):
        acc = _row(rows, system="accelerate", pct=pct)
        ours = [
            r
            for r in rows
            if r.get("ok") and r.get("system") == "us" and r.get("bits") == 16 and r.get("pct") == pct
        ]
        best = max(ours, key=lambda r: r["decode_tok_s"], default=None)
        v = best["decode_tok_s"] / acc["decode_tok_s"] if best and acc and acc.get("decode_tok_s") else None
        out.append(
            {
                "goal": f"16-bit decode ÷ accelerate at {pct} %",
                "target": f">= {GOAL_SPEEDUP:g}x",
                "value": v,
                "detail": best and f"prefetch {best['prefetch']}",
                "met": None if v is None else v >= GOAL_SPEEDUP,
            }
        )
    la = _row(rows, system="us", bits=16, pct=50, prefetch="lookahead")
    v = la.get("stall_share") if la else None
    out.append(
        {
            "goal": "stall share of decode time, lookahead, 16-bit, 50 %",
            "target": f"<= {GOAL_STALL:.0%}",
            "value": v,
            "detail": la and f"{la.get('stall_ms_per_token', 0):.2f} ms/token",
            "met": None if v is None else v <= GOAL_STALL,
        }
    )
    ratios = [
        r["decode_tok_s"] / sim_for(r) for r in rows if r.get("ok") and r.get("system") == "us" and sim_for(r)
    ]
    worst = max(ratios, key=lambda x: abs(x - 1), default=None)
    out.append(
        {
            "goal": "measured ÷ simulator, worst us row",
            "target": f"within {GOAL_SIM:.0%}",
            "value": worst,
            "detail": f"{len(ratios)} rows",
            "met": None if worst is None else abs(worst - 1) <= GOAL_SIM,
        }
    )
    return out


# ---- rendering ---------------------------------------------------------------------------------------------


def _f(v, fmt="{:.2f}", none="-") -> str:
    return none if v is None else fmt.format(v)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _pct(v) -> str:
    return "-" if v is None else f"{v:g} %"


def render(res: dict) -> str:
    """summary.md from results.json's dict."""
    lines = [
        f"# GPU check (issue 20): {res.get('mode')}",
        "",
        f"`{res.get('command')}` on {res.get('gpu', '?')}, {res.get('started')} .. {res.get('finished')}",
        "",
    ]
    lines += ["## Phases", ""]
    lines += _table(
        ["phase", "status", "seconds", "log"],
        [
            [
                p["name"],
                "ok" if p["ok"] else ("timed out" if p.get("timed_out") else f"failed (rc {p['rc']})"),
                f"{p['seconds']:.0f}",
                p["log"],
            ]
            for p in res.get("phases", [])
        ],
    )
    t = res.get("tests") or {}
    lines += [
        "",
        "## CUDA tests (tests/test_cuda.py)",
        "",
        f"{t.get('passed', 0)} passed, {t.get('failed', 0)} failed, {t.get('errors', 0)} errors, "
        f"{t.get('skipped', 0)} skipped"
        + ("" if t.get("finished", True) else " (did not finish)")
        + (f"; {res['pytest']}" if res.get("pytest", "pytest found") != "pytest found" else ""),
    ]
    lines += [f"- FAILED {name}" for name in t.get("failed_tests", [])]
    bench = res.get("bench") or {}
    m = bench.get("machine") or {}
    if m:
        lines += ["", "## This machine (measured)", ""]
        lines += _table(
            ["pinned host→device", "device copy", "expert GEMV (bf16)", "per-token overhead", "disk"],
            [
                [
                    f"{_f(m.get('link_gbs'), '{:.1f}')} GB/s",
                    f"{_f(m.get('device_copy_gbs'), '{:.0f}')} GB/s",
                    f"{_f(m.get('expert_gemv_gbs'), '{:.0f}')} GB/s",
                    f"{_f(m.get('token_overhead_ms'))} ms",
                    f"{_f(m.get('disk_gbs'), '{:.1f}')} GB/s",
                ]
            ],
        )
    rows = bench.get("rows") or []
    if rows:
        acc = {r["pct"]: r for r in rows if r.get("system") == "accelerate" and r.get("ok")}
        w = bench.get("widths", {})
        lines += [
            "",
            f"## Bench: {bench.get('layers')} layers, hidden {w.get('hidden_size')}, "
            f"{w.get('num_local_experts')} experts x {w.get('intermediate_size')}, top-"
            f"{w.get('num_experts_per_tok')}; {bench.get('new_tokens')} decoded tokens "
            f"(accelerate {bench.get('accelerate_tokens')})",
            "",
            "Budget: % of the expert bytes on the device (+ backbone); every expert also in pinned host RAM. "
            "sim: the simulator on the row's own routing with this machine's profile (serial without "
            "prefetch, transfers hidden with it).",
            "",
        ]
        body = []
        for r in rows:
            if not r.get("ok"):
                body.append(
                    [
                        _pct(r.get("pct")),
                        r["system"],
                        str(r.get("bits")),
                        str(r.get("prefetch") or "-"),
                        "failed: " + str(r.get("error", ""))[:80],
                        *["-"] * 7,
                    ]
                )
                continue
            a = acc.get(r.get("pct"))
            sim = sim_for(r) if r["system"] == "us" else None
            body.append(
                [
                    _pct(r.get("pct")),
                    r["system"],
                    str(r.get("bits")),
                    str(r.get("prefetch") or "-"),
                    _f(r.get("decode_tok_s")),
                    _f(
                        r["decode_tok_s"] / a["decode_tok_s"] if a and r["system"] == "us" else None,
                        "{:.1f}x",
                    ),
                    _f(r.get("hit_rate"), "{:.3f}"),
                    _f(r.get("stall_ms_per_token")),
                    _f(r.get("stall_share"), "{:.0%}"),
                    _f(r.get("link_gbs"), "{:.1f}"),
                    _f(sim),
                    _f(r["decode_tok_s"] / sim if sim else None),
                ]
            )
        lines += _table(
            [
                "budget",
                "system",
                "bits",
                "prefetch",
                "decode tok/s",
                "÷ accelerate",
                "hit rate",
                "stall ms/token",
                "stall %",
                "link GB/s",
                "sim tok/s",
                "measured ÷ sim",
            ],
            body,
        )
    gl = res.get("goals") or []
    if gl:
        lines += ["", "## Goals", ""]
        lines += _table(
            ["goal", "target", "measured", "met"],
            [
                [
                    g["goal"],
                    g["target"],
                    _f(g["value"], "{:.2f}") + (f" ({g['detail']})" if g.get("detail") else ""),
                    {True: "yes", False: "NO", None: "not measured"}[g["met"]],
                ]
                for g in gl
            ],
        )
    c = res.get("consumer") or {}
    if c.get("plan"):
        p, s = c["plan"], c.get("scaled") or {}
        rec = p.get("recommended") or {}
        lines += [
            "",
            f"## {c.get('profile')}: the planner's Mixtral-8x7B plan scaled to these layers",
            "",
            f"Plan: experts {rec.get('expert_bits')}-bit, {_f(s.get('device_share'), '{:.1%}')} of them "
            f"on the device, {_f(s.get('host_share'), '{:.1%}')} in host RAM, "
            f"{_f(s.get('disk_share'), '{:.1%}')} on "
            f"disk; prefetch {'on' if rec.get('prefetch') else 'off'}, CPU-computed misses "
            f"{'on' if rec.get('cpu_misses') else 'off'}. Its prediction for the full model on the card: "
            f"hit rate {_f(p.get('predicted_hit_rate'), '{:.3f}')}, {_f(p.get('predicted_tok_s_serial'))} .. "
            f"{_f(p.get('predicted_tok_s_overlap'))} tok/s ({p.get('trace')}).",
            f"Scaled: {s.get('on_device')} of {s.get('experts')} experts on the device "
            f"(--memory {c.get('memory')}), {c.get('store_bits')}-bit store.",
            "",
        ]
        body = []
        for r in c.get("rows", []):
            if not r.get("ok"):
                body.append(["failed: " + str(r.get("error", ""))[:80], *["-"] * 6])
                continue
            body.append(
                [
                    _f(r.get("decode_tok_s")),
                    _f(r.get("hit_rate"), "{:.3f}"),
                    _f(r.get("cpu_experts_per_token")),
                    _f(r.get("stall_share"), "{:.0%}"),
                    _f(sim_for(r)),
                    _f(r["decode_tok_s"] / sim_for(r) if sim_for(r) else None),
                    f"{_f(r.get('card_sim_tok_s_serial'))} .. {_f(r.get('card_sim_tok_s_overlap'))}",
                ]
            )
        lines += _table(
            [
                "decode tok/s here",
                "hit rate",
                "CPU experts/token",
                "stall %",
                "sim here",
                "measured ÷ sim",
                f"sim on {c.get('profile')} (these layers)",
            ],
            body,
        )
    fails = [*(bench.get("failures") or []), *(c.get("failures") or [])]
    if fails:
        lines += ["", "## Failures", ""] + [
            f"- {f.get('system')} {f.get('bits')}-bit {_pct(f.get('pct'))} "
            f"{f.get('prefetch')}: {f.get('error')}"
            for f in fails
        ]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- the command -------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"gpu_check: {message}; {USAGE}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="gpu_check", add_help=False)
    p.add_argument("outdir")
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--work", default=None)
    p.add_argument("--layers", type=int, default=2)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    a = parse_args(argv)
    out = Path(a.outdir)
    if out.exists() and not out.is_dir():
        print(f"gpu_check: {out} exists and is not a folder", file=sys.stderr)
        return 2
    if a.layers < 1:
        print(f"gpu_check: --layers must be >= 1, got {a.layers}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else Path(tempfile.gettempdir()) / "moe-offload-gpu-check"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    res = {
        "mode": "cpu-smoke" if a.cpu_smoke else "gpu",
        "command": "scripts/gpu_check.sh " + shlex.join(argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "phases": [],
    }
    work.mkdir(parents=True, exist_ok=True)
    test_env, res["pytest"] = ensure_pytest(sys.executable, env, work)
    for ph in phases(out, work, a.cpu_smoke, a.layers):
        print(f"gpu_check: {ph.name} (at most {ph.timeout:.0f} s) ...", file=sys.stderr, flush=True)
        r = run_phase(ph, out, test_env if ph.name == "tests" else env)
        print(
            f"gpu_check: {ph.name}: {'ok' if r['ok'] else 'FAILED'} in {r['seconds']:.0f} s", file=sys.stderr
        )
        res["phases"].append(r)
    res["tests"] = parse_pytest((out / "tests.log").read_text(errors="replace"))
    res["bench"], res["consumer"] = read_json(out / "bench.json"), read_json(out / "consumer.json")
    res["goals"] = goals(res["bench"])
    ran = res["bench"] or res["consumer"] or {}  # the phases name the device they ran on
    res["gpu"], res["torch"] = ran.get("gpu", "unknown"), ran.get("torch", "unknown")
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_atomic(out / "results.json", json.dumps(res, indent=1, default=str))
    try:
        text = render(res)
    except Exception as e:  # noqa: BLE001  (results.json is written; the tables are a view of it)
        text = f"# GPU check (issue 20)\n\nsummary not rendered ({type(e).__name__}: {e}); see results.json\n"
    write_atomic(out / "summary.md", text)
    print(f"gpu_check: wrote {out / 'summary.md'} and {out / 'results.json'}", file=sys.stderr)
    return 0 if all(p["ok"] for p in res["phases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
