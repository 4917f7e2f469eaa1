"""`moe-offload bench`: our engine side by side with the tools users would pick instead, and the physical limits.

Every configuration (system x memory budget) runs in a fresh subprocess, under a cgroup-v1 memory limit of
budget + a fixed overhead where the memory controller is writable (the limit counts page cache, so mmap cannot
hide the model in it), after the page cache of the files it will read was dropped (fsync, then
POSIX_FADV_DONTNEED, checked with `fincore`). Timings: one warm-up generation excluded, then `--repeat`
generations, each on its own fixed prompt (the same prompts for every system), greedy, EOS never stops them;
prefill and decode apart; decode tok/s = decoded tokens / decode seconds, reported as median [min, max].
Bytes read from disk per decoded token come from the kernel's /proc/self/io read_bytes for every system (and
from our own expert counters for us).

Systems: `us` (the expert store under --memory), `hf` (transformers with every weight in RAM, each CPU experts
implementation asked for), `accelerate` (transformers + accelerate device_map="auto", max_memory = the budget,
the rest offloaded to a folder on disk), `llamacpp` (llama-cpp-python on GGUF files written by
`moe-offload export-gguf`: F16 by us, Q4_0 / Q4_K_M by llama.cpp's quantizer).

Limits: the best decode tok/s the measured RAM read bandwidth and cold disk read bandwidth allow for the
bytes one token must touch: the backbone (less the embedding table, of which one row is read) + top_k
experts per MoE layer + the KV cache; out of core, the missed share of the experts (at our measured hit rate)
also comes from disk. `tok_s` assumes disk and RAM traffic overlap perfectly (the upper bound);
`tok_s_serial` adds them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import MoeError, UsageError
from .progress import Progress, add_quiet_arg
from .workload import budget_bytes, kv_tokens, prompts_for  # noqa: F401 (bench.budget_bytes, bench.prompts_for)
from .models.known import MIXTRAL_8X7B, QWEN3_30B_A3B, STREAMED, synthetic_config  # noqa: F401  (re-exported)

PKG_PARENT = Path(__file__).resolve().parents[1]  # on the children's PYTHONPATH: they import this moe_offload
CACHE = Path(".cache") / "bench"  # in the caller's directory, like --out
MiB, GB = 1 << 20, 1e9
OVERHEAD = 512 * MiB  # cgroup limit = budget + this: Python, torch, activations, KV cache, allocator slack
PEERS = ("hf", "accelerate", "llamacpp")
HF_IMPLS = ("grouped_mm", "eager")  # transformers' fast CPU experts paths (batched_mm is ~10x slower on CPU)
LLAMACPP_TYPES = ("f16", "q4_0", "q4_k")

# Mixtral-shaped random models built with transformers on the fly (saved once under the cache folder).
SYNTHETIC = {
    "mixtral-1024x8": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, initializer_range=0.05,
                           dtype="bfloat16"),
}

SHARD_BYTES = 1 << 30  # what the builder holds in RAM at most (one shard being written)


# ---- arithmetic (pure; tests hold it) -------------------------------------------------------------------


def summarize(values) -> dict:
    """median / min / max / n of a list of numbers (None-free); empty -> Nones."""
    xs = [float(v) for v in values]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


BUDGET_BASES = {"f16": 16, "q4": 4}  # --budgets prefix -> bits of the model its percentages refer to


def parse_budgets(text: str) -> list[tuple[int, float]]:
    """--budgets: '100,50,25' -> [(16, 100.0), (16, 50.0), (16, 25.0)], percentages of the 16-bit model's expert
    bytes (+ its backbone); 'q4:100,50,25' -> [(4, 100.0), ...], of the 4-bit model's (its backbone + 4-bit
    experts). A prefix applies to the numbers after it: '100,q4:100,50' mixes both."""
    out, bits = [], 16
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        base, sep, num = item.rpartition(":")
        if sep:
            if base.strip().lower() not in BUDGET_BASES:
                raise UsageError(f"--budgets: unknown base {base!r} in {item!r}; use "
                                 + " or ".join(f"{k}:" for k in BUDGET_BASES) + " (e.g. q4:100,50,25)")
            bits = BUDGET_BASES[base.strip().lower()]
        try:
            pct = float(num)
        except ValueError:
            raise UsageError(f"--budgets takes percentages like 100,50,25 or q4:100,50,25, got {text!r}") from None
        if not 0 < pct <= 100:
            raise UsageError(f"--budgets must be in (0, 100], got {item!r}")
        out.append((bits, pct))
    if not out:
        raise UsageError(f"--budgets takes percentages like 100,50,25 or q4:100,50,25, got {text!r}")
    return out


def memory_budgets(memories: list[int], by_bits: dict, us_bits: list[int]) -> tuple[list, dict]:
    """--memory BYTES as budgets (label, % of the expert bytes, bytes) and {label: bits of the model the % and
    the limits count}: the 4-bit model's when only 4-bit rows run, else the 16-bit one's."""
    bits = 4 if list(us_bits) == [4] and 4 in by_bits else 16
    z = by_bits[bits]
    budgets = [(f"{m / MiB:.0f} MiB", 100.0 * (m - z.backbone) / z.experts, m) for m in memories]
    return budgets, {lbl: bits for lbl, _, _ in budgets}


def budget_label(bits: int, pct: float) -> str:
    """'50 %' (of the 16-bit model's experts, as before) or 'q4 50 %' (of the 4-bit model's)."""
    return f"{pct:g} %" if bits == 16 else f"q{bits} {pct:g} %"


@dataclass(frozen=True)
class Sizes:
    """Bytes of one model at the benchmark's dtype."""

    backbone: int  # the engine's resident backbone (every dense tensor, as --memory counts it)
    embed: int  # the embedding table (decode reads one row of it)
    hidden: int  # D
    itemsize: int
    expert: int  # one routed expert as the cache holds it (page-rounded span)
    moe_layers: int
    n_experts: int
    top_k: int
    kv_per_token: int  # KV cache bytes per token over all layers

    @property
    def experts(self) -> int:
        return self.expert * self.moe_layers * self.n_experts

    @property
    def active_experts(self) -> int:
        """Expert bytes one decoded token computes with: top_k per MoE layer."""
        return self.expert * self.moe_layers * self.top_k

    def touched_per_token(self, context: float) -> float:
        """Weight + KV bytes one decode step must read at `context` tokens of KV cache."""
        return self.backbone - self.embed + self.hidden * self.itemsize + self.active_experts + self.kv_per_token * context


def decode_limit(touched: float, miss_bytes: float, ram_bw: float, disk_bw: float) -> dict:
    """Best decode tok/s for `touched` bytes from RAM per token and `miss_bytes` of them first read from disk."""
    t_ram = touched / ram_bw
    t_disk = miss_bytes / disk_bw if miss_bytes else 0.0
    return {"t_ram_s": t_ram, "t_disk_s": t_disk, "tok_s": 1.0 / max(t_ram, t_disk),
            "tok_s_serial": 1.0 / (t_ram + t_disk), "bound": "disk" if t_disk > t_ram else "RAM"}


def miss_bytes_per_token(sizes: Sizes, hit_rate: float) -> float:
    return (1.0 - hit_rate) * sizes.active_experts


def leading_agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy generations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summarize_runs(runs: list[dict], tokens: int) -> dict:
    """Per-configuration summary of the measured generations (warm-up already removed)."""
    out = {k: summarize([r[k] for r in runs if r.get(k) is not None])
           for k in ("prefill_tok_s", "decode_tok_s")}
    disk = [r["decode_disk_read_bytes"] for r in runs if r.get("decode_disk_read_bytes") is not None]
    out["disk_bytes_per_token"] = sum(disk) / (tokens * len(disk)) if disk else None
    secs = sum(r["decode_s"] for r in runs if r.get("decode_disk_read_bytes") is not None and r.get("decode_s"))
    out["disk_read_bw"] = sum(disk) / secs if disk and secs else None  # bytes/s achieved while decoding
    cpu = [(r["decode_cpu_s"], r["decode_s"]) for r in runs if r.get("decode_cpu_s") is not None and r.get("decode_s")]
    out["cpu_cores"] = sum(c for c, _ in cpu) / sum(d for _, d in cpu) if cpu else None  # CPU seconds per second
    if runs and "hits" in runs[0]:
        hits, misses = sum(r["hits"] for r in runs), sum(r["misses"] for r in runs)
        out["hit_rate"] = hits / (hits + misses) if hits + misses else None
        out["expert_bytes_per_token"] = sum(r["bytes_read_disk"] for r in runs) / (tokens * len(runs))
        out["stall_s_per_token"] = sum(r["stall_seconds"] for r in runs) / (tokens * len(runs))
    return out


GOALS = [  # (budget kind, peer, what, target); peer "llamacpp": the GGUF type at our row's bits (SAME_PRECISION)
    ("out of core", "llamacpp", "decode tok/s ÷ llama.cpp (same precision)", 3.0),
    ("out of core", "accelerate", "decode tok/s ÷ accelerate", 20.0),
    ("out of core", "limit", "decode tok/s ÷ disk-bandwidth limit", 0.5),
    ("fits", "llamacpp", "decode tok/s ÷ llama.cpp (same precision)", 0.8),
    ("fits", "limit", "decode tok/s ÷ RAM-bandwidth limit", 0.7),
]


SAME_PRECISION = {16: "llamacpp-f16", 4: "llamacpp-q4_0"}  # our expert bits -> llama.cpp at those bits
# --llamacpp-repack: llama.cpp's default copies its quantized weights at load into its CPU kernels' layout
# (anonymous memory, so below its file size it is OOM-killed); without it (llama.cpp's --no-repack) the weights
# stay pages of the mmap'd file, which the kernel can drop and read again: how llama.cpp runs a model larger
# than the memory it is given
REPACK = {"on": (True,), "off": (False,), "both": (True, False)}


def goal_rows(rows: list[dict], limits: dict) -> list[dict]:
    """Measured ratios against the goals, for each of our rows per budget: budgets < 100 % are out of core,
    100 % fits. llama.cpp "same precision" is F16 for our unquantized store, Q4_0 for a 4-bit one; the
    bandwidth limits are computed for the unquantized store's bytes, so quantized rows skip them."""
    out = []
    for us in rows:
        if us["system"] != "us" or not us.get("ok"):
            continue
        label, pct, bits = us["label"], us["budget_pct"], us.get("expert_bits", 16)
        # everything fits at 100 % of a model at least as wide as ours (a 16-bit store under a q4 100 % budget
        # is out of core)
        kind = "fits" if pct is not None and pct >= 100 and bits <= us.get("budget_bits", 16) else "out of core"
        mine = us["summary"]["decode_tok_s"]["median"]
        for gk, peer, what, target in GOALS:
            if gk != kind:
                continue
            if peer == "limit":
                lim = limits.get("per_budget", {}).get(label) or {}
                if bits != lim.get("bits", 16):  # the limit counts the bytes of the budget's model
                    continue
                other = lim.get("tok_s")
            else:
                names = [peer]
                if peer == "llamacpp":  # llama.cpp's default run, else the one without its CPU repack
                    names = [SAME_PRECISION.get(bits), f"{SAME_PRECISION.get(bits)}-norepack"]
                other = next((r["summary"]["decode_tok_s"]["median"] for n in names for r in rows
                              if r["label"] == label and r["config"] == n and r.get("ok")), None)
            v = ratio(mine, other)
            out.append({"budget": label, "us": us["config"], "goal": what, "target": target, "measured": v,
                        "met": None if v is None else v >= target})
    return out


# ---- page cache and cgroups --------------------------------------------------------------------------


def resident_bytes(paths) -> int | None:
    """Bytes of `paths` in the page cache (fincore); None when fincore is missing."""
    from .utils import files_under

    files = files_under(paths)
    if not files:
        return 0
    if shutil.which("fincore") is None:
        return None
    r = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, files)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None
    return sum(int(x) for x in r.stdout.split())


class Cgroup:
    """A cgroup-v1 memory child with a hard limit (page cache counts). `create` returns (None, why) where the
    controller is missing or read-only."""

    ROOT = Path("/sys/fs/cgroup/memory")

    def __init__(self, path: Path, limit: int):
        self.path, self.limit = path, limit

    @classmethod
    def create(cls, name: str, limit: int) -> tuple[Cgroup | None, str | None]:
        if not (cls.ROOT / "cgroup.procs").is_file():
            return None, f"no cgroup-v1 memory controller at {cls.ROOT}"
        path = cls.ROOT / name
        try:
            path.mkdir(exist_ok=True)
            (path / "memory.limit_in_bytes").write_text(str(limit))
        except OSError as e:
            return None, f"cannot create a memory cgroup ({e})"
        return cls(path, limit), None

    def join(self) -> None:  # runs in the child between fork and exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def stats(self) -> dict:
        def read(name):
            try:
                return (self.path / name).read_text()
            except OSError:
                return ""

        oom = dict(line.split() for line in read("memory.oom_control").splitlines() if len(line.split()) == 2)
        return {"limit_bytes": self.limit, "max_usage_bytes": int(read("memory.max_usage_in_bytes") or 0),
                "failcnt": int(read("memory.failcnt") or 0), "oom_kill": int(oom.get("oom_kill", 0))}

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


# ---- the measured child processes ----------------------------------------------------------------------


def _read_bytes() -> int | None:
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _delta(a, b):
    return None if a is None or b is None else b - a


def child_us(spec: dict) -> dict:
    import torch

    from .routes import RouteLog, attach
    from .runtime.load import load

    torch.set_num_threads(spec["threads"])
    offload = {"cache_policy": spec.get("policy"), "preload": "auto"}  # as the command line does
    if spec.get("prefetch"):
        offload["prefetch"] = spec["prefetch"]
    if spec.get("embed_rows"):
        offload["embed_rows"] = spec["embed_rows"]
    if spec.get("disk_reads"):
        offload["disk_reads"] = spec["disk_reads"]
    n = spec["new_tokens"]
    ctx = max(len(p) for p in spec["prompts"]) + n + 1  # the run's context (llama.cpp's -c): a budget that
    # holds every expert and this context's KV cache reads them all at load (--preload auto)
    t0 = time.perf_counter()
    engine = load(spec["model"], device="cpu", dtype=spec["dtype"], memory=spec["memory"], ctx_size=ctx, **offload)
    load_s = time.perf_counter() - t0
    log = RouteLog()  # the experts of every call: the prompt's prefill, then one per decoded token
    attach(engine.model, log)
    cache = getattr(engine, "expert_cache", None)
    runs = []
    for ids in spec["prompts"]:
        io0, mark0 = _read_bytes(), len(log.calls)
        it = engine.stream_generate(prompt_ids=ids, max_new_tokens=n + 1, ignore_eos=True, temperature=0.0)
        first = next(it)  # yielded after prefill: the first token comes from the prompt's logits
        pre = cache.stats() if cache is not None else None
        io1, mark, c1 = _read_bytes(), len(log.calls), time.process_time()
        tokens, last = [first.token], None
        for r in it:
            if r.token is not None:
                tokens.append(r.token)
            last = r
        io2, c2 = _read_bytes(), time.process_time()
        s = last.stats
        run = {"prefill_tok_s": s["prefill_tokens_per_s"], "decode_tok_s": s["decode_tokens_per_s"],
               "prefill_s": s["prefill_seconds"], "decode_s": s["decode_seconds"], "tokens": tokens,
               "prefill_disk_read_bytes": _delta(io0, io1), "decode_disk_read_bytes": _delta(io1, io2),
               "decode_cpu_s": c2 - c1, "routes": [(la, idx[0].tolist()) for la, idx, _ in log.calls[mark:]],
               "prefill_routes": [(la, idx.tolist()) for la, idx, _ in log.calls[mark0:mark]]}
        if pre is not None:  # decode only: the counters at the end minus those after prefill
            for k in ("expert_hits", "expert_misses", "bytes_read_disk", "bytes_to_device", "stall_seconds"):
                run[k.replace("expert_", "")] = s[k] - pre[k]
            run["prefill_misses"] = pre["expert_misses"]
            run["resident_weight_bytes"] = s["resident_weight_bytes"]
        runs.append(run)
    info = {k: v for k, v in engine.info.items() if isinstance(v, (int, float, str, bool)) or v is None}
    info["omp_wait"] = omp_wait_setting(os.environ)
    return {"load_s": load_s, "runs": runs, "info": info}


def omp_wait_setting(environ) -> str:
    """How this process's OpenMP threads wait between parallel regions, as results.md names it: the variable
    moe_offload set at import (its per-process choice) or the user's, else libgomp's default."""
    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        if k in environ:
            who = "chosen at import" if environ.get("MOE_OFFLOAD_OMP_WAIT") == k else "the user's"
            return f"{k}={environ[k]} ({who})"
    return "libgomp's default"


def _hf_runs(model, spec: dict) -> list[dict]:
    import torch

    n = spec["new_tokens"]
    runs = []
    with torch.inference_mode():
        for ids in spec["prompts"]:
            io0, t0 = _read_bytes(), time.perf_counter()
            out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            tok = int(out.logits[0, -1].argmax())
            t1, io1, c1 = time.perf_counter(), _read_bytes(), time.process_time()
            pkv, tokens = out.past_key_values, [tok]
            for _ in range(n):
                out = model(input_ids=torch.tensor([[tok]]), past_key_values=pkv, use_cache=True)
                pkv, tok = out.past_key_values, int(out.logits[0, -1].argmax())
                tokens.append(tok)
            t2, io2, c2 = time.perf_counter(), _read_bytes(), time.process_time()
            runs.append({"prefill_tok_s": len(ids) / (t1 - t0), "decode_tok_s": n / (t2 - t1),
                         "prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_cpu_s": c2 - c1, "tokens": tokens,
                         "prefill_disk_read_bytes": _delta(io0, io1), "decode_disk_read_bytes": _delta(io1, io2)})
    return runs


def child_hf(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    kw = {}
    if spec.get("impl"):
        kw["experts_implementation"] = spec["impl"]
    if spec["system"] == "accelerate":
        import accelerate  # noqa: F401  (a clear "not installed" reason)

        kw.update(device_map="auto", max_memory={"cpu": int(spec["memory"])}, offload_folder=spec["offload_folder"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"]), **kw).eval()
    load_s = time.perf_counter() - t0
    info = {}
    dm = getattr(model, "hf_device_map", None)
    if dm:
        info["device_map_counts"] = {str(d): sum(1 for v in dm.values() if v == d) for d in set(dm.values())}
        info["offloaded_modules"] = sorted(k for k, v in dm.items() if v == "disk")[:50]
    info["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    return {"load_s": load_s, "runs": _hf_runs(model, spec), "info": info}


def llama_last_logits(llm):
    """Logits of the last evaluated token as a numpy view (llama-cpp-python >= 0.3 no longer copies them into
    `scores` unless logits_all)."""
    import numpy as np

    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))


def no_repack() -> None:
    """llama.cpp's --no-repack in llama-cpp-python, which has no argument for it: model params with
    use_extra_bufts off (the weights stay in the mmap'd file instead of being copied into the CPU_REPACK
    buffer)."""
    from llama_cpp import llama_cpp as api

    default = api.llama_model_default_params
    if getattr(default, "no_repack", False):
        return

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    params.no_repack = True
    api.llama_model_default_params = params


def child_llamacpp(spec: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama

    n = spec["new_tokens"]
    ctx = max(len(p) for p in spec["prompts"]) + n + 8
    t0 = time.perf_counter()
    if not spec.get("repack", True):
        no_repack()
    llm = Llama(model_path=spec["model"], n_ctx=ctx, n_batch=512, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], n_gpu_layers=0, use_mmap=True, use_mlock=False, verbose=False)
    load_s = time.perf_counter() - t0
    runs = []
    for ids in spec["prompts"]:
        llm.reset()  # forget the previous prompt: no prefix reuse between prompts
        io0, t0 = _read_bytes(), time.perf_counter()
        llm.eval(ids)
        tok = int(np.argmax(llama_last_logits(llm)))
        t1, io1, c1 = time.perf_counter(), _read_bytes(), time.process_time()
        tokens = [tok]
        for _ in range(n):
            llm.eval([tok])
            tok = int(np.argmax(llama_last_logits(llm)))
            tokens.append(tok)
        t2, io2, c2 = time.perf_counter(), _read_bytes(), time.process_time()
        runs.append({"prefill_tok_s": len(ids) / (t1 - t0), "decode_tok_s": n / (t2 - t1), "prefill_s": t1 - t0,
                     "decode_s": t2 - t1, "decode_cpu_s": c2 - c1, "tokens": tokens, "prefill_disk_read_bytes": _delta(io0, io1),
                     "decode_disk_read_bytes": _delta(io1, io2)})
    import llama_cpp

    system = llama_cpp.llama_print_system_info()
    return {"load_s": load_s, "runs": runs, "info": {"llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
                                                     "system_info": system.decode(errors="replace").strip()}}


CHILDREN = {"us": child_us, "hf": child_hf, "accelerate": child_hf, "llamacpp": child_llamacpp}


def child_main(spec_path: str, out_path: str) -> int:
    """Run one configuration; the result (or the error) goes to `out_path` as JSON."""
    from .utils import atomic_write_text, peak_rss_bytes

    spec = json.loads(Path(spec_path).read_text())
    try:
        res = CHILDREN[spec["system"]](spec)
        res["ok"] = True
    except ImportError as e:
        res = {"ok": False, "error": f"not installed: {e}"}
    except BaseException as e:  # noqa: BLE001  (every failure becomes a row with its reason)
        res = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}"}
    res["peak_rss_bytes"] = peak_rss_bytes()
    atomic_write_text(out_path, json.dumps(res))
    return 0


# ---- the parent: prepare, run, report ------------------------------------------------------------------


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Mixtral or Qwen3-MoE checkpoint as the Hub stores it (per-expert matrices), in order."""
    mt, D, L, V = config["model_type"], config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    H, KV = config["num_attention_heads"], config["num_key_value_heads"]
    Hd = config.get("head_dim") or D // H
    out = [("model.embed_tokens.weight", (V, D))]
    for i in range(L):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (D,)), (p + "post_attention_layernorm.weight", (D,)),
                (p + "self_attn.q_proj.weight", (H * Hd, D)), (p + "self_attn.k_proj.weight", (KV * Hd, D)),
                (p + "self_attn.v_proj.weight", (KV * Hd, D)), (p + "self_attn.o_proj.weight", (D, H * Hd))]
        if mt == "mixtral":
            E, inter = config["num_local_experts"], config["intermediate_size"]
            out.append((p + "block_sparse_moe.gate.weight", (E, D)))
            for e in range(E):
                q = f"{p}block_sparse_moe.experts.{e}."
                out += [(q + "w1.weight", (inter, D)), (q + "w2.weight", (D, inter)), (q + "w3.weight", (inter, D))]
        elif mt == "qwen3_moe":
            E, inter = config["num_experts"], config["moe_intermediate_size"]
            out += [(p + "self_attn.q_norm.weight", (Hd,)), (p + "self_attn.k_norm.weight", (Hd,)),
                    (p + "mlp.gate.weight", (E, D))]
            for e in range(E):
                q = f"{p}mlp.experts.{e}."
                out += [(q + "gate_proj.weight", (inter, D)), (q + "up_proj.weight", (inter, D)),
                        (q + "down_proj.weight", (D, inter))]
        else:
            raise UsageError(f"no synthetic builder for model_type {mt!r}")
    out += [("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]
    return out


def shard_plan(shapes: list[tuple[str, tuple[int, ...]]], itemsize: int, shard_bytes: int) -> list[list[int]]:
    """Consecutive tensors grouped into shards of at most `shard_bytes` (a bigger tensor gets a shard alone)."""
    shards, cur, size = [], [], 0
    for i, (_, shape) in enumerate(shapes):
        n = itemsize
        for d in shape:
            n *= d
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    if cur:
        shards.append(cur)
    return shards


def random_tensor(name: str, shape: tuple[int, ...], index: int, seed: int, std: float, dtype):
    """Norm weights are ones; every other tensor N(0, std) from its own generator (seed, index): the same
    bytes whatever the sharding."""
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn(shape, generator=g, dtype=dtype).mul_(std)


def build_streamed(config: dict, folder: Path, seed: int = 0, shard_bytes: int = SHARD_BYTES,
                   progress=None) -> Path:
    """A random checkpoint of `config` written shard by shard (at most one shard in RAM), with its
    model.safetensors.index.json and config.json; atomic (a .tmp folder renamed at the end)."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, config.get("torch_dtype", "bfloat16"))
    shapes = tensor_shapes(config)
    plan = shard_plan(shapes, dtype.itemsize, shard_bytes)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, total = {}, 0
    for k, idx in enumerate(plan):
        fname = f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
        part = {}
        for i in idx:
            name, shape = shapes[i]
            part[name] = random_tensor(name, shape, i, seed, config.get("initializer_range", 0.02), dtype)
            weight_map[name] = fname
            total += part[name].numel() * dtype.itemsize
        save_file(part, str(tmp / fname), metadata={"format": "pt"})
        del part
        if progress is not None:
            progress.update()
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}, indent=1))
    os.replace(tmp, folder)
    return folder


def build_synthetic(name: str, folder: Path) -> Path:
    """A random model (once; reused when config.json exists): SYNTHETIC ones by transformers, STREAMED ones
    (real widths) shard by shard."""
    if (folder / "config.json").is_file():
        return folder
    if name in STREAMED:
        config = synthetic_config(name)
        n = len(shard_plan(tensor_shapes(config), 2, SHARD_BYTES))
        print(f"bench: building the synthetic model {name} into {folder}", file=sys.stderr)
        with Progress(f"bench: build {name}", n, "shards") as bar:
            return build_streamed(config, folder, progress=bar)
    if name not in SYNTHETIC:
        raise UsageError(f"--synthetic {name!r}: choose one of {', '.join([*SYNTHETIC, *STREAMED])}")
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    kw = dict(SYNTHETIC[name])
    dtype = getattr(torch, kw.pop("dtype"))
    print(f"bench: building the synthetic model {name} into {folder}", file=sys.stderr)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MixtralConfig(**kw), dtype=dtype)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    del model
    os.replace(tmp, folder)
    return folder


def model_sizes(store_path: Path, dtype: str, expert_bytes: int | None = None, as_stored: bool = True) -> Sizes:
    """Sizes from the store's manifest and the planner's counts of the model (models.sizes, as the engine holds
    it: the family's fp32 keys in fp32, its own KV cache); `expert_bytes` replaces the store's mean expert span
    (the 16-bit sizes read from a quantized store; with as_stored=False the backbone too is the 16-bit one)."""
    import torch

    from .models.sizes import model_sizes as count
    from .store.format import open_store

    from .runtime.engine import backbone_bytes

    store = open_store(store_path)
    dt = getattr(torch, dtype)
    s = count(store.config)
    spans = [e.span for e in store.entries.values()]
    source = store.backbone()
    # a store with quantized attention / lm_head holds fewer backbone bytes than the config's 16-bit count
    quantized = as_stored and any(k.endswith(".qweight") for k in source.keys())
    backbone = backbone_bytes(store.config, source, dt) if quantized else s.resident_backbone_bytes(dt)
    return Sizes(backbone=backbone, embed=s.embed_params * dt.itemsize,
                 hidden=store.config["hidden_size"], itemsize=dt.itemsize,
                 expert=expert_bytes or round(sum(spans) / len(spans)),
                 moe_layers=len(store.moe_layers), n_experts=store.n_experts, top_k=store.top_k,
                 kv_per_token=s.kv_bytes(dt))


@dataclass
class Config:
    system: str  # us / hf / accelerate / llamacpp
    config: str  # row name: us-lru, hf-grouped_mm, accelerate, llamacpp-f16, ...
    spec: dict
    files: list  # what its page cache must not hold before it starts


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-400:]


LIBGOMP_SPIN = 300000  # libgomp's spin before sleeping when neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT is set


def child_env(threads: int | None = None, system: str = "us") -> dict:
    """Environment of every child: offline, this moe_offload first on the path; the caller's directory stays
    the working directory (every path in a spec is absolute, see absolute_paths). OpenMP's wait: our rows choose
    their own (moe_offload/__init__.py); a peer runs with what its users get, libgomp's default spin (set
    explicitly, as its `GOMP_SPINCOUNT`, since the child imports moe_offload too), unless the caller set one.
    Until 2026-12-04 every peer inherited our OMP_WAIT_POLICY=PASSIVE (llama.cpp's Q4_0 decoded 20.6 tok/s under it
    against 25.2 with libgomp's default, Qwen3's widths on the Xeon: docs/benchmarks.md)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(PKG_PARENT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ours = env.pop("MOE_OFFLOAD_OMP_WAIT", None)
    if ours:  # the variable this process's import chose, not the caller's
        env.pop(ours, None)
        if system != "us":
            env["GOMP_SPINCOUNT"] = str(LIBGOMP_SPIN)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def absolute_paths(a) -> None:
    """--model, --cache-dir and --out as absolute paths: a relative one means the caller's directory, in
    every child too (a transformers peer given a relative path that does not exist looks it up on the Hub)."""
    for name in ("model", "cache_dir", "out"):
        if getattr(a, name, None) is not None:
            setattr(a, name, os.path.abspath(getattr(a, name)))


@contextmanager
def output_to(path: Path):
    """This process's stdout and stderr file descriptors into `path` (appended) for the block: what C
    libraries print there too (llama.cpp's quantizer logs every tensor it loads)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(path, "ab") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def run_config(cfg: Config, memory: int | None, out: Path, tag: str, overhead: int, timeout: float,
               use_cgroup: bool) -> dict:
    """One fresh subprocess under the memory limit, page cache dropped first. Returns its raw result."""
    work = out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    spec_path, res_path, log_path = work / f"{tag}.spec.json", work / f"{tag}.result.json", work / f"{tag}.log"
    res_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(cfg.spec))
    from .utils import drop_page_cache

    drop_page_cache(cfg.files, sync=True)
    before = resident_bytes(cfg.files)
    cg, why = (None, "no memory limit for this run") if not use_cgroup else (None, None)
    if use_cgroup and memory is not None:
        cg, why = Cgroup.create(f"moe-bench-{os.getpid()}-{tag}", memory + overhead)
    elif use_cgroup:
        why = "no memory budget: no cgroup limit"
    env = child_env(cfg.spec["threads"], cfg.spec["system"])
    cmd = [sys.executable, "-m", "moe_offload.bench", "--child", str(spec_path), str(res_path)]
    t0 = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            try:  # subprocess.run kills the child on any exception, SIGTERM of this process included
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout,
                                      preexec_fn=cg.join if cg is not None else None)
                rc, timed_out = proc.returncode, False
            except subprocess.TimeoutExpired:
                rc, timed_out = None, True
        wall = time.perf_counter() - t0
        cstats = cg.stats() if cg is not None else None
    finally:
        if cg is not None:
            cg.remove()
    res = json.loads(res_path.read_text()) if res_path.is_file() else None
    if res is None:
        if timed_out:
            err = f"timed out after {timeout:.0f} s"
        elif cstats and (rc == -9 or cstats["oom_kill"]) :
            err = (f"OOM-killed under the cgroup limit of {cstats['limit_bytes'] / MiB:.0f} MiB "
                   f"(budget + {overhead / MiB:.0f} MiB overhead)")
        else:
            err = f"exit code {rc}: {_tail(log_path)}"
        res = {"ok": False, "error": err}
    res.update(wall_s=wall, cgroup=cstats, cgroup_note=why, page_cache_before_bytes=before, log=str(log_path))
    return res


def _gguf_for(prep: dict, type_: str, threads: int, log: Path) -> tuple[Path | None, str | None]:
    """The model's GGUF of `type_` (exported once into the cache); (None, reason) when it cannot be made.
    What the exporter and llama.cpp's quantizer print goes to `log`, not the terminal."""
    from .gguf_export import export_gguf

    path = prep["dir"] / f"model-{type_}.gguf"
    if path.is_file():
        return path, None
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with output_to(log):
            export_gguf(prep["hf"], path, type_, threads=threads)
    except (MoeError, ImportError, OSError) as e:
        return None, f"export-gguf --type {type_} failed: {e} (log: {log})"
    return path, None


def _store_is_fresh(path: Path, dtype: str, stamp: float) -> bool:
    """A readable store at `dtype`, written after the checkpoint's newest file (mtime `stamp`), whose 4-bit
    experts are in the order this machine's kernel reads (quantize writes kernels.write_layout(); a store of
    another order is read by converting each expert once per load, which is not what the bench measures)."""
    from .quant.kernels import write_layout
    from .store.format import open_store

    try:
        m = open_store(path).manifest
    except MoeError:
        return False
    layouts = {e["codec"].get("layout") for e in m["experts"] if e.get("codec", {}).get("bits") == 4}
    return (m["dtype"] == dtype and (path / "manifest.json").stat().st_mtime >= stamp
            and layouts <= {write_layout()})  # (None: b64, the order before stores recorded one)


def quantized_store_name(dtype: str, bits: int, quantizer: str, backbone_bits: int = 16) -> str:
    """The cache's folder for our `bits`-bit store (attention and lm_head at `backbone_bits`)."""
    return (f"store-{dtype}-q{bits}" + ("" if quantizer == "hqq" else f"-{quantizer}")
            + ("" if backbone_bits == 16 else f"-bb{backbone_bits}"))


def quantize_args(hf, out, bits: int, dtype: str, quantizer: str, backbone_bits: int = 16) -> list[str]:
    """`moe-offload quantize` arguments for the bench's store: experts at `bits`; attention and lm_head 16-bit,
    or codes at `backbone_bits` (--us-backbone-bits: how llama.cpp's Q4_0 / Q4_K_M files hold them)."""
    head = ["--head-bits", str(backbone_bits)] if backbone_bits < 16 else []
    return ["quantize", "--model", str(hf), "--out", str(out), "--expert-bits", str(bits),
            "--attn-bits", str(backbone_bits), *head, "--dtype", dtype, "--quantizer", quantizer,
            "--overwrite", "--quiet"]


def prepare(a) -> dict:
    """The HF folder, our store at the benchmark dtype, and the sizes."""
    from .store.format import convert

    if a.model and str(a.model).lower().endswith(".gguf"):
        return prepare_gguf(a)  # a GGUF file: llama.cpp on it, us on the store converted from it
    if a.synthetic:
        d = Path(a.cache_dir) / a.synthetic
        hf = build_synthetic(a.synthetic, d / "hf")
        name = a.synthetic
    else:
        hf = Path(a.model)
        if not hf.is_dir():
            raise UsageError(f"--model {hf}: no such folder")
        if (hf / "manifest.json").is_file():
            raise UsageError(f"--model {hf} is an expert store: the peers need the Hugging Face folder it came from")
        import hashlib

        key = hashlib.sha256(str(hf.resolve()).encode()).hexdigest()[:8]
        name = hf.resolve().name
        d = Path(a.cache_dir) / f"{name}-{key}"
    d.mkdir(parents=True, exist_ok=True)
    store = d / f"store-{a.dtype}"
    stamp = max(p.stat().st_mtime for p in hf.iterdir() if p.is_file())
    if store.is_dir() and not _store_is_fresh(store, a.dtype, stamp):
        shutil.rmtree(store)
    # the 16-bit store only when a 16-bit row or budget needs it (at real widths it is another ~11 GB on disk)
    budgets = [] if getattr(a, "memory", None) else getattr(a, "budgets", [(16, 100.0)])  # --memory: bytes, no %
    need16 = 16 in getattr(a, "us_bits", [16]) or any(b == 16 for b, _ in budgets)
    if not store.is_dir() and need16:
        import torch

        print(f"bench: converting {hf} into an expert store at {store} ({a.dtype})", file=sys.stderr)
        with Progress("bench: convert", unit="experts", quiet=getattr(a, "quiet", False)) as bar:
            convert(hf, store, getattr(torch, a.dtype), overwrite=True, progress=bar)
    quantized, qlog = {}, {}
    qbits = {b for b in getattr(a, "us_bits", [16]) if b != 16} | {b for b, _ in budgets if b != 16}
    quantizer = getattr(a, "quantizer", "hqq")
    for bits in sorted(qbits):
        bb = getattr(a, "us_backbone_bits", 16)
        q = d / quantized_store_name(a.dtype, bits, quantizer, bb)
        if not _store_is_fresh(q, a.dtype, stamp):
            cmd = [sys.executable, "-m", "moe_offload.cli", *quantize_args(hf, q, bits, a.dtype, quantizer, bb)]
            print(f"bench: {' '.join(['moe-offload', *cmd[3:]])}", file=sys.stderr)
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
            if r.returncode != 0:
                raise MoeError(f"bench: quantizing to {bits} bits failed: {(r.stderr or r.stdout).strip()[-300:]}")
            secs = time.perf_counter() - t0
            src = _expert_param_bytes(hf, 2)
            qlog[bits] = {"command": " ".join(["moe-offload", *cmd[3:]]), "seconds": secs,
                          "bf16_expert_bytes_per_s": src / secs, "output": r.stdout.strip()[-400:]}
            print(f"bench: quantized in {secs:.0f} s: {src / secs / MiB:.1f} MiB/s of 16-bit expert weights",
                  file=sys.stderr)
        quantized[bits] = q
    sizes_q = {b: model_sizes(q, a.dtype) for b, q in quantized.items()}
    if store.is_dir():
        sizes = model_sizes(store, a.dtype)
    else:  # no 16-bit store: its sizes from a quantized store's manifest with 16-bit expert bytes
        bits = min(quantized)
        zq, itemsize = sizes_q[bits], 4 if a.dtype == "float32" else 2
        per_expert = _expert_param_bytes(hf, itemsize) // (zq.moe_layers * zq.n_experts)
        sizes = model_sizes(quantized[bits], a.dtype, expert_bytes=_page(per_expert), as_stored=False)
        store = quantized[bits]  # what traces and the concurrency mode read: the store that exists
    config = json.loads((hf / "config.json").read_text())
    from .cpuinfo import machine_info

    return {"name": name, "dir": d, "hf": hf, "store": store, "quantized": quantized, "sizes": sizes,
            "sizes_q": sizes_q, "quantize_log": qlog, "machine": machine_info(),
            "config": config, "hf_files": [p for p in hf.iterdir() if p.suffix == ".safetensors"]}


def _page(n: int, page: int = 4096) -> int:
    return -(-n // page) * page


def _expert_param_bytes(hf: Path, itemsize: int) -> int:
    """Bytes of every routed expert's weights at `itemsize` bytes per parameter, from the checkpoint's headers."""
    from safetensors import safe_open

    n = 0
    for f in sorted(hf.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                if ".experts." in k:
                    size = 1
                    for dim in s.get_slice(k).get_shape():
                        size *= dim
                    n += size * itemsize
    return n


# ---- bench --model FILE.gguf (gguf helper): llama.cpp runs that very file, we run the store converted from it ----

def prepare_gguf(a) -> dict:
    """prepare() for a GGUF file: our store is the one `--model FILE.gguf` converts it into (quantized experts kept
    as codes, store dtype the file's: bfloat16 for a quantized file), llama.cpp's peer row is the file itself
    (linked as the cache's model-<type>.gguf, so _gguf_for finds it). The transformers peers need a Hugging Face
    folder and are dropped; --us-bits is the file's own precision."""
    import hashlib

    from .gguf_import import convert_gguf, open_gguf, store_dtype
    from .utils import DTYPE_NAMES

    path = Path(a.model).resolve()
    if not path.is_file():
        raise UsageError(f"--model {a.model}: no such GGUF file")
    g = open_gguf(path)
    st = path.stat()
    key = hashlib.sha256(json.dumps([str(path), st.st_size, st.st_mtime_ns]).encode()).hexdigest()[:8]
    d = Path(a.cache_dir) / f"{path.stem}-gguf-{key}"
    d.mkdir(parents=True, exist_ok=True)
    dtype = store_dtype(g)
    a.dtype = DTYPE_NAMES[dtype]
    store = d / f"store-{a.dtype}-backbone-auto"  # convert_gguf's default backbone_bits
    if not _store_is_fresh(store, a.dtype, st.st_mtime):
        print(f"bench: converting {path} into an expert store at {store}", file=sys.stderr)
        with Progress("bench: convert", unit="experts", quiet=getattr(a, "quiet", False)) as bar:
            convert_gguf(g, store, dtype, overwrite=True, progress=bar)
    dropped = [p for p in a.peers if p != "llamacpp"]
    if dropped:
        print(f"bench: --model is a GGUF file: peers {', '.join(dropped)} need a Hugging Face folder, skipped",
              file=sys.stderr)
    a.peers = [p for p in a.peers if p == "llamacpp"]
    a.us_bits = [16]  # "16": the store as converted, at the file's own precision
    a.llamacpp_types = [g.meta.get("general.file_type") and _GGUF_FILE_TYPES.get(int(g.meta["general.file_type"]))
                        or "file"]
    link = d / f"model-{a.llamacpp_types[0]}.gguf"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(path)
    from .store.format import open_store

    return {"name": path.name, "dir": d, "hf": path, "store": store, "quantized": {},
            "sizes": model_sizes(store, a.dtype), "config": open_store(store).config, "hf_files": [path]}


_GGUF_FILE_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 15: "q4_k_m",
                    14: "q4_k_s", 17: "q5_k_m", 18: "q6_k", 32: "bf16", 38: "mxfp4"}  # llama_ftype -> a row name


def configs_for(a, prep: dict, pct: float | None, memory: int, prompts, tag: str) -> list[Config]:
    base = {"dtype": a.dtype, "threads": a.threads, "prompts": prompts, "new_tokens": a.new_tokens, "memory": memory}
    rows = getattr(a, "embed_rows", "resident")
    out = []
    for bits in a.us_bits:
        store = prep["store"] if bits == 16 else prep["quantized"][bits]
        for policy in a.cache_policy:
            for pf in a.prefetch:
                pf = None if pf == "none" else pf
                spec = {**base, "system": "us", "model": str(store), "policy": policy, "prefetch": pf,
                        "expert_bits": bits}
                name = f"us-{policy}" + (f"-q{bits}" if bits != 16 else "") + (f"+prefetch-{pf}" if pf else "")
                if rows != "resident":  # resident rows keep their spec and name as before the flag
                    spec["embed_rows"], name = rows, name + f"+embed-rows-{rows}"
                for reads in getattr(a, "us_disk_reads", ["direct"]):
                    if reads == "direct":  # the default keeps its spec and name
                        out.append(Config("us", name, spec, [store]))
                    else:
                        out.append(Config("us", f"{name}+{reads}", {**spec, "disk_reads": reads}, [store]))
    if "hf" in a.peers:
        for impl in a.hf_impls:
            spec = {**base, "system": "hf", "model": str(prep["hf"]), "impl": impl}
            out.append(Config("hf", f"hf-{impl}", spec, prep["hf_files"]))
    if "accelerate" in a.peers:
        folder = prep["dir"] / f"offload-{tag}"
        spec = {**base, "system": "accelerate", "model": str(prep["hf"]), "impl": a.hf_impls[0],
                "offload_folder": str(folder)}
        out.append(Config("accelerate", "accelerate", spec, prep["hf_files"]))
    if "llamacpp" in a.peers:
        for t in a.llamacpp_types:
            g = prep["gguf"].get(t)
            for repack in REPACK[getattr(a, "llamacpp_repack", "on")]:
                spec = {**base, "system": "llamacpp", "model": str(g) if g else None, "gguf_type": t,
                        **({} if repack else {"repack": False})}
                out.append(Config("llamacpp", f"llamacpp-{t}" + ("" if repack else "-norepack"), spec,
                                  [g] if g else []))
    return out


def prefill_rows(prefill_routes: list, layers: list[int]) -> list:
    """A prompt's prefill routing [(layer, [[K ids] per prompt token])] (chunks in order) as trace rows, one per
    prompt token, [] when a layer's calls do not cover the same tokens. The engine runs each layer on the whole
    chunk at once; token-major rows are the same keys in a slightly different order."""
    per = {la: [] for la in layers}
    for la, rows in prefill_routes or []:
        if la not in per:
            return []
        per[la] += rows
    n = {len(v) for v in per.values()}
    if len(n) != 1:
        return []
    return [[per[la][t] for la in layers] for t in range(n.pop())]


def record_trace(prep: dict, runs: list[dict], path: Path, warmup_runs: int = 1) -> tuple[Path | None, int]:
    """The decode routing of `runs` (generations in order, the first `warmup_runs` of them warm-up) as a
    simulator trace, with the prefill routing of the warm-up runs and of the first measured one as uncounted
    rows before its decode, so a replay starts as warm as the run (`meta.prefill_rows`; later prompts'
    prefills are left out). Returns (path, warm-up tokens)."""
    import numpy as np

    from .sim import Trace, save_trace
    from .store.format import open_store

    store = open_store(prep["store"])
    layers = list(store.moe_layers)
    rows, warm, n_pre = [], 0, 0
    for i, r in enumerate(runs):
        if i <= warmup_runs:
            pre = prefill_rows(r.get("prefill_routes"), layers)
            rows += pre
            warm, n_pre = warm + len(pre), n_pre + len(pre)
        routes = r.get("routes") or []
        if len(routes) % len(layers):
            return None, 0
        toks = [routes[j:j + len(layers)] for j in range(0, len(routes), len(layers))]
        for t in toks:
            if [la for la, _ in t] != layers:
                return None, 0
            rows.append([ids for _, ids in t])
        if i < warmup_runs:
            warm += len(toks)
    if not rows:
        return None, 0
    s: Sizes = prep["sizes"]
    trace = Trace(experts=np.array(rows), n_experts=store.n_experts, expert_bytes=s.expert, layers=layers,
                  n_layers=prep["config"].get("num_hidden_layers"), backbone_bytes=s.backbone,
                  kv_bytes_per_token=s.kv_per_token,
                  meta={"source": "moe-offload bench", "model": prep["name"], "warmup_tokens": warm,
                        "prefill_rows": n_pre,
                        "config": prep["config"]})  # lets `simulate --hardware this-machine` time this architecture
    return save_trace(path, trace), warm


def replay_grid(trace_path: Path, sizes: Sizes, pcts: list[float], warm: int) -> dict:
    """Hit rate per policy (and Belady-OPT) per budget, counted after the warm-up tokens."""
    from .sim import load_trace
    from .store.policies import POLICIES, belady_opt, replay

    tr = load_trace(trace_path)
    out: dict = {}
    size = tr.size_fn()

    def run(policy, entries, cap):
        if policy == "opt":
            return belady_opt(entries, size, cap, tr.n_layers, tr.n_experts)
        return replay(entries, size, cap, policy, tr.n_layers, tr.n_experts)

    for policy in [*POLICIES, "opt"]:
        out[policy] = {}
        for pct in pcts:
            cap = int(sizes.experts * pct / 100)
            if cap < sizes.top_k * sizes.expert:
                continue
            full, pre = run(policy, tr.entries(), cap), run(policy, tr.entries(0, warm), cap) if warm else None
            hits = full.hits - (pre.hits if pre else 0)
            misses = full.misses - (pre.misses if pre else 0)
            out[policy][str(pct)] = hits / (hits + misses) if hits + misses else None
    return out


def simulate_cli(trace_path: Path, memory: int, policy: str, warm: int, dtype: str = "bfloat16",
                 threads: int | None = None, timeout: float = 300) -> dict:
    """`moe-offload simulate --hardware this-machine` on the recorded trace (predicted decode tok/s), the
    machine measured in the run's compute dtype and thread count."""
    cmd = [sys.executable, "-m", "moe_offload.cli", "simulate", "--trace", str(trace_path), "--hardware",
           "this-machine", "--memory", str(memory), "--cache-policy", policy, "--warmup", str(warm),
           "--dtype", dtype, *(["--threads", str(threads)] if threads else []), "--json"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env())
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "timed out", "command": "moe-offload " + " ".join(cmd[3:])}
    if r.returncode != 0:
        return {"ok": False, "error": (r.stderr or r.stdout).strip()[-300:], "command": "moe-offload " + " ".join(cmd[3:])}
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return {"ok": True, "command": "moe-offload " + " ".join(cmd[3:]), "tok_s_serial": d.get("tok_s_serial"),
            "tok_s_overlap": d.get("tok_s_overlap"), "hit_rate": d.get("hit_rate"), "bound": d.get("bound")}


# ---- report ------------------------------------------------------------------------------------------


def touched_by_bits(lim: dict) -> dict[int, float]:
    """{bits: bytes a decode token touches} of the budgets counted in another store than the 16-bit one."""
    return {L["bits"]: L["touched_bytes_per_token"] for L in lim.get("per_budget", {}).values()
            if L.get("bits", 16) != 16 and "touched_bytes_per_token" in L}


def _f(v, fmt="{:.2f}", none="-"):
    return none if v is None else fmt.format(v)


def peer_builds(rows: list[dict]) -> list[str]:
    """results.md's line on the llama.cpp build the peer rows ran (its CPU features: which kernels it had), once."""
    for r in rows:
        info = r.get("info") or {}
        if info.get("system_info"):
            return [f"llama.cpp: llama-cpp-python {info.get('llama_cpp_python', '?')}, built with: "
                    f"{info['system_info']}", ""]
    return []


def markdown(res: dict) -> str:
    from .cpuinfo import describe

    s = res["sizes"]
    lim = res["limits"]
    rounds = res.get("rounds", 1)
    lines = [f"### {res['model']} ({res['dtype']}, {res['threads']} threads, prompt {res['prompt_tokens']} tokens, "
             f"{res['new_tokens']} decode tokens; {res['repeat']} measured prompts per configuration in {rounds} "
             f"fresh process{'es' if rounds > 1 else ''} run round-robin over the systems, each after a warm-up "
             f"generation)", "",
             f"Command: `{res['command']}`", "",
             *([f"CPU: {describe(res['machine'])}.", ""] if res.get("machine") else []),
             *peer_builds(res["rows"]),
             *([f"Budgets prefixed q4 are the 4-bit model's bytes: its backbone "
                f"{res['sizes_q']['4']['backbone'] / MiB:.1f} MiB + that % of its 4-bit experts "
                f"({res['sizes_q']['4']['experts'] / MiB:.1f} MiB); the others, as before, the 16-bit model's.", ""]
               if any(b.get("bits", 16) == 4 for b in res.get("budgets", [])) else []),
             f"Backbone {s['backbone'] / MiB:.1f} MiB, experts {s['experts'] / MiB:.1f} MiB "
             f"({s['moe_layers']} layers x {s['n_experts']} x {s['expert'] / MiB:.2f} MiB, top-{s['top_k']}); "
             f"one decode token touches {lim['touched_bytes_per_token'] / MiB:.1f} MiB"
             + "".join(f" ({b}-bit: {t / MiB:.1f} MiB)" for b, t in touched_by_bits(lim).items()) + ". "
             f"RAM read {lim['ram_read_bw'] / GB:.1f} GB/s (best; median {lim['ram_read_bw_median'] / GB:.1f}), "
             f"{res['dtype']} GEMV {lim['gemv_bw'] / GB:.1f} GB/s of weights (best; median "
             f"{lim['gemv_bw_median'] / GB:.1f}), cold disk read {lim['disk_read_bw'] / GB:.2f} GB/s (best of: "
             + ", ".join(f"{k} {v / GB:.2f}" for k, v in lim.get("disk_read_bw_by_method", {}).items()) + ")"
             + (f"; the loader's own reads of whole experts {lim['disk_loader_bw'] / GB:.2f} GB/s"
                if lim.get("disk_loader_bw") else "")
             + (f" (buffered {lim['disk_loader_bw_buffered'] / GB:.2f})" if lim.get("disk_loader_bw_buffered")
                else "") + ".", "",
             "| budget | system | prefill tok/s | decode tok/s median [min, max] | us ÷ this | hit rate | "
             "disk MB/token | disk GB/s | stall ms/token | CPU cores | peak RSS / cgroup MiB | same tokens | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        budget = r["label"]
        if not r.get("ok"):
            lines.append(f"| {budget} | {r['config']} | - | - | - | - | - | - | - | - | - | - | {r.get('error', '')} |")
            continue
        sm = r["summary"]
        d = sm["decode_tok_s"]
        cg = r.get("cgroup") or {}
        disk = sm.get("disk_bytes_per_token")
        note = r.get("note") or ""
        lines.append(
            f"| {budget} | {r['config']} | {_f(sm['prefill_tok_s']['median'], '{:.1f}')} | "
            f"{_f(d['median'])} [{_f(d['min'])}, {_f(d['max'])}] | {_f(r.get('us_over_this'), '{:.2f}×')} | "
            f"{_f(sm.get('hit_rate'), '{:.3f}')} | {_f(disk and disk / 1e6, '{:.1f}')} | "
            f"{_f(sm.get('disk_read_bw') and sm['disk_read_bw'] / GB, '{:.2f}')} | "
            f"{_f(sm.get('stall_s_per_token') and sm['stall_s_per_token'] * 1e3, '{:.1f}')} | "
            f"{_f(sm.get('cpu_cores'))} | "
            f"{_f(r.get('peak_rss_bytes') and r['peak_rss_bytes'] / MiB, '{:.0f}')} / "
            f"{_f(cg.get('max_usage_bytes') and cg['max_usage_bytes'] / MiB, '{:.0f}')} | "
            f"{_f(r.get('same_tokens'), '{:d}')}/{res['new_tokens'] + 1} | {note} |")
    lines += ["", "Limits (decode tok/s the measured bandwidths allow; misses from disk at our measured hit rate):", "",
              "| budget | memory MiB | hit rate used | miss MB/token | RAM ms/token | disk ms/token | limit tok/s "
              "(overlapped) | limit tok/s (serial) | GEMV-kernel limit tok/s | us tok/s | us ÷ limit |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, L in lim["per_budget"].items():
        lines.append(f"| {label} | {L['memory'] / MiB:.0f} | {_f(L['hit_rate'], '{:.3f}')} | "
                     f"{L['miss_bytes_per_token'] / 1e6:.1f} | {L['t_ram_s'] * 1e3:.1f} | {L['t_disk_s'] * 1e3:.1f} | "
                     f"{L['tok_s']:.2f} | {L['tok_s_serial']:.2f} | {_f(L.get('kernel_tok_s'))} | {_f(L.get('us_tok_s'))} | "
                     f"{_f(ratio(L.get('us_tok_s'), L['tok_s']), '{:.2f}')} |")
    if res.get("goals"):
        lines += ["", "Goals (llama.cpp at our precision: F16 for our float16 store, Q4_0 for our 4-bit one; each "
                      "limit counts the bytes of the store its budget is a share of, the Limits table's):", "",
                  "| budget | us | goal | target | measured | met |", "|---|---|---|---|---|---|"]
        for g in res["goals"]:
            met = "n/a" if g["met"] is None else ("yes" if g["met"] else "**no**")
            lines.append(f"| {g['budget']} | {g.get('us', 'us')} | {g['goal']} | ≥ {g['target']} | "
                         f"{_f(g['measured'])} | {met} |")
    if res.get("simulator"):
        lines += ["", "Simulator (`moe-offload simulate --hardware this-machine` on the trace each round recorded, "
                      "warm-up tokens excluded; median over rounds) vs measured:",
                  "", "| budget | policy | measured tok/s | predicted serial | predicted overlapped | "
                  "measured ÷ serial | predicted hit rate | measured hit rate |", "|---|---|---|---|---|---|---|---|"]
        for label, v in res["simulator"].items():
            if not v.get("ok"):
                lines.append(f"| {label} | - | - | - | - | - | - | {v.get('error', '')} |")
                continue
            lines.append(f"| {label} | {v['policy']} | {_f(v['measured_tok_s'])} | {_f(v['tok_s_serial'])} | "
                         f"{_f(v['tok_s_overlap'])} | {_f(ratio(v['measured_tok_s'], v['tok_s_serial']))} | "
                         f"{_f(v['hit_rate'], '{:.3f}')} | {_f(v['measured_hit_rate'], '{:.3f}')} |")
    if res.get("replay"):
        pcts = sorted({p for d in res["replay"].values() for p in d}, key=float, reverse=True)
        lines += ["", "Hit rate of each policy replayed on the recorded decode trace (after the warm-up tokens):", "",
                  "| policy | " + " | ".join(f"{float(p):g} %" for p in pcts) + " |", "|---" * (len(pcts) + 1) + "|"]
        for pol, d in res["replay"].items():
            lines.append(f"| {pol} | " + " | ".join(_f(d.get(p), '{:.3f}') for p in pcts) + " |")
    cached = [r.get("page_cache_before_bytes") for r in res["rows"] if "page_cache_before_bytes" in r]
    known = [c for c in cached if c is not None]
    if cached:
        lines += ["", "Page cache held by each configuration's model files when it started (fincore, after fsync + "
                      "POSIX_FADV_DONTNEED): " + (f"at most {max(known)} bytes over {len(known)} runs"
                                                     if known else "not checked (no fincore)") + "."]
    limited = sorted({(r.get("cgroup") or {}).get("limit_bytes", 0) // MiB for r in res["rows"] if r.get("cgroup")})
    notes = {r.get("cgroup_note") for r in res["rows"] if r.get("cgroup_note")}
    lines += [f"Memory limits (cgroup v1, page cache counted): {', '.join(f'{x} MiB' for x in limited) or 'none'}"
              + (f"; {'; '.join(sorted(notes))}" if notes else "") + "."]
    waits = sorted({(rnd.get("info") or {}).get("omp_wait") for r in res["rows"] if r.get("system") == "us"
                    for rnd in r.get("rounds") or ()} - {None})  # each round a process of its own choice
    if waits:
        lines += ["", f"OpenMP wait of our runs: {'; '.join(waits)}."]
    lines += ["", f"Load average at the start {res['load_avg_start']}, at the end {res['load_avg_end']}."]
    return "\n".join(lines) + "\n"


X_LABEL = "memory budget: backbone + this % of the 16-bit expert bytes"
X_LABELS = {4: "memory budget: the 4-bit model's backbone + this % of its 4-bit expert bytes",
            "gguf": "memory budget: the converted store's backbone + this % of its expert bytes"}


def budget_base(res: dict) -> int | str:
    """What a row's budget % counts: 16 / 4 (the 16- or 4-bit model's bytes; mixed budgets count as 16 on one
    axis, as before) or "gguf" (the store converted from a GGUF file: its codes as kept, its dense parts)."""
    if str(res.get("hf", "")).lower().endswith(".gguf"):
        return "gguf"
    bits = {b.get("bits", 16) for b in res.get("budgets") or []}
    return 4 if bits == {4} else 16


def series_label(r: dict, gguf: bool = False) -> str:
    """One series per configuration; ours name the precision of their store (a 4-bit store fits ~4x more
    experts in the same budget, so its points belong to a line of their own), or that it was converted from the
    GGUF file (its codes kept at the file's types)."""
    if r["system"] != "us":
        return r["config"]
    return f"{r['config']} (" + ("store from the GGUF" if gguf else f"{r.get('expert_bits', 16)}-bit store") + ")"


def _run_hit_rates(r: dict) -> list[float]:
    return [x["hits"] / (x["hits"] + x["misses"]) for x in r.get("runs") or []
            if x.get("hits") is not None and x["hits"] + x["misses"]]


def plot_data(res: dict) -> dict:
    """What the plots draw, both against the same x (budget %): per series sorted points (x, y, lo, hi) with
    y the median decode tok/s (pooled hit rate) and [lo, hi] the min-max over the repeated samples."""
    speed: dict[str, list] = {}
    hits: dict[str, list] = {}
    for r in res["rows"]:
        if not r.get("ok") or r.get("budget_pct") is None:
            continue
        x, d = float(r["budget_pct"]), r["summary"]["decode_tok_s"]
        name = series_label(r, budget_base(res) == "gguf")
        speed.setdefault(name, []).append((x, d["median"], d["min"], d["max"]))
        h, per = r["summary"].get("hit_rate"), _run_hit_rates(r)
        if r["system"] == "us" and h is not None:
            hits.setdefault(name, []).append((x, h, min(per, default=h), max(per, default=h)))
    limit = sorted((float(L["pct"]), L["tok_s"]) for L in res["limits"]["per_budget"].values()
                   if L.get("pct") is not None)
    replay = {pol: sorted((float(p), v) for p, v in d.items() if v is not None)
              for pol, d in (res.get("replay") or {}).items()}
    ticks = sorted({x for pts in speed.values() for x, *_ in pts})
    base = budget_base(res)
    return {"x_label": X_LABELS.get(base, X_LABEL), "x_ticks": ticks,
            "limit_label": f"bandwidth limit ({'16-bit' if base == 16 else '4-bit' if base == 4 else 'store'} bytes)", "x_lim": (0.0, 105.0),
            "speed": {k: sorted(v) for k, v in speed.items()}, "limit": limit,
            "hits": {k: sorted(v) for k, v in hits.items()}, "replay": replay}


def _errorbar(ax, pts, **kw):
    x, y = [p[0] for p in pts], [p[1] for p in pts]
    err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
    ax.errorbar(x, y, yerr=err, capsize=3, marker="o", **kw)


def plots(res: dict, out: Path) -> list[str]:
    """tok_s_vs_budget.png and hit_rate_vs_budget.png (plot_data); [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    d = plot_data(res)

    def finish(ax, fig, name, title, ylabel):
        ax.set_xlabel(d["x_label"])
        ax.set_xlim(*d["x_lim"])
        ax.set_xticks(d["x_ticks"])
        ax.set_ylabel(ylabel)
        ax.set_title(f"{res['model']}: {title}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        return name

    made = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in d["speed"].items():
        _errorbar(ax, pts, label=name)
    if d["limit"]:
        ax.plot(*zip(*d["limit"]), "k--", label=d["limit_label"])
    ax.set_yscale("log")
    made.append(finish(ax, fig, "tok_s_vs_budget.png", "decode speed vs memory budget",
                       "decode tok/s: median, bars min-max of the prompts"))
    if d["replay"] or d["hits"]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for pol, pts in d["replay"].items():
            name = "Belady-OPT (offline bound)" if pol == "opt" else f"{pol} (replay)"
            style = "--" if pol == "opt" else ":"
            ax.plot(*zip(*pts), marker=".", linestyle=style, label=f"{name}, 16-bit store")
        for name, pts in d["hits"].items():
            _errorbar(ax, pts, label=f"measured {name}", zorder=5)
        made.append(finish(ax, fig, "hit_rate_vs_budget.png", "decode hit rate vs memory budget",
                           "decode hit rate: pooled, bars min-max of the prompts"))
    return made


# ---- orchestration -------------------------------------------------------------------------------------


def _csv(text: str, allowed=None, flag: str = "") -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise UsageError(f"{flag}: unknown {bad[0]!r}; choose from {', '.join(allowed)}")
    return items


def _run_with_fallback(cfg: Config, pct, memory, out: Path, tag: str, a) -> dict:
    """run_config, with accelerate's offload folder fresh, and transformers re-run without a limit at 100 %."""
    if cfg.system == "accelerate":
        shutil.rmtree(cfg.spec["offload_folder"], ignore_errors=True)
    try:
        res = run_config(cfg, memory, out, tag, a.overhead, a.timeout, not a.no_cgroup)
        if cfg.system == "hf" and pct is not None and pct >= 100 and "OOM-killed" in str(res.get("error")):
            # everything fits by definition at 100 %: transformers' load needs more than budget + overhead,
            # so measure its speed without a limit and say so (its peak RSS shows what it needed)
            first = res["error"]
            res = run_config(cfg, None, out, tag + "-nolimit", a.overhead, a.timeout, False)
            res["note"] = f"{first} while loading; measured again without a memory limit"
    finally:
        if cfg.system == "accelerate":
            shutil.rmtree(cfg.spec["offload_folder"], ignore_errors=True)
    return res


def run_bench(a) -> dict:
    from .utils import atomic_write_text, parse_size

    absolute_paths(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    load_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    prep = prepare(a)
    sizes: Sizes = prep["sizes"]
    by_bits = {16: sizes, **prep.get("sizes_q", {})}  # the model whose bytes a budget's % refers to
    if a.memory:
        budgets, bits_of = memory_budgets([parse_size(m) for m in a.memory], by_bits, a.us_bits)
    else:
        kv_tok = kv_tokens(a.prompt_tokens, a.new_tokens + 1)  # child_us asks new_tokens + 1
        budgets = [(budget_label(b, p), p, budget_bytes(p, by_bits[b].backbone, by_bits[b].experts,
                                                        by_bits[b].kv_per_token * kv_tok))
                   for b, p in a.budgets]
        bits_of = {budget_label(b, p): b for b, p in a.budgets}
    vocab = prep["config"]["vocab_size"]
    prompts = prompts_for(vocab, a.prompt_tokens, a.repeat + 1)

    # limits: this machine's bandwidths
    from .hardware import measure_disk, measure_gemv, measure_ram_read

    print("bench: measuring RAM and cold disk read bandwidth", file=sys.stderr)
    ram = measure_ram_read(a.threads, nbytes=(64 if a.quick else 512) * MiB)
    ram_bw = ram["best"]
    inter = prep["config"].get("intermediate_size") or 1024
    gemv = measure_gemv(a.threads, a.dtype, 2 * inter, prep["config"]["hidden_size"])
    disk = measure_disk(prep["dir"], (32 if a.quick else 512) * MiB)
    # the model's own figures of the time model (an expert call, a miss's decode, the per-token overhead), so a
    # run validates from its own probes (scripts/validate_scale.py)
    import torch

    from .sim import model_probes

    torch.set_num_threads(a.threads)
    probe_bits = min(a.us_bits)  # our rows' lowest precision (a resident 4-bit run has no q4 budgets)
    probes = {**model_probes(prep["config"], probe_bits, a.dtype), "probe_bits": probe_bits}
    # the disk as a miss reads it: whole experts of that store, the loader's workers in flight
    from .store.tiers import measure_expert_reads
    from .store.format import open_store

    probe_store = open_store(prep["store"] if probe_bits == 16 else prep["quantized"][probe_bits])
    for reads in ("direct", *(r for r in a.us_disk_reads if r != "direct")):
        key = "disk_loader_bw" + ("" if reads == "direct" else f"_{reads}")
        probes[key] = measure_expert_reads(probe_store, nbytes=(32 if a.quick else 512) * MiB, reads=reads)
    disk_method = max(disk, key=disk.get)
    disk_bw = disk[disk_method]
    context = a.prompt_tokens + a.new_tokens / 2

    prep["gguf"], gguf_err = {}, {}
    if "llamacpp" in a.peers:
        for t in a.llamacpp_types:
            log = out / "runs" / f"export-gguf-{t}.log"
            prep["gguf"][t], gguf_err[t] = _gguf_for(prep, t, a.threads, log)

    rows = []
    per = a.repeat // a.rounds  # measured prompts per round; each round is a fresh process per system
    quiet = getattr(a, "quiet", False)
    plan = []  # per budget: its configurations, known up front so the progress has a total
    for label, pct, memory in budgets:
        tag_b = f"b{(pct if pct is not None else memory / MiB):g}".replace(".", "_")
        plan.append((label, pct, memory, tag_b, configs_for(a, prep, pct, memory, prompts, tag_b)))
    bar = Progress("bench", sum(len(c) for *_, c in plan) * a.rounds, "runs", quiet=quiet)

    def say(msg: str) -> None:
        if not quiet:
            bar.write(msg)

    for label, pct, memory, tag_b, cfgs in plan:
        state = {}
        for cfg in cfgs:
            row = {"label": label, "budget_pct": pct, "budget_bits": bits_of[label], "memory": memory,
                   "system": cfg.system, "config": cfg.config,
                   "expert_bits": cfg.spec.get("expert_bits", 16),
                   "policy": cfg.spec.get("policy"), "rounds": [], "_runs": [], "_all": []}
            if cfg.system == "llamacpp" and cfg.spec["model"] is None:
                row["error"] = gguf_err.get(cfg.spec["gguf_type"]) or "no GGUF file"
            state[cfg.config] = row
        # round-robin: every system measures one round of prompts before any measures the next, so slow drifts
        # in the load of this shared machine spread over all systems alike
        for k in range(a.rounds):
            round_prompts = [prompts[0], *prompts[1 + k * per:1 + (k + 1) * per]]
            for cfg in cfgs:
                row = state[cfg.config]
                if row.get("error"):
                    bar.update()
                    continue
                spec = {**cfg.spec, "prompts": round_prompts}
                one = Config(cfg.system, cfg.config, spec, cfg.files)
                tag = f"{tag_b}-{cfg.config}" + (f"-r{k}" if a.rounds > 1 else "")
                say(f"bench: {label} {cfg.config}" + (f" round {k + 1}/{a.rounds}" if a.rounds > 1 else "")
                    + " ...")
                res = _run_with_fallback(one, pct, memory, out, tag, a)
                bar.update()
                row["rounds"].append({k2: v for k2, v in res.items() if k2 != "runs"})
                if not res.get("ok"):
                    row["error"] = res.get("error") if k == 0 else f"round {k + 1}: {res.get('error')}"
                    bar.write(f"bench:   -> {row['error']}")
                    continue
                row["_runs"] += res["runs"][1:]
                row["_all"].append(res["runs"])
                say("bench:   -> ok, decode " + ", ".join(f"{r['decode_tok_s']:.2f}" for r in res["runs"][1:])
                    + " tok/s")
        for cfg in cfgs:
            row = state[cfg.config]
            runs, allr, rnds = row.pop("_runs"), row.pop("_all"), row["rounds"]
            row["ok"] = not row.get("error") and bool(runs)
            if rnds:
                last = rnds[0]
                row.update(note=last.get("note"), info=last.get("info"), cgroup_note=last.get("cgroup_note"),
                           load_s=last.get("load_s"),
                           peak_rss_bytes=max((r.get("peak_rss_bytes") or 0) for r in rnds),
                           page_cache_before_bytes=max((r.get("page_cache_before_bytes") or 0) for r in rnds)
                           if all(r.get("page_cache_before_bytes") is not None for r in rnds) else None)
                cgs = [r["cgroup"] for r in rnds if r.get("cgroup")]
                if cgs:
                    row["cgroup"] = {"limit_bytes": cgs[0]["limit_bytes"],
                                     "max_usage_bytes": max(c["max_usage_bytes"] for c in cgs),
                                     "failcnt": sum(c["failcnt"] for c in cgs), "oom_kill": sum(c["oom_kill"] for c in cgs)}
            if row["ok"]:
                row["warmup"] = {k: v for k, v in allr[0][0].items() if k not in ("routes", "prefill_routes", "tokens")}
                row["summary"] = summarize_runs(runs, a.new_tokens)
                row["tokens"] = [r["tokens"] for r in runs]
                row["runs"] = [{k: v for k, v in r.items() if k not in ("routes", "prefill_routes")} for r in runs]
                if cfg.system == "us" and "trace_rounds" not in prep:
                    prep["trace_rounds"] = allr  # per round: [warm-up, measured...] with their routes
            rows.append(row)
    bar.close()

    # ratios and token agreement against our first policy at the same budget
    for r in rows:
        us = next((u for u in rows if u["label"] == r["label"] and u["system"] == "us" and u.get("ok")), None)
        if us is None or not r.get("ok"):
            continue
        r["us_over_this"] = ratio(us["summary"]["decode_tok_s"]["median"], r["summary"]["decode_tok_s"]["median"])
        r["same_tokens"] = leading_agreement(r["tokens"][0], us["tokens"][0])

    limits = {"ram_read_bw": ram_bw, "ram_read_bw_median": ram["median"], "gemv_bw": gemv["best"],
              "gemv_bw_median": gemv["median"], "disk_read_bw": disk_bw, "disk_method": disk_method,
              "disk_read_bw_by_method": disk, "threads": a.threads, **probes,
              "context_tokens": context, "touched_bytes_per_token": sizes.touched_per_token(context),
              "per_budget": {}}
    for label, pct, memory in budgets:
        bits, sz = bits_of[label], by_bits[bits_of[label]]  # a q4 budget: the 4-bit store's bytes
        us = next((u for u in rows if u["label"] == label and u["system"] == "us" and u.get("ok")
                   and u.get("expert_bits", 16) == bits), None)
        hit = us["summary"].get("hit_rate") if us else None
        full = pct is not None and pct >= 100
        h = 1.0 if full else (hit if hit is not None else 0.0)
        L = decode_limit(sz.touched_per_token(context), miss_bytes_per_token(sz, h), ram_bw, disk_bw)
        K = decode_limit(sz.touched_per_token(context), miss_bytes_per_token(sz, h), gemv["best"], disk_bw)
        L.update(pct=pct, memory=memory, bits=bits, hit_rate=h, miss_bytes_per_token=miss_bytes_per_token(sz, h),
                 touched_bytes_per_token=sz.touched_per_token(context),
                 kernel_tok_s=K["tok_s"],
                 us_tok_s=us["summary"]["decode_tok_s"]["median"] if us else None)
        limits["per_budget"][label] = L

    res = {"model": prep["name"], "hf": str(prep["hf"]), "store": str(prep["store"]), "dtype": a.dtype,
           "threads": a.threads, "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "repeat": a.repeat,
           "rounds": a.rounds,
           "overhead_bytes": a.overhead, "command": a.command_line, "sizes": {**asdict(sizes), "experts": sizes.experts,
                                                                             "active_experts": sizes.active_experts},
           "sizes_q": {str(b): {**asdict(z), "experts": z.experts, "active_experts": z.active_experts}
                       for b, z in prep.get("sizes_q", {}).items()},
           "machine": prep.get("machine"), "quantize": prep.get("quantize_log"),
           "budgets": [{"label": lbl, "pct": p, "memory": m, "bits": bits_of[lbl]} for lbl, p, m in budgets],
           "limits": limits,
           "rows": rows, "prompts": prompts, "load_avg_start": load_start}
    res["goals"] = goal_rows(rows, limits)

    # the recorded trace: policy replay, and the simulator's prediction beside the measurement
    if prep.get("trace_rounds"):
        rounds = prep["trace_rounds"]
        seq = [rounds[0][0]] + [r for rnd in rounds for r in rnd[1:]]  # warm-up, then every measured prompt
        trace_path, warm = record_trace(prep, seq, out / "trace.npz")
        if trace_path is not None:
            res["trace"] = {"path": str(trace_path), "warmup_tokens": warm}
            grid = sorted({100.0, 87.5, 75.0, 62.5, 50.0, 37.5, 25.0, 12.5} | {p for _, p, _ in budgets if p},
                          reverse=True)
            res["replay"] = replay_grid(trace_path, sizes, grid, warm)
        # one trace per round (a fresh process: warm-up, then that round's prompts), as the measurement ran
        round_traces = [record_trace(prep, rnd, out / f"trace-round{k + 1}.npz") for k, rnd in enumerate(rounds)]
        if not a.no_simulate and all(t is not None for t, _ in round_traces):
            res["simulator"] = {}
            for label, pct, memory in budgets:
                us = next((u for u in rows if u["label"] == label and u["system"] == "us" and u.get("ok")), None)
                if us is None or bits_of[label] != 16:  # the trace counts 16-bit expert bytes
                    continue
                policy = us["policy"]
                preds = [simulate_cli(t, memory, policy, w, a.dtype, a.threads) for t, w in round_traces]
                ok = [p for p in preds if p.get("ok")]
                v = {"ok": bool(ok) and len(ok) == len(preds), "policy": policy, "rounds": preds,
                     "command": preds[0].get("command"), "error": next((p["error"] for p in preds if not p.get("ok")), None),
                     "measured_tok_s": us["summary"]["decode_tok_s"]["median"],
                     "measured_hit_rate": us["summary"].get("hit_rate")}
                if v["ok"]:
                    for key in ("tok_s_serial", "tok_s_overlap", "hit_rate"):
                        v[key] = statistics.median(p[key] for p in ok)
                res["simulator"][label] = v
    res["load_avg_end"] = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    atomic_write_text(out / "results.json", json.dumps(res, indent=1, default=str))
    md = markdown(res)
    res["plots"] = plots(res, out)
    if res["plots"]:
        md += "\n" + "\n".join(f"![{p}]({p})" for p in res["plots"]) + "\n"
    atomic_write_text(out / "results.md", md)
    atomic_write_text(out / "results.json", json.dumps(res, indent=1, default=str))
    return res


def add_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="Hugging Face MoE folder (default: the bundled model), or a GGUF "
                                                    "file (llama.cpp on it, us on the store converted from it)")
    src.add_argument("--synthetic", default=None, choices=[*SYNTHETIC, *STREAMED],
                     help="a random model built on the fly (mixtral-8x7b-L4, qwen3-30b-a3b-L8: the real models' "
                          "exact layer widths and vocabulary, 4 / 8 layers)")
    p.add_argument("--memory", action="append", default=None, help="absolute budget (repeatable), e.g. 900MiB")
    p.add_argument("--budgets", default="100,50,25",
                   help="budgets as %% of the 16-bit model's expert bytes (+ its backbone); q4:100,50,25: of the "
                        "4-bit model's (its backbone + 4-bit experts: 100 = everything fits at 4 bits)")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {', '.join(PEERS)} (or 'none')")
    p.add_argument("--hf-impls", default=",".join(HF_IMPLS), help="transformers experts implementations")
    p.add_argument("--llamacpp-types", default=",".join(LLAMACPP_TYPES), help="GGUF types for llama.cpp")
    p.add_argument("--us-disk-reads", default="direct",
                   help="comma-separated: how our rows read missed experts (generate --disk-reads): direct, "
                        "buffered (rows named +buffered)")
    p.add_argument("--llamacpp-repack", default="on", choices=list(REPACK),
                   help="on: llama.cpp as it runs by default (its CPU repack of quantized weights, anonymous "
                        "memory); off: its --no-repack (weights stay in the mmap'd file: it runs below the file's "
                        "size, rows named llamacpp-TYPE-norepack); both")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length")
    p.add_argument("--new-tokens", type=int, default=64, help="decoded tokens after the first (prefill) token")
    p.add_argument("--repeat", type=int, default=3, help="measured generations (prompts) per configuration")
    p.add_argument("--rounds", type=int, default=None,
                   help="fresh processes per configuration, run round-robin over the systems, each doing one "
                        "warm-up and repeat/rounds measured prompts (default: --repeat, one prompt per round)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every system")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="weights and compute dtype for us and the transformers peers (llama.cpp: its GGUF types)")
    p.add_argument("--cache-policy", default="lru", help="our expert cache policy (comma list: one row each)")
    p.add_argument("--prefetch", default="none", help="our prefetcher: comma list of none, lookahead, shadow, "
                                                       "auto (one row each)")
    p.add_argument("--us-backbone-bits", type=int, default=16, choices=[16, 8, 4],
                   help="our quantized stores' attention and lm_head (quantize --attn-bits/--head-bits): 16, or "
                        "8/4 as llama.cpp's files hold them")
    p.add_argument("--embed-rows", default="resident", choices=["resident", "auto", "disk"],
                   help="our embedding table: resident, or its rows read from the store per token (disk; auto: "
                        "when over 5%% of the budget)")
    p.add_argument("--us-bits", default="16", help="our experts' bits: comma list of 16 (the store as converted) "
                                                   "and 4 (a 4-bit HQQ store made by `moe-offload quantize`)")
    p.add_argument("--quantizer", default="hqq", choices=["hqq", "rtn"],
                   help="how bench's `quantize` makes the 4-bit store (rtn: round to nearest, same format, "
                        "much faster at real widths)")
    p.add_argument("--overhead", default=f"{OVERHEAD // MiB}MiB", help="cgroup limit = budget + this")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    p.add_argument("--no-cgroup", action="store_true", help="run without memory limits")
    p.add_argument("--no-simulate", action="store_true", help="skip the simulator comparison")
    p.add_argument("--cache-dir", default=str(CACHE), help="where synthetic models, stores and GGUF files live")
    p.add_argument("--quick", action="store_true", help="smoke test: 8+8 tokens, 1 repeat, budgets 100,50")
    p.add_argument("--concurrency", default=None,
                   help="stream counts, e.g. 1,4,16: a batch-1 queue vs one batch on our store (no peers)")
    p.add_argument("--out", default="bench-results", help="folder for results.json, results.md, plots, trace")
    add_quiet_arg(p)


def run(a) -> int:
    from .utils import parse_size

    if a.model is None and a.synthetic is None:
        from .runtime.engine import DEFAULT_MODEL

        a.model = str(DEFAULT_MODEL)
    a.command_line = "moe-offload bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])
    a.peers = [] if a.peers.strip() in ("", "none") else _csv(a.peers, PEERS, "--peers")
    a.hf_impls = _csv(a.hf_impls, None, "--hf-impls")
    a.llamacpp_types = _csv(a.llamacpp_types, None, "--llamacpp-types")
    a.us_disk_reads = _csv(a.us_disk_reads, ("direct", "buffered"), "--us-disk-reads")
    a.cache_policy = _csv(a.cache_policy, None, "--cache-policy")
    a.prefetch = _csv(a.prefetch or "none", ("none", "lookahead", "shadow", "auto"), "--prefetch")
    a.us_bits = [int(b) for b in _csv(a.us_bits, ("16", "4"), "--us-bits")]
    a.overhead = parse_size(a.overhead)
    a.budgets = parse_budgets(a.budgets)
    if a.quick:
        a.prompt_tokens, a.new_tokens, a.repeat = min(a.prompt_tokens, 8), min(a.new_tokens, 8), 1
        if a.budgets == [(16, 100.0), (16, 50.0), (16, 25.0)]:
            a.budgets = [(16, 100.0), (16, 50.0)]
        a.timeout = min(a.timeout, 600)
    if a.repeat < 1 or a.new_tokens < 1 or a.prompt_tokens < 1 or a.threads < 1:
        raise UsageError("--repeat, --new-tokens, --prompt-tokens and --threads must be >= 1")
    a.rounds = a.repeat if a.rounds is None else a.rounds
    if a.rounds < 1 or a.repeat % a.rounds:
        raise UsageError(f"--rounds must divide --repeat ({a.repeat}), got {a.rounds}")
    if a.concurrency:
        from .concurrency import cmd_concurrency

        return cmd_concurrency(a, prepare)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: children killed, cgroups removed
    res = run_bench(a)
    print(markdown(res))
    print(f"wrote {Path(a.out) / 'results.json'}, results.md" + "".join(f", {p}" for p in res.get("plots", [])))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2], sys.argv[3]))
    import runpy  # `python -m moe_offload.bench ARGS` is `moe-offload bench ARGS`

    sys.argv[1:1] = ["bench"]
    runpy.run_module("moe_offload", run_name="__main__")
