"""A GGUF file (llama.cpp, ollama, LM Studio) as a model source: `--model FILE.gguf` on every command.

The file is read memory-mapped with `gguf.GGUFReader`, one tensor (one expert's slab of a stacked tensor)
at a time, and converted once into an expert store (cached like an HF folder, store/open.py `cache_root`):

    general.architecture   llama (with experts: Mixtral), qwen2moe, qwen3moe, olmoe -> our model_type
    {arch}.* metadata      -> config.json keys (CONFIG below); shapes come from the tensors where they can
    tensor names           -> checkpoint names (NAMES below); llama's Q/K rows are un-permuted (gguf_export)
    tokenizer.ggml.*       -> tokenizer.json by transformers' own GGUF tokenizer conversion;
                              tokenizer.chat_template -> tokenizer_config.json
    blk.L.ffn_{gate,up,down}_exps [E, ...]   -> one store unit per expert:
        F32/F16/BF16 experts                 dense codec, exact in the store dtype
        Q4_0/Q4_1/Q4_K, Q8_0                 "gguf" codec (quant/ggml.py): the file's codes kept, scales bf16
        anything else (Q5_K, Q6_K, MXFP4..)  dequantized by gguf.quants.dequantize, stored dense
Backbone tensors are dequantized to the store dtype (default: the file's float type; bfloat16 for
quantized files, the int4 kernel's activation dtype), except, with backbone_bits "auto" (the default) or 8,
the attention linears and an untied lm_head that the file holds quantized (Q4_K, Q6_K, Q8_0, ...): those are
stored as 8-bit codes with one bf16 scale/offset per row (quant/backbone.py, the codes `quantize --attn-bits 8
--head-bits 8` writes; run by the int8 kernel), about the file's bytes instead of 2-4x them. The embedding
table stays at the store dtype (one row read per token).

Shape legend: E experts, N output rows, K inputs, D hidden, I expert intermediate.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from .checkpoint import EXPERT_NAMES, check_keys
from .errors import MoeError
from .models import family_table, get_module
from .progress import Progress
from .quant.kernels import write_layout
from .store.folders import check_out, store_dir
from .utils import DTYPE_NAMES, drop_page_cache, reuse_freed_memory

# each family's GGUF table (models/<model_type>.py), and the views of it this module and gguf_export read
GGUF: dict[str, dict] = family_table("GGUF")
ARCHITECTURES = {t["arch"]: mt for mt, t in GGUF.items()}  # general.architecture -> our model_type
FLOAT_TYPES = ("F32", "F16", "BF16")
ROTARY_PERMUTED = {mt for mt, t in GGUF.items() if t["rotary_permuted"]}  # llama.cpp's "llama" rope pairs

# GGUF name -> checkpoint name; "{i}" is the layer. Per family on top of the shared ones.
NAMES_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
NAMES_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"attn_{g}.{w}": f"self_attn.{h}_proj.{w}" for g, h in (("q", "q"), ("k", "k"), ("v", "v"),
                                                                ("output", "o")) for w in ("weight", "bias")},
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",  # dense layers
    "ffn_down.weight": "mlp.down_proj.weight",
}
NAMES_FAMILY = {mt: t["names"] for mt, t in GGUF.items()}
EXPERT_PARTS = {"ffn_gate_exps.weight": "gate", "ffn_up_exps.weight": "up", "ffn_down_exps.weight": "down"}
EXPERT_BIASES = {"ffn_gate_exps.bias": "gate", "ffn_up_exps.bias": "up", "ffn_down_exps.bias": "down"}  # gpt-oss
SPLIT_KV_B = ("attn_k_b.weight", "attn_v_b.weight")  # deepseek2: one checkpoint tensor from two GGUF tensors

# {arch}.<key> -> config.json key (values checked and completed from the tensors in gguf_config)
CONFIG = {"context_length": "max_position_embeddings", "embedding_length": "hidden_size",
          "block_count": "num_hidden_layers", "attention.head_count": "num_attention_heads",
          "attention.head_count_kv": "num_key_value_heads", "attention.layer_norm_rms_epsilon": "rms_norm_eps",
          "rope.freq_base": "rope_theta", "expert_used_count": "num_experts_per_tok",
          "attention.clamp_kqv": "clip_qkv", "expert_weights_norm": "norm_topk_prob"}
# llama.cpp's routing per architecture where the file does not say (expert_weights_norm)
NORM_TOPK = {mt: t["norm_topk_prob"] for mt, t in GGUF.items()}
EXPERTS_KEY = {mt: t["experts_key"] for mt, t in GGUF.items()}  # config.json's key of the expert count


def _unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of gguf_export.permute_rotary: interleaved pairs (2i, 2i+1) back to rotate-half (i, i+Hd/2)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class GGUFModel:
    """An opened GGUF file: its metadata, tensors by name, our model_type and the checkpoint-name map."""

    path: Path
    arch: str
    model_type: str
    meta: dict
    tensors: dict  # gguf name -> gguf ReaderTensor
    names: dict  # checkpoint name -> gguf name (backbone)
    experts: dict  # (layer, part) -> (gguf name of the stacked [E, N, K] tensor,) or one [N, K] name per expert
    expert_bias: dict  # (layer, part) -> gguf name of the stacked [E, N] bias (gpt-oss)
    split: dict  # checkpoint name -> (attn_k_b, attn_v_b) gguf names (deepseek2's kv_b_proj)
    halves: dict = field(default_factory=dict)  # (layer, part) / ("bias", layer, part) -> 0 | 1: a half of the
    #                                              rows of a fused ffn_gate_up_exps [E, 2I, D] (gate rows first)

    def dims(self, gguf_name: str) -> list[int]:
        """A tensor's shape in numpy (checkpoint) order; KeyError if the file lacks it."""
        return [int(x) for x in self.tensors[gguf_name].shape][::-1]

    def type_name(self, gguf_name: str) -> str:
        return self.tensors[gguf_name].tensor_type.name

    def expert_type(self, layer: int, part: str) -> str:
        return self.type_name(self.experts[(layer, part)][0])

    def expert_dims(self, layer: int, part: str) -> list[int]:
        """[E, N, K] of one layer's experts (numpy order)."""
        names = self.experts[(layer, part)]
        dims = [int(x) for x in self.tensors[names[0]].shape][::-1]
        if (layer, part) in self.halves:
            dims[1] //= 2
        return dims if len(names) == 1 else [len(names), *dims]

    def expert_raw(self, layer: int, part: str, e: int) -> tuple[str, np.ndarray]:
        """(gguf name, memory-mapped data) of expert e: its slab of the stacked tensor, or its own tensor."""
        names = self.experts[(layer, part)]
        if len(names) == 1:
            return names[0], _half(self.tensors[names[0]].data[e], self.halves.get((layer, part)))
        return names[e], self.tensors[names[e]].data

    def expert_bias_raw(self, layer: int, part: str, e: int) -> tuple[str, np.ndarray]:
        name = self.expert_bias[(layer, part)]
        return name, _half(self.tensors[name].data[e], self.halves.get(("bias", layer, part)))

    def expert_bias_dims(self, layer: int, part: str) -> list[int]:
        dims = [int(x) for x in self.tensors[self.expert_bias[(layer, part)]].shape][::-1]
        if ("bias", layer, part) in self.halves:
            dims[1] //= 2
        return dims

    def n_elements(self, name: str) -> int:
        """Values of the checkpoint tensor `name` (a GGUF tensor, or the two halves of a split one)."""
        return sum(int(self.tensors[n].n_elements) for n in self.split.get(name) or (self.names[name],))

    def expert_nbytes(self, layer: int, part: str) -> int:
        n = sum(int(self.tensors[n].n_bytes) for n in self.experts[(layer, part)])
        return n // 2 if (layer, part) in self.halves else n


def _half(rows: np.ndarray, half: int | None) -> np.ndarray:
    """rows [2I, ...] -> the first (0) or second (1) I rows; all of them for None."""
    if half is None:
        return rows
    n = rows.shape[0] // 2
    return rows[half * n:(half + 1) * n]


def _field(f):
    v = f.contents()
    v = v.tolist() if isinstance(v, np.ndarray) else v
    return float(str(np.float32(v))) if isinstance(v, float) else v  # GGUF floats are f32: 1e-06, not 9.99e-07


def open_gguf(path: str | os.PathLike) -> GGUFModel:
    """Read the header and map names; a file that is not GGUF, is truncated, or holds another architecture
    is one MoeError line."""
    path = Path(path)
    if not path.is_file():
        raise MoeError(f"{path}: no such GGUF file")
    try:
        import gguf
    except ImportError:
        raise MoeError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    try:
        r = gguf.GGUFReader(str(path))
        meta = {k: _field(f) for k, f in r.fields.items() if not k.startswith("GGUF.")}
        tensors = {t.name: t for t in r.tensors}
        size = path.stat().st_size
        for t in tensors.values():
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise ValueError(f"tensor {t.name} runs past the end of the file")
    except MoeError:
        raise
    except Exception as e:  # the reader raises ValueError, struct/numpy errors, KeyError on unknown types
        raise MoeError(f"{path}: not a readable GGUF file, corrupt or truncated ({type(e).__name__}: {e})") from None
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise MoeError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                       f"{', '.join(ARCHITECTURES)})")
    model_type = ARCHITECTURES[arch]
    if not any(n.endswith(("ffn_gate_exps.weight", "ffn_gate.0.weight", "ffn_gate_up_exps.weight")) for n in tensors):
        raise MoeError(f"{path}: a {arch} GGUF without routed experts (ffn_*_exps) is a dense model, not an MoE")
    names, experts, legacy, biases, split, halves = {}, {}, {}, {}, {}, {}
    table = {**NAMES_LAYER, **NAMES_FAMILY[model_type]}
    for name in tensors:
        if name in NAMES_GLOBAL:
            names[NAMES_GLOBAL[name]] = name
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
        old = re.fullmatch(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight", name)  # early Mixtral files: one
        if old:  # tensor per expert
            legacy.setdefault((int(old.group(1)), old.group(2)), {})[int(old.group(3))] = name
        elif m and m.group(2) in EXPERT_PARTS:
            experts[(int(m.group(1)), EXPERT_PARTS[m.group(2)])] = (name,)
        elif m and (m.group(2) == "ffn_gate_up_exps.weight" or  # llama.cpp's convert --fuse-gate-up-exps
                    (model_type == "gpt_oss" and m.group(2) == "ffn_gate_up_exps.bias")):
            la, bias = int(m.group(1)), m.group(2).endswith("bias")
            for h, p in enumerate(("gate", "up")):
                if bias:
                    biases[(la, p)] = name
                else:
                    experts[(la, p)] = (name,)
                halves[("bias", la, p) if bias else (la, p)] = h
        elif m and model_type == "gpt_oss" and m.group(2) in EXPERT_BIASES:
            biases[(int(m.group(1)), EXPERT_BIASES[m.group(2)])] = name
        elif m and model_type == "deepseek_v2" and m.group(2) in SPLIT_KV_B:
            split.setdefault(f"model.layers.{m.group(1)}.self_attn.kv_b_proj.weight", {})[m.group(2)] = name
        elif m and m.group(2) in table:
            names[f"model.layers.{m.group(1)}.{table[m.group(2)]}"] = name
        elif m and model_type == "deepseek_v2" and m.group(2) == "exp_probs_b.bias":
            raise MoeError(f"{path}: deepseek2 with sigmoid routing / exp_probs_b (DeepSeek-V3) is not supported")
        else:
            raise MoeError(f"{path}: tensor {name!r} is not one a {arch} MoE model has (not supported)")
    for key, per in legacy.items():
        if key in experts or sorted(per) != list(range(len(per))):
            raise MoeError(f"{path}: layer {key[0]} {key[1]} experts are neither stacked nor numbered 0..E-1")
        if len({tensors[n].tensor_type for n in per.values()}) != 1:
            raise MoeError(f"{path}: layer {key[0]} {key[1]} experts do not share one tensor type")
        experts[key] = tuple(per[e] for e in range(len(per)))
    for name, pair in split.items():
        if len(pair) != 2 or name in names:
            raise MoeError(f"{path}: {name.split('.')[2]}: attn_k_b and attn_v_b come in pairs, without attn_kv_b")
        names[name] = pair[SPLIT_KV_B[0]]
        split[name] = (pair[SPLIT_KV_B[0]], pair[SPLIT_KV_B[1]])
    return GGUFModel(path, arch, model_type, meta, tensors, names, experts, biases, split, halves)


def gguf_config(g: GGUFModel) -> dict:
    """config.json for our model classes, from the metadata and the tensors' shapes."""
    try:
        return _config(g)
    except KeyError as e:  # a tensor or key every file of the architecture has
        raise MoeError(f"{g.path}: {e} is missing: not a complete {g.arch} GGUF") from None


def _config(g: GGUFModel) -> dict:
    a, m = g.arch, g.meta
    cfg = {"model_type": g.model_type, "architectures": [f"{g.model_type} (from GGUF)"]}
    for key, ours in CONFIG.items():
        if f"{a}.{key}" in m:
            cfg[ours] = m[f"{a}.{key}"]
    for k in ("num_key_value_heads", "num_attention_heads"):
        if isinstance(cfg.get(k), list):  # per-layer counts: ours are uniform
            if len(set(cfg[k])) != 1:
                raise MoeError(f"{g.path}: per-layer {k} {cfg[k]} is not supported")
            cfg[k] = cfg[k][0]
    scaling = m.get(f"{a}.rope.scaling.type")
    own = GGUF[g.model_type].get("own_config", False)  # the family builds its whole config (deepseek2, gpt-oss)
    if scaling not in (None, "none") and not (scaling == "yarn" and own):
        raise MoeError(f"{g.path}: rope scaling {scaling!r} is not supported for {a} GGUF files")
    if "rope_freqs.weight" in g.tensors:
        raise MoeError(f"{g.path}: per-dimension rope frequencies (rope_freqs) are not supported")
    shape = g.dims
    V, D = shape("token_embd.weight")
    cfg.update(vocab_size=V, hidden_size=D, tie_word_embeddings="output.weight" not in g.tensors)
    L = 1 + max(int(n.split(".")[1]) for n in g.tensors if n.startswith("blk."))
    cfg.setdefault("num_hidden_layers", L)
    E, I, _ = g.expert_dims(min(la for la, _ in g.experts), "gate")
    cfg[EXPERTS_KEY[g.model_type]] = E
    if "num_attention_heads" not in cfg:
        raise KeyError(f"{a}.attention.head_count")
    H = cfg["num_attention_heads"]
    if own:
        moe_layers = sorted({la for la, _ in g.experts})
        dense = [i for i in range(L) if i not in moe_layers]
        get_module(g.model_type).config_from_gguf(cfg, g, I, moe_layers, dense)
        return cfg
    cfg["head_dim"] = shape("blk.0.attn_q.weight")[0] // H
    cfg.setdefault("rms_norm_eps", 1e-5)
    cfg.setdefault("rope_theta", 10000.0)
    cfg.setdefault("norm_topk_prob", NORM_TOPK[g.model_type])
    cfg["norm_topk_prob"] = bool(cfg["norm_topk_prob"])
    moe_layers = sorted({la for la, _ in g.experts})
    dense = [i for i in range(L) if i not in moe_layers]
    get_module(g.model_type).config_from_gguf(cfg, g, I, moe_layers, dense)  # the family's own keys
    if cfg.get("clip_qkv") in (0, 0.0):
        cfg["clip_qkv"] = None
    for k, ours in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        if f"tokenizer.ggml.{k}" in m:
            cfg[ours] = int(m[f"tokenizer.ggml.{k}"])
    return cfg
















def check_types(g: GGUFModel) -> None:
    """Every tensor's GGML type is one we keep or the gguf package dequantizes (tried on one zero block)."""
    import gguf
    from gguf.quants import dequantize

    ok: dict[str, bool] = {}
    for name, t in g.tensors.items():
        tn = t.tensor_type.name
        if tn not in ok:
            try:
                dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[t.tensor_type][1]), np.uint8), t.tensor_type)
                ok[tn] = True
            except (NotImplementedError, KeyError, ValueError):
                ok[tn] = False
        if not ok[tn]:
            raise MoeError(f"{g.path}: tensor {name} has GGML type {tn}, which is not supported")


def store_dtype(g: GGUFModel) -> torch.dtype:
    """The file's float type for the backbone and dense experts; bfloat16 for a quantized file."""
    types = {g.type_name(n) for n in g.tensors if len(g.tensors[n].shape) >= 2}
    if types <= {"F32"}:
        return torch.float32
    if types <= {"F32", "F16"}:
        return torch.float16
    return torch.bfloat16


class GGUFSource:
    """keys()/get()/dtype_of()/shape_of() over a GGUF under checkpoint names (the store writer's source).
    get() dequantizes one tensor (one expert of a stacked tensor) to fp32."""

    def __init__(self, g: GGUFModel, config: dict, shapes: dict[str, tuple]):
        self.g, self.config, self.shapes = g, config, shapes
        self.folder = g.path
        H = config["num_attention_heads"]
        self.heads = {"q_proj": H, "k_proj": config.get("num_key_value_heads") or H}
        n = config[EXPERTS_KEY[g.model_type]]
        template, parts = EXPERT_NAMES.get(g.model_type, (None, None))  # gpt-oss: stacked in checkpoints
        self.expert_names = {template.format(layer=layer, expert=e, part=parts[part]): (layer, part, e)
                             for layer, part in g.experts for e in range(n)} if template else {}

    def keys(self) -> list[str]:
        return [*self.g.names, *self.expert_names]

    def dequantized(self, gguf_name: str, data: np.ndarray | None = None) -> np.ndarray:
        """fp32 values of a tensor (or of `data`, a part of it: one expert's slab)."""
        from gguf.quants import dequantize

        t = self.g.tensors[gguf_name]
        try:
            return dequantize(np.asarray(t.data if data is None else data), t.tensor_type).astype(np.float32)
        except NotImplementedError:
            raise MoeError(f"{self.g.path}: tensor {gguf_name} has type {t.tensor_type.name}, which the gguf "
                           f"package cannot dequantize (not supported)") from None

    def get(self, name: str) -> torch.Tensor:
        if name in self.expert_names:
            return torch.from_numpy(self.dequantized(*self.g.expert_raw(*self.expert_names[name])))
        if name == "lm_head.weight" and name not in self.g.names:
            name = "model.embed_tokens.weight"  # tied
        gname = self.g.names[name]
        if name in self.g.split:  # deepseek2: kv_b [H·(Dn+Dv), R] from k_b [H, R, Dn] and v_b [H, Dv, R]
            k_b, v_b = (self.dequantized(n) for n in self.g.split[name])
            H = self.config["num_attention_heads"]
            k_b = k_b.reshape(H, -1, self.config["qk_nope_head_dim"])
            v_b = v_b.reshape(H, self.config["v_head_dim"], -1)
            w = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, v_b.shape[-1])
        else:
            w = self.dequantized(gname)
        if self.g.model_type in ROTARY_PERMUTED and name.endswith(("q_proj.weight", "k_proj.weight",
                                                                     "q_proj.bias", "k_proj.bias")):
            w = _unpermute_rotary(w, self.heads[name.split(".")[-2]])
        want = self.shapes.get(name)
        if want is not None:
            if int(np.prod(want)) != w.size:
                raise MoeError(f"{self.g.path}: tensor {gname} has {w.size} values, {name} needs shape {want}")
            w = w.reshape(want)
        return torch.from_numpy(np.ascontiguousarray(w))

    def dtype_of(self, name: str) -> str:
        return "F32"  # get() returns fp32; the writer casts to the store dtype

    def shape_of(self, name: str) -> list[int]:
        return list(self.shapes[name])


# ---- tokenizer ---------------------------------------------------------------------------------------

def write_tokenizer(g: GGUFModel, out: Path) -> str | None:
    """tokenizer.json + tokenizer_config.json (special tokens, chat template) into `out`. Returns None, or a
    one-line reason when there is no tokenizer (the model then takes --prompt-ids)."""
    if "tokenizer.ggml.tokens" not in g.meta:
        return "the GGUF has no tokenizer.ggml.tokens"
    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError as e:
        return f"transformers' GGUF tokenizer conversion is not importable ({e}); pip install transformers"
    try:
        arch, tdict, tcfg = get_gguf_tokenizer(str(g.path))
        backend, _ = convert_gguf_tokenizer(arch, tdict)
    except Exception as e:  # transformers refuses tokenizer types it does not know, in its own words
        return f"transformers cannot build this GGUF's tokenizer ({type(e).__name__}: {e})"
    from tokenizers import processors

    tokens = g.meta["tokenizer.ggml.tokens"]
    bos = g.meta.get("tokenizer.ggml.bos_token_id")
    if tcfg.get("add_bos_token") and bos is not None and 0 <= bos < len(tokens):
        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B", special_tokens=[(tokens[bos], bos)])
    tj = json.loads(backend.to_str())  # transformers' GPT2Tokenizer adds its own <|endoftext|> past the file's
    tj["added_tokens"] = [t for t in tj.get("added_tokens") or [] if t["id"] < len(tokens)]  # vocabulary: drop it
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    cfg = {k: tcfg.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if tcfg.get(k)}
    template = g.meta.get("tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return None


# ---- the store ---------------------------------------------------------------------------------------

def expert_codec(g: GGUFModel, layer: int, dtype: torch.dtype):
    """The codec for one layer's experts: dense when the file holds floats, else the gguf codec with each
    matrix's format (q4 / q8 where the codes are kept, dense `dtype` otherwise)."""
    from .experts import DenseCodec
    from .quant.ggml import KEPT, GGUFCodec

    types = {p: g.expert_type(layer, p) for p in ("gate", "up", "down")}
    if all(t in FLOAT_TYPES for t in types.values()) or g.expert_bias:  # biased experts (gpt-oss): dense
        return DenseCodec(dtype), types

    def fmt(parts):
        kept = {KEPT.get(types[p]) for p in parts}
        return kept.pop() if len(kept) == 1 and None not in kept else DTYPE_NAMES[dtype]

    spec = {"gate_up": fmt(("gate", "up")), "down": fmt(("down",)), "source": types}
    if "q4" in (spec["gate_up"], spec["down"]):
        spec["layout"] = write_layout()  # q4 codes in this CPU's int4 kernel order (quant/kernels.py)
    return GGUFCodec(spec), types


BACKBONE_BITS = ("auto", "16", "8")


def check_backbone_bits(bits) -> str:
    """"auto" | "16" | "8" (ints accepted); anything else is a UsageError line."""
    from .errors import UsageError

    if str(bits) not in BACKBONE_BITS:
        raise UsageError(f"backbone bits must be one of {', '.join(BACKBONE_BITS)}, got {bits!r}")
    return str(bits)


def quantized_backbone(g: GGUFModel, model, bits: str) -> list[str]:
    """Checkpoint names of the backbone matrices to store as 8-bit codes: the attention linears and an untied
    lm_head; with "auto" only those whose GGUF tensors (both halves of a split one) are quantized in the file,
    with "8" all of them, with "16" none."""
    from .quant.backbone import attention_linears

    if bits == "16":
        return []
    names = [f"{n}.weight" for n in attention_linears(model)]
    if not getattr(model, "tie", False):
        names.append("lm_head.weight")
    return [n for n in names if n in g.names and (bits == "8" or
            all(g.type_name(t) not in FLOAT_TYPES for t in g.split.get(n) or (g.names[n],)))]


def convert_gguf(path: str | os.PathLike | GGUFModel, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                 overwrite: bool = False, quiet: bool = False, progress: Progress | None = None,
                 backbone_bits: int | str = "auto"):
    """GGUF file (or an opened one) -> store folder (store/format.py layout), one expert at a time; returns the
    opened Store. Everything that can be refused is refused before anything is written. backbone_bits: "16"
    dequantizes every backbone tensor to the store dtype; "auto" / "8" stores the attention linears and lm_head
    that the file holds quantized as 8-bit codes (quantized_backbone)."""
    from .models import build
    from .store.format import (
        ALIGN,
        BACKBONE,
        EXPERTS,
        FORMAT_NAME,
        FORMAT_VERSION,
        MANIFEST,
        ExpertEntry,
        crc32_hex,
        open_store,
        round_up,
        write_safetensors,
    )

    from .quant.backbone import STORED_AS_IS, linears_view
    from .quant.codec import DEFAULT_GROUP

    backbone_bits = check_backbone_bits(backbone_bits)
    g = path if isinstance(path, GGUFModel) else open_gguf(path)
    config = gguf_config(g)
    check_types(g)
    dt = dtype or store_dtype(g)
    config["dtype"] = DTYPE_NAMES[dt]
    try:
        with torch.device("meta"):
            _, model = build(config)
    except (TypeError, ValueError, KeyError) as e:
        raise MoeError(f"{g.path}: its metadata does not make a valid {g.model_type} config ({e})") from None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    source = GGUFSource(g, config, shapes)
    moe_layers = [layer for layer, _ in model.moe_blocks()]
    if sorted({la for la, _ in g.experts}) != moe_layers or len(g.experts) != 3 * len(moe_layers):
        raise MoeError(f"{g.path}: expert tensors are missing in some of layers {moe_layers}")
    backbone = list(shapes)
    ignore = {"lm_head.weight"} if model.tie else set()
    check_keys(set(g.names), set(backbone) - ignore, str(g.path), ignore)
    for name, gname in g.names.items():  # shapes before anything is written
        if name in shapes and int(np.prod(shapes[name])) != g.n_elements(name):
            raise MoeError(f"{g.path}: tensor {gname} has {g.n_elements(name)} values, "
                           f"{name} needs shape {shapes[name]}")
    for (layer, part), gname in g.expert_bias.items():
        want = [model.n_experts, model.expert_shape.hidden if part == "down" else model.expert_shape.intermediate]
        if g.expert_bias_dims(layer, part) != want:
            raise MoeError(f"{g.path}: {gname} ({part} biases) has shape {g.expert_bias_dims(layer, part)}, "
                           f"expected {want}")
    shape = model.expert_shape
    E = model.n_experts
    for (layer, part), gnames in g.experts.items():
        want = [E, shape.hidden, shape.intermediate] if part == "down" else [E, shape.intermediate, shape.hidden]
        if g.expert_dims(layer, part) != want:
            raise MoeError(f"{g.path}: {gnames[0]} (layer {layer} {part} experts) has shape "
                           f"{g.expert_dims(layer, part)}, expected {want}")
    codecs = {layer: expert_codec(g, layer, dt) for layer in moe_layers}
    note = None
    check_out(g.path, out_dir, overwrite)
    with store_dir(out_dir, overwrite=overwrite) as tmp:
        entries, offset = [], 0
        if progress is None:
            progress = Progress(f"convert {g.path.name}", unit="experts", quiet=quiet)
        progress.start(len(moe_layers) * E)
        with open(tmp / EXPERTS, "wb") as f, reuse_freed_memory():
            for layer in moe_layers:
                codec, types = codecs[layer]
                for e in range(E):
                    parts = {}
                    for p in ("gate", "up", "down"):
                        gname, data = g.expert_raw(layer, p, e)
                        kept = hasattr(codec, "encode_blocks") and types[p] not in FLOAT_TYPES and \
                            codec.spec["down" if p == "down" else "gate_up"] in ("q4", "q8")
                        parts[p] = (types[p], np.asarray(data) if kept else source.dequantized(gname, data))
                    if hasattr(codec, "encode_blocks"):
                        blob = codec.encode_blocks(shape, parts)
                    else:
                        biases = {f"{p}_bias": torch.from_numpy(source.dequantized(*g.expert_bias_raw(layer, p, e)))
                                  for p in ("gate", "up", "down") if shape.bias}
                        blob = codec.encode(**{p: torch.from_numpy(np.ascontiguousarray(v)) for p, (_, v) in
                                               parts.items()}, **biases)
                    data = blob.numpy().data
                    f.write(data)
                    f.write(b"\0" * (round_up(len(data)) - len(data)))
                    entries.append(ExpertEntry(layer, e, offset, len(data), dict(codec.spec), crc32_hex(data)))
                    offset += round_up(len(data))
                progress.update(E, sum(g.expert_nbytes(layer, p) for p in ("gate", "up", "down")))
            f.flush()
            os.fsync(f.fileno())
        drop_page_cache(tmp / EXPERTS)
        keep = model.fp32_keys
        names = [n for n in backbone if n in g.names or n not in ignore]
        coded = quantized_backbone(g, model, backbone_bits)
        bsource = source
        if coded:  # 8-bit codes, one group per row: the int8 kernel's layout (quant/codec.py DEFAULT_GROUP)
            bsource, names, keep = linears_view(coded, 8, DEFAULT_GROUP[8])(source, names, (*keep, *STORED_AS_IS))
        backbone_crc = write_safetensors(tmp / BACKBONE, names, bsource, dt, keep)
        note = write_tokenizer(g, tmp)
        manifest = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "model_type": g.model_type, "dtype": DTYPE_NAMES[dt],
            "config": config, "expert_shape": {f.name: getattr(shape, f.name) for f in fields(shape)},
            "moe_layers": moe_layers, "n_experts": E, "top_k": model.top_k, "alignment": ALIGN,
            "experts": [asdict(e) for e in entries], "backbone_checksum": backbone_crc,
            "source": {"gguf": str(g.path.resolve()), "architecture": g.arch,
                       "expert_types": {str(la): t for la, (_, t) in codecs.items()},
                       "backbone_bits": backbone_bits, "backbone_8bit": coded},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
    if note and not quiet:
        print(f"moe-offload: {g.path.name}: no tokenizer in the store: {note}", file=sys.stderr)
    return open_store(out_dir)


def is_gguf(path: str | os.PathLike | None) -> bool:
    return path is not None and Path(path).suffix.lower() == ".gguf" and Path(path).is_file()


def store_for(path: str | os.PathLike, dtype: torch.dtype | None = None, backbone_bits: int | str | None = None):
    """The store converted from a GGUF file, made once under the store cache; keyed by the file's resolved
    path, size and mtime, the dtype and backbone_bits (None: "auto")."""
    from .store.format import open_store
    from .store.cached import cache_root

    bits = check_backbone_bits("auto" if backbone_bits is None else backbone_bits)
    path = Path(path)
    st = path.stat()
    key = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, DTYPE_NAMES.get(dtype), "gguf-2", bits])
    out = cache_root() / f"{path.stem}-gguf-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if out.is_dir():
        try:
            return open_store(out)
        except MoeError as e:
            print(f"moe-offload: cached store {out} is unusable ({e}); converting again", file=sys.stderr)
    g = open_gguf(path)
    gguf_config(g)
    check_types(g)  # a bad file is refused before the "converting" line
    print(f"moe-offload: converting {path} into an expert store at {out} (once)", file=sys.stderr)
    return convert_gguf(g, out, dtype, overwrite=True, backbone_bits=bits)


def read_config(path: str | os.PathLike) -> tuple[dict, str]:
    """(config, name) of a GGUF file without converting it (the planner's view)."""
    g = open_gguf(path)
    return gguf_config(g), Path(path).stem


__all__ = ["GGUFSource", "convert_gguf", "gguf_config", "is_gguf", "open_gguf", "store_for"]
