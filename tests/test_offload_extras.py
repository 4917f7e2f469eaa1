"""Issue 8's runtime parts: CPU compute of missed experts (the CPU-only bypass and the cost-model decision),
2-bit stand-ins for low-weight misses, `--auto` from the planner, NUMA placement wiring."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import shutil
import subprocess
import sys

import pytest
import torch

from moe_offload import numa
from moe_offload.cli import main as cli_main
from moe_offload.codecs import make_codec
from moe_offload.costmodel import crossover_tokens, miss_cost
from moe_offload.errors import MoeError, UsageError
from moe_offload.plan import model_sizes, plan_for
from moe_offload.runtime.load import load
from moe_offload.sim import PROFILES, HardwareProfile
from moe_offload.store import lowbit, misses
from moe_offload.store.format import convert, open_store
from tests import tiny
from tests.conftest import CHILD_ENV

PROMPT = [1, 5, 9, 20, 33, 7, 8, 9, 40, 11, 3, 60]  # 12 tokens: prefill routes several tokens to most experts
NEW = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("extras")
    hf = tiny.make_checkpoint(root / "hf", "mixtral_gqa")  # float32, 2 MoE layers x 4 experts, top-2
    return convert(hf, root / "store").path


@pytest.fixture(scope="module")
def reference(store):
    """Tokens with every expert cached (the exact path)."""
    return greedy(load(store, dtype="float32"))[0]


def greedy(engine, prompt=PROMPT, n=NEW):
    r = engine.generate(prompt_ids=prompt, max_new_tokens=n, ignore_eos=True)
    return r.token_ids, r.stats


class Routing:
    """Every (layer, expert, tokens routed to it, its largest routing weight) in call order, from the routing
    functions themselves (independent of the cache)."""

    def __init__(self, engine):
        self.uses: list[tuple[int, int, int, float]] = []
        for layer, moe in engine.model.moe_blocks():
            moe.route = self._wrap(layer, moe.route)

    def _wrap(self, layer, route):
        def recorded(logits):
            idx, w = route(logits)
            for e in torch.unique(idx).tolist():
                mask = idx == e
                self.uses.append((layer, e, int(mask.sum()), float(w[mask].max())))
            return idx, w
        return recorded


def span(store) -> int:
    spans = {e.span for e in open_store(store).entries.values()}
    assert len(spans) == 1
    return spans.pop()


# ---- CPU compute of misses -------------------------------------------------------------------------------

def test_cpu_misses_on_is_a_cache_bypass_on_cpu_and_changes_no_token(store, reference):
    engine = load(store, dtype="float32", cpu_misses="on")
    routing = Routing(engine)
    tokens, stats = greedy(engine)
    assert tokens == reference
    uses = len(routing.uses)
    # no link on a CPU-only machine: every miss is computed from its freshly read blob and never cached
    assert stats["cpu_computed_experts"] == stats["expert_misses"] == uses > 0
    assert stats["expert_hits"] == 0 and not engine.expert_cache.resident
    assert stats["bytes_read_disk"] == uses * span(store) and stats["bytes_to_device"] == 0
    assert stats["cpu_compute_seconds"] > 0 and stats["cpu_misses"] == "on"
    # under the smallest budget too: the bypass reserves its read buffer while it runs
    memory = engine.info["backbone_bytes"] + 2 * span(store)
    small = load(store, dtype="float32", memory=memory, cpu_misses="on")
    tokens, stats = greedy(small)
    assert tokens == reference and stats["resident_weight_bytes"] <= memory


def test_cpu_misses_auto_is_a_no_op_on_cpu(store, reference):
    engine = load(store, dtype="float32", cpu_misses="auto")
    tokens, stats = greedy(engine)
    assert tokens == reference
    assert stats["cpu_computed_experts"] == 0 and stats["expert_misses"] > 0
    assert "cpu_miss_crossover_tokens" not in engine.info


FIXED = misses.Figures(link_bw=0.5e9, cpu_bw=1e9, cpu_flops=0.4e9, device_bw=1e12, device_flops=1e15,
                       source="test")


def test_cost_model_sends_one_token_to_the_cpu_and_a_batch_to_the_device(store, reference, monkeypatch):
    monkeypatch.setattr(misses, "measure_figures", lambda st, dev, dt, costs: dict.fromkeys(costs, FIXED))
    sh = open_store(store).expert_shape
    params, nbytes = 3 * sh.hidden * sh.intermediate, 3 * sh.hidden * sh.intermediate * 4  # float32 experts
    kw = FIXED.kw()
    assert miss_cost(params, nbytes, 1, **kw).where == "cpu"
    cross = crossover_tokens(params, nbytes, **kw)
    assert cross == 2  # 1 token: CPU 46 us vs link 74 us; 2 tokens: CPU 92 us

    engine = load(store, dtype="float32", cpu_misses="on")
    router = engine.expert_cache.router
    assert router.decide((0, 0), 1) == "cpu" and router.decide((0, 0), 64) == "device"
    assert set(engine.info["cpu_miss_crossover_tokens"].values()) == {2}
    routing = Routing(engine)
    tokens, stats = greedy(engine)
    assert tokens == reference
    # replay the decisions: a miss with < 2 tokens is computed on the CPU (not cached), else loaded and cached
    cached, cpu, loads = set(), 0, 0
    for layer, e, n, _ in routing.uses:
        if (layer, e) in cached:
            continue
        if n < cross:
            cpu += 1
        else:
            loads += 1
            cached.add((layer, e))
    assert cpu > 0 and loads > 0  # decode sends single tokens to the CPU, prefill batches to the device
    assert stats["cpu_computed_experts"] == cpu
    assert stats["expert_misses"] == cpu + loads
    assert stats["expert_hits"] == len(routing.uses) - cpu - loads
    assert stats["bytes_to_device"] == loads * span(store)
    assert stats["bytes_read_disk"] == (cpu + loads) * span(store)
    assert set(engine.expert_cache.resident) == cached


def test_bad_offload_options_are_refused(store):
    with pytest.raises(UsageError, match="--cpu-misses"):
        load(store, cpu_misses="sometimes")
    with pytest.raises(UsageError, match="needs --miss-fallback lowbit"):
        load(store, fallback_threshold=0.5)
    with pytest.raises(UsageError, match="0..1"):
        load(store, miss_fallback="lowbit", fallback_threshold=1.5)


# ---- 2-bit stand-ins ---------------------------------------------------------------------------------------

def test_lowbit_threshold_one_replaces_every_stalling_miss(store):
    engine = load(store, dtype="float32", miss_fallback="lowbit", fallback_threshold=1.0)
    routing = Routing(engine)
    _, stats = greedy(engine)
    cached, fallbacks, loads = set(), 0, 0
    for layer, e, _, w in routing.uses:  # a miss whose weights are all < 1.0 uses the stand-in, never loads
        if (layer, e) in cached:
            continue
        if w < 1.0:
            fallbacks += 1
        else:
            loads += 1
            cached.add((layer, e))
    assert fallbacks > 0
    assert stats["lowbit_fallbacks"] == fallbacks
    assert stats["expert_misses"] == fallbacks + loads
    assert stats["bytes_read_disk"] == loads * span(store)
    # the stand-ins are resident all run and counted in the weights on the device
    assert engine.info["lowbit_bytes"] > 0
    assert stats["resident_weight_bytes"] >= engine.info["backbone_bytes"] + engine.info["lowbit_bytes"]


def test_lowbit_threshold_zero_is_the_exact_path(store, reference):
    engine = load(store, dtype="float32", miss_fallback="lowbit", fallback_threshold=0.0)
    tokens, stats = greedy(engine)
    assert tokens == reference
    assert stats["lowbit_fallbacks"] == 0 and stats["expert_misses"] > 0


def test_lowbit_stand_ins_are_2bit_copies_saved_once_and_counted_in_the_budget(store, tmp_path):
    own = tmp_path / "store"
    shutil.copytree(store, own)
    for name in (lowbit.BIN, lowbit.INDEX):
        (own / name).unlink(missing_ok=True)
    st = open_store(own)
    logs = []
    first = lowbit.stand_ins(st, torch.device("cpu"), torch.float32, log=logs.append)
    assert first.source.startswith("built at open, saved") and (own / lowbit.BIN).is_file() and len(logs) == 1
    again = lowbit.stand_ins(st, torch.device("cpu"), torch.float32, log=logs.append)
    assert again.source.startswith("read from") and len(logs) == 1 and again.nbytes == first.nbytes
    # the unit computes with the 2-bit codec's own dequantised weights, and those differ from the expert's
    key = (st.moe_layers[0], 1)
    blob = lowbit.read(st)[0][key]
    gu, dn = make_codec(lowbit.SPEC).dequantize(blob, st.expert_shape)
    x = torch.randn(5, st.expert_shape.hidden, generator=torch.Generator().manual_seed(0))
    g, u = (x @ gu.t()).chunk(2, dim=-1)
    want = (torch.nn.functional.silu(g) * u) @ dn.t()
    got = again.units[key](x)
    assert float((got - want).norm() / want.norm()) < 0.02  # the CPU int4 kernel computes in bf16
    e = st.entries[key]
    gate, up, _ = lowbit.full_weights(make_codec(e.codec), _blob(own, e), st.expert_shape)
    err = float((gu - torch.cat([gate, up])).norm() / torch.cat([gate, up]).norm())
    assert 0.05 < err < 0.6  # really 2-bit: visibly lossy, not garbage
    # a changed byte in the saved file is caught: the copies are rebuilt
    data = bytearray((own / lowbit.BIN).read_bytes())
    data[10] ^= 0xFF
    (own / lowbit.BIN).write_bytes(bytes(data))
    assert lowbit.read(st) is None
    # counted in --memory: the minimum grows by the stand-ins' bytes
    plain = load(own, dtype="float32")
    need = plain.info["backbone_bytes"] + 2 * span(own)
    load(own, dtype="float32", memory=need)
    with pytest.raises(MoeError, match="2-bit stand-ins"):
        load(own, dtype="float32", memory=need, miss_fallback="lowbit")


def _blob(root, e) -> torch.Tensor:
    with open(root / "experts.bin", "rb") as f:
        f.seek(e.offset)
        return torch.frombuffer(bytearray(f.read(e.nbytes)), dtype=torch.uint8)


# ---- --auto ------------------------------------------------------------------------------------------------

def cli(*args: str):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_auto_runs_a_tiny_store_with_one_stderr_line(store, reference):
    ids = ",".join(map(str, PROMPT))
    r = subprocess.run([sys.executable, "-m", "moe_offload.cli", "generate", "--model", str(store), "--auto",
                        "--hardware", "laptop-16gb-cpu", "--dtype", "float32", "--prompt-ids", ids,
                        "--max-new-tokens", str(NEW), "--ignore-eos", "--json"],
                       capture_output=True, text=True, env=CHILD_ENV, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-offload: --auto on laptop-16gb-cpu:"), r.stderr
    assert "all 8 experts" in lines[0] and "--prefetch none" in lines[0] and "--cpu-misses off" in lines[0]
    out = json.loads(r.stdout)
    assert out["token_ids"] == reference and out["stats"]["cache_policy"] == "lru"


def test_auto_carries_a_partial_plan_over_in_the_stores_bytes(store, reference, monkeypatch):
    """A machine where 5 of the 8 experts fit at 16-bit (all 8 at 8-bit): the plan wants 8-bit, the store is
    dense, so a hint names the quantize command and the 16-bit plan runs with 5 experts' worth of cache."""
    sizes = model_sizes(open_store(store).config)
    kv = sizes.kv_bytes_per_token * 4096
    fit = sizes.backbone_bytes(16) + kv + 5 * sizes.expert_bytes(16) + 100
    box = HardwareProfile(name="tiny-box", description="test", device="cpu", device_bytes=fit, host_bytes=0,
                          link_bw=0.0, host_bw=1e10, disk_bw=1e9, device_bw=1e10, cpu_bw=1e10, cpu_flops=1e10,
                          device_flops=1e10, link_latency_s=0.0)
    monkeypatch.setitem(PROFILES, "tiny-box", box)
    ids = ",".join(map(str, PROMPT))
    code, out, err = cli("generate", "--model", str(store), "--auto", "--hardware", "tiny-box", "--dtype",
                         "float32", "--cache-policy", "lfu", "--prompt-ids", ids,
                         "--max-new-tokens", str(NEW), "--ignore-eos", "--json")
    assert code == 0, err
    hint, line = err.strip().splitlines()
    assert "moe-offload quantize" in hint and "--expert-bits 8" in hint
    assert "5 of 8 experts" in line and "--prefetch auto" in line and "--cache-policy lfu (yours)" in line
    got = json.loads(out)
    assert got["token_ids"] == reference  # offloading stays exact
    stats = got["stats"]
    assert stats["cache_policy"] == "lfu" and stats["evictions"] > 0
    backbone = load(store, dtype="float32").info["backbone_bytes"]
    assert stats["cache_capacity_bytes"] == 5 * span(store)  # the plan's 5 experts, at the store's bytes
    assert stats["resident_weight_bytes"] <= backbone + 5 * span(store)


def test_auto_plans_again_at_the_stores_backbone_when_the_plan_wants_it_quantized(store, monkeypatch):
    """A machine where every 16-bit expert fits beside a 4-bit backbone but not beside a 16-bit one: the plan
    holds the backbone at 4 bits (quantize first); the store's backbone is 16-bit, so a hint names the quantize
    flags and the budget is planned again with the store's 16-bit backbone (5 experts, not all 8)."""
    from moe_offload.autoconf import plan_options, store_backbone_bits

    sizes = model_sizes(open_store(store).config)
    kv = sizes.kv_bytes_per_token * 4096
    assert store_backbone_bits(open_store(store)) == 16
    fit = sizes.backbone_bytes(4) + kv + 8 * sizes.expert_bytes(16) + 100
    assert fit < sizes.backbone_bytes(16) + kv + 8 * sizes.expert_bytes(16)
    box = HardwareProfile(name="tiny-box", description="test", device="cpu", device_bytes=fit, host_bytes=0,
                          link_bw=0.0, host_bw=1e10, disk_bw=1e9, device_bw=1e10, cpu_bw=1e10, cpu_flops=1e10,
                          device_flops=1e10, link_latency_s=0.0)
    monkeypatch.setitem(PROFILES, "tiny-box", box)
    want = plan_for(store, box)
    assert (want["expert_bits"], want["backbone_bits"]) == (16, 4)
    a = argparse.Namespace(model=str(store), device="cpu", dtype="float32", memory=None, host_memory=None,
                           cache_policy=None, prefetch=None, prefetch_depth=None, prefetch_experts=None,
                           cpu_misses=None, miss_fallback=None, fallback_threshold=None, verify_reads=None,
                           hardware="tiny-box", auto=True)
    said = []
    v = plan_options(a, log=said.append)
    hint, line = said
    assert "--attn-bits 4 --head-bits 4" in hint and "backbone 16-bit" in line
    n = (fit - sizes.backbone_bytes(16) - kv) // sizes.expert_bytes(16)
    assert 0 < n < 8 and f"{n} of 8 experts" in line
    assert v["memory"] <= load(store, dtype="float32").info["backbone_bytes"] + n * span(store) + (1 << 20)


def test_auto_returns_a_config_and_leaves_the_flags_alone(store):
    """--auto used to fill the argparse namespace in place; the planner now returns an OffloadConfig, the
    user's own choices kept, and the namespace is read only."""
    from moe_offload.autoconf import auto_config
    from moe_offload.runtime.load import OffloadConfig

    a = argparse.Namespace(model=str(store), device="cpu", dtype="float32", memory="auto", host_memory=None,
                           cache_policy="lfu", prefetch=None, prefetch_depth=None, prefetch_experts=None,
                           cpu_misses=None, miss_fallback=None, fallback_threshold=None, verify_reads=None,
                           hardware="laptop-16gb-cpu", auto=True)
    before, said = dict(vars(a)), []
    config = auto_config(a, log=said.append)
    assert vars(a) == before
    assert isinstance(config, OffloadConfig) and isinstance(config.memory, int)
    assert config.cache_policy == "lfu" and config.prefetch == "none" and config.cpu_misses == "off"
    assert len(said) == 1 and "--cache-policy lfu (yours)" in said[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.memory = 1


def test_impossible_auto_plan_is_refused_in_one_line(tmp_path):
    big = dict(tiny.COMMON, model_type="mixtral", hidden_size=16384, num_hidden_layers=24,
               num_attention_heads=128, num_key_value_heads=128, intermediate_size=1024, num_local_experts=8,
               num_experts_per_tok=2, vocab_size=32000)  # ~26 B dense params: not even 4-bit fits 11 GiB
    (tmp_path / "config.json").write_text(json.dumps(big))
    r = subprocess.run([sys.executable, "-m", "moe_offload.cli", "generate", "--model", str(tmp_path),
                        "--auto", "--hardware", "rtx3060-12gb", "--prompt-ids", "1,2"],
                       capture_output=True, text=True, env=CHILD_ENV, timeout=120, check=False)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cannot run here" in lines[0], r.stderr


# ---- NUMA --------------------------------------------------------------------------------------------------

def test_numa_single_node_is_a_no_op_reported_in_stats(store, monkeypatch):
    monkeypatch.setattr(numa, "detect", lambda root="/": [numa.Node(0, (0, 1), 1 << 34, 1 << 33)])
    _, stats = greedy(load(store, dtype="float32"), n=2)
    assert stats["numa_nodes"] == 1 and "numa_local_experts" not in stats


def test_numa_places_the_hottest_experts_on_the_local_node(store, tmp_path):
    st = dataclasses.replace(open_store(store), path=tmp_path)
    freq = {str(la): {"frequency": [0.1 * (e + 1) + la for e in range(st.n_experts)]} for la in st.moe_layers}
    (tmp_path / "routing_stats.json").write_text(json.dumps({"layers": freq}))
    nodes = [numa.Node(0, (0,), 1 << 34, 1 << 33), numa.Node(1, (1,), 1 << 34, 1 << 33)]
    info, placement = misses.plan_numa(st, 3 * span(store), torch.device("cpu"), nodes)
    assert info["numa_nodes"] == 2 and info["numa_local_experts"] == 3
    local = [k for k, n in placement.node_of.items() if n == placement.local]
    hottest = sorted(st.entries, key=lambda k: -freq[str(k[0])]["frequency"][k[1]])[:3]
    assert sorted(local) == sorted(hottest)
    assert misses.plan_numa(st, None, torch.device("cpu"), nodes)[1] is None  # no host tier: nothing to place


def test_preload_reads_every_expert_at_load_when_the_budget_holds_them_and_their_context(store, reference):
    """--preload auto (the command line's default): a budget that holds every expert and a full context's KV
    cache reads them all at load, as llama.cpp reads its file, so the first generation does not miss; a budget
    that does not, or --preload off (the library's default), loads on first use; on: always, evicting what
    does not fit. The tokens are the same every way."""
    full = load(store, dtype="float32", memory="100%", ctx_size=64)  # weights + this context's KV cache
    assert full.info["preloaded_experts"] == 0  # the library's default: off
    toks, st = greedy(full)
    assert toks == reference and st["expert_misses"] > 0
    auto = load(store, dtype="float32", memory="100%", ctx_size=64, preload="auto")
    n = auto.info["preloaded_experts"]
    assert n == len(open_store(store).entries)
    toks, st = greedy(auto)
    assert toks == reference and st["expert_misses"] == 0 and st["bytes_read_disk"] == 0
    assert st["resident_bytes"] <= auto.info["memory"]
    tight = load(store, dtype="float32", memory="60%", ctx_size=64, preload="auto")
    assert tight.info["preloaded_experts"] == 0
    on = load(store, dtype="float32", memory="60%", ctx_size=64, preload="on")
    assert on.info["preloaded_experts"] == n
    toks, st = greedy(on)
    assert toks == reference and st["resident_bytes"] <= on.info["memory"]
    with pytest.raises(UsageError, match="--preload"):
        load(store, dtype="float32", memory="60%", preload="sometimes")
