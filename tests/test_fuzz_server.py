"""A property fuzz over the request schema of both generate endpoints (issue 14): random types, NaN and
infinities, huge and negative numbers, lone surrogates, deep nesting and raw bytes. Every answer must be 2xx
(with no in-band error) or a JSON 4xx, and /health must answer within a second after each. 150 examples,
derandomized, so a failure reproduces."""

from __future__ import annotations

import json

import httpx
import pytest

from moe_offload import server as srv
from tests.test_hostile_server import CONTEXT, HI, JSON, engine, gated, url  # noqa: F401  (fixtures)

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


FUZZ_KEYS = [*srv.FIELDS, *srv.UNSUPPORTED, "stop", "messages", "prompt", "mirostat", "__proto__", ""]
SURROGATES = st.text(st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010), max_size=4)
SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([-1, 0, 1, 2**63, 2**64])
           | st.floats() | st.text(max_size=12) | SURROGATES)
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                    max_size=3), max_leaves=8)
ROLES = st.sampled_from(["user", "system", "assistant", "wizard", ""])
MESSAGES = st.lists(st.fixed_dictionaries({"role": ROLES | VALUES, "content": st.text(max_size=30) | VALUES}),
                    max_size=3)
BASES = {"/v1/chat/completions": {"messages": HI, "max_tokens": 2},
         "/v1/completions": {"prompt": "hi", "max_tokens": 2}}


@st.composite
def requests(draw) -> tuple[str, bytes]:
    path = draw(st.sampled_from(sorted(BASES)))
    kind = draw(st.sampled_from(["fields", "fields", "fields", "messages", "nested", "bytes"]))
    if kind == "nested":  # deep nesting somewhere in a valid request
        n = draw(st.integers(1, 20000))
        return path, b'{"max_tokens": 1, "stop": ' + b"[" * n + b"]" * n + b', "prompt": "a", "messages": []}'
    if kind == "bytes":
        return path, draw(st.binary(max_size=64) | st.sampled_from([b"", b"null", b"[]", b'"x"', b"1e999"]))
    body = dict(BASES[path])
    if kind == "messages":
        body["messages"] = draw(MESSAGES)
    for key in draw(st.lists(st.sampled_from(FUZZ_KEYS), min_size=1, max_size=3)):
        body[key] = draw(VALUES)
    for key in ("max_tokens", "max_completion_tokens"):  # keep generations short: huge and bad values stay
        if type(body.get(key)) is int and 3 <= body[key] < CONTEXT:
            body[key] = 2
    return path, json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


def test_fuzzed_requests_get_2xx_or_json_4xx_and_health_answers(url):  # noqa: F811
    seen, client = [], httpx.Client(base_url=url, timeout=30)

    @hypothesis.settings(max_examples=150, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(requests())
    def probe(req):
        path, raw = req
        r = client.post(path, content=raw, headers=JSON)
        seen.append(r.status_code)
        if r.status_code < 300:
            assert 'data: {"error"' not in r.text
        else:
            assert 400 <= r.status_code < 500 and r.status_code != 413, r.text
            assert r.json()["error"]["message"]
        assert client.get("/health", timeout=1).json()["status"] == "ok"

    with client:
        probe()
    assert len(seen) == 150 and any(s < 300 for s in seen) and any(s >= 400 for s in seen)
