"""Hostile requests against a live server on 127.0.0.1 (issue 14): oversized bodies, a full queue, foreign
Host headers, text/plain POSTs, bad numbers, deep nesting, bad Unicode, a port in use; then a property fuzz
over the request schema. Every answer must be 2xx or a JSON 4xx, and /health must keep answering.

The server runs uvicorn in a thread over a socket from `server.bind`, serving the tiny engine behind a gate
the tests close to hold the engine busy, so the queue case needs no timing."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from moe_offload import server as srv  # noqa: E402
from moe_offload.runtime.load import load  # noqa: E402

CONTEXT = 128
LIMITS = srv.Limits(max_body=64 * 1024, max_queue=1)
JSON = {"Content-Type": "application/json"}
HI = [{"role": "user", "content": "hi"}]


class Gated:
    """The engine with a gate before each generation and a count of encode calls."""

    def __init__(self, engine):
        self.engine, self.gate, self.encodes = engine, threading.Event(), 0
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def encode(self, *a, **kw):
        self.encodes += 1
        return self.engine.encode(*a, **kw)

    def batch(self, *a, **kw):  # the server's worker steps a batch: each step waits at the gate
        inner, gate = self.engine.batch(*a, **kw), self.gate

        class GatedBatch:
            def __getattr__(self, name):
                return getattr(inner, name)

            def step(self):
                assert gate.wait(30)
                return inner.step()

        return GatedBatch()


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return load(tiny_checkpoint("mixtral_gqa", tokenizer=True, max_position_embeddings=CONTEXT))


@pytest.fixture(scope="module")
def gated(engine):
    return Gated(engine)


@pytest.fixture(scope="module")
def url(gated):
    sock = srv.bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    app = srv.create_app(gated, "tiny-chat", None, LIMITS, parallel=1)  # a second request queues
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    yield base
    gated.gate.set()
    server.should_exit = True
    thread.join(10)
    sock.close()


def error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def healthy(url: str) -> bool:
    return httpx.get(url + "/health", timeout=1).json()["status"] == "ok"


# ---- bodies ---------------------------------------------------------------------------------------------
def test_body_over_the_cap_is_413_declared_or_chunked(url):
    big = json.dumps({"prompt": "x" * (LIMITS.max_body + 1), "max_tokens": 1}).encode()
    error(httpx.post(url + "/v1/completions", content=big, headers=JSON), 413)

    def chunks():  # no Content-Length: the cap holds while reading
        yield b'{"prompt": "'
        for _ in range(LIMITS.max_body // 4096 + 2):
            yield b"x" * 4096
        yield b'"}'

    error(httpx.post(url + "/v1/completions", content=chunks(), headers=JSON), 413)
    assert healthy(url)
    assert srv.Limits().max_body == 4 * 2**20


def test_long_prompt_is_refused_before_tokenizing(url, gated):
    before = gated.encodes
    n = CONTEXT * LIMITS.chars_per_token + 1
    for path, body, param in (("/v1/completions", {"prompt": "y" * n}, "prompt"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * n}]},
                               "messages"),
                              ("/tokenize", {"content": "y" * n}, "content"),
                              ("/v1/completions", {"prompt": [5] * CONTEXT}, "prompt")):
        err = error(httpx.post(url + path, json=body), 400, param)
        assert err["code"] == "context_length_exceeded"
    assert gated.encodes == before


# ---- the queue ------------------------------------------------------------------------------------------
def test_queue_past_max_is_429_with_retry_after(url, gated):
    body = {"messages": HI, "max_tokens": 2, "stream": True}
    gated.gate.clear()
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as running:
            assert running.status_code == 200
            for _ in range(200):  # the worker has taken it and waits at the gate
                if httpx.get(url + "/health").json()["busy"]:
                    break
                time.sleep(0.02)
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as waiting:
                assert waiting.status_code == 200
                assert httpx.get(url + "/health").json()["queue_depth"] == 1
                r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=5)
                assert error(r, 429)["code"] == "queue_full" and r.headers["retry-after"] == "1"
                gated.gate.set()
                assert "[DONE]" in waiting.read().decode()
            assert "[DONE]" in running.read().decode()
    finally:
        gated.gate.set()
    assert httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


# ---- what a web page could send -------------------------------------------------------------------------
def test_foreign_host_headers_are_refused(url):
    for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example", "localhost.evil.example:1"):
        assert error(httpx.get(url + "/health", headers={"Host": host}), 400)["code"] == "invalid_host"
        error(httpx.post(url + "/v1/completions", json={"prompt": "hi"}, headers={"Host": host}), 400)
    for host in ("localhost", "LOCALHOST:8000", "127.0.0.1:1", "[::1]:8000", "[::1]"):
        assert httpx.get(url + "/health", headers={"Host": host}).status_code == 200


def test_allowed_hosts_policy():
    assert srv.allowed_hosts("127.0.0.1") == srv.LOOPBACK_HOSTS
    assert srv.allowed_hosts("::1") == srv.LOOPBACK_HOSTS
    assert srv.allowed_hosts("0.0.0.0") is None  # bound to the network: the operator chose exposure
    assert srv.allowed_hosts("192.168.1.5") is None
    assert srv.allowed_hosts("127.0.0.1", ["my.box, other.box:8000"]) == srv.LOOPBACK_HOSTS | {"my.box",
                                                                                              "other.box"}
    assert srv.allowed_hosts("0.0.0.0", ["my.box"]) == srv.LOOPBACK_HOSTS | {"0.0.0.0", "my.box"}
    assert srv.allowed_hosts("127.0.0.1", ["*"]) is None


def test_posts_must_be_json_and_docs_are_off(url):
    raw = json.dumps({"prompt": "hi", "max_tokens": 1})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": ctype} if ctype else {}
        r = httpx.post(url + "/v1/completions", content=raw, headers=headers)
        assert error(r, 415)["code"] == "unsupported_media_type"
    r = httpx.post(url + "/v1/completions", content=raw,
                   headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200
    for path in ("/docs", "/redoc", "/openapi.json"):
        error(httpx.get(url + path), 404)


# ---- every number, type and string checked once ----------------------------------------------------------
def chat(**kw) -> dict:
    return {"messages": HI, "max_tokens": 2, **kw}


BAD = [
    # (path, JSON body or raw bytes, param)
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}', None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}',
     "temperature"),
    ("/v1/chat/completions", chat(top_p=0), "top_p"),
    ("/v1/chat/completions", chat(top_p=5), "top_p"),
    ("/v1/chat/completions", chat(temperature=-1), "temperature"),
    ("/v1/chat/completions", chat(top_k=-5), "top_k"),
    ("/v1/chat/completions", chat(top_k=10**30), "top_k"),
    ("/v1/chat/completions", chat(seed=1e30), "seed"),
    ("/v1/chat/completions", chat(seed=10**30), "seed"),
    ("/v1/chat/completions", chat(seed=-(2**64)), "seed"),
    ("/v1/chat/completions", chat(max_tokens=10**30), "max_tokens"),
    ("/v1/chat/completions", chat(max_tokens=-1), "max_tokens"),
    ("/v1/chat/completions", chat(max_tokens=True), "max_tokens"),
    ("/v1/chat/completions", chat(max_tokens=2.5), "max_tokens"),
    ("/tokenize", {"content": "hi", "model": 5}, "model"),
    ("/v1/chat/completions", chat(user=5), "user"),
    ("/v1/chat/completions", chat(min_p=1.5), "min_p"),
    ("/v1/chat/completions", chat(min_p="0.1"), "min_p"),
    ("/v1/chat/completions", chat(repetition_penalty=0), "repetition_penalty"),
    ("/v1/chat/completions", chat(repeat_penalty=-1), "repeat_penalty"),
    ("/v1/chat/completions", chat(repetition_penalty=1.1, repeat_penalty=1.2), "repeat_penalty"),
    ("/v1/chat/completions", chat(presence_penalty=0.5), "presence_penalty"),
    ("/v1/chat/completions", chat(frequency_penalty=1), "frequency_penalty"),
    ("/v1/chat/completions", chat(tools=[{"type": "function"}]), "tools"),
    ("/v1/chat/completions", chat(response_format={"type": "json_object"}), "response_format"),
    ("/v1/chat/completions", chat(mirostat=2), "mirostat"),  # unknown fields are never ignored
    ("/v1/chat/completions", chat(typical_p=0.9), "typical_p"),
    ("/v1/chat/completions", chat(stream=True, stream_options={"include_usage": True, "x": 1}),
     "stream_options.x"),
    ("/v1/chat/completions", chat(stop=["s"] * 17), "stop"),
    ("/v1/chat/completions", chat(stop="s" * 2000), "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "tool_calls": [{"id": "x"}]}]},
     "messages[0].tool_calls"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://x"}}]}]}, "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800 hi"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "user": "\\udfff"}', "user"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', None),  # not UTF-8
    ("/v1/chat/completions", b'{"messages": ' + b"[" * 30000 + b"]" * 30000 + b"}", None),
    ("/v1/chat/completions", b'{"messages": ' + b"[" * 65 + b"]" * 65 + b"}", None),
    ("/v1/completions", b'{"prompt": "hi \\udc00"}', "prompt"),
    ("/tokenize", b'{"content": "\\ud800"}', "content"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, "max_tokens"),
    ("/v1/completions", {"prompt": [True]}, "prompt"),
    ("/v1/completions", {"prompt": [10**30]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "n": 3}, "n"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2}, "best_of"),
    ("/tokenize", {"content": 5}, "content"),
    ("/tokenize", {"content": "hi", "with_pieces": True}, "with_pieces"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, "tokens"),
    ("/detokenize", {"tokens": [10**9]}, "tokens"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_values_are_400_with_the_field(url, path, body, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    err = error(httpx.post(url + path, content=raw, headers=JSON), 400, param)
    assert "non-finite" not in err["message"] or b"1e999" in raw


def test_depth_scan_ignores_brackets_inside_strings():
    assert srv.json_depth(b'{"a": [[1], {"b": "[[[[[[[[[["}]}') == 3
    assert srv.json_depth(b'"[[[[\\"[[["') == 0
    assert srv.json_depth(b"[" * 100) == 100
    assert srv.parse_json(json.dumps({"content": "[" * 500 + "\\" + "{" * 500}).encode(), 4)["content"]
    with pytest.raises(srv.APIError, match="nested deeper than 64"):  # was a RecursionError, a 500
        srv.parse_json(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 64)


# ---- what the server implements in place of refusing it ---------------------------------------------------
def test_min_p_and_repetition_penalty_reach_sampling(url, engine):
    ref = engine.generate("The router", max_new_tokens=8, temperature=0.0, ignore_eos=True,
                          repetition_penalty=1.5)
    for name in ("repetition_penalty", "repeat_penalty"):
        r = httpx.post(url + "/v1/completions", json={"prompt": "The router", "max_tokens": 8,
                                                      "temperature": 0, "ignore_eos": True, name: 1.5})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref.text
    r = httpx.post(url + "/v1/completions", json={"prompt": "The router", "max_tokens": 4, "temperature": 1,
                                                  "min_p": 1.0, "seed": 3, "ignore_eos": True})
    greedy = engine.generate("The router", max_new_tokens=4, temperature=0.0, ignore_eos=True).text
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy  # min_p 1 keeps only the top


def test_content_parts_model_card_and_tokenize(url, engine):
    parts = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}],
                                                       "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    ref = engine.generate(messages=[{"role": "user", "content": "Hi there"}], max_new_tokens=4,
                          temperature=0.0, ignore_eos=True)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ref.text
    card = httpx.get(url + "/v1/models/tiny-chat").json()
    assert card["id"] == "tiny-chat" and card["object"] == "model" and card["context_length"] == CONTEXT
    assert error(httpx.get(url + "/v1/models/org/other"), 404)["code"] == "model_not_found"
    text = "The cache streams every byte"
    toks = httpx.post(url + "/tokenize", json={"content": text}).json()["tokens"]
    assert toks == engine.tokenizer.encode(text, add_special_tokens=False)
    with_bos = httpx.post(url + "/tokenize", json={"content": text, "add_special": True}).json()["tokens"]
    assert with_bos == engine.tokenizer.encode(text) and len(with_bos) == len(toks) + 1
    assert httpx.post(url + "/detokenize", json={"tokens": toks}).json() == {"content": text}
    assert httpx.post(url + "/detokenize", json={"tokens": with_bos}).json() == {"content": "<s>" + text}


# ---- the command ----------------------------------------------------------------------------------------
def test_port_in_use_is_one_line(child_env, tiny_checkpoint):
    folder = tiny_checkpoint("mixtral_gqa", tokenizer=True, max_position_embeddings=CONTEXT)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cmd = [sys.executable, "-m", "moe_offload.cli", "serve", "--model", str(folder), "--port", str(port)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=child_env, timeout=120, check=False)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "already in use" in lines[0] and str(port) in lines[0], p.stderr


def test_serve_flags():
    p = argparse.ArgumentParser()
    srv.add_args(p)
    a = p.parse_args(["--served-model-name", "org/name", "--max-body", "1MiB", "--max-queue", "3",
                      "--allowed-hosts", "my.box"])
    assert a.model_name == "org/name"
    lim = srv.limits_from_args(a)
    assert (lim.max_body, lim.max_queue, lim.hosts) == (2**20, 3, srv.LOOPBACK_HOSTS | {"my.box"})
    d = srv.limits_from_args(p.parse_args([]))
    assert (d.max_body, d.max_queue, d.hosts) == (4 * 2**20, 64, srv.LOOPBACK_HOSTS)
    for bad in (["--max-queue", "0"], ["--max-body", "10"], ["--max-body", "lots"]):
        with pytest.raises(srv.UsageError):
            srv.limits_from_args(p.parse_args(bad))

