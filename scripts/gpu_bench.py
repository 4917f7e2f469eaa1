"""The GPU bench of issue 20 (docs/gpu.md), run by scripts/gpu_check.sh: a model with Mixtral-8x7B's layer
widths (hidden 4096, 8 experts x 14336, top-2) and a few layers of random weights built on the device.

    python scripts/gpu_bench.py bench    --work DIR --out bench.json    [--layers 2] [--budgets 50,25,100]
    python scripts/gpu_bench.py consumer --work DIR --out consumer.json [--profile rtx3060-12gb]
    --cpu-smoke: the same code on a tiny Mixtral on the CPU with a few tokens (a test runs it)

bench: for each budget (% of the expert bytes on the device, + backbone + the CUDA reserve; every expert also
in the pinned host tier, as accelerate holds the rest in host RAM), us (LRU; prefetch none / lookahead / auto;
16-bit and 4-bit experts) and transformers + accelerate (device_map="auto", max_memory = the same device
bytes). Per row: decode tok/s, hit rate, stall per decoded token (time the compute thread waited for copies),
bytes and GB/s over the link, and the simulator's prediction on the row's own recorded routing with the
profile of this machine measured here (pinned host->device copy, GPU expert GEMV, per-token overhead).
consumer: the planner's Mixtral-8x7B plan for a 12 GB card, scaled to these layers (the same share of experts
on the device and in host RAM, the same bits, prefetch and CPU-computed misses), run here; beside it the
planner's own prediction and the simulator's on the measured routing, for this machine and for the card.

Results go to --out as JSON, rewritten (temp + rename) after every row, so a phase cut short by its timeout
still leaves the rows it finished. Random weights: tokens mean nothing; the 4-bit store encodes one expert
(RTN, group 64) and repeats its blob for every expert (the bench measures bytes and kernels, not values).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GB, MiB = 1e9, 1 << 20
# Mixtral-8x7B's published config.json (the planner reads only these keys)
MIXTRAL_8X7B = dict(
    model_type="mixtral",
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=32000,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=32768,
    rope_theta=1e6,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    num_local_experts=4,
    num_experts_per_tok=2,
)
GROUP = 64  # 4-bit group size


def model_config(layers: int, smoke: bool) -> dict:
    base = {k: v for k, v in MIXTRAL_8X7B.items() if k != "model_type"}
    if smoke:
        base.update(TINY)
    return {
        **base,
        "num_hidden_layers": layers,
        "max_position_embeddings": 4096,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


# ---- arithmetic (pure; tests/test_gpu_check.py holds it) ---------------------------------------------------


def budget(pct: float, backbone: int, experts: int, reserve: int, floor: int) -> int:
    """--memory for `pct` % of the expert bytes on the device: backbone + reserve + max(share, floor)."""
    return backbone + reserve + max(int(experts * pct / 100), floor)


def scaled_consumer(plan: dict, moe_layers: int, n_experts: int) -> dict:
    """The planner's split of all routed experts (plan['rows'] entry of the chosen bits: on_device / in_host /
    on_disk experts of n_routed) scaled to a model of `moe_layers` x `n_experts` experts, whole experts,
    device share rounded down (never below one layer's top-k, which the caller checks)."""
    n_routed = plan["moe_layers"] * plan["n_experts"]
    row = next(r for r in plan["rows"] if r["bits"] == plan["recommended"]["expert_bits"])
    n = moe_layers * n_experts
    dev = row["on_device"] * n // n_routed
    host = min(n - dev, -(-row["in_host"] * n // n_routed))
    return {
        "bits": row["bits"],
        "device_share": row["on_device"] / n_routed,
        "host_share": row["in_host"] / n_routed,
        "disk_share": row["on_disk"] / n_routed,
        "experts": n,
        "on_device": dev,
        "in_host": host,
        "on_disk": n - dev - host,
        "prefetch": bool(plan["recommended"]["prefetch"]),
        "cpu_misses": bool(plan["recommended"]["cpu_misses"]),
    }


def n_all(sizes: dict) -> int:
    return sizes["moe_layers"] * sizes["n_experts"]


def floor_bytes(sizes: dict) -> int:
    """Device expert bytes that always run: one layer's top-k experts with room for their load footprint
    (read buffer + decoded unit), which only tiny models ever come near."""
    return 2 * sizes["top_k"] * sizes["spans"] // n_all(sizes)


def decode_deltas(pre: dict, end: dict, tokens: int, seconds: float) -> dict:
    """Decode-only expert counters (end minus after-prefill) per decoded token and per second."""
    d = {
        k: end.get(k, 0) - pre.get(k, 0)
        for k in (
            "expert_hits",
            "expert_misses",
            "bytes_to_device",
            "bytes_read_disk",
            "stall_seconds",
            "cpu_computed_experts",
        )
    }
    n = d["expert_hits"] + d["expert_misses"]
    return {
        "hit_rate": d["expert_hits"] / n if n else None,
        "stall_ms_per_token": 1e3 * d["stall_seconds"] / tokens if tokens else None,
        "stall_share": d["stall_seconds"] / seconds if seconds else None,
        "link_bytes_per_token": d["bytes_to_device"] / tokens if tokens else None,
        "link_gbs": d["bytes_to_device"] / seconds / GB if seconds else None,
        "disk_bytes_per_token": d["bytes_read_disk"] / tokens if tokens else None,
        "cpu_experts_per_token": d["cpu_computed_experts"] / tokens if tokens else None,
    }


# ---- building the models -----------------------------------------------------------------------------------


class OneBlob:
    """A codec that encodes the first expert it is given and repeats that blob for every other one."""

    def __init__(self, codec):
        self.codec, self.spec, self.blob = codec, codec.spec, None

    def encode(self, gate, up, down, **extra):
        if self.blob is None:
            self.blob = self.codec.encode(gate, up, down)
        return self.blob


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prepare(work: Path, layers: int, smoke: bool, device: str) -> dict:
    """HF folder (random weights built on `device`), the 16-bit and the 4-bit store; reused if present."""
    import torch

    from moe_offload.quant.mixed import expert_spec
    from moe_offload.quant.codec import HQQCodec
    from moe_offload.store.format import convert, open_store

    work.mkdir(parents=True, exist_ok=True)
    tag = f"{'tiny' if smoke else 'mixtral'}-{layers}l"
    hf, s16, s4 = work / f"hf-{tag}", work / f"store16-{tag}", work / f"store4-{tag}"
    t0 = time.perf_counter()
    if not (hf / "config.json").is_file():
        from transformers import AutoModelForCausalLM, MixtralConfig

        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(
                MixtralConfig(**model_config(layers, smoke)), dtype=torch.bfloat16
            )
        tmp = hf.with_name(hf.name + ".tmp")
        model.save_pretrained(str(tmp))
        del model
        free_device()  # the built weights leave the device before the bench's budgets are set
        os.replace(tmp, hf)
        log(f"built {hf.name} on {device} in {time.perf_counter() - t0:.1f} s")
    if not (s16 / "manifest.json").is_file():
        t1 = time.perf_counter()
        convert(hf, s16, torch.bfloat16, overwrite=True)
        log(f"converted {s16.name} in {time.perf_counter() - t1:.1f} s")
    if not (s4 / "manifest.json").is_file():
        t1 = time.perf_counter()
        convert(hf, s4, torch.bfloat16, overwrite=True, codec=OneBlob(HQQCodec(expert_spec(4, GROUP, "rtn"))))
        log(f"wrote {s4.name} (one RTN 4-bit expert repeated) in {time.perf_counter() - t1:.1f} s")
    out = {"hf": str(hf), "prepare_s": time.perf_counter() - t0}
    for bits, path in ((16, s16), (4, s4)):
        st = open_store(path)
        out[f"store{bits}"] = str(path)
        out[f"sizes{bits}"] = {
            "experts": sum(e.nbytes for e in st.entries.values()),
            "expert": max(e.nbytes for e in st.entries.values()),
            "spans": sum(e.span for e in st.entries.values()),
            "backbone": (path / "backbone.safetensors").stat().st_size,
            "moe_layers": len(st.moe_layers),
            "n_experts": st.n_experts,
            "top_k": st.top_k,
        }
    return out


# ---- this machine ------------------------------------------------------------------------------------------


def machine_profile(work: Path, config: dict, expert_bytes: int, device: str, smoke: bool):
    """sim's this-machine profile measured here, with the expert GEMV and per-token overhead timed on `device`
    at this model's shapes (as `simulate --hardware this-machine` does with a trace that names its model)."""
    from moe_offload.sim import expert_gemv_bw, measure_this_machine, measure_token_overhead

    small = dict(ram_bytes=16 * MiB, disk_bytes=8 * MiB, gemv_bytes=8 * MiB) if smoke else {}
    hw = measure_this_machine(disk_dir=str(work), read_bytes=expert_bytes, read_streams=2, **small)
    D, I = config["hidden_size"], config["intermediate_size"]
    bw = expert_gemv_bw(D, I, "bfloat16", total=8 * MiB if smoke else 96 * MiB, device=device)
    over = measure_token_overhead(
        {**config, "model_type": "mixtral"},
        "bfloat16",
        tokens=4 if smoke else 24,
        context=8 if smoke else 32,
        device=device,
    )
    cpu_bw = bw if hw.device == "cpu" else hw.cpu_bw
    measured = {
        "link_gbs": hw.link_bw / GB,
        "device_copy_gbs": hw.device_bw / GB,
        "expert_gemv_gbs": bw / GB,
        "token_overhead_ms": 1e3 * over,
        "disk_gbs": hw.disk_bw / GB,
        "cpu_gemv_gbs": hw.cpu_bw / GB,
        "description": hw.description,
        "sources": hw.sources,
    }
    return replace(hw, device_bw=bw, cpu_bw=cpu_bw, token_overhead_s=over), measured


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


# ---- one configuration -------------------------------------------------------------------------------------


def prompts(vocab: int, n: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for _ in range(2)]


def free_device() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        empty_host = getattr(torch._C, "_host_emptyCache", None)  # cached pinned blocks
        if empty_host is not None:
            empty_host()


def run_us(
    store: str,
    memory: int,
    host: int | None,
    device: str,
    prefetch: str,
    args,
    cpu_misses: str = "off",
    hardware=None,
) -> dict:
    """One engine: a warm-up generation (fills the host tier and the cache), then a measured one."""
    from moe_offload import load
    from moe_offload.routes import RouteLog, attach

    kw = {"prefetch": prefetch, "cpu_misses": cpu_misses, "cache_policy": "lru"}
    if host:
        kw["host_memory"] = host
    t0 = time.perf_counter()
    engine = load(store, device=device, dtype="bfloat16", memory=memory, **kw)
    load_s = time.perf_counter() - t0
    log = RouteLog(decode_only=True)  # the experts of every single-token (decode) call
    attach(engine.model, log)
    cache = engine.expert_cache
    warm_ids, ids = prompts(engine.args.vocab_size, args.prompt_tokens)
    try:
        engine.generate(prompt_ids=warm_ids, max_new_tokens=args.warm_tokens, ignore_eos=True)
        warm_rows = len(log.calls)
        it = engine.stream_generate(prompt_ids=ids, max_new_tokens=args.new_tokens + 1, ignore_eos=True)
        next(it)  # after prefill
        pre, last = cache.stats(), None
        for r in it:
            last = r
        s = last.stats
        n = s["generation_tokens"] - 1
        row = {
            "ok": True,
            "load_s": load_s,
            "decode_tok_s": s["decode_tokens_per_s"],
            "prefill_tok_s": s["prefill_tokens_per_s"],
            "decode_s": s["decode_seconds"],
            "tokens": n,
            "resident_weight_bytes": s["resident_weight_bytes"],
            "peak_device_bytes": s.get("peak_device_bytes"),
            **decode_deltas(pre, s, n, s["decode_seconds"]),
        }
        for k in ("prefetch_recall", "prefetch_precision", "prefetch_issued", "prefetch_used", "host_hits"):
            if k in s:
                row[k] = s[k]
        row["routes"] = [(la, idx[0].tolist()) for la, idx, _ in log.calls]
        row["warm_rows"] = warm_rows
        return row
    finally:
        cache.close()
        del engine, cache
        free_device()


def run_accelerate(hf: str, device_bytes: int, device: str, args) -> dict:
    """transformers + accelerate: device_map="auto", max_memory = the same device bytes, the rest in RAM."""
    import accelerate  # noqa: F401  (a clear "not installed" failure)
    import torch
    from transformers import AutoModelForCausalLM

    max_memory = {0: device_bytes, "cpu": 1 << 40} if device == "cuda" else {"cpu": 1 << 40}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        hf, dtype=torch.bfloat16, device_map="auto", max_memory=max_memory
    ).eval()
    load_s = time.perf_counter() - t0
    dm = getattr(model, "hf_device_map", {}) or {}
    dev = next(model.parameters()).device if device == "cpu" else torch.device("cuda", 0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    warm_ids, ids = prompts(model.config.vocab_size, args.prompt_tokens)
    n = args.accelerate_tokens
    try:
        with torch.inference_mode():
            times = []
            for p, steps in ((warm_ids, 2), (ids, n)):
                out = model(input_ids=torch.tensor([p], device=dev), use_cache=True, logits_to_keep=1)
                pkv, tok = out.past_key_values, int(out.logits[0, -1].argmax())
                sync()
                t1 = time.perf_counter()
                for _ in range(steps):
                    out = model(
                        input_ids=torch.tensor([[tok]], device=dev), past_key_values=pkv, use_cache=True
                    )
                    pkv, tok = out.past_key_values, int(out.logits[0, -1].argmax())
                sync()
                times.append(time.perf_counter() - t1)
        return {
            "ok": True,
            "load_s": load_s,
            "decode_tok_s": n / times[1],
            "decode_s": times[1],
            "tokens": n,
            "device_map_counts": {str(d): sum(1 for v in dm.values() if v == d) for d in set(dm.values())},
        }
    finally:
        del model
        free_device()


def predict(
    row: dict, sizes: dict, hw, memory: int, host: int | None, config: dict, cpu_misses: bool = False
) -> dict:
    """The simulator on the row's own decode routing (warm-up tokens excluded); `memory` = the device bytes
    for backbone + experts (the engine's reserve taken out)."""
    import numpy as np

    from moe_offload.sim import Trace, simulate

    L = sizes["moe_layers"]
    routes = row.get("routes") or []
    if not routes or len(routes) % L:
        return {"sim_error": "no decode routing recorded"}
    rows = [[ids for _, ids in routes[j : j + L]] for j in range(0, len(routes), L)]
    warm = row["warm_rows"] // L
    trace = Trace(
        experts=np.array(rows),
        n_experts=sizes["n_experts"],
        expert_bytes=sizes["expert"],
        layers=sorted({la for la, _ in routes}),
        n_layers=config["num_hidden_layers"],
        backbone_bytes=sizes["backbone"],
    )
    r = simulate(
        trace,
        hw,
        memory=memory,
        host_memory=host if hw.device == "cuda" else None,
        policy="lru",
        warmup=min(warm, trace.tokens - 1),
        cpu_misses=cpu_misses and hw.device == "cuda",
    )
    return {
        "sim_tok_s_serial": r.tok_s_serial,
        "sim_tok_s_overlap": r.tok_s_overlap,
        "sim_hit_rate": r.hit_rate,
        "sim_bound": r.bound,
    }


# ---- phases ------------------------------------------------------------------------------------------------


class Results:
    """The phase's JSON, rewritten after every row (temp file + rename)."""

    def __init__(self, path: Path, **head):
        self.path, self.data = path, {**head, "rows": [], "failures": []}
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def row(self, key: dict, fn) -> dict:
        t0 = time.perf_counter()
        try:
            got = fn()
        except Exception as e:  # noqa: BLE001  (recorded; the phase goes on to the next row)
            got = {"ok": False, "error": f"{type(e).__name__}: {e}"[:400]}
            self.data["failures"].append(
                {**key, "error": got["error"], "traceback": traceback.format_exc()[-1500:]}
            )
        got = {
            **key,
            **{k: v for k, v in got.items() if k not in ("routes", "warm_rows")},
            "wall_s": time.perf_counter() - t0,
        }
        self.data["rows"].append(got)
        self.save()
        log(
            f"{key}: "
            + (f"{got.get('decode_tok_s', 0):.2f} tok/s" if got.get("ok") else got.get("error", ""))
        )
        return got


def grid(budgets: list[float], prefetch: list[str], bits: list[int]) -> list[tuple]:
    """Row order: what the goals need first (16-bit lookahead and accelerate at 50 %, then 25 %), so a phase
    cut by its timeout still answers them; then the other prefetch modes, then 4-bit, then the rest."""

    def rank(item):
        system, b, pct, pf = item
        return (
            b != 16,
            pct not in (50, 25),
            -pct if pct in (50, 25) else pct,
            {"lookahead": 0, "accelerate": 1, "none": 2}.get(pf if system == "us" else "accelerate", 3),
        )

    items = [("us", b, p, pf) for b in bits for p in budgets for pf in prefetch]
    items += [("accelerate", 16, p, None) for p in budgets]
    return sorted(items, key=rank)


def cmd_bench(a) -> int:
    import torch

    device = "cpu" if a.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device (use --cpu-smoke on a CPU machine)", file=sys.stderr)
        return 2
    res = Results(
        Path(a.out),
        phase="bench",
        device=device,
        gpu=gpu_name(),
        torch=torch.__version__,
        layers=a.layers,
        widths=model_config(a.layers, a.cpu_smoke),
        new_tokens=a.new_tokens,
        accelerate_tokens=a.accelerate_tokens,
        prompt_tokens=a.prompt_tokens,
    )
    prep = prepare(Path(a.work), a.layers, a.cpu_smoke, device)
    res.data["prepare"] = prep
    res.save()
    config = model_config(a.layers, a.cpu_smoke)
    hw, res.data["machine"] = machine_profile(
        Path(a.work), config, prep["sizes16"]["expert"], device, a.cpu_smoke
    )
    res.save()
    from moe_offload.store.open import RESERVE

    reserve = RESERVE[device]
    for system, bits, pct, pf in grid(a.budgets, a.prefetch, a.bits):
        sz = prep[f"sizes{bits}"]
        memory = budget(pct, sz["backbone"], sz["experts"], reserve, floor_bytes(sz))
        host = sz["spans"] if device == "cuda" and pct < 100 else None  # every expert pinned in host RAM
        key = {
            "system": system,
            "bits": bits,
            "pct": pct,
            "prefetch": pf,
            "memory": memory,
            "host_memory": host,
        }
        if system == "us":

            def one(store=prep[f"store{bits}"], memory=memory, host=host, pf=pf, sz=sz):
                row = run_us(store, memory, host, device, pf, a)
                return {**row, **predict(row, sz, hw, memory - reserve, host, config)}
        else:

            def one(memory=memory):
                return run_accelerate(prep["hf"], memory - reserve, device, a)

        res.row(key, one)
    return 0


def consumer_plan(profile: str) -> dict:
    from moe_offload.plan import make_plan, model_sizes
    from moe_offload.sim import get_profile

    return make_plan(model_sizes(MIXTRAL_8X7B), get_profile(profile), model="Mixtral-8x7B").to_dict()


def cmd_consumer(a) -> int:
    import torch

    from moe_offload.sim import get_profile
    from moe_offload.store.open import RESERVE

    device = "cpu" if a.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device (use --cpu-smoke on a CPU machine)", file=sys.stderr)
        return 2
    plan = consumer_plan(a.profile)
    pred = plan.get("prediction") or {}
    res = Results(
        Path(a.out),
        phase="consumer",
        device=device,
        gpu=gpu_name(),
        torch=torch.__version__,
        profile=a.profile,
        plan={
            "recommended": plan["recommended"],
            "rows": plan["rows"],
            "predicted_hit_rate": pred.get("hit_rate"),
            "predicted_tok_s_serial": pred.get("tok_s_serial"),
            "predicted_tok_s_overlap": pred.get("tok_s_overlap"),
            "trace": plan.get("trace"),
        },
    )
    prep = prepare(Path(a.work), a.layers, a.cpu_smoke, device)
    config = model_config(a.layers, a.cpu_smoke)
    bits = plan["recommended"]["expert_bits"]
    store_bits = 4 if bits <= 4 else 16  # the stores this bench has
    sz = prep[f"sizes{store_bits}"]
    scaled = scaled_consumer(plan, sz["moe_layers"], sz["n_experts"])
    reserve = RESERVE[device]
    memory = sz["backbone"] + reserve + max(scaled["on_device"] * sz["expert"], floor_bytes(sz))
    host = (
        (scaled["in_host"] + scaled["on_device"]) * (sz["spans"] // scaled["experts"])
        if device == "cuda"
        else None
    )
    res.data.update(scaled=scaled, store_bits=store_bits, memory=memory, host_memory=host)
    res.save()
    hw, res.data["machine"] = machine_profile(Path(a.work), config, sz["expert"], device, a.cpu_smoke)
    card = get_profile(a.profile)
    pf = "lookahead" if scaled["prefetch"] else "none"
    key = {
        "system": "us",
        "bits": store_bits,
        "prefetch": pf,
        "cpu_misses": "on" if scaled["cpu_misses"] else "off",
    }

    def one():
        row = run_us(prep[f"store{store_bits}"], memory, host, device, pf, a, cpu_misses=key["cpu_misses"])
        on = scaled["cpu_misses"]
        here = predict(row, sz, hw, memory - reserve, host, config, on)
        there = predict(row, sz, card, memory - reserve, host if device == "cuda" else None, config, on)
        return {**row, **here, **{f"card_{k}": v for k, v in there.items()}}

    res.row(key, one)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpu_bench.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("bench", "consumer"):
        s = sub.add_parser(name)
        s.add_argument(
            "--work", required=True, help="folder for the model and stores (tens of GB on the GPU)"
        )
        s.add_argument("--out", required=True, help="the phase's JSON")
        s.add_argument("--layers", type=int, default=2)
        s.add_argument("--prompt-tokens", type=int, default=16)
        s.add_argument("--warm-tokens", type=int, default=8)
        s.add_argument("--new-tokens", type=int, default=24)
        s.add_argument("--accelerate-tokens", type=int, default=6)
        s.add_argument("--cpu-smoke", action="store_true")
        if name == "bench":
            s.add_argument("--budgets", default="50,25,100")
            s.add_argument("--prefetch", default="lookahead,none,auto")
            s.add_argument("--bits", default="16,4")
        else:
            s.add_argument("--profile", default="rtx3060-12gb")
    a = p.parse_args(argv)
    if a.cmd == "bench":
        a.budgets = [float(x) for x in a.budgets.split(",") if x]
        a.prefetch = [x for x in a.prefetch.split(",") if x]
        a.bits = [int(x) for x in a.bits.split(",") if x]
        return cmd_bench(a)
    return cmd_consumer(a)


if __name__ == "__main__":
    sys.exit(main())
