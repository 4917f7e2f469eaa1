"""OLMoE: q/k RMSNorm over the full projection (before the head split), optional `clip_qkv`,
softmax -> top-k with `norm_topk_prob`."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from ..errors import MoeError
from ..experts import ExpertShape
from .base import Attention, BaseModelArgs, CausalLM, DecoderLayer, MoE
from .layouts import SWIGLU
from .routing import softmax_topk


# ---- checkpoint layout (models/layouts.py explains the tables; checkpoint.py reads them) -----------------
CONFIG_KEYS = (("intermediate_size", "num_experts|num_local_experts"), "model.layers.{layer}.mlp.gate.weight")
EXPERT_NAMES = ("model.layers.{layer}.mlp.experts.{expert}.{part}.weight", SWIGLU)

# ---- GGUF: llama.cpp's architecture for this family (gguf_import.py and gguf_export.py read it) ----------
GGUF = {"arch": "olmoe", "rotary_permuted": False, "norm_topk_prob": False, "experts_key": "num_experts",
        "names": {"ffn_gate_inp.weight": "mlp.gate.weight"}}


def config_from_gguf(cfg: dict, g, expert_size: int, moe_layers: list[int], dense: list[int]) -> None:
    """This family's config.json keys from an olmoe GGUF (gguf_import.GGUFModel `g`)."""
    cfg["intermediate_size"] = expert_size
    if dense:
        raise MoeError(f"{g.path}: olmoe layers {dense} have no experts")
    cfg["attention_bias"] = "blk.0.attn_q.bias" in g.tensors


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "olmoe"
    vocab_size: int = 50304
    hidden_size: int = 2048
    intermediate_size: int = 1024
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float | None = None
    rope_parameters: dict | None = None
    attention_bias: bool = False
    clip_qkv: float | None = None
    num_experts_per_tok: int = 8
    num_experts: int = 64
    norm_topk_prob: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        route = partial(softmax_topk, top_k=args.num_experts_per_tok, norm_topk_prob=args.norm_topk_prob)
        layers = [
            DecoderLayer(args, Attention(args, qkv_bias=args.attention_bias, o_bias=args.attention_bias,
                                         qk_norm="full", clip_qkv=args.clip_qkv),
                         MoE(args.hidden_size, args.num_experts, route))
            for _ in range(args.num_hidden_layers)
        ]
        super().__init__(args, layers)
        self.n_experts, self.top_k = args.num_experts, args.num_experts_per_tok
        self.expert_shape = ExpertShape(args.hidden_size, args.intermediate_size, args.hidden_act)
