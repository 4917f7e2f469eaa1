"""The expert store and offloaded execution: exact tokens under any budget and policy, budgets that hold,
every fetch accounted, corrupt stores refused clearly, nothing left in the page cache."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from moe_offload.cli import main as cli_main
from moe_offload.errors import MoeError, UsageError
from moe_offload.experts import DenseCodec
from moe_offload.runtime.load import load
from moe_offload.store import format as fmt
from moe_offload.store import tiers
from moe_offload.store.format import convert, open_store
from moe_offload.store.loader import DEMAND, PREFETCH, Loader
from moe_offload.store.open import mib
from moe_offload.store.policies import POLICIES
from moe_offload.store.tiers import BufferPool, DiskTier, HostTier
from tests import tiny
from tests.conftest import CHILD_ENV

PROMPT = [1, 5, 9, 20, 33, 7, 8, 9, 40, 11, 3, 60]  # 12 tokens: prefill needs most experts of each layer
NEW = 10


def cli(*args: str):
    """The CLI entry point in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(args))
    return code, out.getvalue(), err.getvalue()


def greedy(engine, prompt=PROMPT, n=NEW):
    r = engine.generate(prompt_ids=prompt, max_new_tokens=n, ignore_eos=True)
    return r.token_ids, r.stats


class RoutingCounter:
    """Counts, independently of the cache, the distinct experts each MoE layer needs per forward call
    (one fetch each), by wrapping the routing functions."""

    def __init__(self, engine):
        self.uses = 0
        self.used: set[tuple[int, int]] = set()
        for layer, moe in engine.model.moe_blocks():
            moe.route = self._wrap(layer, moe.route)

    def _wrap(self, layer, route):
        def counted(logits):
            idx, w = route(logits)
            experts = torch.unique(idx).tolist()
            self.uses += len(experts)
            self.used |= {(layer, e) for e in experts}
            return idx, w
        return counted


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """spec -> (HF folder, store folder), converted once."""
    out = {}
    for spec in ("mixtral_gqa", "qwen2_moe_shared_dense"):
        root = tmp_path_factory.mktemp(f"store-{spec}")
        hf = tiny.make_checkpoint(root / "hf", spec)
        out[spec] = hf, convert(hf, root / "store").path
    return out


def budget(engine_info: dict, store: Path, frac: float) -> int:
    """--memory for `frac` of all experts' bytes, never below the working minimum."""
    s = open_store(store)
    spans = sorted(e.span for e in s.entries.values())
    return engine_info["backbone_bytes"] + max(int(frac * sum(spans)), s.top_k * spans[-1])


# ---- exactness and accounting ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["mixtral_gqa", "qwen2_moe_shared_dense"])
def test_offloaded_tokens_equal_resident_for_every_budget_and_policy(stores, spec):
    hf, store = stores[spec]
    want, _ = greedy(load(hf, dtype="float32"))  # all experts resident, from the HF folder
    full = load(store)
    assert greedy(full)[0] == want
    for frac in (1.0, 0.5, 0.25, 0.0):  # 0.0: the minimum, one layer's active experts
        for policy in POLICIES:
            memory = budget(full.info, store, frac)
            engine = load(store, memory=memory, cache_policy=policy)
            counter = RoutingCounter(engine)
            for _ in range(2):  # the second run starts from a warm cache
                before = counter.uses
                tokens, stats = greedy(engine)
                assert tokens == want, (frac, policy)
                assert stats["expert_hits"] + stats["expert_misses"] == counter.uses - before
                assert stats["resident_weight_bytes"] <= memory
                assert stats["cache_policy"] == policy and stats["cache_capacity_bytes"] > 0
            if frac == 0.0:
                assert stats["evictions"] > 0 and stats["expert_misses"] > 0


def test_cold_run_reads_each_used_expert_once_and_warm_run_reads_nothing(stores):
    _, store = stores["mixtral_gqa"]
    engine = load(store)  # memory=None: everything fits
    counter = RoutingCounter(engine)
    tokens, cold = greedy(engine)
    entries = open_store(store).entries
    assert cold["bytes_read_disk"] == sum(entries[k].span for k in counter.used)
    assert cold["bytes_to_device"] == cold["bytes_read_disk"]  # CPU: the read lands in the compute tier
    assert cold["expert_misses"] == len(counter.used) and cold["evictions"] == 0
    again, warm = greedy(engine)
    assert again == tokens
    assert warm["bytes_read_disk"] == 0 and warm["expert_misses"] == 0 and warm["hit_rate"] == 1.0


def test_store_dtype_differs_from_compute_dtype(tmp_path):
    """A bf16 store computed in fp32: decode makes converted copies, and those are the bytes accounted."""
    hf = tiny.make_checkpoint(tmp_path / "hf", "mixtral_gqa")
    store = convert(hf, tmp_path / "bf16", torch.bfloat16)
    assert store.manifest["dtype"] == "bfloat16"
    e = next(iter(store.entries.values()))
    sh = store.expert_shape
    assert e.nbytes == 3 * sh.hidden * sh.intermediate * 2
    full = load(store.path, dtype="float32")
    want, _ = greedy(full)
    memory = budget(full.info, store.path, 0.0) + 3 * sh.hidden * sh.intermediate * 4 * store.top_k
    engine = load(store.path, dtype="float32", memory=memory)
    tokens, stats = greedy(engine)
    assert tokens == want
    assert stats["resident_weight_bytes"] <= memory
    assert set(engine.expert_cache.sizes.values()) == {3 * sh.hidden * sh.intermediate * 4}


def test_experts_of_different_sizes_share_one_byte_budget(tmp_path):
    """Mixed precision: odd experts stored in bf16 (decoded into fp32 copies), even ones in fp32 (used in
    place). The budget counts each expert's real bytes, and tokens match the all-resident run."""
    hf = tiny.make_checkpoint(tmp_path / "hf", "qwen2_moe_shared_dense")
    half, full = DenseCodec(torch.bfloat16), DenseCodec(torch.float32)
    store = convert(hf, tmp_path / "mixed", codec=lambda layer, e: half if e % 2 else full)
    assert {e.codec["dtype"] for e in store.entries.values()} == {"bfloat16", "float32"}
    resident = load(store.path)
    want, _ = greedy(resident)
    sh = store.expert_shape
    fp32_bytes = 3 * sh.hidden * sh.intermediate * 4
    for (_, e), n in resident.expert_cache.sizes.items():  # bf16: the fp32 copy; fp32: the page-rounded read
        assert n == (fp32_bytes if e % 2 else fmt.round_up(fp32_bytes))
    loads = sorted(f.load for f in resident.expert_cache.foot.values())
    assert loads[0] < loads[-1]
    base = resident.info["backbone_bytes"]
    for memory in (base + sum(loads) // 2, base + 2 * loads[-1]):
        for policy in ("lru", "lfu"):
            tokens, stats = greedy(load(store.path, memory=memory, cache_policy=policy))
            assert tokens == want and stats["resident_weight_bytes"] <= memory
    with pytest.raises(MoeError, match="too small"):
        load(store.path, memory=base + 2 * loads[-1] - 1)


def test_hf_folder_with_memory_is_converted_once_into_the_cache(stores, tmp_path, monkeypatch, capsys):
    hf, store = stores["mixtral_gqa"]
    monkeypatch.setenv("MOE_OFFLOAD_CACHE", str(tmp_path / "cache"))
    want, _ = greedy(load(store))
    memory = budget(load(store).info, store, 0.5)
    assert greedy(load(hf, memory=memory))[0] == want
    err = capsys.readouterr().err
    assert err.count("converting") == 1 and str(tmp_path / "cache") in err
    assert greedy(load(hf, memory=memory))[0] == want
    assert "converting" not in capsys.readouterr().err
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_cached_stores_are_announced_keyed_on_content_listed_and_removed(stores, tmp_path, monkeypatch,
                                                                       capsys):
    hf = shutil.copytree(stores["mixtral_gqa"][0], tmp_path / "hf")
    monkeypatch.delenv("MOE_OFFLOAD_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "xdg" / "moe-offload" / "stores"
    load(hf, memory="1GiB")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"into an expert store at {root}" in err and " MiB on disk" in err
    first = list(root.iterdir())
    code, out, _ = cli("stores")
    assert code == 0 and len(first) == 1 and f"{first[0]}  <-  {hf.resolve()}\n" in out
    os.utime(hf / "model.safetensors", ns=(1, 1))  # the source changes: its entry is stale ...
    assert "(stale: source gone or changed)" in cli("stores")[1]
    load(hf, memory="1GiB")  # ... and the next conversion replaces it
    assert "replacing 1 stale copy" in capsys.readouterr().err
    second = list(root.iterdir())
    assert len(second) == 1 and second != first
    foreign = root / "mine"  # not ours: never removed
    foreign.mkdir()
    for path in (hf, foreign, tmp_path):
        code, _, err = cli("stores", "--remove", str(path))
        assert code == 2 and "is not a store in the moe-offload cache" in err and path.exists()
    code, out, _ = cli("stores", "--remove", str(second[0]))
    assert code == 0 and out.startswith(f"removed {second[0]}") and not second[0].exists()
    load(hf, memory="1GiB")
    shutil.rmtree(hf)
    code, out, _ = cli("stores", "--prune")
    assert code == 0 and out.startswith("removed 1 stale cached store(s)")
    assert list(root.iterdir()) == [foreign]


def test_unknown_offload_option_is_refused(stores):
    with pytest.raises(UsageError, match="warp_drive"):
        load(stores["mixtral_gqa"][1], warp_drive="on")


# ---- budgets ----------------------------------------------------------------------------------------------

def test_memory_too_small_gives_the_arithmetic(stores):
    _, store = stores["mixtral_gqa"]
    info = load(store).info
    s = open_store(store)
    span = max(e.span for e in s.entries.values())
    need = info["backbone_bytes"] + s.top_k * span
    code, out, err = cli("generate", "--model", str(store), "--memory", str(need - 1), "--prompt-ids", "1,2")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: --memory ")
    assert f"backbone {mib(info['backbone_bytes'])} + {s.top_k} active experts × {mib(span)}" in err
    assert f"= {mib(need)} needed at least" in err
    assert greedy(load(store, memory=need))[0] == greedy(load(store))[0]  # the minimum itself works


RSS_MODEL = ("mixtral", dict(num_hidden_layers=4, num_key_value_heads=2, intermediate_size=512,
                             num_local_experts=8, num_experts_per_tok=2))
# Peak RSS above the baseline that is not weights: KV cache, activations, loader threads, allocator slack.
# Measured here: 8-11 MiB at 15, 30 and 60 MiB budgets (torch 2.13 CPU). Keeping all experts would add 48 MiB.
RSS_OVERHEAD = 20 << 20
BASELINE = """
import json, sys, torch
import moe_offload.cli, moe_offload.runtime.load
from moe_offload.models import build
with torch.device("meta"):  # the same model skeleton as generate builds, but no weights
    build(json.load(open(sys.argv[1]))["config"])
from moe_offload.utils import peak_rss_bytes  # VmHWM: ru_maxrss would report our parent's RSS
print(peak_rss_bytes())
"""


def test_generate_subprocess_stays_within_budget_on_a_store_several_times_larger(tmp_path):
    """No cgroup v2 to cap memory here (/sys/fs/cgroup is cgroup v1, read-only), so: peak RSS of
    `moe-offload generate` minus the peak RSS of a process that imports the same code and builds the same
    skeleton on `meta` (no weights) must stay within --memory + RSS_OVERHEAD."""
    hf = tiny.make_checkpoint(tmp_path / "hf", RSS_MODEL, hidden_size=256)  # 48 MiB of experts
    store = convert(hf, tmp_path / "store")
    expert_bytes = sum(e.span for e in store.entries.values())
    backbone = (store.path / fmt.BACKBONE).stat().st_size
    memory = backbone + expert_bytes // 4
    assert expert_bytes >= 3 * memory
    argv = ["generate", "--model", str(store.path), "--memory", str(memory), "--prompt-ids",
            ",".join(map(str, PROMPT)), "--max-new-tokens", "16", "--ignore-eos", "--json"]
    run = subprocess.run([sys.executable, "-m", "moe_offload.cli", *argv], capture_output=True, text=True,
                         env=CHILD_ENV, timeout=120)
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout)["stats"]
    base = subprocess.run([sys.executable, "-c", BASELINE, str(store.path / fmt.MANIFEST)],
                          capture_output=True, text=True, env=CHILD_ENV, timeout=120)
    assert base.returncode == 0, base.stderr
    growth = stats["peak_rss_bytes"] - int(base.stdout)
    assert stats["resident_weight_bytes"] <= memory
    assert stats["expert_misses"] > 0 and stats["evictions"] > 0
    assert stats["bytes_read_disk"] > expert_bytes // 4  # it really streamed
    assert growth <= memory + RSS_OVERHEAD, (growth / 2**20, memory / 2**20)


# ---- refusing damaged stores ----------------------------------------------------------------------------

def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_flipped_byte_names_layer_and_expert(stores, tmp_path):
    _, store = stores["mixtral_gqa"]
    bad = copy_store(store, tmp_path / "bad")
    probe = load(store)
    used = RoutingCounter(probe)
    greedy(probe, n=1)
    layer, expert = sorted(used.used)[-1]  # an expert the prompt needs
    e = open_store(bad).entries[(layer, expert)]
    with open(bad / fmt.EXPERTS, "r+b") as f:
        f.seek(e.offset + e.nbytes // 2)
        b = f.read(1)
        f.seek(e.offset + e.nbytes // 2)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(MoeError, match=rf"layer {layer} expert {expert}\b.*corrupt"):
        greedy(load(bad), n=1)
    with pytest.raises(MoeError, match=rf"checksum mismatch in layer {layer} expert {expert}\b"):
        DiskTier(bad / fmt.EXPERTS).read(e)
    code, out, err = cli("generate", "--model", str(bad), "--memory", "100MiB", "--prompt-ids", "1,5,9,20")
    assert code == 1 and err.count("\n") == 1 and f"layer {layer} expert {expert}" in err


def test_truncated_experts_bin_is_refused(stores, tmp_path):
    bad = copy_store(stores["mixtral_gqa"][1], tmp_path / "bad")
    size = (bad / fmt.EXPERTS).stat().st_size
    os.truncate(bad / fmt.EXPERTS, size - 4096)
    with pytest.raises(MoeError, match=rf"{size - 4096} bytes, the manifest expects {size}.*truncated"):
        open_store(bad)
    code, _, err = cli("generate", "--model", str(bad), "--prompt-ids", "1,2")
    assert code == 1 and err.count("\n") == 1 and "truncated" in err


def test_other_format_version_is_refused(stores, tmp_path):
    bad = copy_store(stores["mixtral_gqa"][1], tmp_path / "bad")
    m = json.loads((bad / fmt.MANIFEST).read_text())
    m["version"] = fmt.FORMAT_VERSION + 1
    (bad / fmt.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(MoeError, match=rf"version {fmt.FORMAT_VERSION + 1} is not supported.*reads version "
                                       rf"{fmt.FORMAT_VERSION}"):
        open_store(bad)
    m["format"] = "something-else"
    (bad / fmt.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(MoeError, match="not a moe-offload-store manifest"):
        open_store(bad)


def test_interrupted_convert_leaves_no_store(stores, tmp_path, monkeypatch):
    hf, _ = stores["qwen2_moe_shared_dense"]
    calls = {"n": 0}
    encode = fmt.DenseCodec.encode

    def failing(self, *a, **kw):  # fail on the 5th expert, after 4 were written
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full (simulated)")
        return encode(self, *a, **kw)

    monkeypatch.setattr(fmt.DenseCodec, "encode", failing)
    with pytest.raises(OSError, match="simulated"):
        convert(hf, tmp_path / "out")
    assert calls["n"] == 5
    assert list(tmp_path.iterdir()) == []  # neither `out` nor a temporary folder


def test_convert_cli_prints_one_line_and_writes_a_valid_store(stores, tmp_path):
    hf, _ = stores["mixtral_gqa"]
    code, out, err = cli("convert", "--model", str(hf), "--out", str(tmp_path / "s"), "--dtype", "bfloat16")
    assert code == 0 and out.count("\n") == 1 and "converted 8 experts" in out, (out, err)
    s = open_store(tmp_path / "s")
    assert s.manifest["dtype"] == "bfloat16" and all(e.offset % 4096 == 0 for e in s.entries.values())
    assert oct((tmp_path / "s").stat().st_mode & 0o777) != oct(0o700)
    code, _, err = cli("convert", "--model", str(hf), "--out", str(tmp_path / "s"))
    assert code == 2 and "already exists" in err


# ---- page cache -------------------------------------------------------------------------------------------

def resident_pages(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "PAGES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


@pytest.mark.skipif(shutil.which("fincore") is None, reason="fincore (util-linux) is not installed")
@pytest.mark.parametrize("direct", [True, False])
def test_reads_leave_nothing_in_the_page_cache(stores, tmp_path, direct):
    store = copy_store(stores["mixtral_gqa"][1], tmp_path / "s")
    path = store / fmt.EXPERTS
    drop(path)
    with open(path, "rb") as f:  # a buffered read does fill the page cache: the check can see it
        f.read()
    assert resident_pages(path) > 0
    drop(path)
    assert resident_pages(path) == 0
    tier = DiskTier(path)
    if not direct:  # the fallback path: buffered pread + POSIX_FADV_DONTNEED
        os.close(tier.fd)
        tier.fd, tier.direct = os.open(path, os.O_RDONLY), False
    entries = open_store(store).entries.values()
    total = sum(int(tier.read(e)[:e.nbytes].sum()) for e in entries)
    assert total > 0
    assert resident_pages(path) == 0
    engine = load(store, memory=budget(load(store).info, store, 0.25))
    _, stats = greedy(engine)
    assert stats["bytes_read_disk"] > 0
    assert resident_pages(path) == 0
    assert resident_pages(store / fmt.BACKBONE) == 0


# ---- loader and prefetch hook ------------------------------------------------------------------------------

def test_loader_runs_demand_before_prefetch_and_cancels_queued_work():
    loader = Loader(workers=1)
    gate, order = threading.Event(), []
    blocker = loader.submit(gate.wait, DEMAND)  # occupies the only worker
    pre = [loader.submit(lambda i=i: order.append(f"p{i}") or i, PREFETCH + i) for i in range(3)]
    dem = loader.submit(lambda: order.append("d") or "d", DEMAND)
    assert pre[1].cancel() and pre[1].cancelled()
    pre[2].set_priority(DEMAND - 1)  # promoted ahead of the demand load
    gate.set()
    assert dem.result(5) == "d" and pre[0].result(5) == 0 and blocker.result(5)
    assert order == ["p2", "d", "p0"]
    with pytest.raises(RuntimeError, match="cancelled"):
        pre[1].result(1)
    assert not dem.cancel()  # finished work cannot be cancelled
    failing = loader.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(5)
    seen = []
    failing.add_done_callback(seen.append)  # already done: runs now
    assert seen == [failing]
    loader.close()


def test_buffer_pool_reuses_only_buffers_nothing_views_and_trims_to_the_room_left():
    if not BufferPool.usable():
        pytest.skip("this torch has no storage use count")
    pool = BufferPool()
    a = pool.take(8192)
    a_ptr = a.data_ptr()
    unit = a[:4096].view(torch.float32)  # what a decoded expert keeps: a view of its read buffer
    del a
    b = pool.take(8192)
    assert b.data_ptr() != a_ptr  # still viewed: never handed out twice
    assert pool.allocated == 2 and pool.reused == 0
    del unit  # the expert was evicted
    c = pool.take(8192)
    assert c.data_ptr() == a_ptr and pool.reused == 1 and pool.allocated == 2
    d = pool.take(8192)  # b and c are still held
    assert d.data_ptr() not in (a_ptr, b.data_ptr()) and pool.allocated == 3
    del b, c, d
    pool.trim(10**9)
    assert pool.free_bytes == 3 * 8192
    small = pool.take(4096)  # no free buffer of that size: a new mapping
    assert pool.allocated == 4 and small.data_ptr() % 4096 == 0
    pool.trim(8192)
    assert pool.free_bytes == 8192
    del small
    pool.trim(0)
    assert pool.free_bytes == 0 and not pool.free


def test_offloaded_runs_read_into_reused_buffers_and_stay_exact(stores):
    hf, store = stores["mixtral_gqa"]
    want, _ = greedy(load(store))
    engine = load(store, memory=budget(load(store).info, store, 0.25))
    tokens, stats = greedy(engine)
    assert tokens == want and stats["evictions"] > 0
    if BufferPool.usable():  # each miss after the first evictions reads into an evicted expert's buffer
        assert stats["read_buffers_reused"] > 0
        assert stats["read_buffers_allocated"] + stats["read_buffers_reused"] == stats["expert_misses"]


def test_verify_first_checks_each_expert_once_and_always_checks_every_read(stores, tmp_path, monkeypatch):
    store = copy_store(stores["mixtral_gqa"][1], tmp_path / "s")
    e = open_store(store).entries[(0, 1)]
    checked = []
    monkeypatch.setattr(tiers, "crc32_hex", lambda view: checked.append(1) or fmt.crc32_hex(view))
    first, always = DiskTier(store / fmt.EXPERTS), DiskTier(store / fmt.EXPERTS, verify="always")
    for _ in range(3):
        first.read(e), always.read(e)
    assert len(checked) == 1 + 3
    stat = os.stat(store / fmt.EXPERTS)
    with open(store / fmt.EXPERTS, "r+b") as f:  # the file changes under a running process ...
        f.seek(e.offset)
        b = f.read(1)
        f.seek(e.offset)
        f.write(bytes([b[0] ^ 1]))
    os.utime(store / fmt.EXPERTS, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and hides its mtime
    for tier in (first, always):  # refused, not served: a verified expert is not read as is
        with pytest.raises(MoeError, match=r"changed on disk while in use \(experts.bin was modified\)"):
            tier.read(e)
    with pytest.raises(MoeError, match="checksum mismatch in layer 0 expert 1"):
        DiskTier(store / fmt.EXPERTS).read(e)  # a new process checks it again


def test_host_tier_keeps_blobs_under_its_byte_budget():
    """The pinned host tier of CUDA machines, with plain CPU tensors: bytes, not counts; policy victims."""
    host = HostTier(10_000, "lru-global", n_layers=2, n_experts=4)
    blob = lambda n: torch.zeros(n, dtype=torch.uint8)  # noqa: E731
    host.offer((0, 0), blob(4_000), step=1)
    host.offer((0, 1), blob(4_000), step=1)
    assert host.get((0, 0), step=2) is not None  # (0, 1) is now the least recently used
    host.offer((1, 0), blob(6_000), step=2)
    assert set(host.blobs) == {(0, 0), (1, 0)} and host.used == 10_000 and host.evictions == 1
    host.offer((1, 1), blob(20_000), step=3)  # larger than the tier: stays a staging buffer
    assert (1, 1) not in host.blobs and host.peak == 10_000 and host.hits == 1
    assert host.get((0, 1), step=3) is None


def test_prefetch_stages_without_evicting_and_is_used_or_cancelled(stores):
    _, store = stores["mixtral_gqa"]
    want, _ = greedy(load(store))
    s = open_store(store)
    span = max(e.span for e in s.entries.values())
    full = load(store)
    memory = full.info["backbone_bytes"] + 4 * span
    engine = load(store, memory=memory)
    cache = engine.expert_cache
    cache.set_staging(2 * span)
    greedy(engine)  # warm: the cache holds 2 experts' worth
    resident = set(cache.resident)
    absent = [k for k in s.entries if k not in cache.resident]
    assert cache.prefetch(absent) == 2  # only what the staging bytes take
    assert set(cache.resident) == resident  # nothing evicted for a prefetch
    staged = [k for k, p in cache.pending.items() if p.pool == "stage"]
    for p in cache.pending.values():
        p.handle.result(5)
    assert cache.cancel_prefetch(staged[1:]) == 1 and cache.stage_used == cache.foot[staged[0]].load
    # the staged expert is used when its layer asks for it
    units = dict(p for group in cache.fetch(staged[0][0], [staged[0][1]]) for p in group)
    assert staged[0][1] in units and cache.prefetch_used == 1 and staged[0] in cache.resident
    assert cache.stage_used == 0 and cache.cache_used <= cache.capacity
    tokens, stats = greedy(engine)
    assert tokens == want and stats["resident_weight_bytes"] <= memory
    assert cache.cancel_prefetch() == 0 and not cache.pending


def test_a_fetch_of_hits_only_is_one_list_with_the_same_counts_and_recency(stores):
    """Every needed expert resident (a warm decode token): fetch returns the one group as a list, without the
    miss machinery's generator, and counts the hits and tells the policy as the generator does."""
    _, store = stores["mixtral_gqa"]
    engine = load(store, memory=10**9)
    greedy(engine)  # warm
    cache = engine.expert_cache
    layer = min(la for la, _ in cache.resident)
    have = sorted(e for la, e in cache.resident if la == layer)[:2]
    hits, order = cache.hits, cache.policy.order[layer]
    got = cache.fetch(layer, have[::-1])
    assert isinstance(got, list) and [[e for e, _ in g] for g in got] == [have[::-1]]
    assert all(u is cache.resident[(layer, e)] for e, u in got[0])
    assert cache.hits == hits + 2 and list(order)[-2:] == [(layer, e) for e in have[::-1]]
    small = load(store, memory=engine.info["backbone_bytes"] + 3 * max(e.span for e in open_store(store).entries.values()))
    greedy(small)  # a cache of three experts: some of every layer miss
    c = small.expert_cache
    missing = next(k for k in c.entries if k not in c.resident)
    got = c.fetch(*missing[:1], [missing[1]])
    assert not isinstance(got, list) and [[e for e, _ in g] for g in got] == [[missing[1]]]


def test_verify_reads_option_reaches_the_disk_tier(stores):
    _, store = stores["mixtral_gqa"]
    assert load(store, memory=10**9).expert_cache.disk.verify == "first"
    assert load(store, memory=10**9, verify_reads="always").expert_cache.disk.verify == "always"
    with pytest.raises(UsageError, match="--verify-reads must be one of first, always, got 'sometimes'"):
        load(store, memory=10**9, verify_reads="sometimes")  # was a ValueError from the disk tier: a traceback
    code, out, err = cli("generate", "--model", str(store), "--memory", "100MiB", "--verify-reads", "always",
                         "--prompt-ids", "1,5,9,20", "--max-new-tokens", "2")
    assert code == 0, err


def test_buffered_disk_reads_give_the_same_tokens_and_leave_no_pages_in_the_cache(tmp_path):
    """--disk-reads buffered: misses read through the page cache with the kernel's readahead, each read's
    pages (and what readahead fetched past them) dropped right after, so the weights do not stay in the page
    cache; the tokens are those of O_DIRECT reads."""
    import shutil
    import subprocess

    from moe_offload.store.tiers import DiskTier
    from moe_offload.utils import drop_page_cache

    hf = tiny.make_checkpoint(tmp_path / "hf", "mixtral_gqa")
    store = convert(hf, tmp_path / "store").path
    one = open_store(store)
    memory = int(load(store, dtype="float32").info["backbone_bytes"]) + 3 * max(e.span for e in one.entries.values())
    runs = {}
    for reads in ("direct", "buffered"):
        engine = load(store, dtype="float32", memory=memory, disk_reads=reads)
        assert engine.info["disk_reads"] == reads
        r = engine.generate(prompt_ids=[1, 2, 3, 4, 5], max_new_tokens=6, ignore_eos=True)
        assert r.stats["expert_misses"] > 0 and r.stats["disk_reads"] == reads
        runs[reads] = r.token_ids
    assert runs["direct"] == runs["buffered"]
    with pytest.raises(UsageError, match="--disk-reads"):
        load(store, dtype="float32", memory=memory, disk_reads="mmap")
    if shutil.which("fincore") is None:
        return
    path = one.experts_path
    drop_page_cache(path, sync=True)
    disk = DiskTier(path, reads="buffered")
    try:
        for e in one.entries.values():
            disk.read(e)
    finally:
        disk.close()
    res = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True)
    assert res.returncode == 0 and int(res.stdout.split()[0]) == 0
