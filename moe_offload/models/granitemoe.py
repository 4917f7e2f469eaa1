"""Granite-MoE: Mixtral-like with scalar multipliers (embeddings, residual branches, attention scale, logits),
top-k -> softmax routing, router at `block_sparse_moe.router.layer`, experts stacked in the checkpoint
(`input_linear [E, 2I, D]`, `output_linear [E, D, I]`; STACKED_EXPERT_NAMES below splits them)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..experts import ExpertShape
from .base import Attention, BaseModelArgs, CausalLM, DecoderLayer, MoE, rope_tables, router_logits_fp32
from .layouts import first_half, second_half, whole
from .routing import topk_softmax


# ---- checkpoint layout (models/layouts.py explains the tables; checkpoint.py reads them) -----------------
CONFIG_KEYS = (("intermediate_size", "num_local_experts|num_experts"),
               "model.layers.{layer}.block_sparse_moe.router.layer.weight")
# input_linear [E, 2I, D] = gate rows then up rows; output_linear [E, D, I]
STACKED_EXPERT_NAMES = [{
    "gate": (("model.layers.{layer}.block_sparse_moe.input_linear.weight",), first_half),
    "up": (("model.layers.{layer}.block_sparse_moe.input_linear.weight",), second_half),
    "down": (("model.layers.{layer}.block_sparse_moe.output_linear.weight",), whole),
}]


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "granitemoe"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None
    attention_bias: bool = False
    embedding_multiplier: float = 1.0
    logits_scaling: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads


class Router(nn.Module):
    def __init__(self, dim: int, n_experts: int):
        super().__init__()
        self.layer = nn.Linear(dim, n_experts, bias=False)


class GraniteMoE(MoE):
    """The shared MoE block with the router named as Granite checkpoints name it."""

    def __init__(self, dim: int, n_experts: int, route):
        super().__init__(dim, n_experts, route)  # routing weights cast to the hidden dtype, as transformers
        del self.gate
        self.router = Router(dim, n_experts)

    def router_logits(self, h: torch.Tensor) -> torch.Tensor:
        return router_logits_fp32(h, self.router.layer.weight)  # [N, E] fp32

    def router_linear(self) -> nn.Linear:
        return self.router.layer


class GraniteDecoderLayer(DecoderLayer):
    def __init__(self, args: ModelArgs, attn: Attention, mlp: nn.Module):
        super().__init__(args, attn, mlp, mlp_name="block_sparse_moe")
        self.residual_multiplier = args.residual_multiplier

    def forward(self, x, cos, sin, cache, pos, masks):
        m = self.residual_multiplier
        a = self.self_attn(self.input_layernorm(x), cos, sin, cache, pos, masks.get(self.self_attn.window))
        h = x + a * m
        return h + self.ffn(self.post_attention_layernorm(h)) * m


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        route = partial(topk_softmax, top_k=args.num_experts_per_tok)
        layers = [
            GraniteDecoderLayer(args, Attention(args, qkv_bias=args.attention_bias, o_bias=args.attention_bias,
                                                scale=args.attention_multiplier),
                                GraniteMoE(args.hidden_size, args.num_local_experts, route))
            for _ in range(args.num_hidden_layers)
        ]
        super().__init__(args, layers)
        self.n_experts, self.top_k = args.num_local_experts, args.num_experts_per_tok
        self.expert_shape = ExpertShape(args.hidden_size, args.intermediate_size, args.hidden_act)

    def init_rope(self, device) -> None:
        """default or yarn from rope_parameters / rope_scaling; any other rope type is an error."""
        head_dim = self.model.layers[0].self_attn.head_dim
        cos, sin = rope_tables(self.args, head_dim, self.args.max_position_embeddings)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens) * self.args.embedding_multiplier

    def head(self, x: torch.Tensor) -> torch.Tensor:
        w = self.model.embed_tokens.weight if self.tie else self.lm_head.weight
        return (F.linear(x, w) / self.args.logits_scaling).float()
