"""`moe-offload serve`: an OpenAI-compatible HTTP server, a thin layer over `Engine.stream_generate`.

    moe-offload serve --model models/tiny-moe [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Endpoints: POST /v1/chat/completions, POST /v1/completions (stream or not), GET /v1/models, GET /health,
GET /metrics (Prometheus text). One worker thread owns the engine and serves queued requests one at a time
(batch 1), in arrival order; the event loop only parses, tokenizes and streams, so /health and /metrics
answer while a request generates. A client that disconnects sets its job's cancel flag, which
stream_generate's `should_stop` reads after every token: the engine is free at the next token.

With --api-key (or MOE_OFFLOAD_API_KEY) every /v1/* and /metrics request needs `Authorization: Bearer KEY`;
/health stays open so a supervisor can probe liveness without the key. The server binds to 127.0.0.1
unless told otherwise.

Defaults follow OpenAI: temperature 1, top_p 1, max_tokens 16 for /v1/completions and the rest of the
context for chat. Extensions (as in vLLM): `top_k`, `ignore_eos`. Unsupported options (n > 1, logprobs,
echo, tools, penalties, ...) are refused with a 400 rather than silently ignored.
"""

import argparse
import asyncio
import hmac
import json
import os
import queue
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .cli import add_model_args, command, load_engine
from .errors import MoeError, UsageError

# fastapi/uvicorn are the optional "serve" extra: imported only when a server is built, so that every other
# subcommand (this module is imported by the CLI on start) works without them.

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
GENERATE = ("/v1/chat/completions", "/v1/completions")
FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}  # engine -> OpenAI finish_reason
# engine stats summed over requests when the model runs from the expert store
EXPERT_TOTALS = ("expert_hits", "expert_misses", "bytes_read_disk", "bytes_to_device", "stall_seconds")
# request fields we do not implement: refused unless absent or at their neutral value
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias",
               "presence_penalty", "frequency_penalty")


class APIError(Exception):
    """An OpenAI-style error: HTTP `status` and body {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request validation: plain JSON in, engine keywords out --------------------------------------------
KINDS = {
    "an integer": lambda v: type(v) is int,
    "a number": lambda v: type(v) in (int, float),
    "a boolean": lambda v: type(v) is bool,
    "a string": lambda v: isinstance(v, str),
    "an object": lambda v: isinstance(v, dict),
}
JSON_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
              float: "a number"}


def _get(body: dict, name: str, kind: str, default=None, lo=None, hi=None, lo_open: bool = False):
    """body[name] checked for JSON type and range; null or absent gives `default`."""
    v = body.get(name)
    if v is None:
        return default
    if not KINDS[kind](v):
        raise APIError(400, f"Invalid type for '{name}': expected {kind}, but got "
                            f"{JSON_NAMES.get(type(v), 'a value')} instead.", name, "invalid_type")
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        want = f"{'>' if lo_open else '>='} {lo}" + ("" if hi is None else f" and <= {hi}")
        raise APIError(400, f"Invalid value for '{name}': expected a value {want}, but got {v} instead.",
                       name, "invalid_value")
    return v


def _refuse_unsupported(body: dict) -> None:
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, 0, "", [], {}):
            raise APIError(400, f"'{name}' is not supported by this server.", name, "unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise APIError(400, "'best_of' is not supported by this server.", "best_of", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise APIError(400, "only response_format {'type': 'text'} is supported.", "response_format",
                       "unsupported_parameter")
    if _get(body, "n", "an integer", 1) != 1:
        raise APIError(400, "Only n=1 is supported: requests are served one at a time.", "n",
                       "unsupported_value")


def sampling(body: dict) -> dict:
    """Sampling fields -> stream_generate keywords (max_new_tokens is settled after tokenizing)."""
    _refuse_unsupported(body)
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or
                                 (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise APIError(400, "Invalid type for 'stop': expected a string or an array of strings.", "stop",
                       "invalid_type")
    opts = _get(body, "stream_options", "an object")
    stream = _get(body, "stream", "a boolean", False)
    if opts is not None:
        if not stream:
            raise APIError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                           "stream_options", "invalid_value")
        _get(opts, "include_usage", "a boolean")
    max_tokens = _get(body, "max_completion_tokens", "an integer", lo=1)
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", "an integer", lo=1)
    return dict(
        max_new_tokens=max_tokens,
        temperature=float(_get(body, "temperature", "a number", 1.0, lo=0, hi=2)),
        top_p=float(_get(body, "top_p", "a number", 1.0, lo=0, hi=1, lo_open=True)),
        top_k=_get(body, "top_k", "an integer", 0, lo=0),
        seed=_get(body, "seed", "an integer"),
        stop=stop,
        ignore_eos=_get(body, "ignore_eos", "a boolean", False),
    )


def chat_messages(body: dict) -> list[dict]:
    """OpenAI messages -> template messages; content parts are joined when they are all text."""
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
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise APIError(400, f"Invalid value for '{p}.role': expected a non-empty string.", f"{p}.role",
                           "invalid_value")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise APIError(400, f"'{p}.content': only text content parts are supported.", f"{p}.content",
                               "unsupported_value")
            content = "".join(c["text"] for c in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise APIError(400, f"Invalid type for '{p}.content': expected a string or an array of text parts.",
                           f"{p}.content", "invalid_type")
        out.append({**m, "content": content})
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
    """Runs jobs one at a time (batch 1) in a dedicated thread; the only user of the engine's forward."""

    def __init__(self, engine, metrics: Metrics):
        self.engine, self.metrics = engine, metrics
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.busy = False
        self.thread = threading.Thread(target=self._run, name="moe-offload-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                if job.cancel.is_set():  # the client left while queued
                    self.metrics.skipped()
                    continue
                self.busy = True
                for r in self.engine.stream_generate(**job.kwargs, should_stop=job.cancel.is_set):
                    if r.finish_reason is not None:
                        self.metrics.finished(r)
                    job.put(r)
            except Exception as e:  # reaches the client as a 500; the worker goes on
                job.put(e)
            finally:
                self.busy = False
                job.done.set()
                job.put(None)


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
    """State behind the routes: the engine's worker, the metrics and the OpenAI response shapes."""

    def __init__(self, engine, model_name: str | None = None, api_key: str | None = None):
        self.engine = engine
        self.name = model_name or engine.path.name
        self.api_key = api_key or None
        self.created = int(time.time())
        self.metrics = Metrics()
        self.worker = Worker(engine, self.metrics)
        self.tasks: set[asyncio.Task] = set()

    def check_key(self, authorization: str | None) -> None:
        if self.api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")

    def check_model(self, body: dict) -> None:
        model = _get(body, "model", "a string")
        if model is not None and model != self.name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.name}'.",
                           "model", "model_not_found")

    async def encode(self, param: str, **source) -> list[int]:
        try:
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

    async def generate(self, request, body: dict, ids: list[int], kw: dict, chat: bool):
        from fastapi.responses import JSONResponse, StreamingResponse

        job = Job(dict(kw, prompt_ids=ids), asyncio.get_running_loop())
        self.worker.submit(job)
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


class _CountRequests:
    """ASGI middleware: requests by endpoint and status, and generation requests in flight."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].rstrip("/") or "/"
        endpoint = path if path in ROUTES else "other"
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


def create_app(engine, model_name: str | None = None, api_key: str | None = None):
    """The FastAPI app serving `engine`. `model_name` defaults to the model folder's name."""
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException

    srv = Server(engine, model_name, api_key)

    @asynccontextmanager
    async def lifespan(app):
        yield
        srv.worker.close()

    app = FastAPI(title="moe-offload", version="0.1.0", lifespan=lifespan)
    app.state.server = srv
    app.add_middleware(_CountRequests, metrics=srv.metrics)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

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

    async def json_body(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request: {e}.", code="invalid_json")
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        srv.check_model(body)
        return body

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(request: Request):
        body = await json_body(request)
        messages = chat_messages(body)
        kw = sampling(body)
        ids = await srv.encode("messages", messages=messages)
        kw["max_new_tokens"] = srv.max_new_tokens(kw["max_new_tokens"], len(ids), None, "messages")
        return await srv.generate(request, body, ids, kw, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(request: Request):
        body = await json_body(request)
        source = completion_prompt(body)
        kw = sampling(body)
        ids = await srv.encode("prompt", **source)
        kw["max_new_tokens"] = srv.max_new_tokens(kw["max_new_tokens"], len(ids), 16, "prompt")
        return await srv.generate(request, body, ids, kw, chat=False)

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [{"id": srv.name, "object": "model", "created": srv.created,
                                            "owned_by": "moe-offload",
                                            "context_length": engine.context_length}]}

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
def _add_serve(p: argparse.ArgumentParser) -> None:
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
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (/health stays open); "
                        "default $MOE_OFFLOAD_API_KEY")
    p.add_argument("--model-name", default=None, help="model id for /v1/models and requests "
                                                      "(default: the model folder's name)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")


@command("serve", "OpenAI-compatible HTTP server: chat, completions, models, health, metrics", _add_serve)
def cmd_serve(a) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as e:
        raise MoeError(f"serve needs {e.name}: pip install 'moe-offload[serve]'") from None
    if not 0 <= a.port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {a.port}")
    engine = load_engine(a)
    # the id is the folder the user named, not the converted store's cache folder
    name = a.model_name or (Path(a.model).resolve().name if a.model else None)
    app = create_app(engine, name, a.api_key)
    if a.host not in ("127.0.0.1", "localhost", "::1") and not a.api_key:
        print(f"warning: serving on {a.host} without --api-key: anyone who can reach it can use the model",
              file=sys.stderr)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=3)
    return 0
