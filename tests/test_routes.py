"""The one routing recorder (routes.RouteLog) and the route-hook protocol shared with the cache's hooks."""

from __future__ import annotations

import torch

import moe_offload
from moe_offload.routes import RouteLog, attach, hooked
from moe_offload.store.format import convert
from tests.tiny import make_checkpoint

SPEC = ("mixtral", dict(num_hidden_layers=3, num_key_value_heads=2, intermediate_size=32, num_local_experts=4,
                        num_experts_per_tok=2))


class Seen:
    """A route hook that keeps what it was told, cache included."""

    def __init__(self):
        self.calls = []

    def on_route(self, layer, hidden, top_k_index, top_k_weights, cache):
        self.calls.append((layer, top_k_index.clone(), top_k_weights.clone(), cache))


def test_route_log_records_what_the_layers_dispatch_and_restores_the_backends(tmp_path):
    hf = make_checkpoint(tmp_path / "hf", SPEC)
    convert(hf, tmp_path / "store")
    for path in (hf, tmp_path / "store"):  # resident and offloaded
        engine = moe_offload.load(path, dtype="float32")
        before = [moe.experts for _, moe in engine.model.moe_blocks()]
        log, seen, decode = RouteLog(hidden=True), Seen(), RouteLog(decode_only=True)
        with hooked(engine.model, log, seen, decode):
            engine.generate(prompt_ids=[5, 9, 17, 33], max_new_tokens=3, ignore_eos=True)
        assert [moe.experts for _, moe in engine.model.moe_blocks()] == before
        layers = [la for la, _ in engine.model.moe_blocks()]
        # prefill (4 rows) then 2 decode steps (1 row each; the 3rd token comes from the last step's logits)
        assert [la for la, _, _ in log.calls] == layers * 3
        assert [idx.shape[0] for _, idx, _ in log.calls] == [4] * len(layers) + [1] * 2 * len(layers)
        assert all(h.dtype == torch.float32 and h.shape[0] == idx.shape[0] for _, idx, h in log.calls)
        assert [(la, idx.tolist()) for la, idx, _ in decode.calls] == [
            (la, idx.tolist()) for la, idx, _ in log.calls if idx.shape[0] == 1]
        assert all(h is None for _, _, h in decode.calls)
        assert all(torch.equal(a[1], b[1].to(a[1].device)) for a, b in zip(seen.calls, log.calls))
        cache = getattr(engine, "expert_cache", None)
        assert all(c is cache for *_, c in seen.calls)  # the cache of an offloaded model; None when resident
    attach(engine.model, decode)  # for good: a recorder that stays (bench)
    engine.generate(prompt_ids=[5, 9], max_new_tokens=2, ignore_eos=True)
    assert len(decode.calls) == 2 * len(layers) + len(layers)
