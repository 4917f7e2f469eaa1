"""The command line: a thin layer over the engine. COMMANDS lists every command and the module that runs it;
a command's module is imported only when that command runs (or shows its --help), so `moe-offload --help`
imports no command module and no torch."""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import sys
from typing import Callable

from .args import COUNT, FRACTION, add_model_args, load_engine, number
from .errors import MoeError, UsageError

# name -> (module, one-line help). The module has add_args(parser) and run(args) -> exit code;
# "module:x" names the pair add_x_args and run_x of a module that hosts several commands.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("moe_offload.cli:generate", "generate text from a prompt"),
    "chat": ("moe_offload.cli:chat", "interactive chat with the model's chat template"),
    "convert": ("moe_offload.store.cli:convert", "convert a Hugging Face MoE folder into an expert store"),
    "stores": ("moe_offload.store.cli:stores",
               "list the stores converted on the fly for --memory (a cache), or remove them"),
    "profile": ("moe_offload.profile",
                "record routing statistics (and train the shadow router) on calibration text"),
    "quantize": ("moe_offload.quant.cli",
                 "write an expert store with quantized experts (uniform or mixed bits) and attention"),
    "serve": ("moe_offload.server",
              "OpenAI-compatible HTTP server: chat, completions, models, tokenize, health, metrics"),
    "lowbit": ("moe_offload.store.lowbit",
               "write the 2-bit stand-ins that --miss-fallback lowbit uses (experts_lowbit.bin)"),
    "bench": ("moe_offload.bench",
              "benchmark against transformers, accelerate and llama.cpp, and the bandwidth limits"),
    "eval": ("moe_offload.eval", "perplexity and tok/s of a model, or a comparison table of several"),
    "simulate": ("moe_offload.sim",
                 "predict hit rate and decode tok/s from a routing trace on a hardware profile"),
    "plan": ("moe_offload.plan",
             "plan precision, memory budgets and prefetch for a model on given hardware (config.json only)"),
    "export-gguf": ("moe_offload.gguf_export",
                    "write a Hugging Face MoE folder or an expert store as a GGUF file for llama.cpp"),
    "prefetch-report": ("moe_offload.prefetch.report",
                        "prefetch hit rate / speed per mode and budget, beside Belady-OPT"),
}


AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]


def entry_points(name: str) -> tuple[AddArgs, Run]:
    """(add_args, run) of command `name`, its module imported now."""
    module, _, pair = COMMANDS[name][0].partition(":")
    mod = importlib.import_module(module)
    if pair:
        return getattr(mod, f"add_{pair}_args"), getattr(mod, f"run_{pair}")
    return mod.add_args, mod.run


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


def add_generate_args(p):
    add_model_args(p, chat_template=True)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None,
                     help="prompt text, taken as text (special tokens are not parsed); - reads it from stdin")
    src.add_argument("--prompt-ids", default=None, help="comma-separated token ids, e.g. 1,2,3")
    add_sampling_args(p)
    p.add_argument("--chat", action="store_true",
                   help="wrap --prompt in the model's chat template (implied by --chat-template)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def run_generate(a) -> int:
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


def add_chat_args(p):
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


def run_chat(a) -> int:
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


def build_parser(names: list[str] | None = None) -> tuple[_Parser, dict[str, _Parser]]:
    """The top parser, listing every command, with the flags of the commands in `names` (default: all; their
    modules are imported): (the top parser, name -> the parser of each command in `names`)."""
    parser = _Parser(prog="moe-offload", description="Run MoE models that do not fit in fast memory.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    subs = {}
    for name, (_, help_text) in COMMANDS.items():
        example = EXAMPLES.get(name)
        sp = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Help,
                            epilog=f"example:\n  {example}" if example else None)
        sp.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
        if names is None or name in names:
            entry_points(name)[0](sp)
            add_aliases(sp)
            subs[name] = sp
    return parser, subs


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    words = argv if argv is not None else sys.argv[1:]
    debug = "--debug" in words
    try:
        name = next((w for w in words if not w.startswith("-")), None)  # --debug is the only top-level flag
        parser, subs = build_parser([name] if name in COMMANDS else [])  # only that command's module loads
        a, extra = parser.parse_known_args(argv)
        if extra:
            raise UsageError(unknown_flags(subs[a.cmd], extra))
        return entry_points(a.cmd)[1](a) or 0
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
    sys.exit(main())
