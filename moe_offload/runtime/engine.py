"""The engine: generate, stream, score a built model. runtime/load.py builds it (HF folder or expert store);
the CLI and the server wrap both."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..checkpoint import EXPERT_NAMES, check_keys, expert_checkpoint_keys, expert_tensors
from ..errors import MoeError, UsageError
from ..experts import LocalExperts, expert_unit
from ..models import build, get_module
from ..models.base import Packed
from ..utils import page_out, peak_rss_bytes
from ..workload import KV_CHUNK  # tokens a KV cache grows by at least (workload.kv_tokens counts the rule)
from .sampling import recent, sample
from .tokenizer import Tokenizer

# the bundled model ships inside the package (package data), so a wheel finds it from any directory;
# the repo's models/tiny-moe is a link to it
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "_models" / "tiny-moe"


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


def build_model(config: dict, source, device: torch.device, dtype: torch.dtype, expert_keys: bool = True,
                embed_rows: Path | None = None):
    """Backbone from `source` (keys()/get()), strictly: every tensor used, none missing. Experts unattached.
    `embed_rows`: the safetensors file to read embedding rows from on demand (store/rows.py) instead of
    holding the table (never read here)."""
    get_module(config.get("model_type"))  # unsupported type -> clear error before anything else
    with torch.device("meta"):
        args, model = build(config)
    have = set(source.keys())
    if embed_rows is not None:
        from ..store.rows import FLOATS, KEY, DiskEmbedding, why_resident

        if why := why_resident(source, model.tie):
            raise UsageError(f"--embed-rows disk: {why}; use --embed-rows resident or auto")
        dt = model.backbone_dtype(KEY, FLOATS[source.dtype_of(KEY)], dtype)
        model.model.embed_tokens = DiskEmbedding(embed_rows, KEY, dt, device)
        have.discard(KEY)
    if any(k.endswith(".qweight") for k in have):  # quantized attention (moe-offload quantize --attn-bits)
        from ..quant.backbone import use_quantized_linears

        use_quantized_linears(model, source)
    want = set(model.state_dict())
    ignore = {"lm_head.weight"} if model.tie else set()
    ignore |= {k for k in have if model.skip_checkpoint_key(k)}  # tensors the family never uses
    if expert_keys:
        for layer, _ in model.moe_blocks():
            want |= expert_checkpoint_keys(args.model_type, layer, model.n_experts, have)
    check_keys(have, want, str(getattr(source, "folder", "checkpoint")), ignore)
    # copy=True: safetensors hands out views into the mmap at file-layout-dependent alignment, and CPU kernels
    # round differently on unaligned data (a sharded copy of the same weights gave other logits)
    state = {}
    for k in model.state_dict():
        t = source.get(k)  # fp32 keys in fp32, quantized codes and meta as stored, the rest in `dtype`
        state[k] = t.to(device=device, dtype=model.backbone_dtype(k, t.dtype, dtype), copy=True)
        page_out(t)  # the mapped file's pages now, not at the end: the load held the backbone twice
    model.load_state_dict(state, assign=True, strict=True)
    model.init_rope(device)
    if device.type == "cpu":  # 4-bit linears take their kernel's nibble order now, not on the first request
        for m in model.modules():  # (~1.5 s at Qwen3-30B-A3B's widths, 8 layers: the first prompt waited for it)
            if hasattr(m, "prepare"):
                m.prepare()
    return args, model.eval()


def backbone_bytes(config: dict, source, dtype: torch.dtype) -> int:
    """The bytes build_model's backbone holds for `source` (quantized linears as stored, fp32 keys in fp32, the
    rest in `dtype`), from the tensors' shapes only: built on the meta device, nothing read."""
    with torch.device("meta"):
        _, model = build(config)
    if any(k.endswith(".qweight") for k in source.keys()):
        from ..quant.backbone import use_quantized_linears

        use_quantized_linears(model, source)
    from ..store.format import _ST_NAMES

    have = set(source.keys())
    total = 0
    for k, t in model.state_dict().items():
        stored = _ST_NAMES.get(source.dtype_of(k), dtype) if k in have else dtype
        total += t.numel() * model.backbone_dtype(k, stored, dtype).itemsize
    return total


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
                 expert_stats: Callable[[], dict] | None = None, info: dict | None = None,
                 ctx_size: int | None = None, expert_cache=None):
        self.model, self.args, self.tokenizer = model, args, tokenizer
        self.device, self.dtype, self.path, self.eos_ids = device, dtype, path, eos_ids
        self.expert_stats = expert_stats
        self.info = info or {}
        self.ctx_size = check_ctx_size(ctx_size, model.max_len)
        self.kv_bytes_per_token = kv_bytes_per_token(model, dtype)
        self.kv_bytes = 0  # KV caches of the sequences in flight
        self.expert_cache = expert_cache  # store.cache.ExpertCache when offloaded: KV bytes are held in its budget

    @property
    def context_length(self) -> int:
        return min(self.model.max_len, self.ctx_size or self.model.max_len)

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

    def _hold_kv(self, nbytes: int) -> None:
        """`nbytes` more (negative: fewer) of KV cache; offloaded, they come out of the expert budget."""
        if self.expert_cache is not None:
            self.expert_cache.hold_kv(nbytes)
        self.kv_bytes += nbytes

    # ---- generation --------------------------------------------------------------------------------
    def batch(self, prefill_chunk: int | None = None) -> "Batch":
        """An empty batch: `add` requests (any time, also between steps), `step` until it is empty. With
        `prefill_chunk`, a step prefills at most that many tokens of each new prompt."""
        return Batch(self, prefill_chunk)

    def stream_generate(self, prompt: str | None = None, **request) -> Iterator[GenerationResponse]:
        """One request (the keywords of `Batch.add`) as a stream of responses; the last has finish_reason."""
        for _, r in self.stream_generate_batch([dict(request, prompt=prompt)]):
            yield r

    def stream_generate_batch(self, requests: list[dict]) -> Iterator[tuple[int, GenerationResponse]]:
        """Several requests generated together: (index in `requests`, response) as each step makes them.
        Every request is validated before any is run."""
        batch = self.batch()
        try:
            index = {id(batch.add(**r)): i for i, r in enumerate(requests)}
            while batch.seqs:
                for seq, r in batch.step():
                    yield index[id(seq)], r
        finally:  # the consumer may stop early: free the KV caches
            batch.close()

    def generate(self, prompt: str | None = None, **kw) -> GenerationResult:
        return self.generate_batch([dict(kw, prompt=prompt)])[0]

    def generate_batch(self, requests: list[dict]) -> list[GenerationResult]:
        text = [[] for _ in requests]
        ids = [[] for _ in requests]
        last: list[GenerationResponse | None] = [None] * len(requests)
        for i, r in self.stream_generate_batch(requests):
            text[i].append(r.text)
            if r.token is not None:
                ids[i].append(r.token)
            last[i] = r
        return [GenerationResult("".join(t), x, r.prompt_tokens, r.finish_reason, r.stats)
                for t, x, r in zip(text, ids, last)]


@dataclass
class Sequence:
    """One request in a batch: prompt, limits, sampling, its own KV cache and the text produced so far."""

    ids: list[int]
    max_new: int
    sampling: dict  # sample() keywords: temperature, top_p, top_k, min_p, repetition_penalty
    gen: torch.Generator
    stops: list[str]
    ignore_eos: bool = False
    should_stop: Callable[[], bool] | None = None
    cache: list | None = None  # per layer, batch 1
    pos: int = 0  # tokens in the cache
    next: list[int] = field(default_factory=list)  # tokens the next step feeds
    out: list[int] = field(default_factory=list)
    decoded: str = ""  # all decoded
    text: str = ""  # without an incomplete UTF-8 tail (and cut at a stop string)
    sent: str = ""  # the part yielded
    cut: bool = False  # a stop string ended it
    finish: str | None = None
    t_start: float = 0.0
    t_prefilled: float = 0.0

    @property
    def limit(self) -> int:  # the most tokens its cache will hold
        return len(self.ids) + self.max_new

    def response(self, piece: str, tok: int | None) -> GenerationResponse:
        return GenerationResponse(piece, tok, len(self.ids), len(self.out))

    def push(self, tok: int, tokenizer: Tokenizer | None, eos_ids: set[int]) -> GenerationResponse | None:
        """A sampled token: the text it adds (None at EOS); sets `finish` at EOS or a stop string."""
        if tok in eos_ids and not self.ignore_eos:
            self.finish = "stop"
            return None
        self.out.append(tok)
        self.decoded = tokenizer.decode(self.out) if tokenizer else ""
        if not self.decoded.endswith("\ufffd"):  # hold back an incomplete UTF-8 sequence
            self.text = self.decoded
        cut = min((self.text.index(s) for s in self.stops if s in self.text), default=None)
        if cut is not None:
            self.text, self.finish, self.cut = self.text[:cut], "stop", True
            piece, self.sent = self.text[len(self.sent):], self.text
            return self.response(piece, tok)
        # hold back a tail that may be the start of a stop string: a yielded piece cannot be taken back
        safe = len(self.text) - _stop_prefix_len(self.text, self.stops)
        piece, self.sent = self.text[len(self.sent):safe], self.text[:max(safe, len(self.sent))]
        self.next = [tok]
        return self.response(piece, tok)

    def last(self, stats: dict) -> GenerationResponse:
        rest = "" if self.cut else self.decoded[len(self.sent):]  # held-back text goes out last
        return GenerationResponse(rest, None, len(self.ids), len(self.out), self.finish, stats)


class Batch:
    """Sequences generated together. Each step is one forward over all of them, packed along T (newcomers'
    prompts and the others' last tokens), so every MoE layer fetches each needed expert once for the whole
    batch and computes it on all its rows; attention runs per sequence on its own KV cache. A sequence that
    finishes leaves at once; one added between steps is prefilled in the next steps, `prefill_chunk` tokens
    a step (all at once if None), so a long prompt does not stall the streams in flight."""

    def __init__(self, engine: Engine, prefill_chunk: int | None = None):
        if prefill_chunk is not None and prefill_chunk < 1:
            raise UsageError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.engine, self.prefill_chunk = engine, prefill_chunk
        self.seqs: list[Sequence] = []

    def add(self, prompt: str | None = None, *, prompt_ids: list[int] | None = None,
            messages: list[dict] | None = None, max_new_tokens: int = 128, temperature: float = 0.0,
            top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: list[str] | str | None = None,
            ignore_eos: bool = False, min_p: float = 0.0, repetition_penalty: float = 1.0,
            should_stop: Callable[[], bool] | None = None) -> Sequence:
        e = self.engine
        ids = e.encode(prompt, prompt_ids, messages)
        if max_new_tokens < 0:
            raise UsageError("max_new_tokens must be >= 0")
        max_new_tokens = min(max_new_tokens, e.context_length - len(ids))  # stops at the end of the context
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed if seed is not None else int(time.time_ns() % 2**31))
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                        repetition_penalty=repetition_penalty)
        seq = Sequence(ids, max_new_tokens, sampling, gen, stops, ignore_eos, should_stop, next=list(ids),
                       t_start=time.perf_counter())
        if not self.seqs and e.expert_stats is not None:
            e.expert_stats(reset=True)
        self._grow(seq, len(ids) + max(min(max_new_tokens, KV_CHUNK), 1))
        self.seqs.append(seq)
        return seq

    def _grow(self, seq: Sequence, length: int) -> None:
        """Make `seq`'s KV cache hold `length` tokens (allocated, or grown by copy), counted in the budget."""
        e = self.engine
        have = 0 if seq.cache is None else seq.cache[0].length
        e._hold_kv((length - have) * e.kv_bytes_per_token)
        try:
            if seq.cache is None:
                seq.cache = e.model.make_cache(1, length, e.dtype, e.device)
            else:
                for c in seq.cache:
                    c.grow(length)
        except BaseException:
            e._hold_kv(-(length - have) * e.kv_bytes_per_token)
            raise

    def _drop(self, seq: Sequence) -> None:
        if seq.cache is not None:
            self.engine._hold_kv(-seq.cache[0].length * self.engine.kv_bytes_per_token)
            seq.cache = None
        self.seqs.remove(seq)

    def close(self) -> None:
        for seq in list(self.seqs):
            self._drop(seq)

    def _finish(self, seq: Sequence) -> GenerationResponse:
        e = self.engine
        now = time.perf_counter()
        t_prefill, t_decode = seq.t_prefilled - seq.t_start, now - seq.t_prefilled
        n = len(seq.out)
        stats = {
            "prompt_tokens": len(seq.ids),
            "generation_tokens": n,
            "prefill_seconds": t_prefill,
            "prefill_tokens_per_s": len(seq.ids) / t_prefill if t_prefill > 0 else 0.0,
            "decode_seconds": t_decode,
            # tokens produced by decode steps: the first token comes from prefill
            "decode_tokens_per_s": (n - 1) / t_decode if n > 1 and t_decode > 0 else 0.0,
            "peak_rss_bytes": peak_rss_bytes(),
            "kv_cache_bytes": seq.cache[0].length * e.kv_bytes_per_token if seq.cache else 0,
            "batch_size": len(self.seqs),
        }
        if e.device.type == "cuda":
            stats["peak_device_bytes"] = torch.cuda.max_memory_allocated(e.device)
        if e.expert_stats is not None:  # since the last sequence of the batch ended: they sum to the totals
            stats.update(e.expert_stats(reset=True))
        r = seq.last(stats)
        self._drop(seq)
        return r

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, GenerationResponse]]:
        """One forward over every live sequence, one token sampled for each: the responses it makes."""
        e, out = self.engine, []
        for seq in self.seqs:  # the caller has seen each one's last token: cancelled, or at its length
            if seq.out and seq.finish is None:
                if seq.should_stop is not None and seq.should_stop():
                    seq.finish = "cancelled"
                elif len(seq.out) >= seq.max_new:
                    seq.finish = "length"
        out += [(seq, self._finish(seq)) for seq in [s for s in self.seqs if s.finish is not None]]
        live = list(self.seqs)
        if not live:
            return out
        feed = [s.next[:self.prefill_chunk] if self.prefill_chunk else s.next for s in live]
        for seq, f in zip(live, feed):
            need = seq.pos + len(f)
            if seq.cache[0].length < need:
                have = seq.cache[0].length
                self._grow(seq, min(seq.limit, max(need, have + KV_CHUNK, 2 * have)))
        tokens = torch.tensor([[t for f in feed for t in f]], device=e.device)
        packed = Packed(tuple(s.pos for s in live), tuple(len(f) for f in feed))
        caches = [tuple(s.cache[i] for s in live) for i in range(len(live[0].cache))]  # [layer][sequence]
        e._sync()
        logits = e.model(tokens, packed, caches)[0]  # [S, V]
        e._sync()
        now = time.perf_counter()
        for i, (seq, f) in enumerate(zip(live, feed)):
            prefill = seq.pos < len(seq.ids)
            seq.pos += len(f)
            seq.next = seq.next[len(f):]
            if seq.next:  # a prompt prefilled in chunks: not done yet
                continue
            if prefill:
                seq.t_prefilled = now
                if seq.max_new == 0:
                    seq.finish = "length"
                    out.append((seq, self._finish(seq)))
                    continue
            seen = recent(seq.ids, seq.out) if seq.sampling["repetition_penalty"] != 1.0 else ()
            tok = sample(logits[i].cpu(), generator=seq.gen, seen=seen, **seq.sampling)
            r = seq.push(tok, e.tokenizer, e.eos_ids)
            if r is not None:
                out.append((seq, r))
            if seq.finish is not None:
                out.append((seq, self._finish(seq)))
        return out


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


def kv_bytes_per_token(model, dtype: torch.dtype) -> int:
    """KV cache bytes one token takes in every layer (from a 1-token cache built on `meta`)."""
    return sum(c.nbytes for c in model.make_cache(1, 1, dtype, torch.device("meta")))


def check_ctx_size(ctx_size: int | None, max_len: int) -> int | None:
    if ctx_size is None:
        return None
    if isinstance(ctx_size, bool) or not isinstance(ctx_size, int) or not 1 <= ctx_size <= max_len:
        raise UsageError(f"ctx_size must be an integer from 1 to the model's context ({max_len}), "
                         f"got {ctx_size!r}")
    return ctx_size


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


__all__ = ["Batch", "Engine", "GenerationResponse", "GenerationResult", "build_model", "EXPERT_NAMES"]
