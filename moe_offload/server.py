"""`moe-offload serve`: an OpenAI-compatible HTTP server, a thin layer over `Engine.stream_generate`.

    moe-offload serve --model models/tiny-moe [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Endpoints: POST /v1/chat/completions, POST /v1/completions (stream or not), GET /v1/models and
/v1/models/{id}, POST /tokenize and /detokenize (llama-server's shapes), GET /health, GET /metrics (Prometheus
text). One worker thread owns the engine and generates up to --parallel requests as one batch (continuous
batching: a request joins at the next step, the rest queue in arrival order); the event loop only reads,
checks and streams, and parses, templates and tokenizes in threads, so /health and /metrics answer while
requests generate. A client that disconnects sets its job's cancel flag, which the batch reads after every
token: its sequence leaves the batch at the next step.

The server is reachable by any web page on the machine, so it is treated as exposed (docs/reliability.md):
a loopback bind answers only loopback Host names (DNS rebinding; --allowed-hosts adds names), POSTs must be
application/json (a page cannot send that without a CORS preflight, which is never granted), bodies are
read in chunks up to --max-body (413), JSON nesting is bounded before parsing, past --max-queue waiting
requests the answer is 429 with Retry-After, and a prompt longer than the context could hold is refused
before it is tokenized. There are no /docs or /openapi.json.

With --api-key (or MOE_OFFLOAD_API_KEY) every /v1/*, /tokenize, /detokenize and /metrics request needs
`Authorization: Bearer KEY`; /health stays open so a supervisor can probe liveness without the key. The server
binds to 127.0.0.1 unless told otherwise.

Every request field is checked once against one table (FIELDS): JSON type, finite, in range. Defaults follow
OpenAI: temperature 1, top_p 1, max_tokens 16 for /v1/completions and the rest of the context for chat.
Extensions (as in vLLM and llama-server): `top_k`, `min_p`, `repetition_penalty` (or `repeat_penalty`),
`ignore_eos`. Options we do not implement (UNSUPPORTED: n > 1, logprobs, echo, tools, presence and frequency
penalties, ...) and unknown fields are refused with a 400 rather than silently ignored.
"""

import argparse
import asyncio
import errno
import hmac
import ipaddress
import itertools
import json
import math
import os
import queue
import re
import socket
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .args import add_model_args, load_engine
from .errors import MoeError, UsageError
from .utils import parse_size

# fastapi/uvicorn are the optional "serve" extra: imported only when a server is built, so that every other
# subcommand (this module is imported by the CLI on start) works without them.

PREFILL_CHUNK = 256  # prompt tokens a step prefills per new request, beside the streams in flight
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize",
          "/detokenize")
GENERATE = ("/v1/chat/completions", "/v1/completions")
FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}  # engine -> OpenAI finish_reason
# engine stats summed over requests when the model runs from the expert store
EXPERT_TOTALS = ("expert_hits", "expert_misses", "bytes_read_disk", "bytes_to_device", "stall_seconds")
# Host header names a loopback server answers: others are refused (DNS rebinding lets a web page use them)
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})


class APIError(Exception):
    """An OpenAI-style error: HTTP `status` and body {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- limits and the request schema: plain JSON in, engine keywords out ----------------------------------
@dataclass(frozen=True)
class Limits:
    """What one request may ask; each bound is checked before the work it protects."""

    max_body: int = 4 * 2**20  # bytes of a request body (413 past it, read in chunks, never whole)
    max_queue: int = 64  # requests waiting for the engine (429 with Retry-After past it)
    max_depth: int = 64  # JSON nesting, scanned on the raw bytes before parsing
    chars_per_token: int = 32  # text longer than context * this is refused before tokenizing
    max_stops: int = 16  # stop strings per request, each at most max_stop_chars
    max_stop_chars: int = 1024
    hosts: frozenset[str] | None = LOOPBACK_HOSTS  # Host header names answered; None: any


KINDS = {
    "an integer": lambda v: type(v) is int,
    "a number": lambda v: type(v) in (int, float) and math.isfinite(v),
    "a boolean": lambda v: type(v) is bool,
    "a string": lambda v: isinstance(v, str),
    "an object": lambda v: isinstance(v, dict),
}
JSON_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
              float: "a number"}
INT64 = 2**63 - 1


@dataclass(frozen=True)
class Field:
    """A request field: JSON kind, the value when null or absent, inclusive bounds (lo excluded: open_lo)."""

    kind: str
    default: object = None
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False


# every field a generation request may carry, besides `messages` / `prompt` and `stop` (checked apart)
FIELDS = {
    "model": Field("a string"),
    "stream": Field("a boolean", False),
    "stream_options": Field("an object"),
    "max_tokens": Field("an integer", None, 1, INT64),
    "max_completion_tokens": Field("an integer", None, 1, INT64),
    "temperature": Field("a number", 1.0, 0, 2),
    "top_p": Field("a number", 1.0, 0, 1, open_lo=True),
    "top_k": Field("an integer", 0, -1, INT64),  # -1 (vLLM) or 0 (llama.cpp): off
    "min_p": Field("a number", 0.0, 0, 1),  # 0: off
    "repetition_penalty": Field("a number", None, 0, 100, open_lo=True),  # 1: off
    "repeat_penalty": Field("a number", None, 0, 100, open_lo=True),  # llama.cpp's spelling of the same
    "seed": Field("an integer", None, -(2**63), 2**64 - 1),  # what torch's generator takes
    "ignore_eos": Field("a boolean", False),
    "n": Field("an integer", 1, 1),
    "best_of": Field("an integer", 1, 1),
    "user": Field("a string"),  # an end-user id for the operator's logs: accepted, not used
}
# fields we do not implement: refused (400) unless null, false, 0, "", [], {} or one of the values listed
UNSUPPORTED = {
    "logprobs": (), "top_logprobs": (), "echo": (), "suffix": (), "logit_bias": (), "presence_penalty": (),
    "frequency_penalty": (), "tools": (), "functions": (), "tool_choice": ("none", "auto"),
    "function_call": ("none", "auto"), "parallel_tool_calls": (True,), "response_format": ({"type": "text"},),
    "modalities": (["text"],), "audio": (), "prediction": (), "store": (), "metadata": (), "service_tier": (),
    "reasoning_effort": (), "web_search_options": (),
}
CHAT_FIELDS = frozenset({*FIELDS, *UNSUPPORTED, "stop", "messages"})
COMPLETION_FIELDS = frozenset({*FIELDS, *UNSUPPORTED, "stop", "prompt"})
TOKENIZE_FIELDS = frozenset({"model", "content", "add_special"})
DETOKENIZE_FIELDS = frozenset({"model", "tokens"})
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}  # -> template
MESSAGE_FIELDS = {"role", "content", "name"}  # others must be null or empty (clients echo "tool_calls": [])


def _get(body: dict, name: str, f: Field | None = None):
    """body[name] checked against its Field (FIELDS[name] by default); null or absent gives the default."""
    f = f or FIELDS[name]
    v = body.get(name)
    if v is None:
        return f.default
    if not KINDS[f.kind](v):
        finite = type(v) is not float or math.isfinite(v)
        got = JSON_NAMES.get(type(v), "a value") if finite else "a non-finite number"
        raise APIError(400, f"Invalid type for '{name}': expected {f.kind}, but got {got} instead.", name,
                       "invalid_type")
    if (f.lo is not None and (v <= f.lo if f.open_lo else v < f.lo)) or (f.hi is not None and v > f.hi):
        want = f"{'>' if f.open_lo else '>='} {f.lo}" + ("" if f.hi is None else f" and <= {f.hi}")
        raise APIError(400, f"Invalid value for '{name}': expected a value {want}, but got {v} instead.",
                       name, "invalid_value")
    return v


def check_fields(body: dict, allowed: frozenset) -> None:
    """Unknown fields and fields we do not implement are refused, never ignored (OpenAI answers the same);
    every field of FIELDS present is checked for type and range."""
    for name in body:
        if name not in allowed:
            raise APIError(400, f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")
        if name in FIELDS:
            _get(body, name)
    for name, neutral in UNSUPPORTED.items():
        v = body.get(name)
        if v not in (None, False, "", [], {}, *neutral):  # False == 0 == 0.0
            raise APIError(400, f"'{name}' is not supported by this server.", name, "unsupported_parameter")
    for name in ("n", "best_of"):
        if _get(body, name) != 1:
            raise APIError(400, f"Only {name}=1 is supported: requests are served one at a time.", name,
                           "unsupported_value")


def sampling(body: dict, limits: Limits = Limits()) -> dict:
    """Sampling fields -> stream_generate keywords (max_new_tokens is settled after tokenizing)."""
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list) and len(stop) > limits.max_stops:
        raise APIError(400, f"Invalid value for 'stop': at most {limits.max_stops} strings.", "stop",
                       "invalid_value")
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise APIError(400, "Invalid type for 'stop': expected a string or an array of strings.", "stop",
                       "invalid_type")
    if stop and max(map(len, stop)) > limits.max_stop_chars:
        raise APIError(400, f"Invalid value for 'stop': at most {limits.max_stop_chars} characters a string.",
                       "stop", "invalid_value")
    stream = _get(body, "stream")
    opts = _get(body, "stream_options")
    if opts is not None:
        if not stream:
            raise APIError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                           "stream_options", "invalid_value")
        if set(opts) - {"include_usage"}:
            name = min(set(opts) - {"include_usage"})
            raise APIError(400, f"Unrecognized request argument supplied: stream_options.{name}",
                           f"stream_options.{name}", "unknown_parameter")
        _get(opts, "include_usage", Field("a boolean"))
    penalty, alias = _get(body, "repetition_penalty"), _get(body, "repeat_penalty")
    if penalty is not None and alias is not None and penalty != alias:
        raise APIError(400, "'repetition_penalty' and 'repeat_penalty' are one setting: give one.",
                       "repeat_penalty", "invalid_value")
    max_tokens = _get(body, "max_completion_tokens")
    return dict(
        max_new_tokens=max_tokens if max_tokens is not None else _get(body, "max_tokens"),
        temperature=float(_get(body, "temperature")),
        top_p=float(_get(body, "top_p")),
        top_k=max(_get(body, "top_k"), 0),
        min_p=float(_get(body, "min_p")),
        repetition_penalty=float(penalty if penalty is not None else alias if alias is not None else 1.0),
        seed=_get(body, "seed"),
        stop=stop,
        ignore_eos=_get(body, "ignore_eos"),
    )


def _content(p: str, content) -> str:
    """OpenAI message content: a string, null, or an array of text parts (joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        for j, c in enumerate(content):
            if not (isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)):
                kind = c.get("type") if isinstance(c, dict) and isinstance(c.get("type"), str) else None
                what = f", not '{kind}'." if kind else "."
                raise APIError(400, f"'{p}.content[{j}]': only text content parts are supported{what}",
                               f"{p}.content", "unsupported_value")
        return "".join(c["text"] for c in content)
    raise APIError(400, f"Invalid type for '{p}.content': expected a string or an array of text parts.",
                   f"{p}.content", "invalid_type")


def chat_messages(body: dict) -> list[dict]:
    """OpenAI messages -> template messages {role, content[, name]}."""
    msgs = body.get("messages")
    if msgs is None:
        raise APIError(400, "Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "Invalid value for 'messages': expected a non-empty array of messages.", "messages",
                       "invalid_value")
    out = []
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"Invalid type for '{p}': expected an object.", p, "invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise APIError(400, f"Invalid value for '{p}.role': expected one of {', '.join(ROLES)}.",
                           f"{p}.role", "invalid_value")
        for k, v in m.items():
            if k not in MESSAGE_FIELDS and v not in (None, "", [], {}):
                raise APIError(400, f"'{p}.{k}' is not supported by this server.", f"{p}.{k}",
                               "unsupported_parameter")
        msg = {"role": ROLES[role], "content": _content(p, m.get("content"))}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise APIError(400, f"Invalid type for '{p}.name': expected a string.", f"{p}.name", "invalid_type")
            msg["name"] = m["name"]
        out.append(msg)
    return out


def completion_prompt(body: dict) -> dict:
    """OpenAI prompt (string, [string], token ids or [token ids]) -> encode keywords."""
    p = body.get("prompt")
    if p is None:
        raise APIError(400, "Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        return {"prompt": p}
    if isinstance(p, list) and p and all(type(i) is int for i in p):
        return {"prompt_ids": p}
    if isinstance(p, list) and len(p) > 1 and all(isinstance(i, (str, list)) for i in p):
        raise APIError(400, "Batched prompts are not supported: send one prompt per request.", "prompt",
                       "unsupported_value")
    raise APIError(400, "Invalid type for 'prompt': expected a string or a non-empty array of token ids.",
                   "prompt", "invalid_type")


# ---- the body: bounded bytes -> a JSON object --------------------------------------------------------------
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # as signed bytes: +1, +1, -1, -1


def json_depth(raw: bytes) -> int:
    """Nesting depth of a JSON text, from its brackets outside strings; no recursion, no parse."""
    steps = _STRING.sub(b"", raw).translate(None, _NOT_BRACKET).translate(_STEP)
    return max(itertools.accumulate(memoryview(steps).cast("b")), default=0)


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def bad_string(body) -> str | None:
    """Path of the first string (key or value) that is not valid Unicode (a lone surrogate), else None."""
    stack = [("", body)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode()
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(v, dict):
            stack.extend((f"{path}.{k}" if path else str(k), x) for k, x in v.items())
            stack.extend((path or "body", k) for k in v)
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", x) for i, x in enumerate(v))
    return None


def parse_json(raw: bytes, max_depth: int) -> dict:
    """A request body -> a JSON object, or a 400: nesting, NaN/Infinity and lone surrogates are refused."""
    if raw.count(b"[") + raw.count(b"{") > max_depth and json_depth(raw) > max_depth:
        raise APIError(400, f"The JSON body is nested deeper than {max_depth} levels.", code="invalid_json")
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request: {e}.", code="invalid_json")
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    if re.search(rb"\\u[dD][89a-fA-F]", raw) and (where := bad_string(body)) is not None:
        raise APIError(400, f"Invalid string at '{where}': a lone UTF-16 surrogate is not text.", where,
                       "invalid_value")
    return body


async def read_body(request, max_body: int) -> bytes:
    """The body in chunks, stopping at `max_body` bytes (the Content-Length was checked by _Guard)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise _too_large(max_body)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_body: int) -> APIError:
    return APIError(413, f"The request body is larger than {max_body} bytes (serve --max-body).",
                    code="request_too_large", headers={"Connection": "close"})  # the rest is never read


# ---- the worker: one thread owns the engine -------------------------------------------------------------
@dataclass
class Job:
    """One request for the worker. Results come back on `out` (responses, then an exception or None)."""

    kwargs: dict
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def put(self, item) -> None:  # from the worker thread
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening
            self.cancel.set()

    async def events(self):
        while (item := await self.out.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item


class Metrics:
    """Counters for /metrics; updated from the event loop and the worker thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # (endpoint, status) -> count
        self.in_flight = 0  # generation requests accepted and not yet answered (queued or running)
        self.prompt_tokens = self.generation_tokens = self.cancelled = 0
        self.last: dict = {}  # stats of the last finished generation
        self.expert: defaultdict = defaultdict(int)

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[endpoint, status] += 1

    def finished(self, r) -> None:
        with self.lock:
            self.prompt_tokens += r.prompt_tokens
            self.generation_tokens += r.generation_tokens
            self.cancelled += r.finish_reason == "cancelled"
            self.last = dict(r.stats or {})
            for k in EXPERT_TOTALS:
                if k in self.last:
                    self.expert[k] += self.last[k]

    def skipped(self) -> None:
        with self.lock:
            self.cancelled += 1

    def render(self, queue_depth: int, busy: bool) -> str:
        lines: list[str] = []

        def metric(name, kind, help, samples):
            lines.extend([f"# HELP moe_offload_{name} {help}", f"# TYPE moe_offload_{name} {kind}"])
            for labels, v in samples:
                lab = ",".join(f'{k}="{x}"' for k, x in labels.items())
                lines.append(f"moe_offload_{name}{{{lab}}} {v}" if lab else f"moe_offload_{name} {v}")

        with self.lock:
            metric("requests_total", "counter", "HTTP requests by endpoint and status.",
                   [({"endpoint": e, "status": s}, n) for (e, s), n in sorted(self.requests.items())])
            metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [({}, self.prompt_tokens)])
            metric("generation_tokens_total", "counter", "Tokens generated.", [({}, self.generation_tokens)])
            metric("requests_cancelled_total", "counter", "Generations stopped early by a client disconnect.",
                   [({}, self.cancelled)])
            metric("decode_tokens_per_second", "gauge", "Decode speed of the last request.",
                   [({}, self.last.get("decode_tokens_per_s", 0.0))])
            metric("prefill_tokens_per_second", "gauge", "Prefill speed of the last request.",
                   [({}, self.last.get("prefill_tokens_per_s", 0.0))])
            if "hit_rate" in self.last:
                metric("expert_hit_rate", "gauge", "Expert cache hit rate of the last request.",
                       [({}, self.last["hit_rate"])])
            for k in EXPERT_TOTALS:
                if k in self.expert:
                    metric(f"{k}_total", "counter", f"Sum of the engine's {k} over requests.",
                           [({}, self.expert[k])])
            metric("queue_depth", "gauge", "Requests waiting for the engine.", [({}, queue_depth)])
            metric("requests_in_flight", "gauge", "Generation requests accepted and not yet answered.",
                   [({}, self.in_flight)])
            metric("engine_busy", "gauge", "1 while the engine generates.", [({}, int(busy))])
        return "\n".join(lines) + "\n"


class Worker:
    """One thread owns the engine and runs up to `parallel` jobs as one batch (continuous batching): a job
    joins at the next step boundary, its prompt prefilled `PREFILL_CHUNK` tokens a step beside the streams in
    flight; the rest wait in the queue, in arrival order. A finished or cancelled job leaves at once."""

    def __init__(self, engine, metrics: Metrics, parallel: int = 1):
        self.engine, self.metrics, self.parallel = engine, metrics, parallel
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.busy = False
        self.thread = threading.Thread(target=self._run, name="moe-offload-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)

    @staticmethod
    def _end(job: Job, last=None) -> None:
        if last is not None:
            job.put(last)
        job.done.set()
        job.put(None)

    def _admit(self, batch, running: dict) -> bool:
        """Queued jobs join the batch while it has room; blocks while idle. False once closed."""
        while len(batch.seqs) < self.parallel:
            try:
                job = self.jobs.get(block=not batch.seqs)
            except queue.Empty:
                return True
            if job is None:
                return False
            if job.cancel.is_set():  # the client left while queued
                self.metrics.skipped()
                self._end(job)
                continue
            try:
                running[id(batch.add(**job.kwargs, should_stop=job.cancel.is_set))] = job
            except Exception as e:  # reaches the client as a 500 (the server checks requests before)
                self._end(job, e)
        return True

    def _run(self) -> None:
        batch, running = self.engine.batch(PREFILL_CHUNK), {}  # id(sequence) -> job
        open_ = True
        while open_ or batch.seqs:
            if open_:
                open_ = self._admit(batch, running)
            if not batch.seqs:
                continue
            self.busy = True
            try:
                for seq, r in batch.step():
                    job = running[id(seq)]
                    if r.finish_reason is None:
                        job.put(r)
                        continue
                    self.metrics.finished(r)
                    self._end(running.pop(id(seq)), r)
            except Exception as e:  # a failed step fails the jobs in it; the worker goes on
                batch.close()
                for job in running.values():
                    self._end(job, e)
                running.clear()
            finally:
                self.busy = bool(batch.seqs)


async def _cancel_on_disconnect(request, job: Job) -> None:
    while not job.done.is_set():
        if await request.is_disconnected():
            job.cancel.set()
            return
        await asyncio.sleep(0.1)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(r) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.generation_tokens,
            "total_tokens": r.prompt_tokens + r.generation_tokens}


# ---- the app --------------------------------------------------------------------------------------------
class Server:
    """State behind the routes: the engine's worker, metrics and limits, and the OpenAI response shapes."""

    def __init__(self, engine, model_name: str | None = None, api_key: str | None = None,
                 limits: Limits = Limits(), parallel: int = 1):
        self.engine, self.limits = engine, limits
        self.name = model_name or engine.path.name
        self.api_key = api_key or None
        self.created = int(time.time())
        self.metrics = Metrics()
        self.worker = Worker(engine, self.metrics, parallel)
        self.tasks: set[asyncio.Task] = set()

    def check_key(self, authorization: str | None) -> None:
        if self.api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")

    def check_model(self, model) -> None:
        if model is not None and model != self.name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.name}'.",
                           "model", "model_not_found")

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "moe-offload",
                "context_length": self.engine.context_length}

    def check_chars(self, n: int, param: str) -> None:
        """A cheap bound before tokenizing: no tokenizer packs `chars_per_token` characters in a token."""
        cap = self.engine.context_length * self.limits.chars_per_token
        if n > cap:
            raise APIError(400, f"The {param} is {n} characters; this model's context of "
                                f"{self.engine.context_length} tokens holds at most {cap} "
                                f"({self.limits.chars_per_token} a token).", param, "context_length_exceeded")

    async def encode(self, param: str, **source) -> list[int]:
        ids = source.get("prompt_ids")
        if ids is not None and len(ids) >= self.engine.context_length:
            raise APIError(400, f"The prompt is {len(ids)} tokens; the context is "
                                f"{self.engine.context_length} tokens.", param, "context_length_exceeded")
        try:  # in a thread: tokenizing or templating a long text must not stall the event loop
            return await asyncio.to_thread(self.engine.encode, **source)
        except MoeError as e:  # prompt too long, empty, ids outside the vocabulary, no chat template
            raise APIError(400, str(e), param) from None

    def max_new_tokens(self, requested: int | None, n_prompt: int, default: int | None, what: str) -> int:
        ctx = self.engine.context_length
        room = ctx - n_prompt
        if requested is None:
            return room if default is None else min(default, room)
        if n_prompt + requested > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{n_prompt + requested} tokens ({n_prompt} in the {what}, {requested} in the "
                                f"completion). Please reduce the length of the {what} or completion.",
                           "max_tokens", "context_length_exceeded")
        return requested

    def submit(self, job: "Job") -> None:
        """The one door into the engine: past `max_queue` waiting requests the answer is 429."""
        waiting = self.worker.jobs.qsize()
        if waiting >= self.limits.max_queue:
            raise APIError(429, f"The server is busy: {waiting} requests are waiting for the engine "
                                f"(serve --max-queue {self.limits.max_queue}). Retry later.",
                           code="queue_full", type="server_busy", headers={"Retry-After": "1"})
        self.worker.submit(job)

    async def generate(self, request, body: dict, ids: list[int], kw: dict, chat: bool):
        from fastapi.responses import JSONResponse, StreamingResponse

        job = Job(dict(kw, prompt_ids=ids), asyncio.get_running_loop())
        self.submit(job)
        watch = asyncio.create_task(_cancel_on_disconnect(request, job))
        self.tasks.add(watch)
        watch.add_done_callback(self.tasks.discard)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.name}
        if body.get("stream"):
            opts = body.get("stream_options") or {}
            return StreamingResponse(self._stream(job, head, chat, bool(opts.get("include_usage"))),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, last = [], None
        try:
            async for r in job.events():
                text.append(r.text)
                last = r
        finally:
            job.cancel.set()  # no-op once finished; frees the engine if this handler is cancelled
        choice = {"index": 0, "logprobs": None, "finish_reason": FINISH[last.finish_reason]}
        if chat:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        else:
            choice["text"] = "".join(text)
        return JSONResponse({**head, "choices": [choice], "usage": _usage(last)})

    async def _stream(self, job: Job, head: dict, chat: bool, include_usage: bool):
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        extra = {"usage": None} if include_usage else {}

        def chunk(piece: str | None, finish: str | None) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if piece is None else (
                    {"content": piece} if piece else {})
                c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            return _sse({**head, "choices": [c], **extra})

        try:
            if chat:
                yield chunk(None, None)
            async for r in job.events():
                if r.text:  # the last response may carry held-back text too
                    yield chunk(r.text, None)
                if r.finish_reason is not None:
                    yield chunk("", FINISH[r.finish_reason])
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": _usage(r)})
            yield "data: [DONE]\n\n"
        except Exception as e:  # headers are gone: report in-band, as OpenAI does
            yield _sse(APIError(500, f"generation failed: {type(e).__name__}: {e}").body())
        finally:
            job.cancel.set()  # a disconnect lands here (or in the watcher): the engine stops at the next token


def _host_name(host: str) -> str:
    """'LocalHost:8000' -> 'localhost', '[::1]:8000' -> '[::1]', '::1' -> '[::1]'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    if host.count(":") > 1:  # a bare IPv6 address
        return f"[{host}]"
    return host.partition(":")[0].rstrip(".")


def is_loopback(host: str) -> bool:
    name = _host_name(host).strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind: str, extra: list[str] | None = None) -> frozenset[str] | None:
    """Host header names to answer (None: any). A loopback bind answers loopback names and the ones listed;
    a non-loopback bind answers any name unless some are listed; '*' lists all."""
    extra = [h for e in extra or [] for h in e.split(",") if h.strip()]
    if "*" in (h.strip() for h in extra) or (not extra and not is_loopback(bind)):
        return None
    return LOOPBACK_HOSTS | {_host_name(bind)} | {_host_name(h) for h in extra}


class _Guard:
    """ASGI middleware, before any route: the Host header (DNS rebinding), a JSON Content-Type on POST (a
    cross-site page can send text/plain without a CORS preflight), a declared Content-Length over the cap."""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits

    def refusal(self, scope) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host")
        if self.limits.hosts is not None and host is not None and _host_name(host) not in self.limits.hosts:
            return APIError(400, f"Invalid Host header '{host[:100]}': this server answers "
                                 f"{', '.join(sorted(self.limits.hosts))} (serve --allowed-hosts).",
                            code="invalid_host")
        if scope["method"] == "POST":
            ctype = headers.get("content-type", "").partition(";")[0].strip().lower()
            if ctype != "application/json":
                return APIError(415, f"Content-Type must be application/json, not '{ctype[:100]}'.",
                                code="unsupported_media_type")
        n = headers.get("content-length", "")
        if n.isdigit() and int(n) > self.limits.max_body:
            return _too_large(self.limits.max_body)
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (e := self.refusal(scope)) is not None:
            from fastapi.responses import JSONResponse

            return await JSONResponse(e.body(), e.status, e.headers)(scope, receive, send)
        return await self.app(scope, receive, send)


class _CountRequests:
    """ASGI middleware: requests by endpoint and status, and generation requests in flight."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].rstrip("/") or "/"
        endpoint = (path if path in ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/")
                    else "other")
        status = [500]

        async def send_status(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        gen = endpoint in GENERATE
        with self.metrics.lock:
            self.metrics.in_flight += gen
        try:
            await self.app(scope, receive, send_status)
        finally:
            with self.metrics.lock:
                self.metrics.in_flight -= gen
            self.metrics.request(endpoint, status[0])


def create_app(engine, model_name: str | None = None, api_key: str | None = None, limits: Limits = Limits(),
               parallel: int = 4):
    """The FastAPI app serving `engine`, `parallel` requests a batch. `model_name` defaults to the model folder's
    name. The default limits answer only loopback Host names (give Starlette's TestClient
    base_url="http://localhost")."""
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException

    srv = Server(engine, model_name, api_key, limits, parallel)

    @asynccontextmanager
    async def lifespan(app):
        yield
        srv.worker.close()

    # no /docs, /redoc or /openapi.json: the API is the OpenAI one, and nothing is served without the key
    app = FastAPI(title="moe-offload", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = srv
    app.add_middleware(_Guard, limits=limits)
    app.add_middleware(_CountRequests, metrics=srv.metrics)  # added last: outermost, so it counts refusals

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        msg = f"Unknown path {request.url.path}" if e.status_code == 404 else str(e.detail)
        return JSONResponse(APIError(e.status_code, msg).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        msg = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in e.errors())
        return JSONResponse(APIError(400, msg).body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return JSONResponse(APIError(500, f"{type(e).__name__}: {e}").body(), status_code=500)

    def auth(request: Request):
        srv.check_key(request.headers.get("authorization"))

    async def json_body(request: Request, fields: frozenset) -> dict:
        """The request's JSON object: bounded, parsed off the event loop, all fields known, the model ours."""
        raw = await read_body(request, limits.max_body)
        body = await asyncio.to_thread(parse_json, raw, limits.max_depth)
        check_fields(body, fields)
        srv.check_model(_get(body, "model"))
        return body

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(request: Request):
        body = await json_body(request, CHAT_FIELDS)
        messages = await asyncio.to_thread(chat_messages, body)  # a 4 MiB body may hold 100k messages
        kw = sampling(body, limits)
        srv.check_chars(sum(len(m["content"]) for m in messages), "messages")
        ids = await srv.encode("messages", messages=messages)
        kw["max_new_tokens"] = srv.max_new_tokens(kw["max_new_tokens"], len(ids), None, "messages")
        return await srv.generate(request, body, ids, kw, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(request: Request):
        body = await json_body(request, COMPLETION_FIELDS)
        source = await asyncio.to_thread(completion_prompt, body)  # or a million token ids
        kw = sampling(body, limits)
        srv.check_chars(len(source.get("prompt", "")), "prompt")
        ids = await srv.encode("prompt", **source)
        kw["max_new_tokens"] = srv.max_new_tokens(kw["max_new_tokens"], len(ids), 16, "prompt")
        return await srv.generate(request, body, ids, kw, chat=False)

    @app.post("/tokenize", dependencies=[Depends(auth)])
    async def tokenize(request: Request):  # llama-server's shape
        body = await json_body(request, TOKENIZE_FIELDS)
        content = _get(body, "content", Field("a string", ""))
        add_special = _get(body, "add_special", Field("a boolean", False))
        srv.check_chars(len(content), "content")
        if engine.tokenizer is None:
            raise APIError(400, "This model has no tokenizer.", "content")
        ids = await asyncio.to_thread(engine.tokenizer.encode, content, add_special_tokens=add_special)
        return {"tokens": ids}

    @app.post("/detokenize", dependencies=[Depends(auth)])
    async def detokenize(request: Request):  # llama-server's shape
        body = await json_body(request, DETOKENIZE_FIELDS)
        tokens = body.get("tokens", [])
        vocab = engine.args.vocab_size
        if not (isinstance(tokens, list) and all(type(t) is int and 0 <= t < vocab for t in tokens)):
            raise APIError(400, f"Invalid value for 'tokens': expected an array of token ids in "
                                f"0..{vocab - 1}.", "tokens", "invalid_value")
        srv.check_chars(len(tokens), "tokens")
        if engine.tokenizer is None:
            raise APIError(400, "This model has no tokenizer.", "tokens")
        text = await asyncio.to_thread(engine.tokenizer.decode, tokens, skip_special_tokens=False)
        return {"content": text}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [srv.model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(auth)])
    async def model(model_id: str):
        srv.check_model(model_id)
        return srv.model_card()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": srv.name, "queue_depth": srv.worker.jobs.qsize(),
                "busy": srv.worker.busy}

    @app.get("/metrics", dependencies=[Depends(auth)], response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(srv.metrics.render(srv.worker.jobs.qsize(), srv.worker.busy),
                                 media_type="text/plain; version=0.0.4")

    return app


# ---- the command ----------------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the model loads: a port in use is one line, not a uvicorn log."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise MoeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        why = "the address is already in use" if e.errno == errno.EADDRINUSE else e.strerror or str(e)
        raise MoeError(f"cannot listen on {host}:{port}: {why}") from None
    return sock


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, chat_template=True)
    have = p._option_string_actions  # prefetch flags, unless a shared helper already declared them
    if "--prefetch" not in have:
        p.add_argument("--prefetch", default=None, help="expert prefetch policy (expert store only)")
    if "--prefetch-depth" not in have:
        p.add_argument("--prefetch-depth", type=int, default=None, help="layers ahead to prefetch")
    if "--prefetch-experts" not in have:
        p.add_argument("--prefetch-experts", type=int, default=None, help="experts prefetched per layer")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default loopback only; 0.0.0.0 exposes the model to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--api-key", default=os.environ.get("MOE_OFFLOAD_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize and /metrics "
                        "(/health stays open); default $MOE_OFFLOAD_API_KEY")
    p.add_argument("--model-name", "--served-model-name", dest="model_name", default=None,
                   help="model id for /v1/models and requests (default: the model folder's name)")
    p.add_argument("--allowed-hosts", action="append", default=None, metavar="HOST[,HOST]",
                   help="Host header names to answer besides localhost/127.0.0.1/[::1] ('*': any); default: "
                        "loopback names on a loopback bind, any name otherwise")
    p.add_argument("--max-body", default="4MiB", help="largest request body (default 4MiB); larger is 413")
    p.add_argument("--max-queue", type=int, default=Limits.max_queue,
                   help=f"requests waiting for the engine before 429 (default {Limits.max_queue})")
    p.add_argument("-np", "--parallel", type=int, default=4,
                   help="requests generated together as one batch (each step reads an expert once for all); "
                        "more wait in the queue (default 4)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")


def limits_from_args(a) -> Limits:
    max_body = parse_size(a.max_body)
    if not 1024 <= max_body <= 2**31:
        raise UsageError(f"--max-body must be 1KiB..2GiB, got {a.max_body}")
    if not 1 <= a.max_queue <= 1_000_000:
        raise UsageError(f"--max-queue must be 1..1000000, got {a.max_queue}")
    return Limits(max_body=max_body, max_queue=a.max_queue, hosts=allowed_hosts(a.host, a.allowed_hosts))


def run(a) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as e:
        raise MoeError(f"serve needs {e.name}: pip install 'moe-offload[serve]'") from None
    if not 0 <= a.port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {a.port}")
    if not 1 <= a.parallel <= 256:
        raise UsageError(f"--parallel must be 1..256, got {a.parallel}")
    limits = limits_from_args(a)
    sock = bind(a.host, a.port)
    try:
        engine = load_engine(a)
        # the id is the folder the user named, not the converted store's cache folder
        name = a.model_name or (Path(a.model).resolve().name if a.model else None)
        app = create_app(engine, name, a.api_key, limits, a.parallel)
        if not is_loopback(a.host) and not a.api_key:
            print(f"warning: serving on {a.host} without --api-key: anyone who can reach it can use the model",
                  file=sys.stderr)
        port = sock.getsockname()[1]
        host = f"[{a.host}]" if ":" in a.host else a.host
        print(f"serving '{app.state.server.name}' at http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr)
        config = uvicorn.Config(app, host=a.host, port=port, log_level=a.log_level, timeout_graceful_shutdown=3)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0
