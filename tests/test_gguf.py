"""GGUF in and out: tiny GGUF files written here (our exporter, the `gguf` package's writer and quantizer) run
as `--model FILE.gguf`, against the Hugging Face folders they were made from; quantized blocks against gguf's
own dequantization; bad files refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")

from gguf.quants import dequantize, quantize

from moe_offload import load
from moe_offload.errors import MoeError, UsageError
from moe_offload.codecs import make_codec
from moe_offload.experts import ExpertShape
from moe_offload.gguf_export import export_gguf
from moe_offload.gguf_import import convert_gguf, gguf_config, open_gguf
from moe_offload.quant.ggml import GGUFCodec, affine_groups
from moe_offload.store.format import open_store
from tests import tiny

T = gguf.GGMLQuantizationType
PROMPT = torch.randint(5, 300, (12,), generator=torch.Generator().manual_seed(3)).tolist()
N_NEW = 12

# One spec per family llama.cpp reads: experts in every layer, no sliding window, llama.cpp's routing
# normalisation (OLMoE without grouped KV heads or clip_qkv); I and D multiples of 32 so Q4_0 / Q8_0 blocks fit.
SPECS = {
    "mixtral": ("mixtral", dict(num_hidden_layers=2, num_key_value_heads=2, intermediate_size=64,
                                num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("qwen2_moe", dict(num_hidden_layers=2, num_key_value_heads=2, intermediate_size=64,
                                    moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
                                    num_experts_per_tok=2, norm_topk_prob=False)),
    "qwen3_moe": ("qwen3_moe", dict(num_hidden_layers=2, num_key_value_heads=2, head_dim=32, intermediate_size=64,
                                    moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                    norm_topk_prob=True)),
    "olmoe": ("olmoe", dict(num_hidden_layers=2, num_key_value_heads=4, intermediate_size=32, num_experts=4,
                            num_experts_per_tok=2, norm_topk_prob=False)),
}


@pytest.fixture(autouse=True)
def _store_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOE_OFFLOAD_CACHE", str(tmp_path_factory.getbasetemp() / "store-cache"))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """name -> (HF folder in float16 with a tokenizer, the F16 GGUF our exporter wrote from it), built once."""
    made = {}

    def get(name):
        if name not in made:
            d = tmp_path_factory.mktemp(f"gguf-{name}")
            hf = tiny.make_checkpoint(d / "hf", SPECS[name], tokenizer=True, dtype="float16")
            export_gguf(hf, d / f"{name}-f16.gguf", "f16")
            made[name] = hf, d / f"{name}-f16.gguf"
        return made[name]

    return get


def rewrite_gguf(src, dst, qtype_for=lambda name: None, arch=None, replace=None, split_experts=False, drop=""):
    """Copy a GGUF with the `gguf` writer: tensors re-quantized to qtype_for(name) (gguf.quants.quantize),
    another general.architecture, replace(name, tensor) -> (data, type) for chosen tensors, or stacked
    experts split into one tensor per expert (blk.L.ffn_gate.E.weight, as early Mixtral files); `drop`: a
    key or tensor left out."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), arch or r.fields["general.architecture"].contents())
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k in ("general.architecture", drop):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(k, f.contents(), f.types[0], sub_type=sub)
    for t in [t for t in r.tensors if t.name != drop]:
        q = qtype_for(t.name)
        got = replace(t.name, t) if replace else None
        if got is not None:
            w.add_tensor(t.name, got[0], raw_dtype=got[1])
        elif split_experts and "_exps." in t.name:
            for e in range(t.data.shape[0]):
                w.add_tensor(t.name.replace("_exps.", f".{e}."), np.asarray(t.data[e]), raw_dtype=t.tensor_type)
        elif q is None or len(t.shape) < 2:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
        else:
            w.add_tensor(t.name, quantize(dequantize(np.asarray(t.data), t.tensor_type), q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


# ---- F16 files: the same tokens as the folder they came from ----------------------------------------------

@pytest.mark.parametrize("name", list(SPECS))
def test_f16_gguf_gives_the_tokens_and_logits_of_its_hf_folder(family, name):
    hf, path = family(name)
    want = load(hf)
    ours = load(path)  # --model FILE.gguf: converted once into a cached store
    assert ours.info["format"] == "store" and ours.dtype == torch.float16
    ref = want.generate(prompt_ids=PROMPT, max_new_tokens=N_NEW, ignore_eos=True).token_ids
    assert ours.generate(prompt_ids=PROMPT, max_new_tokens=N_NEW, ignore_eos=True).token_ids == ref
    assert len(set(ref)) > 1
    assert torch.equal(ours.logits(PROMPT), want.logits(PROMPT))  # same fp16 weights, same arithmetic
    store, hf_cfg = open_store(ours.path), tiny.read_json(hf / "config.json")
    assert store.n_experts == (hf_cfg.get("num_local_experts") or hf_cfg["num_experts"])
    cfg = store.config
    for k, v in hf_cfg.items():
        if k in ("moe_intermediate_size", "head_dim", "clip_qkv",
                 "norm_topk_prob", "shared_expert_intermediate_size", "num_key_value_heads", "vocab_size") \
                and v is not None:
            assert cfg[k] == pytest.approx(v), k


def test_gguf_tokenizer_and_chat_template_equal_the_folders(family):
    hf, path = family("mixtral")
    ours, want = load(path).tokenizer, load(hf).tokenizer
    for line in tiny.corpus(40, seed=5):
        assert ours.encode(line) == want.encode(line), line
    msgs = [{"role": "user", "content": "Hello café 😀"}]
    assert ours.chat_template == want.chat_template
    assert ours.apply_chat_template(msgs) == want.apply_chat_template(msgs)


def cli(capsys, *args) -> tuple[int, str, str]:
    """`moe-offload ARGS` in this process: (exit code, stdout, stderr)."""
    from moe_offload.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_generate_convert_and_plan_take_a_gguf(family, tmp_path, capsys):
    hf, path = family("qwen3_moe")
    want = load(hf).generate(prompt_ids=PROMPT, max_new_tokens=N_NEW, ignore_eos=True).token_ids
    gen = ["generate", "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", N_NEW, "--ignore-eos", "--json"]
    rc, out, err = cli(capsys, *gen, "--model", path)
    assert rc == 0 and json.loads(out)["token_ids"] == want
    rc, out, err = cli(capsys, *gen, "--model", path, "--memory", "300KiB")  # the cached store, offloaded
    assert rc == 0 and json.loads(out)["token_ids"] == want
    assert "converting" not in err and json.loads(out)["stats"]["expert_misses"] > 0
    rc, out, err = cli(capsys, "convert", "--model", path, "--out", tmp_path / "store")
    assert rc == 0 and open_store(tmp_path / "store").config["model_type"] == "qwen3_moe"
    rc, out, err = cli(capsys, "plan", "--model", path)
    assert rc == 0, err


# ---- quantized files: codes kept, scales rounded to bf16 ------------------------------------------------------

def _scale_bound(codes, s, m, centre):
    """Per weight, what rounding s and m to bf16 can move (c − centre)·s + m: |c − centre|·|Δs| + |Δm|."""
    ds = (torch.from_numpy(s) - torch.from_numpy(s).bfloat16().float()).abs().numpy()
    dm = (torch.from_numpy(m) - torch.from_numpy(m).bfloat16().float()).abs().numpy()
    N = codes.shape[0]
    c = np.abs(codes.reshape(N, -1, 32).astype(np.float32) - centre)
    return (c * ds[..., None] + dm[..., None]).reshape(N, -1) + 1e-7


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_quantized_gguf_experts_round_trip_within_scale_rounding(family, tmp_path, qtype):
    _, f16 = family("mixtral")
    path = rewrite_gguf(f16, tmp_path / f"{qtype}.gguf", lambda n: T[qtype])
    store = convert_gguf(path, tmp_path / "store", quiet=True)
    assert store.dtype == torch.bfloat16
    g = open_gguf(path)
    shape, I = store.expert_shape, store.expert_shape.intermediate
    bits = 8 if qtype == "Q8_0" else 4
    checked = 0
    with open(store.experts_path, "rb") as f:
        for (layer, e), entry in store.entries.items():
            assert entry.codec["gate_up"] == entry.codec["down"] == f"q{bits}"
            f.seek(entry.offset)
            blob = torch.frombuffer(bytearray(f.read(entry.nbytes)), dtype=torch.uint8)
            codec = make_codec(entry.codec)
            gate_up, down = codec.dequantize(blob, shape)
            ours = {"gate": gate_up[:I], "up": gate_up[I:], "down": down}
            for part, W in ours.items():
                blk = np.asarray(g.expert_raw(layer, part, e)[1])
                ref = dequantize(blk, T[qtype])
                codes, s, m = affine_groups(qtype, blk, *ref.shape)
                err = np.abs(W.numpy() - ref)
                assert (err <= _scale_bound(codes, s, m, 128 if bits == 8 else 8)).all(), (layer, e, part)
                assert err.max() < 0.01 * np.abs(ref).max()
                checked += 1
            unit = codec.decode(blob, shape, torch.bfloat16)  # the kernels compute with those weights
            x = torch.randn(3, shape.hidden, generator=torch.Generator().manual_seed(e))
            g_, u = (x @ gate_up.t()).chunk(2, -1)
            torch.testing.assert_close(unit(x.bfloat16()).float(), (torch.nn.functional.silu(g_) * u) @ down.t(),
                                       rtol=0.05, atol=0.05)
    assert checked == 3 * len(store.entries)
    e = load(path)
    assert len(e.generate(prompt_ids=PROMPT, max_new_tokens=4, ignore_eos=True).token_ids) == 4


def test_q4_k_and_q4_1_blocks_map_onto_affine_groups_of_32():
    rng = np.random.default_rng(0)
    N, K = 32, 512
    blocks = rng.integers(0, 256, (N, K // 256 * 144), dtype=np.uint8)  # any bytes are a valid Q4_K block
    for off, v in ((0, 0.02), (2, 0.01)):  # d, dmin: finite fp16 values
        blocks.reshape(N, -1, 144)[..., off:off + 2] = np.frombuffer(np.float16(v).tobytes(), np.uint8)
    ref = dequantize(blocks, T.Q4_K)
    codes, s, m = affine_groups("Q4_K", blocks, N, K)
    exact = (codes.reshape(N, -1, 32).astype(np.float32) - 8) * s[..., None] + m[..., None]
    np.testing.assert_allclose(exact.reshape(N, K), ref, rtol=1e-6, atol=1e-6)  # fp32: the file's values
    w1 = rng.standard_normal((N, K)).astype(np.float32)
    q41 = quantize(w1, T.Q4_1)
    c1, s1, m1 = affine_groups("Q4_1", q41, N, K)
    np.testing.assert_allclose(((c1.reshape(N, -1, 32) - 8.0) * s1[..., None] + m1[..., None]).reshape(N, K),
                               dequantize(q41, T.Q4_1), rtol=1e-6, atol=1e-6)
    # one expert: gate Q4_K, up Q4_1 (fused into one 4-bit gate_up), down dense
    D, I = K, N
    shape = ExpertShape(D, I)
    down = rng.standard_normal((D, I)).astype(np.float32)  # e.g. a Q6_K matrix, dequantized by gguf
    codec = GGUFCodec({"gate_up": "q4", "down": "bfloat16"})
    blob = codec.encode_blocks(shape, {"gate": ("Q4_K", blocks), "up": ("Q4_1", q41), "down": ("F32", down)})
    gate_up, dn = codec.dequantize(blob, shape)
    err = np.abs(gate_up.numpy() - np.concatenate([ref, dequantize(q41, T.Q4_1)]))
    bound = np.concatenate([_scale_bound(codes, s, m, 8), _scale_bound(c1, s1, m1, 8)])
    assert (err <= bound).all()
    torch.testing.assert_close(dn, torch.from_numpy(down).bfloat16().float())


def test_mixed_file_keeps_each_tensors_type(family, tmp_path):
    _, f16 = family("qwen2_moe")
    kinds = {"ffn_down_exps": T.Q5_0, "exps": T.Q4_0, "attn": T.Q8_0}
    path = rewrite_gguf(f16, tmp_path / "mix.gguf", lambda n: next((q for k, q in kinds.items() if k in n), None))
    store = convert_gguf(path, tmp_path / "store", quiet=True, backbone_bits=16)  # (8-bit: test_gguf_backbone)
    spec = store.entries[(0, 0)].codec
    assert (spec["gate_up"], spec["down"]) == ("q4", "bfloat16")
    assert spec["source"] == {"gate": "Q4_0", "up": "Q4_0", "down": "Q5_0"}
    e = load(store.path)
    bb = store.backbone()
    t = open_gguf(path).tensors["blk.1.attn_v.weight"]
    want = torch.from_numpy(dequantize(np.asarray(t.data), t.tensor_type)).bfloat16()
    assert torch.equal(bb.get("model.layers.1.self_attn.v_proj.weight"), want)  # Q8_0 backbone, dequantized
    assert len(e.generate(prompt_ids=PROMPT, max_new_tokens=4, ignore_eos=True).token_ids) == 4


def test_early_mixtral_files_with_one_tensor_per_expert(family, tmp_path):
    hf, f16 = family("mixtral")
    path = rewrite_gguf(f16, tmp_path / "split.gguf", split_experts=True)
    assert "blk.1.ffn_down.3.weight" in {t.name for t in gguf.GGUFReader(str(path)).tensors}
    want = load(hf).generate(prompt_ids=PROMPT, max_new_tokens=N_NEW, ignore_eos=True).token_ids
    assert load(path).generate(prompt_ids=PROMPT, max_new_tokens=N_NEW, ignore_eos=True).token_ids == want


def random_blocks(name: str, shape: tuple, rng) -> np.ndarray:
    """Valid K-quant blocks (random bytes, small fp16 super-block scales) for a float shape [..., K]."""
    d_at = {"Q4_K": 0, "Q6_K": 208}[name]
    bs, ts = gguf.GGML_QUANT_SIZES[T[name]]
    b = rng.integers(0, 256, (*shape[:-1], shape[-1] // bs, ts), dtype=np.uint8)
    b[..., d_at:d_at + 2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    if name == "Q4_K":
        b[..., 2:4] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)
    return b.reshape(*shape[:-1], -1)


def test_q4_k_m_like_file_keeps_q4_k_codes_and_dequantizes_q6_k(tmp_path):
    hf = tiny.make_checkpoint(tmp_path / "hf", ("mixtral", {  # K-quants need inputs in blocks of 256
        "num_hidden_layers": 2, "hidden_size": 256, "num_key_value_heads": 2, "intermediate_size": 256,
        "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 300}), dtype="float16")
    f16 = tmp_path / "f16.gguf"
    export_gguf(hf, f16, "f16")
    rng = np.random.default_rng(0)

    def k_quants(name, t):
        if "_exps." not in name:
            return None
        q = "Q6_K" if "down" in name else "Q4_K"
        return random_blocks(q, tuple(int(x) for x in t.shape[::-1]), rng), T[q]

    path = rewrite_gguf(f16, tmp_path / "qk.gguf", replace=k_quants)
    store = convert_gguf(path, tmp_path / "store", quiet=True)
    g, shape = open_gguf(path), store.expert_shape
    I = shape.intermediate
    with open(store.experts_path, "rb") as f:
        for (layer, e), entry in store.entries.items():
            assert (entry.codec["gate_up"], entry.codec["down"]) == ("q4", "bfloat16")
            f.seek(entry.offset)
            gate_up, down = make_codec(entry.codec).dequantize(
                torch.frombuffer(bytearray(f.read(entry.nbytes)), dtype=torch.uint8), shape)
            for part, W in (("gate", gate_up[:I]), ("up", gate_up[I:])):
                blk = np.asarray(g.expert_raw(layer, part, e)[1])
                ref = dequantize(blk, T.Q4_K)
                assert (np.abs(W.numpy() - ref) <= _scale_bound(*affine_groups("Q4_K", blk, *ref.shape), 8)).all()
            ref = dequantize(np.asarray(g.expert_raw(layer, "down", e)[1]), T.Q6_K)
            assert torch.equal(down, torch.from_numpy(ref).bfloat16().float())
    assert len(load(store.path).generate(prompt_ids=PROMPT, max_new_tokens=3, ignore_eos=True).token_ids) == 3


# ---- bad files: one line, non-zero exit, nothing written ----------------------------------------------------

def test_bad_gguf_files_are_one_line_errors(family, tmp_path, child_env, capsys):
    _, f16 = family("mixtral")
    data = f16.read_bytes()
    bad = {
        "corrupt": (tmp_path / "corrupt.gguf", b"GGUF" + bytes(range(256)) * 8, "not a readable GGUF"),
        "truncated": (tmp_path / "truncated.gguf", data[: len(data) // 2], "truncated"),
        "notgguf": (tmp_path / "text.gguf", b"hello world\n" * 10, "not a readable GGUF"),
    }
    for p, content, _ in bad.values():
        p.write_bytes(content)
    arch = rewrite_gguf(f16, tmp_path / "arch.gguf", arch="grok")
    i8 = rewrite_gguf(f16, tmp_path / "i8.gguf", replace=lambda n, t: (
        (np.asarray(t.data).astype(np.int8), T.I8) if n == "blk.0.attn_v.weight" else None))
    cases = [*bad.values(), (arch, None, "architecture 'grok' is not supported"),
             (i8, None, "blk.0.attn_v.weight has GGML type I8, which is not supported")]
    for path, _, message in cases:
        with pytest.raises(MoeError, match=message):
            convert_gguf(path, tmp_path / "never", quiet=True)
        assert not (tmp_path / "never").exists()
    for path, _, message in [cases[1], cases[3], cases[4]]:
        for cmd in (["convert", "--model", path, "--out", tmp_path / "out"],
                    ["generate", "--model", path, "--prompt-ids", "1,2,3"]):
            rc, out, err = cli(capsys, *cmd)
            assert rc != 0 and out == "" and len(err.strip().splitlines()) == 1, err
            assert err.startswith("error: ") and message.split(",")[0] in err
        assert not (tmp_path / "out").exists()
    child_env["MOE_OFFLOAD_CACHE"] = str(tmp_path / "cache")  # and in a fresh process: no traceback
    p = subprocess.run([sys.executable, "-m", "moe_offload.cli", "generate", "--model", str(cases[1][0]),
                        "--prompt-ids", "1,2,3"], capture_output=True, text=True, env=child_env, timeout=600)
    assert p.returncode != 0 and p.stdout == "" and len(p.stderr.strip().splitlines()) == 1, p.stderr


# ---- export: every family llama.cpp reads, from a folder or a store, read back --------------------------------

@pytest.mark.parametrize("name", ["qwen2_moe", "qwen3_moe", "olmoe"])
def test_export_reads_back_with_the_gguf_reader(family, name):
    hf, path = family(name)
    cfg = tiny.read_json(hf / "config.json")
    r = gguf.GGUFReader(str(path))
    arch = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}[name]
    assert r.fields["general.architecture"].contents() == arch
    E, D = cfg.get("num_local_experts") or cfg["num_experts"], cfg["hidden_size"]
    assert r.fields[f"{arch}.expert_count"].contents() == E
    t = {x.name: x for x in r.tensors}
    I = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    assert [int(x) for x in t["blk.1.ffn_down_exps.weight"].shape] == [I, D, E]
    assert t["blk.1.ffn_gate_inp.weight"].tensor_type == T.F32
    if name == "qwen2_moe":
        assert "blk.0.ffn_gate_inp_shexp.weight" in t and "blk.0.attn_q.bias" in t
    if name != "qwen2_moe":
        assert "blk.0.attn_q_norm.weight" in t and "blk.0.attn_k_norm.weight" in t
    assert gguf_config(open_gguf(path))["num_hidden_layers"] == cfg["num_hidden_layers"]


@pytest.mark.parametrize("name", list(SPECS))
def test_store_exports_to_gguf_and_imports_back_with_the_same_tokens(family, tmp_path, name):
    hf, path = family(name)
    store = convert_gguf(path, tmp_path / "store", quiet=True)
    back = export_gguf(store.path, tmp_path / "back.gguf")["path"]
    a = load(hf).generate(prompt_ids=PROMPT, max_new_tokens=N_NEW, ignore_eos=True).token_ids
    assert load(back).generate(prompt_ids=PROMPT, max_new_tokens=N_NEW, ignore_eos=True).token_ids == a


def test_quantized_store_exports_dequantized(family, tmp_path):
    _, f16 = family("olmoe")
    q8 = convert_gguf(rewrite_gguf(f16, tmp_path / "q8.gguf", lambda n: T.Q8_0), tmp_path / "q8", quiet=True)
    back = export_gguf(q8.path, tmp_path / "back.gguf", "f32")["path"]
    a = load(q8.path).logits(PROMPT)
    b = load(back, dtype="bfloat16").logits(PROMPT)
    assert (a - b).abs().max() < 0.05 * a.abs().max()  # dense bf16 vs the q8 kernels on the same weights


def test_export_refuses_what_llama_cpp_cannot_run(tiny_checkpoint, tmp_path):
    for spec, message in [("qwen3_moe_gqa_dense", "dense layers"), ("mixtral_mha_swa_tied", "sliding_window"),
                          ("qwen3_moe_mha_step2_tied", "attention biases"), ("olmoe_gqa_clip", "grouped KV heads"),
                          ("olmoe_gqa_clip", "does not clamp")]:
        with pytest.raises(UsageError, match=message):
            export_gguf(tiny_checkpoint(spec), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_a_gguf_missing_a_tensor_or_key_is_one_line(family, tmp_path):
    _, f16 = family("olmoe")
    for drop, message in (("olmoe.attention.head_count", "'olmoe.attention.head_count' is missing"),
                          ("blk.0.attn_q.weight", "'blk.0.attn_q.weight' is missing"),
                          ("blk.1.attn_k_norm.weight", "1 missing tensor.*k_norm")):
        path = rewrite_gguf(f16, tmp_path / "bad.gguf", drop=drop)
        with pytest.raises(MoeError, match=message):
            convert_gguf(path, tmp_path / "x", quiet=True)
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", list(SPECS))
def test_llama_cpp_runs_the_exported_file_like_the_hf_folder(family, name):
    """llama.cpp (llama-cpp-python) on our F16 file: perplexity within 0.3 % of the folder's in our engine (fp32),
    the same top-1 token at >= 95 % of 63 positions (an OLMoE with grouped KV heads failed to load)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from moe_offload.eval import compare_llamacpp

    hf, path = family(name)
    ids = torch.randint(5, 300, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    r = compare_llamacpp(load(hf, dtype="float32"), str(path), ids, 32, threads=1)
    assert abs(r["ppl_ratio"] - 1) < 3e-3 and r["top1_agreement"] >= 0.95, r


def test_olmoe_clamp_kqv_key_becomes_clip_qkv(family, tmp_path):
    """llama.cpp's convert writes olmoe.attention.clamp_kqv from clip_qkv (llama.cpp itself ignores it; our export
    refuses a clip_qkv for that reason); a file that has it runs with the clamp, as the model was trained."""
    _, f16 = family("olmoe")
    r = gguf.GGUFReader(str(f16))
    path = tmp_path / "clamp.gguf"
    w = gguf.GGUFWriter(str(path), "olmoe")
    for k, f in r.fields.items():
        if not k.startswith("GGUF.") and k != "general.architecture":
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(k, f.contents(), f.types[0], sub_type=sub)
    w.add_clamp_kqv(0.6)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert gguf_config(open_gguf(path))["clip_qkv"] == pytest.approx(0.6)
    assert gguf_config(open_gguf(f16)).get("clip_qkv") is None


def test_bench_takes_a_gguf_file(family, tmp_path):
    """bench --model FILE.gguf: llama.cpp's row is that very file, ours the store converted from it (the file's
    precision); the transformers peers, which need a folder, are dropped."""
    import argparse

    from moe_offload.bench import _gguf_for, prepare

    _, path = family("mixtral")
    a = argparse.Namespace(model=str(path), synthetic=None, cache_dir=str(tmp_path / "cache"), quiet=True,
                           peers=["hf", "accelerate", "llamacpp"], us_bits=[16, 4], dtype="bfloat16",
                           llamacpp_types=["f16", "q4_0"])
    prep = prepare(a)
    assert a.peers == ["llamacpp"] and a.us_bits == [16] and a.llamacpp_types == ["f16"] and a.dtype == "float16"
    assert open_store(prep["store"]).manifest["source"]["gguf"] == str(path.resolve())
    got, err = _gguf_for(prep, "f16", 1, tmp_path / "log")
    assert err is None and got.resolve() == path.resolve()
    assert prep["sizes"].n_experts == 4


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_store_from_a_q4_0_or_q8_0_file_goes_back_out_as_those_blocks(family, tmp_path, qtype):
    """Kept codes go back out block for block: the same codes, d = the store's bf16 scale (the file's fp16 d
    rounded once, on the way in); importing that file again gives a byte-identical store."""
    _, f16 = family("qwen2_moe")
    path = rewrite_gguf(f16, tmp_path / "q.gguf", lambda n: T[qtype] if "_exps" in n else None)
    store = convert_gguf(path, tmp_path / "store", quiet=True)
    info = export_gguf(store.path, tmp_path / "back.gguf")
    assert info["kept"] == 3 * len(store.moe_layers)
    a, b = open_gguf(path), open_gguf(tmp_path / "back.gguf")
    bs = 18 if qtype == "Q4_0" else 34
    for (layer, part), (name,) in a.experts.items():
        assert b.expert_type(layer, part) == qtype
        x, y = np.asarray(a.tensors[name].data), np.asarray(b.tensors[name].data)
        x, y = x.reshape(*x.shape[:-1], -1, bs), y.reshape(*y.shape[:-1], -1, bs)
        assert np.array_equal(x[..., 2:], y[..., 2:])  # codes: byte-identical
        d = x[..., :2].copy().view(np.float16).astype(np.float32)
        want = torch.from_numpy(d).bfloat16().float().numpy().astype(np.float16)
        assert np.array_equal(y[..., :2].copy().view(np.float16), want)  # d: the file's, rounded to bf16 once
    again = convert_gguf(tmp_path / "back.gguf", tmp_path / "again", quiet=True)
    assert again.experts_path.read_bytes() == store.experts_path.read_bytes()
    plain = export_gguf(store.path, tmp_path / "plain.gguf", keep_bits=False)
    assert plain["kept"] == 0 and open_gguf(tmp_path / "plain.gguf").expert_type(0, "down") == "F16"
