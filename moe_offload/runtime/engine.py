"""The engine: load a model (HF folder or expert store), generate, stream, score. CLI and server wrap this."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..checkpoint import (EXPERT_NAMES, SafetensorsFolder, check_keys, checkpoint_dtype, dequantizing,
                          expert_checkpoint_keys, expert_tensors, read_config)
from ..errors import MoeError, UsageError
from ..experts import LocalExperts, expert_unit
from ..models import build, get_module
from ..utils import parse_dtype, parse_memory, peak_rss_bytes, pick_device
from .sampling import sample
from .tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO_ROOT / "models" / "tiny-moe"


@dataclass
class GenerationResponse:
    """One streamed step: the new text piece and token; the last one also carries finish_reason and stats."""

    text: str
    token: int | None
    prompt_tokens: int
    generation_tokens: int
    finish_reason: str | None = None
    stats: dict | None = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    stats: dict = field(default_factory=dict)


def build_model(config: dict, source, device: torch.device, dtype: torch.dtype, expert_keys: bool = True):
    """Backbone from `source` (keys()/get()), strictly: every tensor used, none missing. Experts unattached."""
    get_module(config.get("model_type"))  # unsupported type -> clear error before anything else
    with torch.device("meta"):
        args, model = build(config)
    have = set(source.keys())
    if any(k.endswith(".qweight") for k in have):  # quantized attention (moe-offload quantize --attn-bits)
        from ..quant.backbone import use_quantized_linears

        use_quantized_linears(model, source)
    want = set(model.state_dict())
    ignore = {"lm_head.weight"} if model.tie else set()
    skip = getattr(model, "skip_checkpoint_key", None)  # tensors a family never uses (DeepSeek-V3's MTP layer)
    if skip is not None:
        ignore |= {k for k in have if skip(k)}
    if expert_keys:
        for layer, _ in model.moe_blocks():
            want |= expert_checkpoint_keys(args.model_type, layer, model.n_experts, have)
    check_keys(have, want, str(getattr(source, "folder", "checkpoint")), ignore)
    fp32 = tuple(getattr(model, "fp32_keys", ()))  # name suffixes kept in fp32 whatever the dtype
    # copy=True: safetensors hands out views into the mmap at file-layout-dependent alignment, and CPU kernels
    # round differently on unaligned data (a sharded copy of the same weights gave other logits)
    keep = tuple(getattr(model, "stored_dtype_keys", ()))  # quantized codes and meta stay as stored
    state = {}
    for k in model.state_dict():
        t = source.get(k)
        dt = t.dtype if keep and k.endswith(keep) else torch.float32 if fp32 and k.endswith(fp32) else dtype
        state[k] = t.to(device=device, dtype=dt, copy=True)
    model.load_state_dict(state, assign=True, strict=True)
    model.init_rope(device)
    return args, model.eval()


def attach_local_experts(model, source, model_type: str, device, dtype) -> int:
    """All routed experts resident; returns their bytes."""
    nbytes = 0
    for layer, moe in model.moe_blocks():
        units = []
        for e in range(model.n_experts):
            parts = {p: t.to(device=device, dtype=dtype, copy=True)  # owned, aligned copies (see build_model)
                     for p, t in expert_tensors(source, model_type, layer, e).items()}
            units.append(expert_unit(model.expert_shape, **parts))
            nbytes += sum(t.numel() for t in parts.values()) * dtype.itemsize
        moe.experts = LocalExperts(units)
    return nbytes


def is_store(path: Path) -> bool:
    return (path / "manifest.json").is_file()


class Engine:
    def __init__(self, model, args, tokenizer: Tokenizer | None, device, dtype, path: Path, eos_ids: set[int],
                 expert_stats: Callable[[], dict] | None = None, info: dict | None = None):
        self.model, self.args, self.tokenizer = model, args, tokenizer
        self.device, self.dtype, self.path, self.eos_ids = device, dtype, path, eos_ids
        self.expert_stats = expert_stats
        self.info = info or {}

    @property
    def context_length(self) -> int:
        return self.model.max_len

    # ---- prompts ---------------------------------------------------------------------------------
    def encode(self, prompt: str | None = None, prompt_ids: list[int] | None = None,
               messages: list[dict] | None = None) -> list[int]:
        if prompt_ids is not None:
            bad = [i for i in prompt_ids if not 0 <= int(i) < self.args.vocab_size]
            if bad:
                raise UsageError(f"prompt id {bad[0]} is outside the vocabulary (0..{self.args.vocab_size - 1})")
            ids = [int(i) for i in prompt_ids]
        elif self.tokenizer is None:
            raise MoeError(f"{self.path}: no tokenizer; pass token ids with --prompt-ids")
        elif messages is not None:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        else:
            ids = self.tokenizer.encode(prompt or "")
        if not ids:
            raise UsageError("empty prompt")
        if len(ids) >= self.context_length:
            raise UsageError(f"prompt is {len(ids)} tokens; the context is {self.context_length} tokens")
        return ids

    # ---- forward -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """Uncached full forward of one sequence: [T, V] fp32."""
        tokens = torch.tensor([ids], device=self.device)
        cache = self.model.make_cache(1, len(ids), self.dtype, self.device)
        return self.model(tokens, 0, cache)[0]

    @torch.inference_mode()
    def perplexity(self, ids: list[int], window: int = 256) -> tuple[float, int]:
        """exp(mean NLL) over non-overlapping windows; returns (ppl, tokens scored)."""
        nll, n = 0.0, 0
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window + 1]
            if len(chunk) < 2:
                break
            logits = self.logits(chunk[:-1])
            target = torch.tensor(chunk[1:], device=logits.device)
            nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            n += len(chunk) - 1
        return float(torch.exp(torch.tensor(nll / max(n, 1)))), n

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- generation --------------------------------------------------------------------------------
    @torch.inference_mode()
    def stream_generate(self, prompt: str | None = None, *, prompt_ids: list[int] | None = None,
                        messages: list[dict] | None = None, max_new_tokens: int = 128, temperature: float = 0.0,
                        top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                        stop: list[str] | str | None = None, ignore_eos: bool = False,
                        should_stop: Callable[[], bool] | None = None) -> Iterator[GenerationResponse]:
        ids = self.encode(prompt, prompt_ids, messages)
        if max_new_tokens < 0:
            raise UsageError("max_new_tokens must be >= 0")
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed if seed is not None else int(time.time_ns() % 2**31))
        n_prompt = len(ids)
        max_new = min(max_new_tokens, self.context_length - n_prompt)
        if self.expert_stats is not None:
            self.expert_stats(reset=True)
        cache = self.model.make_cache(1, n_prompt + max(max_new, 1), self.dtype, self.device)

        self._sync()
        t0 = time.perf_counter()
        logits = self.model(torch.tensor([ids], device=self.device), 0, cache)[0, -1]
        self._sync()
        t_prefill = time.perf_counter() - t0

        out: list[int] = []
        decoded, text, sent = "", "", ""  # all decoded; without an incomplete UTF-8 tail; the part yielded
        cut = None  # where a stop string starts in `text`
        finish = "length"
        t1 = time.perf_counter()
        for step in range(max_new):
            tok = sample(logits.cpu(), temperature, top_p, top_k, gen)
            if tok in self.eos_ids and not ignore_eos:
                finish = "stop"
                break
            out.append(tok)
            decoded = self.tokenizer.decode(out) if self.tokenizer else ""
            if not decoded.endswith("\ufffd"):  # hold back an incomplete UTF-8 sequence
                text = decoded
            cut = min((text.index(s) for s in stops if s in text), default=None)
            if cut is not None:
                text, finish = text[:cut], "stop"
                yield GenerationResponse(text[len(sent):], tok, n_prompt, len(out))
                sent = text
                break
            # hold back a tail that may be the start of a stop string: a yielded piece cannot be taken back
            safe = len(text) - _stop_prefix_len(text, stops)
            piece, sent = text[len(sent):safe], text[:max(safe, len(sent))]
            yield GenerationResponse(piece, tok, n_prompt, len(out))
            if should_stop is not None and should_stop():
                finish = "cancelled"
                break
            if step + 1 < max_new:
                logits = self.model(torch.tensor([[tok]], device=self.device), n_prompt + step, cache)[0, -1]
        self._sync()
        t_decode = time.perf_counter() - t1
        stats = {
            "prompt_tokens": n_prompt,
            "generation_tokens": len(out),
            "prefill_seconds": t_prefill,
            "prefill_tokens_per_s": n_prompt / t_prefill if t_prefill > 0 else 0.0,
            "decode_seconds": t_decode,
            # tokens produced by decode steps: the first token comes from prefill
            "decode_tokens_per_s": (len(out) - 1) / t_decode if len(out) > 1 and t_decode > 0 else 0.0,
            "peak_rss_bytes": peak_rss_bytes(),
        }
        if self.device.type == "cuda":
            stats["peak_device_bytes"] = torch.cuda.max_memory_allocated(self.device)
        if self.expert_stats is not None:
            stats.update(self.expert_stats())
        rest = "" if cut is not None else decoded[len(sent):]  # held-back text goes out with the last response
        yield GenerationResponse(rest, None, n_prompt, len(out), finish_reason=finish, stats=stats)

    def generate(self, prompt: str | None = None, **kw) -> GenerationResult:
        text, ids, last = [], [], None
        for r in self.stream_generate(prompt, **kw):
            text.append(r.text)
            if r.token is not None:
                ids.append(r.token)
            last = r
        return GenerationResult("".join(text), ids, last.prompt_tokens, last.finish_reason, last.stats)


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


def _eos_ids(folder: Path, config: dict, tokenizer: Tokenizer | None) -> set[int]:
    ids: set[int] = set()

    def add(v):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list):
            ids.update(x for x in v if isinstance(x, int))

    add(config.get("eos_token_id"))
    gen_cfg = folder / "generation_config.json"
    if gen_cfg.is_file():
        try:
            add(json.loads(gen_cfg.read_text()).get("eos_token_id"))
        except json.JSONDecodeError:
            pass
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def load(path: str | Path | None = None, device: str | None = None, dtype: str | torch.dtype | None = None,
         memory: str | int | None = None, **offload) -> Engine:
    """Load an HF model folder or an expert store. `memory` (bytes, '2GiB', '25%') caps weights on the device;
    further keywords (host_memory, cache_policy, prefetch, ...) go to the store."""
    path = Path(path) if path is not None else DEFAULT_MODEL
    if not path.exists():
        raise MoeError(f"model path {path} does not exist")
    if not path.is_dir():
        raise MoeError(f"model path {path} is not a folder")
    dev = pick_device(device)
    memory = parse_memory(memory)  # bytes, a Share of the model ('25%', resolved by the store) or 'auto'
    if is_store(path) or memory is not None or any(v is not None for v in offload.values()):
        from ..store.open import open_offloaded  # the tiered path: store on disk, experts cached

        return open_offloaded(path, dev, parse_dtype(dtype), memory, **offload)
    config = read_config(path)
    get_module(config.get("model_type"))
    dt = parse_dtype(dtype) or checkpoint_dtype(config)
    source = dequantizing(SafetensorsFolder(path), config)  # FP8 block-scaled weights -> fp32 at load
    args, model = build_model(config, source, dev, dt)
    nbytes = attach_local_experts(model, source, args.model_type, dev, dt)
    tokenizer = Tokenizer(path) if (path / "tokenizer.json").is_file() else None
    backbone = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    info = {"format": "hf", "model_type": args.model_type, "expert_bytes": nbytes, "backbone_bytes": backbone}
    return Engine(model, args, tokenizer, dev, dt, path, _eos_ids(path, config, tokenizer), info=info)


__all__ = ["Engine", "GenerationResponse", "GenerationResult", "load", "build_model", "EXPERT_NAMES"]
