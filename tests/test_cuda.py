"""The CUDA path against transformers on CUDA, in float32: every family's tiny checkpoints resident, and
offloaded through the store with --memory on the device and a pinned host tier, under every prefetch mode and
with CPU-computed misses; the CUDA branch of measure_this_machine; 2-bit stand-ins on the device.

Skipped without CUDA (scripts/gpu_check.sh runs them on a GPU machine). The last tests run on the CPU: they
hold device-placement fixes found by reading the CUDA path.
"""

from __future__ import annotations

import types

import pytest
import torch

from moe_offload import load
from moe_offload.store.format import convert, open_store
from moe_offload.store.open import RESERVE
from tests import tiny
from tests.test_families import SPECS as MORE_SPECS
from tests.test_families import make_checkpoint as make_more

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PROMPT = [1, 5, 9, 20, 33, 7, 8, 9, 40, 11, 3, 60]  # 12 tokens, all < every spec's vocabulary
NEW = 12
ALL_SPECS = [*tiny.SPECS, *MORE_SPECS]
# one spec per family for the offloaded matrix (the first of each model_type)
FAMILY_SPECS = [
    *{tiny.SPECS[s][0]: s for s in reversed(tiny.SPECS)}.values(),
    *{MORE_SPECS[s][0]: s for s in reversed(MORE_SPECS)}.values(),
]
OFFLOAD_MODES = ["none", "lookahead", "shadow", "auto", "cpu-measured", "cpu-profile"]


@pytest.fixture(scope="module", autouse=True)
def strict_fp32():
    """float32 means float32: no TF32 matmuls on either side of the comparison."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def build(folder, spec: str):
    return tiny.make_checkpoint(folder, spec) if spec in tiny.SPECS else make_more(folder, spec)


def hf_greedy_cuda(hf, prompt: list[int], n: int) -> list[int]:
    inp = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        out = hf.generate(
            inp,
            attention_mask=torch.ones_like(inp),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            eos_token_id=None,
            pad_token_id=0,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    return out[0, len(prompt) :].tolist()


biggest: dict[str, int] = {}  # spec -> its largest expert blob (bytes)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """spec -> (HF folder, expert store with a trained shadow router, transformers' greedy tokens on CUDA)."""
    made = {}

    def get(spec: str):
        if spec not in made:
            from moe_offload.prefetch.predictors import Shadow
            from moe_offload.profile import record

            root = tmp_path_factory.mktemp(f"cuda-{spec}")
            folder = build(root / "hf", spec)
            hf = tiny.load_hf(folder).to("cuda")
            ref = hf_greedy_cuda(hf, PROMPT, NEW)
            del hf
            store = convert(folder, root / "store").path
            cpu = load(store, dtype="float32")
            if spec in FAMILY_SPECS:  # the shadow router learns this model's routing (on the CPU)
                ids = torch.randint(3, 128, (256,), generator=torch.Generator().manual_seed(1)).tolist()
                rec = record(cpu, ids, 64)
                Shadow.train(
                    rec.hidden, rec.chosen, cpu.model.n_experts, depth=2, m=cpu.model.top_k, steps=60
                ).save(store / "shadow_router.safetensors")
            made[spec] = folder, store, ref, cpu.info["backbone_bytes"], cpu.info["expert_bytes"]
            biggest[spec] = max(e.nbytes for e in open_store(store).entries.values())
        return made[spec]

    return get


def greedy(engine) -> tuple[list[int], dict]:
    r = engine.generate(prompt_ids=PROMPT, max_new_tokens=NEW, ignore_eos=True)
    return r.token_ids, r.stats


@cuda
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_resident_on_cuda_equals_transformers_on_cuda(checkpoints, spec):
    folder, _, ref, _, _ = checkpoints(spec)
    engine = load(folder, device="cuda", dtype="float32")
    assert engine.device.type == "cuda"
    tokens, stats = greedy(engine)
    assert tokens == ref
    assert len(set(ref)) > 1  # not a degenerate model
    assert stats["peak_device_bytes"] > 0


def offload_kwargs(mode: str) -> dict:
    if mode.startswith("cpu-"):  # measured figures; or a profile whose link makes 1-token misses CPU work
        return {"cpu_misses": "on", **({"hardware": "t4-16gb"} if mode == "cpu-profile" else {})}
    return {"prefetch": mode}


@cuda
@pytest.mark.parametrize("mode", OFFLOAD_MODES)
@pytest.mark.parametrize("spec", FAMILY_SPECS)
def test_offloaded_on_cuda_with_host_tier_equals_transformers(checkpoints, spec, mode):
    _, store, ref, backbone, experts = checkpoints(spec)
    # a quarter of the experts on the device, never less than two layers' top-k (one computing, one staged by
    # the prefetcher), and half of them in pinned RAM
    top_k = load(store, dtype="float32").model.top_k
    memory = backbone + RESERVE["cuda"] + max(experts // 4, 2 * top_k * biggest[spec])
    engine = load(
        store, device="cuda", dtype="float32", memory=memory, host_memory=experts // 2, **offload_kwargs(mode)
    )
    tokens, s = greedy(engine)
    assert tokens == ref, (spec, mode)
    assert s["expert_misses"] > 0
    if not mode.startswith("cpu-"):  # CPU-computed misses never cross the link
        assert s["bytes_to_device"] > 0
    assert s["resident_weight_bytes"] <= memory
    assert s["host_capacity_bytes"] == experts // 2
    if mode in ("lookahead", "shadow", "auto"):
        assert s["prefetch_issued"] == s["prefetch_used"] + s["prefetch_cancelled"] + s["prefetch_wasted"]
    if mode in ("lookahead", "shadow"):
        assert s["prefetch_issued"] > 0
    if mode == "cpu-profile":
        assert s["cpu_computed_experts"] > 0 and s["cpu_compute_seconds"] > 0
    engine.expert_cache.close()


@cuda
def test_second_run_is_served_by_the_pinned_host_tier(checkpoints):
    _, store, ref, backbone, experts = checkpoints("mixtral_gqa")
    engine = load(
        store,
        device="cuda",
        dtype="float32",
        memory=backbone + RESERVE["cuda"] + experts // 2,
        host_memory=2 * experts,
    )
    first, _ = greedy(engine)
    again, s = greedy(engine)
    assert first == again == ref
    assert s["bytes_read_disk"] == 0 and s["host_hits"] > 0  # every expert was kept in pinned RAM


@cuda
def test_lowbit_stand_ins_run_on_cuda(checkpoints):
    """2-bit stand-ins decoded on the device serve low-weight misses. Tokens may differ from the reference and
    from the CPU (whose int4 kernel takes bf16 activations; CUDA dequantizes), so none is compared."""
    _, store, _, backbone, experts = checkpoints("mixtral_gqa")
    kw = {"dtype": "float32", "miss_fallback": "lowbit", "fallback_threshold": 0.6}
    memory = backbone + RESERVE["cuda"] + experts // 4 + experts  # room for the stand-ins beside the cache
    engine = load(store, device="cuda", memory=memory, **kw)
    tokens, s = greedy(engine)
    again, s2 = greedy(load(store, device="cuda", memory=memory, **kw))
    assert s["lowbit_fallbacks"] > 0 and len(tokens) == NEW
    assert again == tokens and s2["lowbit_fallbacks"] == s["lowbit_fallbacks"]  # deterministic on the device


@cuda
def test_measure_this_machine_on_cuda():
    from moe_offload.sim import measure_this_machine

    hw = measure_this_machine(
        ram_bytes=64 << 20, disk_bytes=16 << 20, gemv_bytes=16 << 20, read_bytes=4 << 20
    )
    assert hw.device == "cuda" and hw.device_bytes > 0 and hw.host_bytes > 0
    assert hw.link_bw > 0 and hw.device_bw > 0 and hw.device_flops > 0 and hw.has_bandwidths


# ---- on the CPU: fixes found by reading the CUDA path ------------------------------------------------------


def test_shadow_router_maps_live_on_the_models_device(tmp_path):
    """The shadow router's maps are read from safetensors onto the CPU; on CUDA they scored CUDA hidden states
    (a device mismatch at the first prefetch). They must move to where the routers are."""
    from moe_offload.prefetch.predictors import Shadow
    from moe_offload.prefetch.runtime import make_prefetcher

    D, E = 8, 4
    maps = {(0, 1): (torch.randn(E, D), torch.zeros(E))}
    Shadow(maps, [0, 1], depth=1, m=2).save(tmp_path / "shadow_router.safetensors")
    gate = types.SimpleNamespace(weight=torch.empty(E, D, device="meta"))  # a device other than the file's
    moe = types.SimpleNamespace(router_linear=lambda: gate)
    model = types.SimpleNamespace(top_k=2, n_experts=E, moe_blocks=lambda: [(0, moe), (1, moe)])
    p = make_prefetcher(model, tmp_path, "shadow")
    W, b = p.predictors["shadow"].maps[(0, 1)]
    assert W.device.type == b.device.type == "meta"
    assert W.dtype == b.dtype == torch.float32


def test_simulate_this_machine_times_the_gpu_on_a_cuda_machine(tmp_path, monkeypatch):
    """`simulate --hardware this-machine` on a CUDA machine replaced the measured GPU bandwidth with a CPU
    GEMV and the per-token overhead with the CPU's: both must be timed on the profile's device."""
    import contextlib
    import dataclasses
    import io
    import json

    from moe_offload import sim
    from moe_offload.cli import main

    gpu = dataclasses.replace(sim.PROFILES["rtx3060-12gb"], name=sim.THIS_MACHINE)
    calls = []
    monkeypatch.setattr(sim, "measure_this_machine", lambda **kw: gpu)
    monkeypatch.setattr(
        sim, "expert_gemv_bw", lambda *a, device="cpu", **kw: calls.append(("bw", device)) or 1e11
    )
    monkeypatch.setattr(
        sim, "measure_token_overhead", lambda *a, device="cpu", **kw: calls.append(("over", device)) or 1e-3
    )
    config = {**tiny.COMMON, "model_type": "mixtral", **tiny.SPECS["mixtral_gqa"][1]}
    trace = sim.synthetic_trace(40, [0, 1], 4, 2, expert_bytes=1 << 20, n_layers=2, backbone_bytes=1 << 20)
    trace.meta["config"] = config
    path = sim.save_trace(tmp_path / "trace.json", trace)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert (
            main(
                ["simulate", "--trace", str(path), "--hardware", "this-machine", "--memory", "4MiB", "--json"]
            )
            == 0
        )
    assert sorted(calls) == [("bw", "cuda"), ("over", "cuda")]
    assert json.loads(out.getvalue())["tokens"] > 0


@pytest.mark.parametrize("spec", ["gpt_oss_swa_yarn_clamped", "granitemoe_gqa"])
def test_families_with_renamed_routers_prefetch_profile_and_plan(spec, tmp_path):
    """gpt-oss (`router`) and Granite (`router.layer`) have no `gate`: --prefetch, the profile's look-ahead
    and the planner's router count read `moe.gate` and failed with an AttributeError."""
    from moe_offload.plan import model_sizes
    from moe_offload.profile import gates_of
    from moe_offload.store.format import open_store

    folder = build(tmp_path / "hf", spec)
    store = convert(folder, tmp_path / "store").path
    full = load(store, dtype="float32")
    ref, _ = greedy(full)
    experts, top_k = full.info["expert_bytes"], full.model.top_k
    big = max(e.nbytes for e in open_store(store).entries.values())
    memory = full.info["backbone_bytes"] + max(experts // 4, 2 * top_k * big)
    tokens, s = greedy(load(store, dtype="float32", memory=memory, prefetch="lookahead"))
    assert tokens == ref and s["prefetch_issued"] > 0
    gates = gates_of(full.model)
    assert sorted(gates) == [la for la, _ in full.model.moe_blocks()]
    assert all(g.shape == (full.model.n_experts, full.args.hidden_size) for g in gates.values())
    sizes = model_sizes(open_store(store).config)
    shape = full.model.expert_shape
    biases = 2 * shape.intermediate + shape.hidden if shape.bias else 0
    assert sizes.expert_params == 3 * shape.hidden * shape.intermediate + biases
    assert (
        sizes.backbone_params == full.info["backbone_bytes"] // 4
    )  # float32 store: every tensor counted once
