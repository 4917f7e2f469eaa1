"""The command line: a thin layer over the engine. Each subcommand registers itself in COMMANDS."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from .errors import MoeError, UsageError

# name -> (help, add_args(parser), run(args) -> exit code)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, add_args: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand: `add_args(parser)` declares its flags; the decorated function runs it."""

    def wrap(run):
        COMMANDS[name] = (help, add_args, run)
        return run

    return wrap


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other usage error
        raise UsageError(f"{self.prog}: {message}")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model folder or expert store (default: the bundled model)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "auto"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--memory", default=None, help="bytes of weights allowed on the compute device, e.g. 512MiB")
    p.add_argument("--host-memory", default=None, help="pinned host RAM tier between disk and device (GPU)")
    p.add_argument("--cache-policy", default=None, help="expert cache policy: lru, lru-global, lfu, lrfu")
    p.add_argument("--prefetch", default=None, choices=["none", "lookahead", "shadow", "auto"],
                   help="speculative expert prefetch (expert store only)")
    p.add_argument("--prefetch-depth", type=int, default=None, help="MoE layers ahead to prefetch (default 1)")
    p.add_argument("--prefetch-experts", type=int, default=None, help="experts per predicted layer (default top-k)")
    p.add_argument("--cpu-misses", default=None, choices=["auto", "on", "off"],
                   help="compute missed experts on the CPU where the cost model says so (GPU; default off)")
    p.add_argument("--miss-fallback", default=None, choices=["none", "lowbit"],
                   help="lowbit: a resident 2-bit copy stands in for a missed low-weight expert "
                        "(changes tokens)")
    p.add_argument("--fallback-threshold", type=float, default=None,
                   help="lowbit: used when every routing weight of the expert is below this (default 0.2)")
    p.add_argument("--verify-reads", default=None, choices=["first", "always"],
                   help="check expert reads against the store's crc32: each expert's first read (default) or "
                        "every read (~6 ms of CPU per 22 MB)")
    p.add_argument("--auto", action="store_true",
                   help="let the planner pick --memory/--host-memory/--prefetch/--cpu-misses/--cache-policy")
    p.add_argument("--hardware", default=None, help="--auto / --cpu-misses figures: a hardware profile "
                                                    "(default: measure this machine)")


def offload_kwargs(a: argparse.Namespace) -> dict:
    kw = {"host_memory": a.host_memory, "cache_policy": a.cache_policy}
    for name in ("prefetch", "prefetch_depth", "prefetch_experts", "cpu_misses", "miss_fallback",
                 "fallback_threshold", "verify_reads"):
        if getattr(a, name, None) is not None:
            kw[name] = getattr(a, name)
    if getattr(a, "hardware", None) not in (None, "this-machine") and kw.get("cpu_misses", "off") != "off":
        kw["hardware"] = a.hardware  # the cost model's figures from the profile instead of measuring
    return kw


def load_engine(a: argparse.Namespace):
    from .runtime.engine import load

    if getattr(a, "auto", False):  # the planner fills what the user left unset; one stderr line
        from .autoconf import apply_auto

        apply_auto(a)
    return load(a.model, device=a.device, dtype=a.dtype, memory=a.memory, **offload_kwargs(a))


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS (benchmarks)")


def sampling_kwargs(a: argparse.Namespace) -> dict:
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                seed=a.seed, stop=a.stop, ignore_eos=a.ignore_eos)


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise UsageError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids or any(i < 0 for i in ids):
        raise UsageError(f"--prompt-ids must be non-empty, non-negative integers, got {text!r}")
    return ids


def format_stats(s: dict) -> str:
    lines = [
        f"prompt: {s['prompt_tokens']} tokens, {s['prefill_tokens_per_s']:.2f} tok/s",
        f"decode: {s['generation_tokens']} tokens, {s['decode_tokens_per_s']:.2f} tok/s",
        f"peak memory: {s['peak_rss_bytes'] / 2**20:.1f} MiB RSS, "
        f"KV cache {s.get('kv_cache_bytes', 0) / 2**20:.1f} MiB",
    ]
    if "expert_hits" in s:
        lines.append(f"experts: {s['expert_hits']} hits, {s['expert_misses']} misses, hit rate {s['hit_rate']:.3f}, "
                     f"{s['bytes_read_disk'] / 2**20:.1f} MiB read from disk, "
                     f"{s['bytes_to_device'] / 2**20:.1f} MiB to device, stalled {s['stall_seconds']:.3f} s, "
                     f"resident weights {s['resident_weight_bytes'] / 2**20:.1f} MiB")
    if "prefetch_issued" in s:
        lines.append(f"prefetch: {s['prefetch_issued']} issued, {s['prefetch_used']} used, "
                     f"{s['prefetch_cancelled']} cancelled, {s.get('prefetch_wasted', 0)} wasted, "
                     f"recall {s.get('prefetch_recall', 0):.3f}, "
                     f"precision {s.get('prefetch_precision', 0):.3f}")
    if s.get("cpu_computed_experts") or s.get("lowbit_fallbacks"):
        lines.append(f"misses: {s.get('cpu_computed_experts', 0)} computed on the CPU "
                     f"({s.get('cpu_compute_seconds', 0.0):.3f} s), "
                     f"{s.get('lowbit_fallbacks', 0)} by 2-bit stand-ins")
    return "\n".join(lines)


def _add_generate(p):
    add_model_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None)
    src.add_argument("--prompt-ids", default=None, help="comma-separated token ids, e.g. 1,2,3")
    add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


@command("generate", "generate text from a prompt", _add_generate)
def cmd_generate(a) -> int:
    ids = parse_ids(a.prompt_ids) if a.prompt_ids is not None else None
    if ids is None and a.prompt is None:
        raise UsageError("generate: give --prompt TEXT or --prompt-ids 1,2,3")
    engine = load_engine(a)
    kw = sampling_kwargs(a)
    if ids is not None:
        kw["prompt_ids"] = ids
    elif a.chat:
        kw["messages"] = [{"role": "user", "content": a.prompt}]
    else:
        kw["prompt"] = a.prompt
    if a.json:
        r = engine.generate(**kw)
        print(json.dumps({"text": r.text, "token_ids": r.token_ids, "prompt_tokens": r.prompt_tokens,
                          "finish_reason": r.finish_reason, "stats": r.stats}))
        return 0
    last = None
    for r in engine.stream_generate(**kw):
        sys.stdout.write(r.text)
        sys.stdout.flush()
        last = r
    sys.stdout.write("\n")
    print(format_stats(last.stats), file=sys.stderr)
    return 0


def _add_chat(p):
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="system message")


@command("chat", "interactive chat with the model's chat template", _add_chat)
def cmd_chat(a) -> int:
    engine = load_engine(a)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write(">>> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        for r in engine.stream_generate(messages=messages, **sampling_kwargs(a)):
            sys.stdout.write(r.text)
            sys.stdout.flush()
            reply.append(r.text)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def _load_plugins() -> None:
    """Subcommands living in other modules register themselves on import."""
    import importlib

    for mod in ("moe_offload.store.cli", "moe_offload.profile", "moe_offload.quant.cli", "moe_offload.server",
                "moe_offload.store.lowbit", "moe_offload.bench", "moe_offload.eval", "moe_offload.plan",
                "moe_offload.sim", "moe_offload.gguf_export", "moe_offload.prefetch.report"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        _load_plugins()
        parser = _Parser(prog="moe-offload", description="Run MoE models that do not fit in fast memory.")
        parser.add_argument("--debug", action="store_true", help="show tracebacks")
        sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
        for name, (help_text, add_args, _) in COMMANDS.items():
            sp = sub.add_parser(name, help=help_text)
            sp.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
            add_args(sp)
        a = parser.parse_args(argv)
        return COMMANDS[a.cmd][2](a) or 0
    except MoeError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # an unexpected failure still gets one line; --debug shows the traceback
        if debug:
            raise
        print(f"error: {type(e).__name__}: {e} (run with --debug for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # run as `python -m moe_offload.cli`: plugins register on the imported module, so call that one's main
    from moe_offload.cli import main as _main

    sys.exit(_main())
