"""The server's worker batches requests (continuous batching): a request joins the running batch at the next
step, up to --parallel, each answer equal to the request run alone."""

from __future__ import annotations

import asyncio

import pytest

from moe_offload import load
from moe_offload.server import Job, Metrics, Worker
from tests import tiny

REQUESTS = [dict(prompt_ids=[5, 9, 14, 3], max_new_tokens=40, ignore_eos=True, temperature=0.0),
            dict(prompt_ids=[7, 8, 30, 31, 32, 33, 40], max_new_tokens=6, ignore_eos=True, temperature=0.0),
            dict(prompt_ids=[11, 12], max_new_tokens=9, ignore_eos=True, temperature=0.0)]


def serve(engine, parallel: int, requests: list[dict], cancel_after: int | None = None):
    """Submit every request at once to a Worker; -> (token lists, finish reasons, batch size at each step)."""
    sizes, make = [], engine.batch

    def batch(chunk=None):  # the worker's batch, its size recorded before each step
        b = make(chunk)
        step = b.step
        b.step = lambda: (sizes.append(len(b.seqs)), step())[1]
        return b

    engine.batch = batch
    metrics = Metrics()
    worker = Worker(engine, metrics, parallel)

    async def run():
        jobs = [Job(dict(r), asyncio.get_running_loop()) for r in requests]
        for job in jobs:
            worker.submit(job)

        async def collect(i, job):
            got = []
            async for r in job.events():
                got.append(r)
                if i == 0 and len(got) == cancel_after:  # the client leaves
                    job.cancel.set()
            return got

        return await asyncio.gather(*(collect(i, j) for i, j in enumerate(jobs)))

    try:
        out = asyncio.run(run())
    finally:
        worker.close()
        worker.thread.join(10)
        del engine.batch
    tokens = [[r.token for r in rs if r.token is not None] for rs in out]
    return tokens, [rs[-1].finish_reason if rs else None for rs in out], sizes, metrics


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return load(tiny.make_checkpoint(tmp_path_factory.mktemp("srv") / "m", "mixtral_gqa"), dtype="float32")


def test_requests_join_the_running_batch_and_get_their_solo_answers(engine):
    solo = [engine.generate(**r).token_ids for r in REQUESTS]
    tokens, finish, sizes, metrics = serve(engine, 3, REQUESTS)
    assert tokens == solo and finish == ["length"] * 3
    assert max(sizes) == 3  # the later requests joined the first one's batch
    assert metrics.generation_tokens == 40 + 6 + 9
    assert engine.kv_bytes == 0


def test_parallel_caps_the_batch_and_queues_the_rest(engine):
    solo = [engine.generate(**r).token_ids for r in REQUESTS]
    tokens, _, sizes, _ = serve(engine, 2, REQUESTS)
    assert tokens == solo and max(sizes) == 2
    tokens, _, sizes, _ = serve(engine, 1, REQUESTS)
    assert tokens == solo and max(sizes) == 1  # --parallel 1: batch 1, one after another


def test_a_cancelled_request_leaves_and_the_others_go_on(engine):
    solo = [engine.generate(**r).token_ids for r in REQUESTS]
    tokens, finish, _, metrics = serve(engine, 3, REQUESTS, cancel_after=3)
    assert tokens[1:] == solo[1:] and finish == ["cancelled", "length", "length"]
    assert 3 <= len(tokens[0]) < 40 and tokens[0] == solo[0][:len(tokens[0])] and metrics.cancelled == 1


def test_serve_refuses_a_bad_parallel(capsys):
    from moe_offload.cli import main

    assert main(["serve", "--parallel", "0"]) == 2
    assert "--parallel must be 1..256" in capsys.readouterr().err
