"""The simulator against a bench run: predicted vs measured decode tok/s for every row of our engine in one or
more `moe-offload bench --out` folders (results.json, and the trace-roundN.npz routing each round recorded).

    PYTHONPATH=. python scripts/validate_scale.py docs/bench/mixtral-8x7b-L4-q4 docs/bench/mixtral-8x7b-L4-q4-resident
        [--threads N] [--no-probe] [--json OUT] [--without expert-call,embed,decode,disk-one-stream] [--ablations]

Per row and round the recorded trace is replayed through `sim.simulate` (the runtime's cache-policy code) at the
row's `--memory`, with the engine's own expert bytes (stored: the run's 4-bit span; held: the codec's unit
footprint, `plan.engine_expert_bytes`) and this time model:

    per token = backbone bytes read (the embedding table aside) / float16 GEMV rate + per-token overhead
              + expert uses x one expert call (the engine's unit and kernel at the model's shapes and bits)
              + misses x (stored bytes / the loader's disk rate + decoding the blob into a unit)
                                                                        (serial: these rows ran without prefetch)

The replay starts warm, as the run did: the run decoded after a warm-up generation and its prompt's prefill,
whose routing these traces do not hold, so each round's replay is primed (uncounted) with the round's own decode
rows, the experts its prefill had made resident standing in for the prefill's (`sim.simulate(prime=)`).

Figures, each from the run's results.json where the bench recorded it (`limits`: gemv_bw, expert_call_s,
token_overhead_s, miss_cpu_s, disk_loader_bw; the disk otherwise from the run's probe with several O_DIRECT reads in flight,
as the loader's workers read), else probed now on this machine and scaled to the run by the ratio of the
float16 GEMV probe then and now (the same `measure_gemv` call): one machine, two moments, compared as ratios.
`--scale cpu-share` instead carries them to the row by its CPU share: a probed time x (CPU cores the probes got /
the cores the row's decode got, bench's `cpu_cores`), the GEMV rate / the same (docs/simulator.md: unstable
on a busy machine, as the probes' average share is not the share their best-of timings ran at). The miss decode is timed with the run's codec
(its stored bytes tell 8- from 16-bit metadata). The script prints the figures it used, the prediction, the
measurement, their ratio, and whether the prediction is within 25 %.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

TOLERANCE = 0.25
DISK_KEY = "O_DIRECT 8 MiB reads"  # the bench's single-stream disk probe (limits.disk_read_bw_by_method)


# ---- arithmetic (pure; tests/test_sim_scale.py holds it) ---------------------------------------------------


def compare(predicted: float | None, measured: float | None, tolerance: float = TOLERANCE) -> dict:
    """measured / predicted and whether the prediction is within `tolerance` of the measurement."""
    if not predicted or not measured:
        return {"ratio": None, "error": None, "within": None}
    err = predicted / measured - 1.0
    return {"ratio": measured / predicted, "error": err, "within": abs(err) <= tolerance}


def cpu_share_factor(now_cores: float | None, row_cores: float | None) -> float | None:
    """How much slower the row's CPU work ran than the probes now: CPU cores the probes got (CPU seconds per
    wall second, all threads) over the cores the row's decode got (bench's `cpu_cores`). The decode's CPU
    seconds per token hold steady across load (Qwen3 rows: 0.20-0.25 s at 0.85-1.66 cores); its wall time is
    those over the cores it got. None when either is unknown."""
    if not now_cores or not row_cores:
        return None
    return now_cores / row_cores


def run_figures(limits: dict, now: dict | None, scale: str = "gemv", row_cores: float | None = None,
                reads: str = "direct") -> dict:
    """The time model's figures for one run: recorded ones from `limits`, the rest from probes taken `now`
    and carried over to the run. scale "cpu-share": every probed time x now_cores / row_cores and the GEMV
    rate (the backbone's) the same way (cpu_share_factor; compute is CPU work, the row got `row_cores`
    cores), the run's own GEMV probe kept where the factor is unknown; scale "gemv" (the earlier model):
    times x gemv_now / gemv_run of the same float16 GEMV probe, the run's GEMV rate. The disk is the run's
    probe either way. Returns {gemv_bw, expert_call_s, token_overhead_s, miss_cpu_s, disk_bw, basis}."""
    out, basis = {"gemv_bw": limits["gemv_bw"]}, {"gemv_bw": "run"}
    speed, how = None, None
    if now is not None:
        k = cpu_share_factor(now.get("cpu_cores"), row_cores) if scale == "cpu-share" else None
        if k is not None:
            speed, how = k, f"now x {k:.2f} cores now/row"  # times x k, rates / k
            out["gemv_bw"], basis["gemv_bw"] = now["gemv_bw"] / k, f"now / {k:.2f} cores now/row"
        else:
            speed = now["gemv_bw"] / limits["gemv_bw"]  # > 1: this machine is faster now than in the run
            how = f"now x {speed:.2f}"
    for key in ("expert_call_s", "token_overhead_s", "miss_cpu_s"):
        if limits.get(key) is not None:
            out[key], basis[key] = limits[key], "run"
        elif now is not None:
            out[key], basis[key] = now[key] * speed, how
        else:
            out[key], basis[key] = None, "missing"
    by_method = limits.get("disk_read_bw_by_method") or {}
    in_flight = next((v for k, v in by_method.items() if k.startswith("O_DIRECT") and "in flight" in k), None)
    if reads != "direct" and limits.get(f"disk_loader_bw_{reads}") is not None:  # the row read its misses so
        out["disk_bw"], basis["disk_bw"] = limits[f"disk_loader_bw_{reads}"], f"run, {reads}"
    elif limits.get("disk_loader_bw") is not None:
        out["disk_bw"], basis["disk_bw"] = limits["disk_loader_bw"], "run"
    elif in_flight:  # the loader keeps several reads in flight (its workers): the run's probe of that
        out["disk_bw"], basis["disk_bw"] = in_flight, "run, reads in flight"
    else:
        out["disk_bw"], basis["disk_bw"] = by_method.get(DISK_KEY) or limits.get("disk_read_bw"), "run, one stream"
    out["basis"] = basis
    return out


# ---- probes now ---------------------------------------------------------------------------------------------


def run_meta_bits(D: int, I: int, bits: int, stored: int | None) -> int | None:
    """The scale/zero bits of the codec whose blob is `stored` bytes (8 or 16; the default codec changed after
    some runs, and an 8-bit-meta blob's decode expands its metadata, a 16-bit one's hardly costs), None if
    neither matches."""
    from moe_offload.experts import ExpertShape
    from moe_offload.quant.codec import HQQCodec
    from moe_offload.store.format import round_up

    for mb in (8, 16):  # the bench's sizes count the blob with its 4096-byte alignment
        codec = HQQCodec({"name": "hqq", "bits": bits, "quantizer": "rtn", "meta_bits": mb}) if bits < 16 else None
        if codec and stored and stored in (codec.nbytes(ExpertShape(D, I)), round_up(codec.nbytes(ExpertShape(D, I)))):
            return mb
    return None


def probe_now(config: dict, bits: int, dtype: str, threads: int, stored: int | None = None) -> dict:
    """This machine now: the bench's float16 GEMV probe, one expert call at `bits`, the per-token overhead at
    toy widths, the decode of a missed blob of the run's codec (the one `stored` bytes fit), and the CPU cores
    the probes got (CPU seconds / wall seconds)."""
    import torch

    from moe_offload.hardware import (expert_call_seconds, expert_decode_seconds, measure_gemv,
                                      measure_token_overhead)
    from moe_offload.sim import expert_dims

    torch.set_num_threads(threads)
    D, I = expert_dims(config)
    t0, c0 = time.perf_counter(), time.process_time()
    out = {"gemv_bw": measure_gemv(threads, dtype, 2 * I, D)["best"],
           "expert_call_s": expert_call_seconds(D, I, min(bits, 16), dtype),
           "token_overhead_s": measure_token_overhead(config, dtype),
           "miss_cpu_s": expert_decode_seconds(D, I, min(bits, 16), dtype,
                                               meta_bits=run_meta_bits(D, I, bits, stored))}
    out["cpu_cores"] = (time.process_time() - c0) / (time.perf_counter() - t0)  # the cores the probes got
    return out


# ---- prediction -----------------------------------------------------------------------------------------------


def prime_rows(trace, warm: str):
    """What the replay replays, uncounted, before the recorded routing. "trace": the round's own decode rows
    (the run decoded after a warm-up generation and the prompt's prefill, which these traces do not record:
    the experts its decode uses stand in for those the prefill made resident; exact where every used expert
    fits, an approximation of the order under a tight budget); "none": a cold start."""
    if warm != "trace" or trace.meta.get("prefill_rows"):  # a newer bench's trace holds the prefill's routing
        return None
    return trace.experts


def predict_round(trace, fig: dict, *, memory: int, policy: str, bits: int, stored: int, resident: int,
                  backbone: int, embed: int, warmup: int, prefetch: bool = False, warm: str = "trace",
                  preload: bool = False) -> dict:
    """sim.simulate of one recorded round with the figures of `run_figures`."""
    from moe_offload.hardware import HardwareProfile
    from moe_offload.sim import simulate

    hw = HardwareProfile(name="bench run", description="", device="cpu", device_bytes=1 << 50, host_bytes=0,
                         link_bw=0.0, host_bw=fig["gemv_bw"], disk_bw=fig["disk_bw"], device_bw=fig["gemv_bw"],
                         cpu_bw=fig["gemv_bw"], cpu_flops=1e12, device_flops=1e12, link_latency_s=0.0,
                         token_overhead_s=fig["token_overhead_s"] or 0.0, expert_call_s=fig["expert_call_s"] or 0.0,
                         miss_cpu_s=fig.get("miss_cpu_s") or 0.0)
    D, I = fig["dims"]
    trace = replace(trace, expert_params=3 * D * I)
    r = simulate(trace, hw, memory=memory, policy=policy, expert_bits=bits if bits < 16 else None,
                 backbone_bytes=backbone, embed_bytes=embed, warmup=warmup, stored_bytes=stored,
                 computed_bytes_each=resident, prime=prime_rows(trace, warm), preload=preload)
    T = r.tokens
    return {"tok_s": r.tok_s_overlap if prefetch else r.tok_s_serial, "hit_rate": r.hit_rate,
            "ms_experts": 1e3 * r.t_experts / T, "ms_backbone_overhead": 1e3 * (r.t_device - r.t_experts) / T,
            "ms_disk": 1e3 * r.t_disk / T}


ABLATIONS = {  # the time model without one of its real-width terms (what it was before them)
    "expert-call": "expert bytes at the float16 GEMV rate instead of the engine's expert call",
    "embed": "the embedding table streamed every token",
    "decode": "no decode of a missed blob",
    "disk-one-stream": "the single-stream disk probe",
    "warm": "the replay from a cold cache (only the warm-up generation's decode before the counted tokens)",
}
SCALES = ("gemv", "cpu-share")  # how probes taken now are carried to the run (run_figures)


def ablate(fig: dict, limits: dict, embed: int, without: set[str]) -> tuple[dict, int]:
    """`fig` and the embedding bytes with the terms in `without` taken out (ABLATIONS)."""
    fig = dict(fig)
    if "expert-call" in without:
        fig["expert_call_s"] = None
    if "decode" in without:
        fig["miss_cpu_s"] = None
    if "disk-one-stream" in without:
        fig["disk_bw"] = (limits.get("disk_read_bw_by_method") or {}).get(DISK_KEY) or limits.get("disk_read_bw")
    return fig, 0 if "embed" in without else embed


def validate(folder: Path, threads: int | None, probe: bool, cache: dict, without: set[str] = frozenset(),
             scale: str = "gemv") -> list[dict]:
    from moe_offload.plan import engine_expert_bytes
    from moe_offload.sim import expert_dims, load_trace

    res = json.loads((folder / "results.json").read_text())
    limits, dtype = res["limits"], res.get("dtype", "float16")
    probed_bits = limits.get("probe_bits")  # bench records sim.model_probes at one precision
    th = threads or res.get("threads") or 1
    traces = sorted(folder.glob("trace-round*.npz"))
    if not traces:
        raise SystemExit(f"{folder}: no trace-roundN.npz (the bench records them with --us-bits rows)")
    trs = [load_trace(t) for t in traces]
    config = trs[0].meta["config"]
    D, I = expert_dims(config)
    out = []
    for row in res["rows"]:
        if row.get("system") != "us":
            continue
        base = {"folder": str(folder), "label": row["label"], "config": row["config"], "threads": res.get("threads"),
                "measured_tok_s": None, "predicted_tok_s": None}
        if not row.get("ok"):
            out.append({**base, "note": (row.get("error") or "failed")[:80]})
            continue
        bits = int(row.get("expert_bits") or 16)
        z = res["sizes_q"].get(str(bits)) if bits < 16 else res["sizes"]
        stored = z["expert"]
        exact = engine_expert_bytes(D, I, bits, 64, dtype) if bits < 16 else None
        resident = exact[1] if exact else stored
        key = (json.dumps(config, sort_keys=True), bits, th, dtype)  # probes once per model and precision
        if probed_bits is not None and probed_bits != bits:  # the run's probes are of another precision
            limits = {k: v for k, v in res["limits"].items() if k not in ("expert_call_s", "miss_cpu_s")}
        else:
            limits = res["limits"]
        now = None
        if probe and any(limits.get(k) is None for k in ("expert_call_s", "token_overhead_s", "miss_cpu_s")):
            if key not in cache:
                cache[key] = probe_now(config, bits, dtype, th, stored)
            now = cache[key]
        s = row["summary"]
        reads = (row.get("info") or {}).get("disk_reads") or "direct"
        fig, embed = ablate({**run_figures(limits, now, scale, s.get("cpu_cores"), reads), "dims": (D, I)}, limits,
                            z["embed"], without)
        prefetch = (row.get("info") or {}).get("prefetch", "none") not in ("none", None)
        preload = bool((row.get("info") or {}).get("preloaded_experts"))  # the engine read every expert at load
        preds = [predict_round(tr, fig, memory=row["memory"], policy=row.get("policy") or "lru", bits=bits,
                               stored=stored, resident=resident, backbone=z["backbone"],
                               embed=embed, warmup=int(tr.meta.get("warmup_tokens") or 0), prefetch=prefetch,
                               warm="none" if "warm" in without else "trace", preload=preload)
                 for tr in trs]
        pred = {k: statistics.median(p[k] for p in preds) for k in preds[0]}
        measured = s["decode_tok_s"]["median"]
        out.append({**base, "measured_tok_s": measured, "predicted_tok_s": pred["tok_s"],
                    "measured_hit_rate": s.get("hit_rate"), "predicted_hit_rate": pred["hit_rate"],
                    "measured_ms_stall": 1e3 * s["stall_s_per_token"] if s.get("stall_s_per_token") is not None else None,
                    "cpu_cores": s.get("cpu_cores"), **{k: pred[k] for k in ("ms_experts", "ms_backbone_overhead", "ms_disk")},
                    "figures": {k: v for k, v in fig.items() if k != "dims"}, "stored": stored, "resident": resident,
                    **compare(pred["tok_s"], measured)})
    return out


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def table(rows: list[dict]) -> str:
    lines = ["| run | threads | budget | predicted tok/s | measured tok/s | measured ÷ predicted | within 25 % | "
             "hit rate pred / meas | ms/token predicted: experts, backbone + overhead, misses (read + decode) | figures |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r.get("figures") or {}
        b = f.get("basis") or {}
        figs = (f"GEMV {_f(f.get('gemv_bw') and f['gemv_bw'] / 1e9, '{:.1f}')} GB/s ({b.get('gemv_bw', '-')}); "
                f"expert call {_f(f.get('expert_call_s') and 1e3 * f['expert_call_s'], '{:.1f}')} ms "
                f"({b.get('expert_call_s', '-')}); decode per miss {_f(f.get('miss_cpu_s') and 1e3 * f['miss_cpu_s'], '{:.1f}')} ms "
                f"({b.get('miss_cpu_s', '-')}); overhead {_f(f.get('token_overhead_s') and 1e3 * f['token_overhead_s'], '{:.1f}')} ms "
                f"({b.get('token_overhead_s', '-')}); disk {_f(f.get('disk_bw') and f['disk_bw'] / 1e9)} GB/s "
                f"({b.get('disk_bw', '-')})") if f else r.get("note", "")
        within = {True: "yes", False: "**no**", None: "-"}[r.get("within")]
        lines.append(f"| {Path(r['folder']).name} | {_f(r.get('threads'), '{}')} | {r['label']} | "
                     f"{_f(r['predicted_tok_s'])} | {_f(r['measured_tok_s'])} | {_f(r.get('ratio'))} | {within} | "
                     f"{_f(r.get('predicted_hit_rate'), '{:.3f}')} / {_f(r.get('measured_hit_rate'), '{:.3f}')} | "
                     f"{_f(r.get('ms_experts'), '{:.0f}')}, {_f(r.get('ms_backbone_overhead'), '{:.0f}')}, "
                     f"{_f(r.get('ms_disk'), '{:.0f}')} | {figs} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="bench --out folders (results.json + trace-roundN.npz)")
    p.add_argument("--threads", type=int, default=None, help="threads for the probes now (default: the run's)")
    p.add_argument("--no-probe", action="store_true", help="use only what results.json recorded")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--without", default="", help="comma list of terms to leave out: " + ", ".join(
        f"{k} ({v})" for k, v in ABLATIONS.items()))
    p.add_argument("--scale", choices=SCALES, default="gemv", help="carry probes taken now to the run by the "
                   "float16 GEMV probe's ratio then / now (default) or by the row's CPU share (cores the probes got "
                   "/ cores the row's decode got)")
    p.add_argument("--ablations", action="store_true", help="also each term left out in turn, and all of them, "
                                                               "with the same probes")
    a = p.parse_args(argv)
    without = {w for w in a.without.split(",") if w}
    if without - set(ABLATIONS):
        print(f"error: --without takes {', '.join(ABLATIONS)}, got {a.without!r}", file=sys.stderr)
        return 2
    for folder in a.folders:
        if not (Path(folder) / "results.json").is_file():
            print(f"error: {folder}: no results.json", file=sys.stderr)
            return 2
    variants = [without]
    if a.ablations:  # the same probes for every variant: the differences are the terms, not the machine
        variants = [set(), *({t} for t in ABLATIONS), set(ABLATIONS)]
    cache, out = {}, []
    for w in variants:
        rows = [r for folder in a.folders for r in validate(Path(folder), a.threads, not a.no_probe, cache, w, a.scale)]
        if len(variants) > 1:
            print(f"\nwithout: {', '.join(sorted(w)) or 'nothing (the full model)'}")
        print(table(rows))
        out.append({"without": sorted(w), "rows": rows})
    if a.json:
        Path(a.json).write_text(json.dumps(out[0]["rows"] if len(out) == 1 else out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
