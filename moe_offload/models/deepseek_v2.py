"""DeepSeek-V2: multi-head latent attention (MLA) with a compressed KV cache, dense first layers, shared experts,
softmax greedy / group-limited-greedy routing × routed_scaling_factor. deepseek_v3.py reuses the pieces.

Shape legend (over base.py's): R kv_lora_rank, Dn qk_nope_head_dim, Dr qk_rope_head_dim, Dv v_head_dim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MoeError
from ..experts import ExpertShape
from .base import (MLP, BaseModelArgs, CausalLM, DecoderLayer, MoE, RMSNorm, SeqAttention, SeqCache,
                   apply_rope, attention_mask, rope_config, rope_tables, yarn_get_mscale)
from .gguf_keys import gguf_special_ids, gguf_yarn
from .layouts import SWIGLU
from .routing import softmax_group_topk
from .sizes import KV_BYTES, ModelSizes


# ---- checkpoint layout (models/layouts.py explains the tables; checkpoint.py reads them) -----------------
CONFIG_KEYS = (("moe_intermediate_size", "n_routed_experts"), "model.layers.{layer}.mlp.gate.weight")
EXPERT_NAMES = ("model.layers.{layer}.mlp.experts.{expert}.{part}.weight", SWIGLU)

# ---- GGUF: llama.cpp's architecture for this family (gguf_import.py and gguf_export.py read it) ----------
# MLA: attn_q (no q_lora_rank) or attn_q_a -> attn_q_a_norm -> attn_q_b; the latent kv_a_mqa -> kv_a_norm; kv_b
# split by llama.cpp into attn_k_b [H, R, Dn] (transposed) and attn_v_b [H, Dv, R] (early files: attn_kv_b)
GGUF = {"arch": "deepseek2", "own_config": True, "rotary_permuted": False, "norm_topk_prob": False, "experts_key": "n_routed_experts",
        "names": {"ffn_gate_inp.weight": "mlp.gate.weight", "attn_q_a.weight": "self_attn.q_a_proj.weight",
                  "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
                  "attn_q_b.weight": "self_attn.q_b_proj.weight",
                  "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
                  "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
                  "attn_kv_b.weight": "self_attn.kv_b_proj.weight",
                  **{f"ffn_{p}_shexp.weight": f"mlp.shared_experts.{p}_proj.weight" for p in ("gate", "up", "down")}}}



def config_from_gguf(cfg: dict, g, I: int, moe_layers: list[int], dense: list[int]) -> None:
    """deepseek2 (DeepSeek-V2 / V2-Lite): MLA sizes from attention.*_lora_rank and key/value_length(_mla), the
    leading dense layers, shared experts, routed_scaling_factor."""
    a, m, shape = g.arch, g.meta, g.dims
    if m.get(f"{a}.expert_gating_func", 1) != 1:
        raise MoeError(f"{g.path}: deepseek2 with sigmoid routing / exp_probs_b (DeepSeek-V3) is not supported")
    if int(m.get(f"{a}.expert_group_count", 1) or 1) > 1:
        raise MoeError(f"{g.path}: deepseek2 group-limited routing (expert_group_count) is not supported")
    H = cfg["num_attention_heads"]
    dr = int(m[f"{a}.rope.dimension_count"])
    if f"{a}.attention.key_length_mla" in m:  # llama.cpp's MQA view: key_length = R + Dr, value_length = R
        qk, dv = int(m[f"{a}.attention.key_length_mla"]), int(m[f"{a}.attention.value_length_mla"])
    else:
        qk, dv = int(m[f"{a}.attention.key_length"]), int(m[f"{a}.attention.value_length"])
    first = [la for la, _ in g.experts]
    shared = shape(f"blk.{min(first)}.ffn_gate_shexp.weight")[0] if f"blk.{min(first)}.ffn_gate_shexp.weight" \
        in g.tensors else 0
    if shared % I:
        raise MoeError(f"{g.path}: shared expert width {shared} is not a multiple of the expert width {I}")
    k_dense = int(m.get(f"{a}.leading_dense_block_count", 0))
    L = cfg["num_hidden_layers"]
    if sorted(set(first)) != list(range(k_dense, L)):
        raise MoeError(f"{g.path}: deepseek2 experts in layers {sorted(set(first))}, expected {k_dense}..{L - 1}")
    cfg.pop("num_key_value_heads", None)  # MLA: llama.cpp writes 1 (its MQA view)
    cfg.update(num_key_value_heads=H, moe_intermediate_size=I, n_shared_experts=shared // I or None,
               first_k_dense_replace=k_dense, moe_layer_freq=1, topk_method="greedy", n_group=1, topk_group=1,
               routed_scaling_factor=float(m.get(f"{a}.expert_weights_scale", 1.0)),
               kv_lora_rank=int(m[f"{a}.attention.kv_lora_rank"]),
               q_lora_rank=int(m[f"{a}.attention.q_lora_rank"]) if "blk.0.attn_q_a.weight" in g.tensors else None,
               qk_rope_head_dim=dr, qk_nope_head_dim=qk - dr, v_head_dim=dv, scoring_func="softmax")
    cfg["intermediate_size"] = (shape("blk.0.ffn_gate.weight")[0] if k_dense else
                                int(m.get(f"{a}.feed_forward_length", I)))
    cfg.setdefault("rms_norm_eps", 1e-6)
    if f"{a}.rope.scaling.yarn_log_multiplier" in m:  # llama.cpp stores 0.1 · mscale_all_dim (= mscale in V2)
        ms = round(float(m[f"{a}.rope.scaling.yarn_log_multiplier"]) / 0.1, 6)
        rp = gguf_yarn(g, mscale=ms, mscale_all_dim=ms)
    else:
        rp = gguf_yarn(g)
    if rp:
        cfg["rope_scaling"] = rp
    gguf_special_ids(g, cfg)

@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "deepseek_v2"
    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None

    def __post_init__(self):
        if self.mlp_bias:
            raise MoeError(f"{self.model_type}: mlp_bias=true is not supported")

    def is_moe(self, i: int) -> bool:
        return (self.n_routed_experts is not None and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)


class MLACache(SeqCache):
    """Compressed KV cache written by position: the normalised latent kv [B, S, R] and the rotated, head-shared
    k_rope [B, 1, S, Dr] — (R + Dr) values per token and layer instead of H·(Dn + Dr + Dv)."""

    axes = {"kv": 1, "k_rope": 2}

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, dtype, device):
        super().__init__()
        self.register_buffer("kv", torch.zeros(batch, max_len, kv_lora_rank, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("k_rope", torch.zeros(batch, 1, max_len, rope_dim, dtype=dtype, device=device),
                             persistent=False)

    def update(self, pos: int, kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = pos + kv.shape[1]
        self.kv[:, pos:end] = kv
        self.k_rope[:, :, pos:end] = k_rope
        return self.kv[:, :end], self.k_rope[:, :, :end]


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., (x0 x1)(x2 x3)...] -> [..., x0 x2 ... | x1 x3 ...]: DeepSeek's rotary pairs in rotate-half layout.
    q and k get the same permutation, so their dot products (the attention) are unchanged."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def softmax_scale(args, qk_head_dim: int) -> float:
    """1/sqrt(Dn + Dr), × yarn's mscale(factor, mscale_all_dim)² when rope is scaled (transformers'
    `yarn_apply_mscale`)."""
    scale = qk_head_dim ** -0.5
    rp = rope_config(args)
    if rp["rope_type"] != "default" and rp.get("mscale_all_dim"):
        m = yarn_get_mscale(rp["factor"], rp["mscale_all_dim"])
        scale = scale * m * m
    return scale


class MLAttention(SeqAttention):
    """Queries from q_proj, or low-rank q_a_proj -> q_a_layernorm -> q_b_proj; keys/values from one latent
    (kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj) plus a head-shared rotary key part."""

    def __init__(self, args, interleaved: bool = True):
        super().__init__()
        D, H = args.hidden_size, args.num_attention_heads
        self.n_heads, self.window, self.interleaved = H, None, interleaved
        self.dn, self.dr, self.dv, self.rank = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim, \
            args.kv_lora_rank
        self.head_dim = self.dr  # the rotary tables' width
        qk = self.dn + self.dr
        if args.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, args.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, 1e-6)  # transformers and DeepSeek: default eps here
            self.q_b_proj = nn.Linear(args.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.rank + self.dr, bias=args.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.rank, H * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(H * self.dv, D, bias=args.attention_bias)
        self.scale = softmax_scale(args, qk)

    def attend(self, x, cos, sin, cache: MLACache, pos: int, mask) -> torch.Tensor:
        B, T, _ = x.shape
        H, dn, dr, dv = self.n_heads, self.dn, self.dr, self.dv
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(B, T, H, dn + dr).transpose(1, 2).split([dn, dr], dim=-1)  # [B, H, T, Dn|Dr]
        kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, dr], dim=-1)
        kv = self.kv_a_layernorm(kv)  # [B, T, R]
        k_rope = k_rope.view(B, 1, T, dr)
        if self.interleaved:
            q_rope, k_rope = deinterleave(q_rope), deinterleave(k_rope)
        q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
        kv, k_rope = cache.update(pos, kv, k_rope)  # [B, S, R], [B, 1, S, Dr]
        S = kv.shape[1]
        k_nope, v = self.kv_b_proj(kv).view(B, S, H, dn + dv).transpose(1, 2).split([dn, dv], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, H, S, dr)], dim=-1)  # [B, H, S, Dn+Dr]
        q = torch.cat([q_nope, q_rope], dim=-1)
        if mask is None and T > 1:
            mask = attention_mask(pos, T, None, x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # [B, H, T, Dv]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * dv))


class DeepseekMoE(MoE):
    """Routed experts + `shared_experts` (n_shared_experts × moe_intermediate_size, no gate). Routing weights stay
    fp32 into the experts (transformers multiplies them in fp32). With `correction_bias` (V3) the router holds
    `e_score_correction_bias` and `route(logits)` passes it to route(logits, bias)."""

    def __init__(self, args, route, correction_bias: bool = False):
        super().__init__(args.hidden_size, args.n_routed_experts, route, cast_weights=False)
        self.shared_experts = (MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts,
                                   args.hidden_act) if args.n_shared_experts else None)
        if correction_bias:
            gate = self.gate
            gate.register_buffer("e_score_correction_bias", torch.zeros(args.n_routed_experts))
            self.route = lambda logits: route(logits, gate.e_score_correction_bias)  # the buffer as loaded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # [N, D]
        idx, w = self.route(self.router_logits(h))
        y = self.experts(h, idx, w)
        if self.shared_experts is not None:
            y = y + self.shared_experts(h)
        return y.reshape(shape)


class Model(CausalLM):
    kv_kind = "mla"  # the latent cache: kv_lora_rank + qk_rope_head_dim values per token and layer

    def __init__(self, args: ModelArgs, interleaved: bool = True, make_moe=None):
        if make_moe is None:
            if args.scoring_func != "softmax":
                raise MoeError(f"deepseek_v2: scoring_func {args.scoring_func!r} is not supported")
            route = partial(softmax_group_topk, top_k=args.num_experts_per_tok, method=args.topk_method,
                            n_group=args.n_group, topk_group=args.topk_group, norm_topk_prob=args.norm_topk_prob,
                            scaling=args.routed_scaling_factor)
            make_moe = partial(DeepseekMoE, args, route)
        layers = [
            DecoderLayer(args, MLAttention(args, interleaved),
                         make_moe() if args.is_moe(i) else MLP(args.hidden_size, args.intermediate_size,
                                                               args.hidden_act))
            for i in range(args.num_hidden_layers)
        ]
        super().__init__(args, layers)
        self.n_experts, self.top_k = args.n_routed_experts, args.num_experts_per_tok
        self.expert_shape = ExpertShape(args.hidden_size, args.moe_intermediate_size, args.hidden_act)

    def init_rope(self, device) -> None:
        cos, sin = rope_tables(self.args, self.args.qk_rope_head_dim, self.args.max_position_embeddings)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def make_cache(self, batch: int, max_len: int, dtype, device) -> list[MLACache]:
        return [MLACache(batch, max_len, self.args.kv_lora_rank, self.args.qk_rope_head_dim, dtype, device)
                for _ in self.model.layers]

    def skip_checkpoint_key(self, name: str) -> bool:
        """Layers past num_hidden_layers (DeepSeek-V3's multi-token-prediction module) are not used."""
        m = re.match(r"model\.layers\.(\d+)\.", name)
        return m is not None and int(m.group(1)) >= self.args.num_hidden_layers


def config_sizes(cfg: dict) -> ModelSizes:
    """DeepSeek-V2/V3 counted from config keys alone, the published arithmetic (models.sizes.model_sizes counts
    the model built on meta; tests hold the two equal): MLA attention (low-rank q and compressed kv),
    `first_k_dense_replace` dense layers, shared experts, `moe_layer_freq`; V3's `noaux_tc` router adds a
    per-expert score bias (kept fp32)."""
    D, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    H, R, Dr = cfg["num_attention_heads"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    Dn, Dv, Q = cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg.get("q_lora_rank")
    E, I = cfg.get("n_routed_experts") or 0, cfg["moe_intermediate_size"]
    bias = bool(cfg.get("attention_bias", False))
    if Q:  # q_a_proj, q_a_layernorm, q_b_proj
        q_lin, q_fix = D * Q + Q * H * (Dn + Dr), Q + (Q if bias else 0)
    else:  # q_proj
        q_lin, q_fix = D * H * (Dn + Dr), 0
    attn_lin = q_lin + D * (R + Dr) + R * H * (Dn + Dv) + H * Dv * D  # + kv_a_proj_with_mqa, kv_b_proj, o_proj
    attn_fix = q_fix + R + ((R + Dr) + D if bias else 0)  # kv_a_layernorm (+ biases of kv_a_proj, o_proj)
    moe_layers = tuple(i for i in range(L) if E and i >= cfg.get("first_k_dense_replace", 0)
                       and i % cfg.get("moe_layer_freq", 1) == 0)
    n_dense, n_moe = L - len(moe_layers), len(moe_layers)
    shared = cfg.get("n_shared_experts") or 0
    score_bias = E if cfg.get("topk_method") == "noaux_tc" else 0  # e_score_correction_bias
    router = E * D + score_bias  # gate (+ e_score_correction_bias)
    lin = L * attn_lin + n_dense * 3 * D * cfg["intermediate_size"] + n_moe * 3 * D * I * shared
    fix = L * (attn_fix + 2 * D) + n_moe * router + D + V * D * (1 if cfg.get("tie_word_embeddings") else 2)
    return ModelSizes(model_type=cfg["model_type"], n_layers=L, moe_layers=moe_layers, n_experts=E,
                      top_k=cfg["num_experts_per_tok"], expert_params=3 * D * I, backbone_linear=lin,
                      backbone_fixed=fix, kv_bytes_per_token=L * (R + Dr) * KV_BYTES, kv_kind="mla",
                      embed_params=V * D, fp32_params=n_moe * score_bias,
                      head_params=0 if cfg.get("tie_word_embeddings") else V * D)
