"""`moe-offload export-gguf`: a Hugging Face Mixtral folder -> a GGUF file llama.cpp runs, for benchmarks on the
same weights.

Mixtral is llama.cpp's "llama" architecture with stacked experts: per layer `ffn_gate_exps` / `ffn_up_exps`
[E, I, D] and `ffn_down_exps` [E, D, I] (numpy order; GGUF stores the dims reversed), the router
`ffn_gate_inp` [E, D] kept in F32, 1-D norms in F32. Q and K rows are permuted from Hugging Face's rotate-half
rotary layout to llama.cpp's interleaved pairs. The tokenizer goes in as a "gpt2" byte-level BPE (tokens,
merges, token types, bos/eos); a folder without tokenizer.json gets a synthetic byte-level vocabulary of the
model's size (benchmarks feed token ids). F16 / BF16 / F32 are written here, one tensor at a time; Q4_0 and
Q4_K come from llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`) run on our F16 file.

Shape legend: V vocab, D hidden, I expert intermediate, E experts, H heads, Hd head dim.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .cli import command
from .errors import MoeError, UsageError

# --type -> (GGML tensor type name for 2-D weights, llama.cpp file type name)
WRITTEN = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16")}
QUANTIZED = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # q4_k = llama.cpp's Q4_K_M mix
TYPES = [*WRITTEN, *QUANTIZED]

# token types (llama.cpp's llama_token_type / gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED = 1, 2, 3, 4, 5


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def tokenizer_vocab(folder: Path, vocab_size: int, bos: int | None, eos: int | None) -> dict:
    """tokens / token types / merges / pre-tokenizer for a byte-level BPE tokenizer.json, padded to the model's
    vocabulary with unused "[PAD{i}]" tokens; a synthetic byte-level vocabulary when there is no tokenizer."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        chars = list(_bytes_to_unicode().values())
        tokens = ["<unk>", "<s>", "</s>", *chars, "\u0120\u0120"]
        types = [UNKNOWN, CONTROL, CONTROL, *[NORMAL] * len(chars), NORMAL]
        if vocab_size < len(tokens):
            raise MoeError(f"{folder}: no tokenizer.json and a vocabulary of {vocab_size} < {len(tokens)} tokens")
        tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
        types += [UNUSED] * (vocab_size - len(types))
        return {"tokens": tokens, "types": types, "merges": ["\u0120 \u0120"], "pre": "gpt-2", "bos": 1, "eos": 2,
                "add_bos": True, "synthetic": True}
    tj = json.loads(path.read_text())
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UsageError(f"{path}: only byte-level BPE tokenizers export (got model type {model.get('type')!r})")
    by_id: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in model["vocab"].items()}
    for a in tj.get("added_tokens") or []:
        by_id[int(a["id"])] = (a["content"], CONTROL if a.get("special") else USER_DEFINED)
    n = max(vocab_size, max(by_id) + 1)
    if n > vocab_size:
        raise MoeError(f"{path}: token id {max(by_id)} is outside the model's vocabulary of {vocab_size}")
    tokens = [by_id.get(i, (f"[PAD{i}]", UNUSED))[0] for i in range(n)]
    types = [by_id.get(i, (f"[PAD{i}]", UNUSED))[1] for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre = tj.get("pre_tokenizer") or {}
    byte_level = pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
    post = json.dumps(tj.get("post_processor") or {})
    add_bos = bos is not None and bos < n and json.dumps(tokens[bos]) in post
    return {"tokens": tokens, "types": types, "merges": merges, "pre": "gpt-2" if byte_level else "default",
            "bos": bos, "eos": eos, "add_bos": bool(add_bos), "synthetic": False}


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """[H*Hd, D] rows from rotate-half order (pairs i, i + Hd/2) to interleaved order (pairs 2i, 2i+1)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config: dict) -> float:
    rp = config.get("rope_parameters") or {}
    if rp.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        raise UsageError(f"rope scaling {rp.get('rope_type') or config.get('rope_scaling')!r} is not exported")
    return float(rp.get("rope_theta") or config.get("rope_theta") or 1e6)


def _int_id(v):
    return v[0] if isinstance(v, list) and v else v


def plan(config: dict) -> list[tuple[str, str, tuple, bool]]:
    """(gguf name, source, numpy shape, keep in F32) per tensor in file order. Source is a checkpoint name, or
    "experts:<layer>:<part>" for a stacked expert tensor, with ":q" / ":k" suffix for a rotary permute."""
    D, V, L = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    E, I = config["num_local_experts"], config["intermediate_size"]
    H, Hkv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    Hd = config.get("head_dim") or D // H
    out = [("token_embd.weight", "model.embed_tokens.weight", (V, D), False),
           ("output_norm.weight", "model.norm.weight", (D,), True)]
    if not config.get("tie_word_embeddings"):
        out.append(("output.weight", "lm_head.weight", (V, D), False))
    for i in range(L):
        p = f"model.layers.{i}."
        out += [
            (f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", (D,), True),
            (f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight:q", (H * Hd, D), False),
            (f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight:k", (Hkv * Hd, D), False),
            (f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", (Hkv * Hd, D), False),
            (f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", (D, H * Hd), False),
            (f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", (D,), True),
            (f"blk.{i}.ffn_gate_inp.weight", p + "block_sparse_moe.gate.weight", (E, D), True),  # router stays F32
            (f"blk.{i}.ffn_gate_exps.weight", f"experts:{i}:gate", (E, I, D), False),
            (f"blk.{i}.ffn_up_exps.weight", f"experts:{i}:up", (E, I, D), False),
            (f"blk.{i}.ffn_down_exps.weight", f"experts:{i}:down", (E, D, I), False),
        ]
    return out


def export_gguf(hf_dir: str | os.PathLike, out: str | os.PathLike, type_: str = "f16", threads: int | None = None,
                overwrite: bool = False) -> dict:
    """Write `out`; returns {"path", "type", "bytes", "seconds", "synthetic_vocab"}."""
    t0 = time.perf_counter()
    hf_dir, out = Path(hf_dir), Path(out)
    if type_ not in TYPES:
        raise UsageError(f"--type {type_!r}: choose one of {', '.join(TYPES)}")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; remove it or pass --overwrite")
    if type_ in QUANTIZED:
        tmp = out.with_name(f".{out.name}.f16-{os.getpid()}.gguf")
        try:
            info = export_gguf(hf_dir, tmp, "f16", overwrite=True)
            quantize_gguf(tmp, out, type_, threads)
        finally:
            tmp.unlink(missing_ok=True)
        return {**info, "path": str(out), "type": type_, "bytes": out.stat().st_size,
                "seconds": time.perf_counter() - t0}
    try:
        import gguf
    except ImportError:
        raise MoeError("export-gguf needs the `gguf` package: pip install 'moe-offload[bench]' (or pip install gguf)") from None
    import torch

    from .checkpoint import SafetensorsFolder, expert_tensors, read_config

    config = read_config(hf_dir)
    if config.get("model_type") != "mixtral":
        raise UsageError(f"export-gguf writes Mixtral-style models; {hf_dir} is {config.get('model_type')!r}")
    sw = config.get("sliding_window")
    if sw and sw < config.get("max_position_embeddings", 0):
        raise UsageError(f"sliding_window {sw}: llama.cpp's llama architecture has no sliding-window attention")
    src = SafetensorsFolder(hf_dir)
    H, Hkv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    D = config["hidden_size"]
    Hd = config.get("head_dim") or D // H
    vocab = tokenizer_vocab(hf_dir, config["vocab_size"], _int_id(config.get("bos_token_id")),
                            _int_id(config.get("eos_token_id")))

    wtype_name, ftype_name = WRITTEN[type_]
    wtype = gguf.GGMLQuantizationType[wtype_name]
    f32 = gguf.GGMLQuantizationType.F32
    tensors = plan(config)
    expected = set(src.keys())

    def load(source: str) -> torch.Tensor:  # float32, numpy shape of the plan
        if source.startswith("experts:"):
            _, layer, part = source.split(":")
            parts = [expert_tensors(src, "mixtral", int(layer), e)[part].float()
                     for e in range(config["num_local_experts"])]
            return torch.stack(parts)
        name, _, rot = source.partition(":")
        t = src.get(name).float()
        if rot:
            t = torch.from_numpy(permute_rotary(t.numpy(), H if rot == "q" else Hkv))
        return t

    def as_numpy(t: torch.Tensor, ggml_type) -> np.ndarray:
        if ggml_type == gguf.GGMLQuantizationType.F32:
            return t.float().contiguous().numpy()
        if ggml_type == gguf.GGMLQuantizationType.F16:
            return t.half().contiguous().numpy()
        return t.bfloat16().contiguous().view(torch.uint8).numpy()  # BF16: raw bytes, shape [..., 2n]

    w = gguf.GGUFWriter(str(out) + ".tmp", "llama")
    w.add_name(hf_dir.resolve().name)
    w.add_context_length(config.get("max_position_embeddings", 4096))
    w.add_embedding_length(D)
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    if Hd != D // H:
        w.add_key_length(Hd)
        w.add_value_length(Hd)
    w.add_rope_dimension_count(Hd)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    w.add_expert_count(config["num_local_experts"])
    w.add_expert_used_count(config["num_experts_per_tok"])
    w.add_vocab_size(config["vocab_size"])
    w.add_file_type(int(gguf.LlamaFileType[ftype_name]))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    if vocab["bos"] is not None:
        w.add_bos_token_id(int(vocab["bos"]))
    if vocab["eos"] is not None:
        w.add_eos_token_id(int(vocab["eos"]))
    w.add_add_bos_token(vocab["add_bos"])
    if vocab["synthetic"]:
        w.add_string("moe_offload.note", "synthetic byte-level vocabulary (the source folder has no tokenizer)")

    used = set()
    for name, source, shape, keep_f32 in tensors:
        t_type = f32 if keep_f32 else wtype
        itemsize = 4 if t_type == f32 else 2
        nbytes = int(np.prod(shape)) * itemsize
        if t_type == gguf.GGMLQuantizationType.BF16:
            w.add_tensor_info(name, (*shape[:-1], shape[-1] * 2), np.dtype(np.uint8), nbytes, raw_dtype=t_type)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float32 if t_type == f32 else np.float16), nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, source, shape, keep_f32 in tensors:  # one tensor in memory at a time
        t = load(source)
        if tuple(t.shape) != shape:
            raise MoeError(f"{hf_dir}: {source} has shape {tuple(t.shape)}, expected {shape}")
        w.write_tensor_data(as_numpy(t, f32 if keep_f32 else wtype))
        used.add(source.partition(":")[0])
    w.close()
    with open(str(out) + ".tmp", "rb+") as f:
        os.fsync(f.fileno())
    os.replace(str(out) + ".tmp", out)
    n_expert_keys = sum(1 for k in expected if ".experts." in k)
    missing = {k for k in expected if ".experts." not in k} - used
    if missing:
        print(f"moe-offload: export-gguf left out {len(missing)} tensor(s), e.g. {sorted(missing)[0]}", file=sys.stderr)
    return {"path": str(out), "type": type_, "bytes": out.stat().st_size, "seconds": time.perf_counter() - t0,
            "synthetic_vocab": vocab["synthetic"], "expert_tensors_read": n_expert_keys}


def quantize_gguf(src: str | os.PathLike, out: str | os.PathLike, type_: str, threads: int | None = None) -> None:
    """llama.cpp's own quantizer (llama_model_quantize) from an F16/F32 GGUF."""
    try:
        import ctypes

        import llama_cpp
    except ImportError as e:
        raise MoeError(f"--type {type_} needs llama.cpp's quantizer: pip install llama-cpp-python ({e})") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZED[type_])
    params.nthread = threads or os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        Path(out).unlink(missing_ok=True)
        raise MoeError(f"llama_model_quantize({src} -> {out}, {type_}) failed with code {rc}")


def _add_export(p):
    p.add_argument("--model", required=True, help="Hugging Face Mixtral-style folder")
    p.add_argument("--out", required=True, help="GGUF file to write")
    p.add_argument("--type", default="f16", choices=TYPES,
                   help="f16/bf16/f32 written here; q4_0, q4_k (Q4_K_M) by llama.cpp's quantizer from our F16")
    p.add_argument("--threads", type=int, default=None, help="quantizer threads")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


@command("export-gguf", "write a Mixtral-style Hugging Face folder as a GGUF file for llama.cpp", _add_export)
def cmd_export_gguf(a) -> int:
    if not Path(a.model).is_dir():
        raise UsageError(f"--model {a.model}: no such folder")
    info = export_gguf(a.model, a.out, a.type, a.threads, a.overwrite)
    note = " (synthetic vocabulary: the folder has no tokenizer)" if info.get("synthetic_vocab") else ""
    print(f"wrote {info['path']}: {info['type']}, {info['bytes'] / 2**20:.1f} MiB in {info['seconds']:.1f} s{note}")
    return 0
