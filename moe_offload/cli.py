"""The command line: a thin layer over the engine. Each subcommand registers itself in COMMANDS."""

from __future__ import annotations

import argparse
import difflib
import json
import math
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


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in --help where they say something (not None, not False, not already in the text); the
    epilog's example kept as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# ---- typed numbers: one place checks every numeric flag -------------------------------------------------

def number(kind: type = float, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False):
    """argparse `type=`: a finite int or float in [lo, hi] ((lo, hi] with lo_open); one-line refusal."""
    what = "an integer" if kind is int else "a number"
    if hi is None:
        span = "" if lo is None else f" {'>' if lo_open else '>='} {lo}"
    else:
        span = f" in {'(' if lo_open else '['}{lo}, {hi}]"

    def parse(text: str):
        try:
            v = kind(text)
        except (TypeError, ValueError):
            v = None
        ok = v is not None and math.isfinite(v) and (hi is None or v <= hi) and \
            (lo is None or (v > lo if lo_open else v >= lo))
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {what}{span}, got {text!r}")
        return v

    parse.__name__ = kind.__name__
    return parse


def checked(fn: Callable[[str], object]):
    """argparse `type=` from a parser that raises UsageError (sizes); returns the text itself, so the flag
    keeps its spelling (`--memory 25%`) and the library parses it again where it is used."""

    def parse(text: str):
        try:
            fn(text)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    parse.__name__ = fn.__name__
    return parse


def _memory(text: str):
    from .utils import parse_memory  # torch: imported when a command runs, not for the parser

    return parse_memory(text)


def _size(text: str):
    from .utils import parse_size

    return parse_size(text)


COUNT = number(int, 0)
POSITIVE = number(int, 1)
FRACTION = number(float, 0, 1)

# familiar spellings (llama.cpp, mlx-lm, vLLM) of our flags, added to every command that has the flag
ALIASES = {
    "--model": ["-m"],
    "--prompt": ["-p"],
    "--max-new-tokens": ["-n", "--max-tokens"],
    "--temperature": ["--temp"],
    "--threads": ["-t"],
    "--ctx-size": ["-c"],
    "--repetition-penalty": ["--repeat-penalty"],
    "--chat-template": ["--chat-template-file"],
}

# one example per command, shown under its --help
EXAMPLES = {
    "generate": "moe-offload generate -m models/tiny-moe -p 'The router' -n 32 --temp 0.7 --memory 25%",
    "chat": "moe-offload chat -m models/tiny-moe --memory auto --system 'Be brief.'",
    "serve": "moe-offload serve -m models/tiny-moe --memory 50% --port 8000",
    "convert": "moe-offload convert --model path/to/hf-folder --out my-store",
    "quantize": "moe-offload quantize --model path/to/hf-folder --expert-bits 4 --out my-store-4bit",
    "profile": "moe-offload profile -m my-store --text calib.txt --out my-store --train-shadow",
    "lowbit": "moe-offload lowbit --model my-store",
    "bench": "moe-offload bench --quick",
    "eval": "moe-offload eval -m models/tiny-moe --text models/tiny-moe/heldout.txt --memory 50%",
    "simulate": "moe-offload simulate --trace trace.json --hardware rtx3060-12gb --memory 10GiB",
    "plan": "moe-offload plan --model path/to/hf-folder --hardware rtx3060-12gb",
    "export-gguf": "moe-offload export-gguf --model path/to/hf-folder --out model.gguf --type q4_k",
    "prefetch-report": "moe-offload prefetch-report -m my-store --text calib.txt --budgets 25,50",
    "stores": "moe-offload stores --prune",
}


def add_aliases(p: argparse.ArgumentParser) -> None:
    """Give each flag of `p` its familiar spellings from ALIASES, where `p` does not use them already."""
    taken = p._option_string_actions
    for action in list(p._actions):
        for name in [o for o in action.option_strings if o in ALIASES]:
            new = [x for x in ALIASES[name] if x not in taken]
            for x in new:
                taken[x] = action
            short = [x for x in new if not x.startswith("--")]
            long = [x for x in new if x.startswith("--")]
            action.option_strings[:] = [*short, *action.option_strings, *long]


def unknown_flags(p: argparse.ArgumentParser, extra: list[str]) -> str:
    """The one line for unrecognized arguments, with the closest flag of the command when there is one."""
    msg = f"{p.prog}: unrecognized arguments: {' '.join(extra)}"
    ours = [o for o in p._option_string_actions if o.startswith("--")]
    for flag in [x.split("=", 1)[0] for x in extra if x.startswith("-")]:
        near = difflib.get_close_matches(flag, ours, 1, 0.6)
        if near:
            return f"{msg}; did you mean {near[0]}?"
    return msg


# ---- shared flags --------------------------------------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser, chat_template: bool = False) -> None:
    p.add_argument("--model", default=None, help="HF model folder or expert store (default: the bundled model)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "auto"],
                   help="compute device (default: cuda when torch sees one, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--memory", default=None, type=checked(_memory),
                   help="weights allowed on the compute device: a size (512MiB, 2GiB), a share of the model "
                        "(25%%: the backbone + 25%% of the expert bytes) or auto (the planner's figure for "
                        "this machine); unset: everything resident")
    p.add_argument("--host-memory", default=None, type=checked(_size),
                   help="pinned host RAM tier between disk and device (GPU)")
    p.add_argument("--cache-policy", default=None, help="expert cache policy: lru, lru-global, lfu, lrfu")
    p.add_argument("--prefetch", default=None, choices=["none", "lookahead", "shadow", "auto"],
                   help="speculative expert prefetch (expert store only)")
    p.add_argument("--prefetch-depth", type=POSITIVE, default=None,
                   help="MoE layers ahead to prefetch (default 1)")
    p.add_argument("--prefetch-experts", type=POSITIVE, default=None,
                   help="experts per predicted layer (default top-k)")
    p.add_argument("--cpu-misses", default=None, choices=["auto", "on", "off"],
                   help="compute missed experts on the CPU where the cost model says so (GPU; default off)")
    p.add_argument("--miss-fallback", default=None, choices=["none", "lowbit"],
                   help="lowbit: a resident 2-bit copy stands in for a missed low-weight expert "
                        "(changes tokens)")
    p.add_argument("--fallback-threshold", type=FRACTION, default=None,
                   help="lowbit: used when every routing weight of the expert is below this (default 0.2)")
    p.add_argument("--verify-reads", default=None, choices=["first", "always"],
                   help="check expert reads against the store's crc32: each expert's first read (default) or "
                        "every read (~6 ms of CPU per 22 MB)")
    p.add_argument("--auto", action="store_true",
                   help="let the planner pick --memory/--host-memory/--prefetch/--cpu-misses/--cache-policy")
    p.add_argument("--hardware", default=None,
                   help="--auto / --memory auto / --cpu-misses figures: a hardware profile "
                        "(default: measure this machine)")
    p.add_argument("--threads", type=number(int, 1, 4096), default=None,
                   help="CPU threads for torch (default: torch's choice, usually the physical cores)")
    p.add_argument("--ctx-size", type=COUNT, default=None,
                   help="cap the context (prompt + reply) and its KV cache at this many tokens "
                        "(0 or unset: the model's)")
    if chat_template:
        p.add_argument("--chat-template", default=None,
                       help="Jinja chat template file (or the template itself) instead of the model's")


def auto_memory(a: argparse.Namespace, log=lambda m: print(m, file=sys.stderr)) -> int:
    """`--memory auto`: the planner's device budget for this machine (or --hardware), in the store's bytes.
    Only the memory is taken from the plan; the other options stay as given."""
    from .autoconf import plan_options

    said: list[str] = []
    chosen = plan_options(argparse.Namespace(**{**vars(a), "memory": None}), log=said.append)
    for line in said[:-1]:  # a hint to quantize first, when the plan wants another precision
        log(line)
    log(f"moe-offload: --memory auto on {getattr(a, 'hardware', None) or 'this-machine'}: "
        f"{chosen['memory'] / 2**20:.1f} MiB")
    return chosen["memory"]


def load_engine(a: argparse.Namespace):
    from .runtime.load import load

    if getattr(a, "threads", None):
        import torch

        torch.set_num_threads(a.threads)
    from .autoconf import auto_config, offload_options

    ctx = {"ctx_size": a.ctx_size} if getattr(a, "ctx_size", None) else {}
    if getattr(a, "auto", False):  # the planner fills what the user left unset (--memory auto too); one line
        engine = load(a.model, device=a.device, dtype=a.dtype, config=auto_config(a), **ctx)
    else:
        memory = auto_memory(a) if a.memory == "auto" else a.memory
        engine = load(a.model, device=a.device, dtype=a.dtype, memory=memory, **offload_options(vars(a)),
                      **ctx)
    if getattr(a, "chat_template", None):
        from .runtime.tokenizer import read_chat_template

        if engine.tokenizer is None:
            raise UsageError(f"--chat-template: {engine.path} has no tokenizer.json")
        engine.tokenizer.set_chat_template(read_chat_template(a.chat_template), origin=a.chat_template)
    return engine


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=COUNT, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=number(float, 0), default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=number(float, 0, 1, lo_open=True), default=1.0,
                   help="sample from the likeliest tokens whose probabilities add up to this")
    p.add_argument("--top-k", type=COUNT, default=0, help="sample from the k likeliest tokens (0: all)")
    p.add_argument("--min-p", type=FRACTION, default=None,
                   help="drop tokens less likely than this fraction of the likeliest one (unset: off)")
    p.add_argument("--repetition-penalty", type=number(float, 0, lo_open=True), default=None,
                   help="penalise tokens already in the context (> 1 discourages repeats; unset or 1: off)")
    p.add_argument("--seed", type=number(int, 0, 2**63 - 1), default=None,
                   help="random seed for sampling (unset: a fresh one each run)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS (benchmarks)")


def sampling_kwargs(a: argparse.Namespace) -> dict:
    kw = {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_p": a.top_p,
          "top_k": a.top_k, "seed": a.seed, "stop": a.stop, "ignore_eos": a.ignore_eos}
    for name in ("min_p", "repetition_penalty"):  # only when given: the engine's defaults are "off"
        if getattr(a, name, None) is not None:
            kw[name] = getattr(a, name)
    return kw


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
    add_model_args(p, chat_template=True)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None,
                     help="prompt text, taken as text (special tokens are not parsed); - reads it from stdin")
    src.add_argument("--prompt-ids", default=None, help="comma-separated token ids, e.g. 1,2,3")
    add_sampling_args(p)
    p.add_argument("--chat", action="store_true",
                   help="wrap --prompt in the model's chat template (implied by --chat-template)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


@command("generate", "generate text from a prompt", _add_generate)
def cmd_generate(a) -> int:
    ids = parse_ids(a.prompt_ids) if a.prompt_ids is not None else None
    if ids is None and a.prompt is None:
        raise UsageError("generate: give --prompt TEXT or --prompt-ids 1,2,3")
    if a.prompt == "-":
        a.prompt = sys.stdin.read().rstrip("\n")
    engine = load_engine(a)
    kw = sampling_kwargs(a)
    if ids is not None:
        kw["prompt_ids"] = ids
    elif a.chat or a.chat_template:
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
    add_model_args(p, chat_template=True)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="system message")


CHAT_HELP = ("/help      this list\n"
             "/clear     forget the conversation (the system message stays)\n"
             "/stats     tok/s (and the expert hit rate when offloaded) after each reply: on/off\n"
             "/exit      quit (also /quit, or end of input)")


def chat_banner(engine) -> str:
    info = engine.info
    budget = f"--memory {info['memory'] / 2**20:.1f} MiB" if info.get("memory") else "all weights resident"
    return (f"moe-offload chat: {engine.path} ({info.get('model_type', '?')}, {budget}, context "
            f"{engine.context_length} tokens); /help for commands")


def reply_stats(s: dict) -> str:
    line = f"[{s['generation_tokens']} tokens, {s['decode_tokens_per_s']:.1f} tok/s"
    if "hit_rate" in s:
        line += f", expert hit rate {s['hit_rate']:.3f}"
    return line + "]"


def fit_history(messages: list[dict], count: Callable[[list[dict]], int],
                limit: int) -> tuple[list[dict], int]:
    """Drop the oldest turns (a user message and what follows it up to the next one; a leading system message
    stays) until count(messages) <= limit or only the last user message is left.
    Returns (messages, turns dropped)."""
    head = 1 if messages and messages[0].get("role") == "system" else 0
    dropped = 0
    while count(messages) > limit and sum(m["role"] == "user" for m in messages[head:]) > 1:
        rest = messages[head + 1:]
        nxt = next(i for i, m in enumerate(rest) if m["role"] == "user")
        messages = messages[:head] + rest[nxt:]
        dropped += 1
    return messages, dropped


@command("chat", "interactive chat with the model's chat template", _add_chat)
def cmd_chat(a) -> int:
    engine = load_engine(a)
    if engine.tokenizer is None:
        raise MoeError(f"{engine.path}: no tokenizer.json, so no chat")

    def say(m: str) -> None:  # everything but the replies goes to stderr
        print(m, file=sys.stderr, flush=True)

    say(chat_banner(engine))
    system = [{"role": "system", "content": a.system}] if a.system else []
    messages, show_stats, last = list(system), False, None
    ctx = engine.context_length
    room = min(a.max_new_tokens, ctx // 2)  # tokens kept free for the reply
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write(">>> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            break
        if not cmd:
            continue
        if cmd == "/help":
            say(CHAT_HELP)
            continue
        if cmd == "/clear":
            messages = list(system)
            say("(conversation cleared)")
            continue
        if cmd == "/stats":
            show_stats = not show_stats
            say(f"(stats after each reply: {'on' if show_stats else 'off'})"
                + (f" last reply: {reply_stats(last)}" if last else ""))
            continue
        if cmd.startswith("/") and " " not in cmd:
            say(f"unknown command {cmd}; /help lists them")
            continue

        def count(ms: list[dict]) -> int:
            return len(engine.tokenizer.apply_chat_template(ms))

        turn = {"role": "user", "content": line}
        alone = count([*system, turn])
        if alone >= ctx:
            say(f"(that message makes a prompt of {alone} tokens on its own; the context is {ctx} tokens: "
                "not sent, shorten it)")
            continue
        messages, dropped = fit_history([*messages, turn], count, ctx - room)
        if dropped:
            say(f"(the conversation no longer fits the context of {ctx} tokens: dropped the oldest "
                f"{dropped} turn{'s' if dropped > 1 else ''}; /clear starts afresh)")
        reply = []
        for r in engine.stream_generate(messages=messages, **sampling_kwargs(a)):
            sys.stdout.write(r.text)
            sys.stdout.flush()
            reply.append(r.text)
            last = r.stats or last
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
        if show_stats:
            say(reply_stats(last))
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


def build_parser() -> tuple[_Parser, dict[str, _Parser]]:
    """The parser of every registered command: (the top parser, name -> the command's parser)."""
    parser = _Parser(prog="moe-offload", description="Run MoE models that do not fit in fast memory.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    subs = {}
    for name, (help_text, add_args, _) in COMMANDS.items():
        example = EXAMPLES.get(name)
        sp = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Help,
                            epilog=f"example:\n  {example}" if example else None)
        sp.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
        add_args(sp)
        add_aliases(sp)
        subs[name] = sp
    return parser, subs


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        _load_plugins()
        parser, subs = build_parser()
        a, extra = parser.parse_known_args(argv)
        if extra:
            raise UsageError(unknown_flags(subs[a.cmd], extra))
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
