"""`moe-offload serve` as a live process on a loopback port, driven by the official `openai` client and httpx.

Greedy outputs and usage are checked against the same checkpoint run in-process by `Engine`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from moe_offload.runtime.load import load  # noqa: E402
from tests.tiny import make_checkpoint  # noqa: E402

KEY = "test-key-123"
CONTEXT = 2048
PROMPTS = ["The router reads", "def fibonacci(n):", "Our engine streams every byte", "42 7 99"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("srv") / "tiny-chat", "mixtral_gqa", tokenizer=True,
                           max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def engine(folder):
    return load(folder)


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("log") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("MOE_OFFLOAD_API_KEY", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", "import sys; from moe_offload.cli import main; sys.exit(main())", "serve", "--model", str(folder),
                                 "--port", str(port), "--api-key", KEY, "--log-level", "warning"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 80
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not come up:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


AUTH = {"Authorization": f"Bearer {KEY}"}


def metrics(url: str) -> dict[str, float]:
    r = httpx.get(url + "/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def chat(text: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


def test_models_and_health(server, client, engine):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-chat"]
    h = httpx.get(server + "/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny-chat"


def test_chat_matches_engine_and_counts_usage(client, engine):
    msgs = chat(PROMPTS[0])
    ref = engine.generate(messages=msgs, max_new_tokens=12, temperature=0.0, ignore_eos=True)
    r = client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.model == "tiny-chat"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(engine.encode(messages=msgs)) == ref.prompt_tokens
    assert r.usage.completion_tokens == len(ref.token_ids) == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_chat_eos_and_stop_string(client, engine):
    msgs = chat(PROMPTS[1])
    ref = engine.generate(messages=msgs, max_new_tokens=40, temperature=0.0)  # EOS allowed
    r = client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=40, temperature=0)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.completion_tokens == len(ref.token_ids)
    # a stop string taken from the middle of the greedy text ends it there with finish_reason "stop"
    long = engine.generate(messages=msgs, max_new_tokens=20, temperature=0.0, ignore_eos=True)
    stop = next(long.text[i:i + 2] for i in range(3, len(long.text) - 1)
                if long.text[i:i + 2].isprintable() and "\ufffd" not in long.text[i:i + 2])
    want = engine.generate(messages=msgs, max_new_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop])
    r = client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=20, temperature=0,
                                       stop=[stop, "never-seen-stop"], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and want.finish_reason == "stop"
    assert r.choices[0].message.content == want.text and stop not in want.text


def test_chat_stream_with_usage(client, engine):
    msgs = chat(PROMPTS[2])
    ref = engine.generate(messages=msgs, max_new_tokens=10, temperature=0.0, ignore_eos=True)
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == len(engine.encode(messages=msgs))
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_plain_stream_and_token_ids(client, engine):
    ref = engine.generate(PROMPTS[3], max_new_tokens=8, temperature=0.0, ignore_eos=True)
    r = client.completions.create(model="tiny-chat", prompt=PROMPTS[3], max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(engine.encode(PROMPTS[3])), 8)
    chunks = list(client.completions.create(model="tiny-chat", prompt=PROMPTS[3], max_tokens=8, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"
    ids = engine.encode(PROMPTS[3])
    r = client.completions.create(model="tiny-chat", prompt=ids, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == ref.text and r.usage.prompt_tokens == len(ids)
    # completions default to 16 tokens, like OpenAI's
    r = client.completions.create(model="tiny-chat", prompt=PROMPTS[3], temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="tiny-chat", prompt=PROMPTS[0], max_tokens=12, temperature=1.0, seed=7,
              extra_body={"ignore_eos": True})
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def _stream_chat(client, prompt: str) -> str:
    stream = client.chat.completions.create(model="tiny-chat", messages=chat(prompt), max_tokens=6,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_twenty_concurrent_streams_are_independent(server, client, engine):
    refs = {p: engine.generate(messages=chat(p), max_new_tokens=6, temperature=0.0, ignore_eos=True).text
            for p in PROMPTS}
    assert len(set(refs.values())) > 1  # the prompts give different outputs, so a mix-up would show
    before = metrics(server)
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        outs = list(pool.map(lambda p: _stream_chat(client, p), jobs))
    assert outs == [refs[p] for p in jobs]
    after = metrics(server)
    key = 'moe_offload_requests_total{endpoint="/v1/chat/completions",status="200"}'
    assert after[key] - before.get(key, 0) == 20
    assert after["moe_offload_generation_tokens_total"] - before["moe_offload_generation_tokens_total"] == 120
    assert after["moe_offload_queue_depth"] == 0 and after["moe_offload_requests_in_flight"] == 0


def test_disconnect_frees_the_engine(server, client):
    before = metrics(server)
    body = {"model": "tiny-chat", "prompt": PROMPTS[0], "max_tokens": 1500, "temperature": 0, "stream": True,
            "ignore_eos": True}
    got = None
    with httpx.stream("POST", server + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                got = line
                # the event loop answers while the engine generates
                busy = metrics(server)
                assert busy["moe_offload_engine_busy"] == 1 and busy["moe_offload_requests_in_flight"] == 1
                break  # leaving the block closes the connection after the first token
    assert got is not None
    # the next request is served; by then the worker has finished (cancelled) the abandoned one
    r = client.completions.create(model="tiny-chat", prompt=PROMPTS[1], max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5
    after = metrics(server)
    assert after["moe_offload_requests_cancelled_total"] - before["moe_offload_requests_cancelled_total"] == 1
    abandoned = (after["moe_offload_generation_tokens_total"] - before["moe_offload_generation_tokens_total"]
                 - 5)
    assert 1 <= abandoned < 1500
    assert httpx.get(server + "/health").status_code == 200


BAD = [
    # (path, raw body or JSON, status, param)
    ("/v1/chat/completions", b'{"model": "tiny-chat", "messages": [', 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"model": "tiny-chat"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny-chat", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny-chat", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400,
     "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400,
     "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400,
     "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, 400, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400,
     "logprobs"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("/v1/completions", {"model": "tiny-chat"}, 400, "prompt"),
    ("/v1/completions", {"prompt": {"text": "hi"}}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5] * (CONTEXT + 10)}, 400, "prompt"),  # prompt too long
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),  # id outside the vocabulary
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/nope", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server + path, headers={**AUTH, "Content-Type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    assert httpx.get(server + "/health").status_code == 200


def test_context_errors_give_the_numbers(server, engine):
    r = httpx.post(server + "/v1/completions", headers=AUTH, json={"prompt": "hi", "max_tokens": 5000})
    n = len(engine.encode("hi"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    msg = r.json()["error"]["message"]
    assert str(CONTEXT) in msg and f"{n + 5000} tokens ({n} in the prompt, 5000 in the completion)" in msg
    r = httpx.post(server + "/v1/chat/completions", headers=AUTH,
                   json={"messages": [{"role": "user", "content": "word " * CONTEXT}]})
    assert r.status_code == 400 and str(CONTEXT) in r.json()["error"]["message"]


def test_bad_requests_are_counted(server):
    before = metrics(server)
    httpx.post(server + "/v1/completions", headers=AUTH, json={"prompt": 3})
    after = metrics(server)
    key = 'moe_offload_requests_total{endpoint="/v1/completions",status="400"}'
    assert after[key] - before.get(key, 0) == 1
    for name in ("prompt_tokens_total", "generation_tokens_total", "decode_tokens_per_second", "queue_depth",
                 "requests_in_flight", "requests_cancelled_total"):
        assert f"moe_offload_{name}" in after


def test_api_key_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                             ("GET", "/v1/models"), ("GET", "/metrics")):
            r = httpx.request(method, server + path, headers=headers, json={"prompt": "hi", "messages": []})
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(server + "/health").status_code == 200  # health stays open


def test_no_key_means_open_in_process(engine):
    from fastapi.testclient import TestClient

    from moe_offload.server import create_app

    with TestClient(create_app(engine, model_name="local"), base_url="http://localhost") as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["local"]
        r = c.post("/v1/completions", json={"model": "local", "prompt": "hi", "max_tokens": 3, "temperature": 0,
                                            "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert r.json()["choices"][0]["text"] == engine.generate("hi", max_new_tokens=3, temperature=0.0,
                                                                 ignore_eos=True).text


def test_expert_store_stats_reach_metrics(folder, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from moe_offload.server import create_app

    monkeypatch.setenv("MOE_OFFLOAD_CACHE", str(tmp_path))
    offloaded = load(folder, memory="1MiB")  # experts served from the store through the cache
    with TestClient(create_app(offloaded, model_name="tiny-chat"), base_url="http://localhost") as c:
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200
        m = {}
        for line in c.get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                m[name] = float(value)
    hits, misses = m["moe_offload_expert_hits_total"], m["moe_offload_expert_misses_total"]
    assert misses > 0 and m["moe_offload_bytes_read_disk_total"] > 0  # a cold cache reads from disk
    assert m["moe_offload_expert_hit_rate"] == pytest.approx(hits / (hits + misses))


def test_non_streaming_client_that_leaves_is_cancelled(server, client):
    before = metrics(server)
    body = {"prompt": PROMPTS[2], "max_tokens": CONTEXT - 16, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):  # the client gives up and closes the connection
        httpx.post(server + "/v1/completions", json=body, headers=AUTH, timeout=0.3)
    r = client.completions.create(model="tiny-chat", prompt=PROMPTS[1], max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5
    after = metrics(server)
    assert after["moe_offload_requests_cancelled_total"] - before["moe_offload_requests_cancelled_total"] == 1
    abandoned = after["moe_offload_generation_tokens_total"] - before["moe_offload_generation_tokens_total"] - 5
    assert abandoned < CONTEXT - 16
