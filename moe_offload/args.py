"""The flags shared by the commands that load a model, and the engine they describe: what the command
modules (cli.py, server.py, profile.py, eval.py, prefetch/report.py) use to declare and read their arguments.
Imports neither torch nor a command module; `moe_offload.cli` lists the commands."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable

from .errors import UsageError


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

# ---- shared flags --------------------------------------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser, chat_template: bool = False) -> None:
    p.add_argument("--model", default=None, help="HF model folder or expert store (default: the bundled model)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "auto"],
                   help="compute device (default: cuda when torch sees one, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--backbone-bits", default=None, choices=["auto", "16", "8"],
                   help="--model FILE.gguf: its attention and lm_head as 8-bit codes where the file holds them "
                        "quantized (auto, the default), always (8) or dequantized (16)")
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
    p.add_argument("--disk-reads", default=None, choices=["direct", "buffered"],
                   help="how a missed expert is read: direct (O_DIRECT, no page cache; default) or buffered "
                        "(the kernel's readahead, each read's pages dropped right after; slower end to end "
                        "on this project's machines, docs/benchmarks.md)")
    p.add_argument("--embed-rows", default=None, choices=["resident", "auto", "disk"],
                   help="disk: read the embedding rows a token needs from the store instead of holding the "
                        "table; auto: so when a --memory size is given and the table is over 5%% of it "
                        "(default resident; a tied table stays resident)")
    p.add_argument("--preload", default="auto", choices=["auto", "on", "off"],
                   help="read every expert into the budget at load, as llama.cpp reads its whole file: auto "
                        "(default) when the budget holds them all, so the first tokens do not miss; on: always "
                        "(the first layers' experts are evicted again when it does not); off: on first use")
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
    gguf = {"backbone_bits": a.backbone_bits} if getattr(a, "backbone_bits", None) else {}
    if getattr(a, "auto", False):  # the planner fills what the user left unset (--memory auto too); one line
        engine = load(a.model, device=a.device, dtype=a.dtype, config=auto_config(a), **ctx, **gguf)
    else:
        memory = auto_memory(a) if a.memory == "auto" else a.memory
        engine = load(a.model, device=a.device, dtype=a.dtype, memory=memory, **offload_options(vars(a)),
                      **ctx, **gguf)
    if getattr(a, "chat_template", None):
        from .runtime.tokenizer import read_chat_template

        if engine.tokenizer is None:
            raise UsageError(f"--chat-template: {engine.path} has no tokenizer.json")
        engine.tokenizer.set_chat_template(read_chat_template(a.chat_template), origin=a.chat_template)
    return engine
