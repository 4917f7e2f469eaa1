"""Mixtral: softmax -> top-k -> renormalise; experts w1 (gate), w3 (up), w2 (down)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from ..errors import MoeError
from ..experts import ExpertShape
from .base import Attention, BaseModelArgs, CausalLM, DecoderLayer, MoE
from .layouts import W132
from .routing import softmax_topk


# ---- checkpoint layout (models/layouts.py explains the tables; checkpoint.py reads them) -----------------
CONFIG_KEYS = (("intermediate_size", "num_local_experts|num_experts"),
               "model.layers.{layer}.block_sparse_moe.gate.weight")
EXPERT_NAMES = ("model.layers.{layer}.block_sparse_moe.experts.{expert}.{part}.weight", W132)

# ---- GGUF: llama.cpp's architecture for this family (gguf_import.py and gguf_export.py read it) ----------
# rotary_permuted: llama's rope pairs (2i, 2i+1) vs HF's rotate-half (i, i+Hd/2); norm_topk_prob: llama.cpp's
# routing where the file does not say; names: GGUF -> checkpoint name inside a layer (over the shared ones)
GGUF = {"arch": "llama", "rotary_permuted": True, "norm_topk_prob": True, "experts_key": "num_local_experts",
        "names": {"ffn_gate_inp.weight": "block_sparse_moe.gate.weight"}}


def config_from_gguf(cfg: dict, g, expert_size: int, moe_layers: list[int], dense: list[int]) -> None:
    """This family's config.json keys from a llama-architecture GGUF (gguf_import.GGUFModel `g`; `expert_size`
    is I, `dense` the layers without experts)."""
    cfg.update(intermediate_size=expert_size, sliding_window=None)
    if dense:
        raise MoeError(f"{g.path}: llama layers {dense} have no experts; Mixtral has experts in every layer")


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "mixtral"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float | None = None
    rope_parameters: dict | None = None
    sliding_window: int | None = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        route = partial(softmax_topk, top_k=args.num_experts_per_tok, norm_topk_prob=True)
        layers = [
            DecoderLayer(args, Attention(args, window=args.sliding_window),
                         MoE(args.hidden_size, args.num_local_experts, route, cast_weights=False),
                         mlp_name="block_sparse_moe")
            for _ in range(args.num_hidden_layers)
        ]
        super().__init__(args, layers)
        self.n_experts, self.top_k = args.num_local_experts, args.num_experts_per_tok
        self.expert_shape = ExpertShape(args.hidden_size, args.intermediate_size, args.hidden_act)
