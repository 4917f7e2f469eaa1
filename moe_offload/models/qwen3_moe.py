"""Qwen3-MoE: q/k RMSNorm per head, no shared expert, `norm_topk_prob`, `mlp_only_layers`,
`decoder_sparse_step`."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from ..experts import ExpertShape
from .base import MLP, Attention, BaseModelArgs, CausalLM, DecoderLayer, MoE
from .layouts import SWIGLU
from .qwen2_moe import qwen_config_from_gguf
from .routing import softmax_topk


# ---- checkpoint layout (models/layouts.py explains the tables; checkpoint.py reads them) -----------------
CONFIG_KEYS = (("moe_intermediate_size", "num_experts|num_local_experts"),
               "model.layers.{layer}.mlp.gate.weight")
EXPERT_NAMES = ("model.layers.{layer}.mlp.experts.{expert}.{part}.weight", SWIGLU)

# ---- GGUF: llama.cpp's architecture for this family (gguf_import.py and gguf_export.py read it) ----------
GGUF = {"arch": "qwen3moe", "rotary_permuted": False, "norm_topk_prob": True, "experts_key": "num_experts",
        "names": {"ffn_gate_inp.weight": "mlp.gate.weight"}}


def config_from_gguf(cfg: dict, g, expert_size: int, moe_layers: list[int], dense: list[int]) -> None:
    """This family's config.json keys from a qwen3moe GGUF (gguf_import.GGUFModel `g`)."""
    qwen_config_from_gguf(cfg, g, expert_size, dense)
    cfg["attention_bias"] = "blk.0.attn_q.bias" in g.tensors


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "qwen3_moe"
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    rope_parameters: dict | None = None
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = None
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 768
    num_experts_per_tok: int = 8
    num_local_experts: int = 128
    norm_topk_prob: bool = False
    mlp_only_layers: list | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None

    def __post_init__(self):
        self.mlp_only_layers = self.mlp_only_layers or []
        self.sliding_window = self.sliding_window if self.use_sliding_window else None

    def is_moe(self, i: int) -> bool:
        return (i not in self.mlp_only_layers and self.num_local_experts > 0
                and (i + 1) % self.decoder_sparse_step == 0)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        route = partial(softmax_topk, top_k=args.num_experts_per_tok, norm_topk_prob=args.norm_topk_prob)
        layers = []
        for i in range(args.num_hidden_layers):
            attn = Attention(args, qkv_bias=args.attention_bias, o_bias=args.attention_bias, qk_norm="head",
                             window=args.sliding_window)
            mlp = (MoE(args.hidden_size, args.num_local_experts, route) if args.is_moe(i)
                   else MLP(args.hidden_size, args.intermediate_size, args.hidden_act))
            layers.append(DecoderLayer(args, attn, mlp))
        super().__init__(args, layers)
        self.n_experts, self.top_k = args.num_local_experts, args.num_experts_per_tok
        self.expert_shape = ExpertShape(args.hidden_size, args.moe_intermediate_size, args.hidden_act)
