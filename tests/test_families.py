"""More MoE families against transformers: greedy tokens, logits, cached vs uncached, the expert-name tables.

Each spec is a tiny random checkpoint written by transformers' own config/model classes and `save_pretrained`
(large init, random norms/biases), loaded back by transformers as the reference.
"""

from __future__ import annotations

import pytest
import torch

from moe_offload import load
from moe_offload.checkpoint import SafetensorsFolder, expert_tensors
from tests import tiny

N_NEW = 20
PROMPT = torch.randint(3, 128, (10,), generator=torch.Generator().manual_seed(1)).tolist()

# name: (transformers config class, kwargs over tiny.COMMON)
SPECS: dict[str, tuple[str, dict]] = {
    "granitemoe_gqa": ("GraniteMoeConfig", dict(
        num_hidden_layers=2, num_key_value_heads=2, intermediate_size=40, num_local_experts=5, num_experts_per_tok=2,
        embedding_multiplier=6.0, attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=1.5)),
    "granitemoe_mha_tied_bias": ("GraniteMoeConfig", dict(
        num_hidden_layers=2, num_key_value_heads=4, intermediate_size=24, num_local_experts=4, num_experts_per_tok=3,
        embedding_multiplier=2.0, attention_multiplier=0.3, residual_multiplier=0.8, logits_scaling=0.8,
        tie_word_embeddings=True, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "phimoe_gqa_bias": ("PhimoeConfig", dict(
        num_hidden_layers=2, num_key_value_heads=2, intermediate_size=40, num_local_experts=6, num_experts_per_tok=2,
        attention_bias=True, lm_head_bias=True, router_jitter_noise=0.3, rms_norm_eps=1e-5)),
    "phimoe_mha_swa_longrope": ("PhimoeConfig", dict(
        num_hidden_layers=3, num_key_value_heads=4, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=6, router_jitter_noise=0.01,
        rope_parameters={"rope_type": "longrope", "rope_theta": 1000.0, "original_max_position_embeddings": 64,
                         "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 3.0, 5.0, 8.0], "long_factor": [4.0] * 8,
                         "short_mscale": 1.2, "long_mscale": 1.4})),
    "deepseek_v2_greedy_qproj": ("DeepseekV2Config", dict(
        num_hidden_layers=3, num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=20,
        n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        routed_scaling_factor=1.5, topk_method="greedy", q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=12)),
    "deepseek_v2_group_lora_yarn_tied": ("DeepseekV2Config", dict(
        num_hidden_layers=2, num_key_value_heads=4, intermediate_size=40, moe_intermediate_size=16,
        n_routed_experts=6, num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=0,
        routed_scaling_factor=0.8, topk_method="group_limited_greedy", n_group=3, topk_group=2, q_lora_rank=24,
        kv_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=8, tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 0.8,
                         "beta_fast": 32, "beta_slow": 1})),
    "deepseek_v3_group_lora_yarn": ("DeepseekV3Config", dict(
        num_hidden_layers=3, num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16,
        n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        routed_scaling_factor=2.5, n_group=3, topk_group=2, norm_topk_prob=True, q_lora_rank=24, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "beta_fast": 32, "beta_slow": 1})),
    "deepseek_v3_qproj_halves_tied": ("DeepseekV3Config", dict(
        num_hidden_layers=2, num_key_value_heads=4, intermediate_size=40, moe_intermediate_size=20,
        n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=0,
        routed_scaling_factor=1.0, n_group=1, topk_group=1, norm_topk_prob=False, q_lora_rank=None,
        kv_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=8, rope_interleave=False,
        tie_word_embeddings=True)),
    "gpt_oss_swa_yarn_clamped": ("GptOssConfig", dict(
        num_hidden_layers=3, num_key_value_heads=2, head_dim=16, intermediate_size=24, num_local_experts=6,
        num_experts_per_tok=2, sliding_window=6, swiglu_limit=1.0, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "yarn", "rope_theta": 15000.0, "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 32})),
    "gpt_oss_mha_layer_types": ("GptOssConfig", dict(
        num_hidden_layers=2, num_key_value_heads=4, head_dim=12, intermediate_size=32, num_local_experts=4,
        num_experts_per_tok=3, sliding_window=4, layer_types=["full_attention", "sliding_attention"],
        swiglu_alpha=1.2, swiglu_limit=0.8, rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
}


def make_checkpoint(folder, spec: str, seed: int = 0):
    import transformers

    cls, kw = SPECS[spec]
    config = getattr(transformers, cls)(**{**tiny.COMMON, **kw})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tiny.randomize_(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # a buffer: steers routing choices
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    model.eval().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """spec -> (folder, our engine, transformers model), each built once."""
    made = {}

    def get(spec):
        if spec not in made:
            folder = make_checkpoint(tmp_path_factory.mktemp(spec), spec)
            made[spec] = folder, load(folder, dtype="float32"), tiny.load_hf(folder)
        return made[spec]

    return get


@pytest.mark.parametrize("spec", list(SPECS))
def test_greedy_tokens_and_logits_match_transformers(pair, spec):
    _, engine, hf = pair(spec)
    ref = tiny.hf_greedy(hf, PROMPT, N_NEW)
    ours = engine.generate(prompt_ids=PROMPT, max_new_tokens=N_NEW, ignore_eos=True)
    assert ours.token_ids == ref
    assert len(set(ref)) > 1  # not a degenerate model
    full = PROMPT + ref
    with torch.no_grad():
        want = hf(torch.tensor([full])).logits[0].float()
    got = engine.logits(full)
    assert got.shape == want.shape
    assert (got[len(PROMPT) - 1] - want[len(PROMPT) - 1]).abs().max().item() <= 1e-4
    assert (got - want).abs().max().item() <= 1e-4
    assert want.std().item() > 0.5  # logits far from uniform: the comparison is meaningful


@pytest.mark.parametrize("spec", list(SPECS))
def test_cached_decode_equals_full_forward(pair, spec):
    _, engine, _ = pair(spec)
    tiny.assert_cached_equals_uncached(engine, PROMPT + PROMPT[::-1])  # 20 tokens: past every sliding window


def offloaded_below_expert_bytes(folder, tmp_path, frac: float = 0.25):
    """The folder converted into an expert store, opened with --memory = backbone + `frac` of the experts'
    bytes (never below one layer's active experts). Returns (engine, memory, all experts' bytes)."""
    from moe_offload.store.format import convert, open_store

    store = convert(folder, tmp_path / "store")
    spans = sorted(e.span for e in open_store(store.path).entries.values())
    backbone = load(store.path).info["backbone_bytes"]
    memory = backbone + max(int(frac * sum(spans)), store.top_k * spans[-1])
    return load(store.path, memory=memory), memory - backbone, sum(spans)


@pytest.mark.parametrize("spec", list(SPECS))
def test_offloaded_through_the_store_with_a_small_budget_gives_the_same_tokens(pair, spec, tmp_path):
    folder, _, hf = pair(spec)
    engine, cache_bytes, expert_bytes = offloaded_below_expert_bytes(folder, tmp_path)
    assert cache_bytes < expert_bytes
    r = engine.generate(prompt_ids=PROMPT, max_new_tokens=N_NEW, ignore_eos=True)
    assert r.token_ids == tiny.hf_greedy(hf, PROMPT, N_NEW)
    assert r.stats["expert_misses"] > 0 and r.stats["evictions"] > 0


def hf_expert(hf, layer: int, e: int) -> dict[str, torch.Tensor]:
    """One expert as transformers holds it in memory (fused gate_up [E, 2I, D], down [E, D, I])."""
    mlp = hf.model.layers[layer].mlp if hasattr(hf.model.layers[layer], "mlp") else \
        hf.model.layers[layer].block_sparse_moe
    if hasattr(mlp.experts, "gate_up_proj_bias"):  # gpt-oss: [E, D, 2I] interleaved columns, [E, I, D], biases
        gate_up, bias = mlp.experts.gate_up_proj[e], mlp.experts.gate_up_proj_bias[e]
        return {"gate": gate_up[:, 0::2].T, "up": gate_up[:, 1::2].T, "down": mlp.experts.down_proj[e].T,
                "gate_bias": bias[0::2], "up_bias": bias[1::2], "down_bias": mlp.experts.down_proj_bias[e]}
    gate_up = mlp.experts.gate_up_proj[e]
    I = gate_up.shape[0] // 2
    return {"gate": gate_up[:I], "up": gate_up[I:], "down": mlp.experts.down_proj[e]}


@pytest.mark.parametrize("spec", ["granitemoe_gqa", "phimoe_gqa_bias", "deepseek_v3_group_lora_yarn",
                                  "gpt_oss_swa_yarn_clamped"])
def test_expert_tensors_equal_transformers_experts(pair, spec):
    folder, engine, hf = pair(spec)
    source = SafetensorsFolder(folder)
    mt = engine.args.model_type
    for layer, _ in engine.model.moe_blocks():
        for e in range(engine.model.n_experts):
            got = expert_tensors(source, mt, layer, e)
            want = hf_expert(hf, layer, e)
            assert set(got) == set(want)
            for part in want:
                assert torch.equal(got[part], want[part]), (layer, e, part)


def _by_expert(idx: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots sorted by expert id: routers may return top-k unsorted."""
    order = idx.argsort(dim=-1)
    return idx.gather(1, order), w.gather(1, order)


def _hf_router(cls_name: str, module: str, E: int, **config):
    """A transformers router over hidden = logits (weight = identity), for pure-function comparisons."""
    import importlib

    import transformers

    mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    cfg_cls = {"deepseek_v2": "DeepseekV2Config", "deepseek_v3": "DeepseekV3Config"}[module]
    cfg = getattr(transformers, cfg_cls)(hidden_size=E, num_attention_heads=1, n_routed_experts=E, **config)
    router = getattr(mod, cls_name)(cfg).eval()
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    return router


@pytest.mark.parametrize("method,n_group,topk_group", [("greedy", None, None), ("group_limited_greedy", 4, 2)])
def test_deepseek_v2_routing_equals_transformers(method, n_group, topk_group):
    from moe_offload.models.routing import softmax_group_topk

    E, K = 16, 3
    router = _hf_router("DeepseekV2TopkRouter", "deepseek_v2", E, num_experts_per_tok=K, topk_method=method,
                        n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5)
    logits = torch.randn(500, E, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        _, w_ref, idx_ref = router(logits)
    idx, w = softmax_group_topk(logits, K, method, n_group, topk_group, False, 2.5)
    idx_ref, w_ref = _by_expert(idx_ref, w_ref)
    idx, w = _by_expert(idx, w)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(w, w_ref, atol=0, rtol=0)
    if method == "group_limited_greedy":  # the group limit changes some choices: the test exercises it
        greedy = _by_expert(*softmax_group_topk(logits, K, "greedy", None, None, False, 2.5))[0]
        assert not torch.equal(greedy, idx)
    # norm_topk_prob (DeepSeek's V2 code; transformers ignores it): renormalised, not scaled
    idx_n, w_n = softmax_group_topk(logits, K, method, n_group, topk_group, True, 2.5)
    torch.testing.assert_close(w_n.sum(-1), torch.ones(500))
    assert torch.equal(_by_expert(idx_n, w_n)[0], idx)


@pytest.mark.parametrize("n_group,topk_group,norm", [(4, 2, True), (1, 1, False), (8, 3, True)])
def test_deepseek_v3_routing_equals_transformers(n_group, topk_group, norm):
    from moe_offload.models.routing import sigmoid_group_topk

    E, K = 16, 4
    router = _hf_router("DeepseekV3TopkRouter", "deepseek_v3", E, num_experts_per_tok=K, n_group=n_group,
                        topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=2.5)
    g = torch.Generator().manual_seed(0)
    bias = 0.3 * torch.randn(E, generator=g)
    with torch.no_grad():
        router.e_score_correction_bias.copy_(bias)
    logits = torch.randn(500, E, generator=g) * 2
    with torch.no_grad():
        _, w_ref, idx_ref = router(logits)
    idx, w = _by_expert(*sigmoid_group_topk(logits, bias, K, n_group, topk_group, norm, 2.5))
    idx_ref, w_ref = _by_expert(idx_ref, w_ref)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(w, w_ref, atol=0, rtol=0)
    unbiased = _by_expert(*sigmoid_group_topk(logits, torch.zeros(E), K, n_group, topk_group, norm, 2.5))[0]
    assert not torch.equal(unbiased, idx)  # the correction bias changes choices: the test exercises it


def _rewrite(src, dst, tensors: dict, config_update: dict | None = None):
    """A copy of checkpoint folder `src` at `dst` holding `tensors` (one file) and an updated config.json."""
    import json
    import shutil

    from safetensors.torch import save_file

    dst.mkdir(parents=True)
    for f in src.iterdir():
        if not f.name.startswith("model.safetensors"):
            shutil.copy(f, dst / f.name)
    save_file(tensors, str(dst / "model.safetensors"))
    if config_update:
        config = json.loads((dst / "config.json").read_text())
        config.update(config_update)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_deepseek_v3_skips_multi_token_prediction_layer(pair, tmp_path):
    from safetensors.torch import load_file

    folder, engine, _ = pair("deepseek_v3_group_lora_yarn")
    tensors = load_file(str(folder / "model.safetensors"))
    n = engine.args.num_hidden_layers
    last = f"model.layers.{n - 1}."
    mtp = {k.replace(last, f"model.layers.{n}."): v.clone() for k, v in tensors.items() if k.startswith(last)}
    mtp[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(8, 8)  # MTP-only tensors: also skipped
    mtp[f"model.layers.{n}.shared_head.head.weight"] = torch.zeros(8, 8)
    with_mtp = _rewrite(folder, tmp_path / "mtp", {**tensors, **mtp}, {"num_nextn_predict_layers": 1})
    torch.testing.assert_close(load(with_mtp, dtype="float32").logits(PROMPT), engine.logits(PROMPT), atol=0, rtol=0)
    # anything else unknown is still an error
    bad = _rewrite(folder, tmp_path / "bad", {**tensors, "model.layers.0.mlp.extra.weight": torch.zeros(2)})
    with pytest.raises(Exception, match="unexpected tensor"):
        load(bad, dtype="float32")


def to_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest MXFP4 of w [..., R, C]: blocks [..., R, C/32, 16] uint8 (low nibble = even element),
    scales [..., R, C/32] uint8 (e8m0: exponent + 127), the layout of the released gpt-oss checkpoints."""
    from moe_offload.checkpoint import FP4_VALUES

    g = w.reshape(*w.shape[:-1], -1, 32)
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
    code = (g / (2.0 ** exp).unsqueeze(-1)).unsqueeze(-1).sub(torch.tensor(FP4_VALUES)).abs().argmin(-1)
    code = code.to(torch.uint8)
    return code[..., 0::2] | (code[..., 1::2] << 4), (exp + 127).to(torch.uint8)


def test_gpt_oss_mxfp4_checkpoint_matches_transformers(pair, tmp_path):
    """Expert blocks/scales as released (transformers dequantises them on CPU): same experts, same tokens."""
    from safetensors.torch import load_file

    folder, engine, _ = pair("gpt_oss_mha_layer_types")  # D = 64, I = 32: whole 32-value blocks
    tensors, mx = load_file(str(folder / "model.safetensors")), {}
    for k, v in tensors.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out] -> blocks over `in`
            mx[k + "_blocks"], mx[k + "_scales"] = to_mxfp4(v.transpose(1, 2).contiguous())
        else:
            mx[k] = v
    quant = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    mx_folder = _rewrite(folder, tmp_path / "mxfp4", mx, {"quantization_config": quant})
    ours, hf = load(mx_folder, dtype="float32"), tiny.load_hf(mx_folder)
    source = SafetensorsFolder(mx_folder)
    for layer, _ in ours.model.moe_blocks():
        for e in range(ours.model.n_experts):
            got, want = expert_tensors(source, "gpt_oss", layer, e), hf_expert(hf, layer, e)
            assert all(torch.equal(got[p], want[p]) for p in want), (layer, e)
    assert not torch.equal(expert_tensors(source, "gpt_oss", 0, 0)["gate"],
                           expert_tensors(SafetensorsFolder(folder), "gpt_oss", 0, 0)["gate"])  # really rounded
    ref = tiny.hf_greedy(hf, PROMPT, N_NEW)
    assert ours.generate(prompt_ids=PROMPT, max_new_tokens=N_NEW, ignore_eos=True).token_ids == ref
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT + ref])).logits[0]
    assert (ours.logits(PROMPT + ref) - want).abs().max().item() <= 1e-4
    offloaded, cache_bytes, expert_bytes = offloaded_below_expert_bytes(mx_folder, tmp_path)
    assert cache_bytes < expert_bytes
    assert offloaded.generate(prompt_ids=PROMPT, max_new_tokens=N_NEW, ignore_eos=True).token_ids == ref


def to_fp8_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's FP8 format for w [O, I]: float8_e4m3fn weight and scale_inv [ceil(O/bo), ceil(I/bi)] fp32
    (block max / 448; edge blocks may be partial)."""
    (O, I), (bo, bi) = w.shape, block
    so, si = -(-O // bo), -(-I // bi)
    padded = torch.zeros(so * bo, si * bi)
    padded[:O, :I] = w
    scale = padded.view(so, bo, si, bi).abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = padded / scale.repeat_interleave(bo, 0).repeat_interleave(bi, 1)
    return q[:O, :I].to(torch.float8_e4m3fn), scale


def test_fp8_block_dequantisation_matches_a_per_block_loop():
    from moe_offload.checkpoint import dequantize_fp8_blocks

    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    q, scale = to_fp8_blocks(w, (128, 128))
    assert scale.shape == (3, 2)  # partial edge blocks
    want = torch.empty(300, 200)
    for i in range(3):
        for j in range(2):
            rows, cols = slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1))
            want[rows, cols] = q[rows, cols].float() * scale[i, j]
    assert torch.equal(dequantize_fp8_blocks(q, scale, (128, 128)), want)
    assert (want - w).abs().max() < 0.07 * w.abs().max()  # e4m3: a few % of the block max


@pytest.mark.parametrize("block", [(128, 128), (8, 8)])
def test_deepseek_v3_fp8_checkpoint_matches_transformers(pair, tmp_path, block):
    """Every decoder linear (experts included, router excluded) stored as FP8 + block scales, as DeepSeek ships
    V3/R1; transformers dequantises on CPU (it needs the scale grid to divide the weight: 8×8 blocks here)."""
    from safetensors.torch import load_file

    folder, engine, _ = pair("deepseek_v3_group_lora_yarn")
    tensors, fp8 = load_file(str(folder / "model.safetensors")), {}
    for k, v in tensors.items():
        if k.startswith("model.layers.") and v.ndim == 2 and not k.endswith("mlp.gate.weight"):
            fp8[k], fp8[k + "_scale_inv"] = to_fp8_blocks(v, block)
        else:
            fp8[k] = v
    quant = {"quant_method": "fp8", "weight_block_size": list(block), "activation_scheme": "dynamic", "fmt": "e4m3"}
    q_folder = _rewrite(folder, tmp_path / "fp8", fp8, {"quantization_config": quant})
    ours, hf = load(q_folder, dtype="float32"), tiny.load_hf(q_folder)
    ref = tiny.hf_greedy(hf, PROMPT, N_NEW)
    assert ours.generate(prompt_ids=PROMPT, max_new_tokens=N_NEW, ignore_eos=True).token_ids == ref
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT + ref])).logits[0]
    got = ours.logits(PROMPT + ref)
    assert (got - want).abs().max().item() <= 1e-4
    assert (got - engine.logits(PROMPT + ref)).abs().max().item() > 1e-3  # the weights really were rounded
    # the store converter dequantises the same way: identical tokens under an expert budget
    from moe_offload.store.format import convert

    store = convert(q_folder, tmp_path / "fp8-store", dtype=torch.float32).path
    small = load(store, dtype="float32", memory=ours.info["backbone_bytes"] + ours.info["expert_bytes"] // 3)
    assert small.generate(prompt_ids=PROMPT, max_new_tokens=N_NEW, ignore_eos=True).token_ids == ref


@pytest.mark.parametrize("spec,names", [("deepseek_v3_group_lora_yarn", ["mlp.gate.e_score_correction_bias"]),
                                        ("gpt_oss_mha_layer_types", ["input_layernorm.weight", "model.norm.weight"])])
def test_bfloat16_keeps_fp32_keys_and_runs_close(pair, spec, names):
    folder, engine, _ = pair(spec)
    half = load(folder, dtype="bfloat16")
    state = half.model.state_dict()
    kept = [k for k in state if any(k.endswith(n) for n in names)]
    assert kept and all(state[k].dtype == torch.float32 for k in kept)
    assert half.model.model.embed_tokens.weight.dtype == torch.bfloat16
    ref = engine.logits(PROMPT)
    assert (half.logits(PROMPT) - ref).abs().max().item() < 0.1 * ref.abs().max().item()


@pytest.mark.parametrize("config,message", [
    ({"model_type": "granitemoe", "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
    ({"model_type": "phimoe", "num_experts_per_tok": 3}, "sparsemixer routes 2 experts"),
    ({"model_type": "deepseek_v2", "mlp_bias": True}, "mlp_bias"),
    ({"model_type": "deepseek_v2", "n_routed_experts": 4, "num_experts_per_tok": 2, "scoring_func": "sigmoid"},
     "scoring_func 'sigmoid'"),
    ({"model_type": "deepseek_v3", "topk_method": "greedy"}, "topk_method 'greedy'"),
])
def test_unsupported_family_settings_are_refused(config, message):
    from moe_offload.errors import MoeError
    from moe_offload.models import build

    small = {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2,
             "intermediate_size": 8, "max_position_embeddings": 8, "vocab_size": 8}
    with torch.device("meta"), pytest.raises(MoeError, match=message):
        build({**small, **config})
