"""`moe-offload export-gguf`: a Hugging Face folder or an expert store -> a GGUF file llama.cpp runs (and our own
`--model FILE.gguf` reads back, gguf_import.py).

Families: mixtral (llama.cpp's "llama" with experts), qwen2_moe (qwen2moe), qwen3_moe (qwen3moe), olmoe,
deepseek_v2 (deepseek2: kv_b_proj split into attn_k_b / attn_v_b as llama.cpp wants), gpt_oss (gpt-oss). Names
are gguf_import's tables read backwards; per layer the stacked experts `ffn_gate_exps` / `ffn_up_exps` [E, I, D]
and `ffn_down_exps` [E, D, I] (numpy order; GGUF stores the dims reversed), routers `ffn_gate_inp` [E, D] kept
in F32, 1-D norms in F32. For "llama", Q and K rows are permuted from Hugging Face's rotate-half rotary layout
to llama.cpp's interleaved pairs (the other three use llama.cpp's NEOX rope, unpermuted). What llama.cpp's
architecture cannot run (sliding windows, dense layers in Qwen MoE, ...) is refused in one line (`refusals`).
The tokenizer goes in as a "gpt2" byte-level BPE (tokens, merges, token types, bos/eos), or for a
byte-fallback BPE (Llama / Mistral style) as a sentencepiece "llama" vocabulary (tokens, scores, types, as in
Mixtral files), with the chat template; a folder without tokenizer.json gets a synthetic byte-level
vocabulary of the model's size (benchmarks feed token ids). A store's experts are decoded by their codec
(quantized ones dequantized). F16 / BF16 / F32 are written here, one tensor at a time; Q4_0, Q4_K_M and Q8_0
come from llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`) run on our F16 file.

Shape legend: V vocab, D hidden, I expert intermediate, E experts, H heads, Hd head dim.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np

from .errors import MoeError, UsageError

# --type -> (GGML tensor type name for 2-D weights, llama.cpp file type name)
WRITTEN = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16")}
QUANTIZED = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k": "LLAMA_FTYPE_MOSTLY_Q4_K_M",  # q4_k = llama.cpp's Q4_K_M mix
             "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}
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
        raise UsageError(f"{path}: only BPE tokenizers export (byte-level or sentencepiece-style; got model type "
                         f"{model.get('type')!r})")
    if model.get("byte_fallback"):  # sentencepiece-style BPE (Llama, Mistral, Mixtral): llama.cpp's "llama" vocab
        return _spm_vocab(tj, path, vocab_size, bos, eos)
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


BYTE = 6  # llama.cpp's LLAMA_TOKEN_TYPE_BYTE: <0xXX> byte-fallback pieces


def _spm_vocab(tj: dict, path: Path, vocab_size: int, bos: int | None, eos: int | None) -> dict:
    """A byte-fallback BPE tokenizer.json as llama.cpp's sentencepiece ("llama") vocabulary: tokens with scores
    (a piece's score is minus its id: BPE trainers number merged pieces in merge order, and the sentencepiece
    tokenizers in llama.cpp and transformers merge the best-scored piece first), byte pieces typed BYTE,
    no merges (as llama.cpp writes Mixtral files)."""
    model = tj["model"]
    by_id = {i: (t, BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", t) else NORMAL) for t, i in model["vocab"].items()}
    for a in tj.get("added_tokens") or []:
        by_id[int(a["id"])] = (a["content"], CONTROL if a.get("special") else USER_DEFINED)
    cfg = path.with_name("tokenizer_config.json")
    unk = model.get("unk_token") or (json.loads(cfg.read_text()).get("unk_token") if cfg.is_file() else None)
    unk = unk.get("content") if isinstance(unk, dict) else unk
    if max(by_id) >= vocab_size:
        raise MoeError(f"{path}: token id {max(by_id)} is outside the model's vocabulary of {vocab_size}")
    tokens = [by_id.get(i, (f"[PAD{i}]", UNUSED))[0] for i in range(vocab_size)]
    types = [UNKNOWN if t == unk else by_id.get(i, (t, UNUSED))[1] for i, t in enumerate(tokens)]
    scores = [-float(i) if ty == NORMAL else 0.0 for i, ty in enumerate(types)]
    post = json.dumps(tj.get("post_processor") or {})
    add_bos = bos is not None and bos < vocab_size and json.dumps(tokens[bos]) in post
    return {"model": "llama", "tokens": tokens, "types": types, "scores": scores, "merges": None,
            "pre": None, "bos": bos, "eos": eos, "unk": tokens.index(unk) if unk in tokens else None,
            "add_bos": bool(add_bos), "synthetic": False}


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


def architectures() -> dict[str, str]:
    """our model_type -> llama.cpp's general.architecture (the GGUF table of models/<model_type>.py)."""
    from .gguf_import import GGUF

    return {mt: t["arch"] for mt, t in GGUF.items()}


# routers and expert biases stay F32 (and every 1-D tensor)
KEEP_F32 = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "_exps.bias")


def gguf_name(model_type: str, name: str) -> str | None:
    """Checkpoint name -> GGUF name (gguf_import's tables read backwards); None if it has none."""
    from .gguf_import import NAMES_FAMILY, NAMES_GLOBAL, NAMES_LAYER

    for g, hf in NAMES_GLOBAL.items():
        if hf == name:
            return g
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m:  # the family's own name first (gpt-oss: post_attention_norm, not ffn_norm)
        for g, hf in [*NAMES_FAMILY[model_type].items(), *NAMES_LAYER.items()]:
            if hf == m.group(2):
                return f"blk.{m.group(1)}.{g}"
    return None


def refusals(config: dict) -> list[str]:
    """What llama.cpp's architecture for this family cannot run (empty: exportable)."""
    from .gguf_import import NORM_TOPK

    ARCH, mt = architectures(), config.get("model_type")
    if mt not in ARCH:
        return [f"model_type {mt!r}: export-gguf writes {', '.join(ARCH)} (Mixtral-style and Qwen/OLMoE MoE models)"]
    out = []
    sw = config.get("sliding_window")
    if (mt == "mixtral" and sw and sw < config.get("max_position_embeddings", 0)) or config.get("use_sliding_window"):
        out.append(f"sliding_window {sw}: llama.cpp's {ARCH[mt]} architecture has no sliding-window attention")
    if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step") or 1) > 1:
        out.append(f"dense layers (mlp_only_layers / decoder_sparse_step): llama.cpp's {ARCH[mt]} has experts in "
                   f"every layer")
    if mt in ("qwen3_moe", "olmoe") and config.get("attention_bias"):
        out.append(f"attention biases: llama.cpp's {ARCH[mt]} has none")
    if mt == "olmoe" and (config.get("num_key_value_heads") or config["num_attention_heads"]) != \
            config["num_attention_heads"]:
        out.append("grouped KV heads: llama.cpp's olmoe normalises k over all heads (its k_norm is hidden_size wide)")
    if mt == "olmoe" and config.get("clip_qkv"):
        out.append(f"clip_qkv {config['clip_qkv']}: llama.cpp's olmoe does not clamp q/k/v (it ignores clamp_kqv)")
    if mt == "deepseek_v2":
        return out + _deepseek2_refusals(config)
    if mt == "gpt_oss":
        return out + _gpt_oss_refusals(config)
    norm = True if mt == "mixtral" else bool(config.get("norm_topk_prob", False))
    if norm != NORM_TOPK[mt]:
        out.append(f"norm_topk_prob={norm}: llama.cpp's {ARCH[mt]} always uses {NORM_TOPK[mt]}")
    return out


def _deepseek2_refusals(config: dict) -> list[str]:
    out = []
    if config.get("topk_method", "greedy") != "greedy" and int(config.get("n_group") or 1) > 1:
        out.append(f"topk_method {config['topk_method']!r} with n_group {config['n_group']}: exported deepseek2 "
                   f"files route greedily")
    if int(config.get("moe_layer_freq") or 1) != 1:
        out.append("moe_layer_freq > 1: llama.cpp's deepseek2 has experts in every layer past the dense ones")
    if config.get("scoring_func", "softmax") != "softmax":
        out.append(f"scoring_func {config['scoring_func']!r}: deepseek2 (V2) routes by softmax")
    if config.get("attention_bias"):
        out.append("attention biases: llama.cpp's deepseek2 has none")
    if not config.get("q_lora_rank") and config["num_hidden_layers"] not in (26, 27):
        out.append(f"q_lora_rank null with {config['num_hidden_layers']} layers: llama.cpp's deepseek2 reads attn_q "
                   f"without q_lora only for 26 or 27 layers (DeepSeek-V2-Lite's count)")
    rp = _rope_params(config)
    if rp.get("rope_type", "default") == "yarn" and rp.get("mscale", 1.0) != rp.get("mscale_all_dim", 1.0):
        out.append(f"yarn mscale {rp.get('mscale')} != mscale_all_dim {rp.get('mscale_all_dim')}: a deepseek2 GGUF "
                   f"holds one (yarn_log_multiplier)")
    return out


def _gpt_oss_refusals(config: dict) -> list[str]:
    out = []
    L = config["num_hidden_layers"]
    pattern = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)]
    if config.get("layer_types") not in (None, pattern):
        out.append("layer_types: llama.cpp's gpt-oss slides the even layers and attends fully in the odd ones")
    if (config.get("swiglu_alpha", 1.702), config.get("swiglu_limit", 7.0)) != (1.702, 7.0):
        out.append(f"swiglu_alpha {config.get('swiglu_alpha')} / swiglu_limit {config.get('swiglu_limit')}: "
                   f"llama.cpp's gpt-oss fixes 1.702 / 7.0")
    if config.get("attention_bias") is False:
        out.append("no attention biases: llama.cpp's gpt-oss needs them")
    return out


def _rope_params(config: dict) -> dict:
    rp = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rp["rope_type"] = rp.get("rope_type", rp.get("type", "default"))
    return rp


def plan(config: dict) -> list[tuple[str, str, tuple, bool]]:
    """(gguf name, source, numpy shape, keep in F32) per tensor in file order. Source is a checkpoint name, or
    "experts:<layer>:<part>" for a stacked expert tensor, with ":q" / ":k" suffix for a rotary permute."""
    import torch

    from .gguf_import import ROTARY_PERMUTED
    from .models import build

    with torch.device("meta"):
        _, model = build(config)
    mt = config["model_type"]
    ARCH = architectures()
    shape, E = model.expert_shape, model.n_experts
    D, I = shape.hidden, shape.intermediate
    out = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.tie:
            continue
        g = gguf_name(mt, name)
        if g is None:
            raise UsageError(f"{name}: no GGUF name for this tensor in llama.cpp's {ARCH[mt]} architecture")
        rot = ":q" if name.endswith("q_proj.weight") else ":k" if name.endswith("k_proj.weight") else ""
        src = name + (rot if mt in ROTARY_PERMUTED else "")
        if g.endswith("attn_kv_b.weight"):  # deepseek2: llama.cpp wants kv_b split into k_b (transposed) and v_b
            a = config
            H, R, dn, dv = a["num_attention_heads"], a["kv_lora_rank"], a["qk_nope_head_dim"], a["v_head_dim"]
            out += [(g.replace("kv_b", "k_b"), f"kb:{name}", (H, R, dn), False),
                    (g.replace("kv_b", "v_b"), f"vb:{name}", (H, dv, R), False)]
            continue
        dims = (t.shape[-1],) if g.endswith("ffn_gate_inp_shexp.weight") else tuple(t.shape)  # [1, D] -> [D]
        out.append((g, src, dims, len(dims) == 1 or g.endswith(KEEP_F32)))
        m = re.fullmatch(r"blk\.(\d+)\.ffn_gate_inp\.weight", g)
        if m:  # the layer's stacked experts follow its router
            i = int(m.group(1))
            out += [(f"blk.{i}.ffn_gate_exps.weight", f"experts:{i}:gate", (E, I, D), False),
                    (f"blk.{i}.ffn_up_exps.weight", f"experts:{i}:up", (E, I, D), False),
                    (f"blk.{i}.ffn_down_exps.weight", f"experts:{i}:down", (E, D, I), False)]
            if shape.bias:  # gpt-oss
                out += [(f"blk.{i}.ffn_{p}_exps.bias", f"experts:{i}:{p}_bias", (E, D if p == "down" else I), True)
                        for p in ("gate", "up", "down")]
    return out


class StoreSource:
    """An expert store as a checkpoint (keys()/get()): the backbone as stored, each expert decoded by its own
    codec to fp32 (quantized experts dequantized)."""

    def __init__(self, store):
        from .checkpoint import EXPERT_NAMES

        self.store, self.backbone = store, store.backbone()
        self.folder = store.path
        template, parts = EXPERT_NAMES.get(store.model_type, (None, {}))  # gpt-oss: expert_parts only
        self.experts = {template.format(layer=la, expert=e, part=parts[p]): (la, e, p)
                        for (la, e) in store.entries for p in parts} if template else {}
        # backbone linears stored as codes (quantize --attn-bits, a GGUF's 8-bit attention): exported dequantized
        self.coded = {k[: -len(".qweight")] for k in self.backbone.keys() if k.endswith(".qweight")}

    def keys(self) -> list[str]:
        return [*(k for k in self.backbone.keys() if not k.endswith((".qweight", ".qsz"))),
                *(f"{s}.weight" for s in sorted(self.coded)), *self.experts]

    def _coded(self, stem: str):
        """W [N, K] fp32 of a backbone linear stored as `<stem>.qweight` / `.qsz` (K from the model's shape)."""
        import torch

        from .models import build
        from .quant.backbone import bits_of
        from .quant.kernels import PackedMatrix

        if not hasattr(self, "_shapes"):
            with torch.device("meta"):
                _, model = build(self.store.config)
            self._shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        N, K = self._shapes[f"{stem}.weight"]
        qw, qsz = self.backbone.get(f"{stem}.qweight"), self.backbone.get(f"{stem}.qsz")
        return PackedMatrix(qw, qsz, bits_of(qw.numel(), N, K), N, K).dequantize()

    def _expert(self, layer: int, e: int) -> dict:
        import torch

        from .codecs import make_codec

        entry = self.store.entries[(layer, e)]
        with open(self.store.experts_path, "rb") as f:
            f.seek(entry.offset)
            blob = torch.frombuffer(bytearray(f.read(entry.nbytes)), dtype=torch.uint8)
        codec, shape = make_codec(entry.codec), self.store.expert_shape
        I = shape.intermediate
        if shape.bias:  # gpt-oss: a dense unit with biases
            unit = codec.decode(blob, shape, torch.float32)
            gb = unit.gate_up_bias
            return {"gate": unit.gate_up[:I], "up": unit.gate_up[I:], "down": unit.down, "gate_bias": gb[:I],
                    "up_bias": gb[I:], "down_bias": unit.down_bias}
        if hasattr(codec, "dequantize"):
            gate_up, down = codec.dequantize(blob, shape)
        else:
            unit = codec.decode(blob, shape, torch.float32)
            gate_up, down = unit.gate_up, unit.down
        return {"gate": gate_up[:I], "up": gate_up[I:], "down": down}

    def expert_parts(self, layer: int, e: int) -> dict:
        return self._expert(layer, e)

    def kept_type(self, layer: int, part: str) -> str | None:
        """The GGML type (Q4_0 / Q8_0) every expert of `layer` keeps for `part` as the file's codes (a GGUF-born
        store), written back block for block; None when any of them holds something else."""
        from .quant.ggml import WRITTEN_BACK

        mat, types = "down" if part == "down" else "gate_up", set()
        for (la, _), entry in self.store.entries.items():
            if la == layer:
                c = entry.codec
                t = (c.get("source") or {}).get(part) if c.get("name") == "gguf" else None
                types.add(t if t in WRITTEN_BACK and c.get(mat) == WRITTEN_BACK[t][0] else None)
        return types.pop() if len(types) == 1 else None

    def expert_blocks(self, layer: int, e: int, part: str, type_name: str) -> np.ndarray:
        import torch

        from .codecs import make_codec

        entry = self.store.entries[(layer, e)]
        with open(self.store.experts_path, "rb") as f:
            f.seek(entry.offset)
            blob = torch.frombuffer(bytearray(f.read(entry.nbytes)), dtype=torch.uint8)
        return make_codec(entry.codec).blocks(blob, self.store.expert_shape, part, type_name)

    def get(self, name: str):
        if name in self.experts:
            la, e, p = self.experts[name]
            return self._expert(la, e)[p]
        if name.endswith(".weight") and name[: -len(".weight")] in self.coded:
            return self._coded(name[: -len(".weight")])
        return self.backbone.get(name)


def export_gguf(hf_dir: str | os.PathLike, out: str | os.PathLike, type_: str = "f16", threads: int | None = None,
                overwrite: bool = False, keep_bits: bool = True) -> dict:
    """Write `out` from a Hugging Face folder or an expert store; returns {"path", "type", "bytes", "seconds",
    "synthetic_vocab", "kept"}. A store's experts holding a Q4_0 / Q8_0 file's codes go out as those blocks
    (`keep_bits`, for --type f16/bf16/f32; "kept" counts those tensors), other quantized experts dequantized."""
    t0 = time.perf_counter()
    hf_dir, out = Path(hf_dir), Path(out)
    if type_ not in TYPES:
        raise UsageError(f"--type {type_!r}: choose one of {', '.join(TYPES)}")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; remove it or pass --overwrite")
    if type_ in QUANTIZED:
        tmp = out.with_name(f".{out.name}.f16-{os.getpid()}.gguf")
        try:
            info = export_gguf(hf_dir, tmp, "f16", overwrite=True, keep_bits=False)
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

    from .checkpoint import SafetensorsFolder, dequantizing, expert_tensors, read_config

    if (hf_dir / "manifest.json").is_file():  # one of our stores
        from .store.format import open_store

        store = open_store(hf_dir)
        config, src = dict(store.config), StoreSource(store)
    else:
        config = read_config(hf_dir)
        src = None
    bad = refusals(config)
    if bad:
        raise UsageError(f"export-gguf {hf_dir}: " + "; ".join(bad))
    if src is None:
        src = dequantizing(SafetensorsFolder(hf_dir), config)
    mt = config["model_type"]
    arch = architectures()[mt]
    H, Hkv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    D = config["hidden_size"]
    Hd = config.get("head_dim") or D // H
    vocab = tokenizer_vocab(hf_dir, config["vocab_size"], _int_id(config.get("bos_token_id")),
                            _int_id(config.get("eos_token_id")))

    wtype_name, ftype_name = WRITTEN[type_]
    wtype = gguf.GGMLQuantizationType[wtype_name]
    f32 = gguf.GGMLQuantizationType.F32
    tensors = plan(config)
    kept = {}  # (layer, part) -> GGML type written back from kept codes
    if keep_bits and isinstance(src, StoreSource):
        for layer, part in {tuple(s.split(":")[1:]) for _, s, _, _ in tensors if s.startswith("experts:")}:
            if part in ("gate", "up", "down") and src.kept_type(int(layer), part):
                kept[(int(layer), part)] = src.kept_type(int(layer), part)
    n_experts = config.get("num_local_experts") or config.get("n_routed_experts") or config["num_experts"]
    I = next(shape[1] for _, source, shape, _ in tensors if source.endswith(":gate"))

    def expert(layer: int, e: int) -> dict:
        return src.expert_parts(layer, e) if hasattr(src, "expert_parts") else expert_tensors(src, mt, layer, e)

    def load(source: str) -> torch.Tensor:  # float32, numpy shape of the plan
        if source.startswith("experts:"):
            _, layer, part = source.split(":")
            parts = [expert(int(layer), e)[part].float() for e in range(n_experts)]
            return torch.stack(parts)
        if source.startswith(("kb:", "vb:")):  # deepseek2 kv_b [H·(Dn+Dv), R] -> k_b [H, R, Dn] | v_b [H, Dv, R]
            kv_b = src.get(source[3:]).float()
            k_b, v_b = kv_b.view(H, -1, kv_b.shape[-1]).split([config["qk_nope_head_dim"], config["v_head_dim"]], 1)
            return k_b.transpose(1, 2).contiguous() if source.startswith("kb:") else v_b.contiguous()
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

    w = gguf.GGUFWriter(str(out) + ".tmp", arch)
    w.add_name(hf_dir.resolve().name)
    w.add_context_length(config.get("max_position_embeddings", 4096))
    w.add_embedding_length(D)
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(H)
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6 if mt == "deepseek_v2" else 1e-5)))
    w.add_expert_count(n_experts)
    w.add_expert_used_count(config["num_experts_per_tok"])
    if mt in ("deepseek_v2", "gpt_oss"):
        _yarn_family_keys(w, config, I)
    else:
        w.add_head_count_kv(Hkv)
        if Hd != D // H or mt == "qwen3_moe":
            w.add_key_length(Hd)
            w.add_value_length(Hd)
        w.add_rope_dimension_count(Hd)
        w.add_rope_freq_base(_rope_theta(config))
    if mt not in ("mixtral", "deepseek_v2", "gpt_oss"):
        w.add_expert_feed_forward_length(I)
        w.add_bool(f"{arch}.expert_weights_norm", bool(config.get("norm_topk_prob", False)))
    if mt == "qwen2_moe":
        w.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
    w.add_vocab_size(config["vocab_size"])
    w.add_file_type(int(gguf.LlamaFileType[ftype_name]))
    w.add_tokenizer_model(vocab.get("model", "gpt2"))
    if vocab["pre"]:
        w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if vocab.get("scores"):
        w.add_token_scores(vocab["scores"])
    if vocab["merges"]:
        w.add_token_merges(vocab["merges"])
    if vocab.get("unk") is not None:
        w.add_unk_token_id(int(vocab["unk"]))
    if vocab["bos"] is not None:
        w.add_bos_token_id(int(vocab["bos"]))
    if vocab["eos"] is not None:
        w.add_eos_token_id(int(vocab["eos"]))
    w.add_add_bos_token(vocab["add_bos"])
    template = _chat_template(hf_dir)
    if template:
        w.add_chat_template(template)
    if vocab["synthetic"]:
        w.add_string("moe_offload.note", "synthetic byte-level vocabulary (the source folder has no tokenizer)")

    def kept_of(source: str) -> str | None:
        if not source.startswith("experts:"):
            return None
        _, layer, part = source.split(":")
        return kept.get((int(layer), part))

    for name, source, shape, keep_f32 in tensors:
        t_type = f32 if keep_f32 else wtype
        itemsize = 4 if t_type == f32 else 2
        nbytes = int(np.prod(shape)) * itemsize
        if kept_of(source):
            qt = gguf.GGMLQuantizationType[kept_of(source)]
            bs, ts = gguf.GGML_QUANT_SIZES[qt]
            byte_shape = (*shape[:-1], shape[-1] // bs * ts)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qt)
        elif t_type == gguf.GGMLQuantizationType.BF16:
            w.add_tensor_info(name, (*shape[:-1], shape[-1] * 2), np.dtype(np.uint8), nbytes, raw_dtype=t_type)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float32 if t_type == f32 else np.float16), nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, source, shape, keep_f32 in tensors:  # one tensor in memory at a time
        if kept_of(source):  # the store's codes as the file's blocks
            _, layer, part = source.split(":")
            w.write_tensor_data(np.stack([src.expert_blocks(int(layer), e, part, kept_of(source))
                                          for e in range(n_experts)]))
            continue
        t = load(source)
        if t.numel() != int(np.prod(shape)):
            raise MoeError(f"{hf_dir}: {source} has shape {tuple(t.shape)}, expected {shape}")
        w.write_tensor_data(as_numpy(t.reshape(shape), f32 if keep_f32 else wtype))
    w.close()
    with open(str(out) + ".tmp", "rb+") as f:
        os.fsync(f.fileno())
    os.replace(str(out) + ".tmp", out)
    return {"path": str(out), "type": type_, "bytes": out.stat().st_size, "seconds": time.perf_counter() - t0,
            "synthetic_vocab": vocab["synthetic"], "kept": len(kept)}


def _yarn_family_keys(w, config: dict, I: int) -> None:
    """deepseek2 / gpt-oss metadata as llama.cpp's convert_hf_to_gguf.py writes it: MLA sizes (llama.cpp's MQA
    view: one kv head of R + Dr keys and R values), leading dense layers, shared experts, yarn; sliding window."""
    import gguf

    rp = _rope_params(config)
    theta = float(rp.get("rope_theta") or config.get("rope_theta") or 10000.0)
    w.add_rope_freq_base(theta)
    w.add_expert_feed_forward_length(I)
    if rp["rope_type"] not in ("default", "yarn"):
        raise UsageError(f"rope_type {rp['rope_type']!r} is not exported")
    if rp["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rp["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rp.get("original_max_position_embeddings") or
                                            config["max_position_embeddings"]))
        w.add_rope_scaling_yarn_beta_fast(float(rp.get("beta_fast") or 32.0))
        w.add_rope_scaling_yarn_beta_slow(float(rp.get("beta_slow") or 1.0))
    if config["model_type"] == "gpt_oss":
        Hd = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        w.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
        w.add_key_length(Hd)
        w.add_value_length(Hd)
        w.add_rope_dimension_count(Hd)
        w.add_sliding_window(int(config.get("sliding_window") or 128))
        return
    R, dr = config["kv_lora_rank"], config["qk_rope_head_dim"]
    w.add_head_count_kv(1)
    w.add_leading_dense_block_count(int(config.get("first_k_dense_replace") or 0))
    if config.get("q_lora_rank"):
        w.add_q_lora_rank(config["q_lora_rank"])
    w.add_kv_lora_rank(R)
    w.add_key_length(R + dr)
    w.add_value_length(R)
    w.add_key_length_mla(config["qk_nope_head_dim"] + dr)
    w.add_value_length_mla(config["v_head_dim"])
    w.add_expert_shared_count(int(config.get("n_shared_experts") or 0))
    w.add_expert_weights_scale(float(config.get("routed_scaling_factor", 1.0)))
    if config.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(dr)
    if rp["rope_type"] == "yarn" and rp.get("mscale_all_dim"):
        w.add_rope_scaling_yarn_log_mul(0.1 * float(rp["mscale_all_dim"]))


def _chat_template(folder: Path) -> str | None:
    """The folder's chat template (chat_template.jinja, or tokenizer_config.json's), for tokenizer.chat_template."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        try:
            t = json.loads(cfg.read_text()).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return t if isinstance(t, str) else None
    return None


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


def add_args(p):
    p.add_argument("--model", required=True, help="Hugging Face folder or expert store (mixtral, qwen2_moe, "
                                                   "qwen3_moe, olmoe, deepseek_v2, gpt_oss)")
    p.add_argument("--out", required=True, help="GGUF file to write")
    p.add_argument("--type", default="f16", choices=TYPES,
                   help="f16/bf16/f32 written here; q4_0, q4_k (Q4_K_M), q8_0 by llama.cpp's quantizer from our F16")
    p.add_argument("--threads", type=int, default=None, help="quantizer threads")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--dequantize", action="store_true",
                   help="a store's experts kept from a Q4_0 / Q8_0 file go out dequantized, not as those blocks")


def run(a) -> int:
    if not Path(a.model).is_dir():
        raise UsageError(f"--model {a.model}: no such folder")
    info = export_gguf(a.model, a.out, a.type, a.threads, a.overwrite, keep_bits=not a.dequantize)
    note = " (synthetic vocabulary: the folder has no tokenizer)" if info.get("synthetic_vocab") else ""
    print(f"wrote {info['path']}: {info['type']}, {info['bytes'] / 2**20:.1f} MiB in {info['seconds']:.1f} s{note}")
    return 0
