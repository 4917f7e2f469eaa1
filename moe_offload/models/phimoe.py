"""PhiMoE (Phi-3.5-MoE): Mixtral layout with LayerNorm (weight and bias, eps = `rms_norm_eps`), attention and
lm_head biases, sparsemixer top-2 routing, optional longrope (short factors: the context is capped at
`original_max_position_embeddings`, below which transformers uses the short factors and `short_mscale`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..errors import MoeError
from ..experts import ExpertShape
from .base import Attention, BaseModelArgs, CausalLM, DecoderLayer, MoE, rope_config, rope_tables
from .layouts import W132
from .routing import sparsemixer


# ---- checkpoint layout (models/layouts.py explains the tables; checkpoint.py reads them) -----------------
CONFIG_KEYS = (("intermediate_size", "num_local_experts|num_experts"),
               "model.layers.{layer}.block_sparse_moe.gate.weight")
EXPERT_NAMES = ("model.layers.{layer}.block_sparse_moe.experts.{expert}.{part}.weight", W132)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "phimoe"
    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 6400
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float | None = None
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None
    sliding_window: int | None = None
    attention_bias: bool = False
    lm_head_bias: bool = False
    num_local_experts: int = 16
    num_experts_per_tok: int = 2
    router_jitter_noise: float = 0.01
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        if self.num_experts_per_tok != 2:
            raise MoeError("phimoe: sparsemixer routes 2 experts, config has "
                           f"num_experts_per_tok={self.num_experts_per_tok}")
        if self.tie_word_embeddings and self.lm_head_bias:
            raise MoeError("phimoe: tied embeddings with an lm_head bias are not supported")


class PhimoeDecoderLayer(DecoderLayer):
    def __init__(self, args: ModelArgs, attn: Attention, mlp: nn.Module):
        super().__init__(args, attn, mlp, mlp_name="block_sparse_moe")
        self.input_layernorm = nn.LayerNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        route = partial(sparsemixer, top_k=2, jitter_eps=args.router_jitter_noise)
        layers = [
            PhimoeDecoderLayer(args, Attention(args, qkv_bias=args.attention_bias, o_bias=args.attention_bias,
                                               window=args.sliding_window),
                               MoE(args.hidden_size, args.num_local_experts, route))
            for _ in range(args.num_hidden_layers)
        ]
        super().__init__(args, layers)
        self.model.norm = nn.LayerNorm(args.hidden_size, eps=args.rms_norm_eps)
        if not self.tie:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=args.lm_head_bias)
        self.n_experts, self.top_k = args.num_local_experts, 2
        self.expert_shape = ExpertShape(args.hidden_size, args.intermediate_size, args.hidden_act)

    def _longrope(self) -> dict | None:
        rp = rope_config(self.args)
        return rp if rp["rope_type"] == "longrope" else None

    @property
    def max_len(self) -> int:
        rp = self._longrope()
        if rp is None:
            return self.args.max_position_embeddings
        return (rp.get("original_max_position_embeddings") or self.args.original_max_position_embeddings
                or self.args.max_position_embeddings)

    def init_rope(self, device) -> None:
        head_dim = self.model.layers[0].self_attn.head_dim
        rp = self._longrope()
        if rp is None:
            cos, sin = rope_tables(self.args, head_dim, self.args.max_position_embeddings)
        else:  # short factors and short_mscale for every position below the original context
            inv = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
            short = torch.tensor(rp["short_factor"], dtype=torch.float32)
            inv_freq = 1.0 / (short * float(rp["rope_theta"]) ** inv)
            freqs = torch.outer(torch.arange(self.max_len, dtype=torch.float32), inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            cos, sin = emb.cos() * rp["short_mscale"], emb.sin() * rp["short_mscale"]
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
