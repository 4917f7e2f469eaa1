"""Qwen2-MoE (Qwen1.5-MoE): qkv bias, shared expert behind a sigmoid gate, `norm_topk_prob`,
dense layers from `mlp_only_layers` / `decoder_sparse_step`, optional sliding-window layers."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from ..experts import ExpertShape
from .base import MLP, Attention, BaseModelArgs, CausalLM, DecoderLayer, MoE
from .layouts import SWIGLU
from .routing import softmax_topk


# ---- checkpoint layout (models/layouts.py explains the tables; checkpoint.py reads them) -----------------
CONFIG_KEYS = (("moe_intermediate_size", "num_experts|num_local_experts"),
               "model.layers.{layer}.mlp.gate.weight")
EXPERT_NAMES = ("model.layers.{layer}.mlp.experts.{expert}.{part}.weight", SWIGLU)

# ---- GGUF: llama.cpp's architecture for this family (gguf_import.py and gguf_export.py read it) ----------
GGUF = {"arch": "qwen2moe", "rotary_permuted": False, "norm_topk_prob": False, "experts_key": "num_experts",
        "names": {"ffn_gate_inp.weight": "mlp.gate.weight",
                  "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
                  "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
                  "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
                  "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight"}}


def qwen_config_from_gguf(cfg: dict, g, expert_size: int, dense: list[int]) -> None:
    """Keys qwen2moe and qwen3moe GGUFs share: the experts' size, dense layers (mlp_only_layers), their size."""
    cfg.update(moe_intermediate_size=expert_size, mlp_only_layers=dense, decoder_sparse_step=1,
               use_sliding_window=False)
    if dense:
        cfg["intermediate_size"] = g.dims(f"blk.{dense[0]}.ffn_gate.weight")[0]
    elif f"{g.arch}.feed_forward_length" in g.meta:
        cfg["intermediate_size"] = g.meta[f"{g.arch}.feed_forward_length"]


def config_from_gguf(cfg: dict, g, expert_size: int, moe_layers: list[int], dense: list[int]) -> None:
    """This family's config.json keys from a qwen2moe GGUF (gguf_import.GGUFModel `g`), shared expert too."""
    qwen_config_from_gguf(cfg, g, expert_size, dense)
    cfg["shared_expert_intermediate_size"] = g.dims(f"blk.{moe_layers[0]}.ffn_gate_shexp.weight")[0]
    cfg["qkv_bias"] = "blk.0.attn_q.bias" in g.tensors


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "qwen2_moe"
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    rope_parameters: dict | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    layer_types: list | None = None
    qkv_bias: bool = True
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 1408
    shared_expert_intermediate_size: int = 5632
    num_experts_per_tok: int = 4
    num_experts: int = 60
    norm_topk_prob: bool = False
    mlp_only_layers: list | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None

    def __post_init__(self):
        self.mlp_only_layers = self.mlp_only_layers or []
        if self.layer_types is None:
            self.layer_types = [
                "sliding_attention" if self.use_sliding_window and (i + 1) % 2 and i < self.max_window_layers
                else "full_attention" for i in range(self.num_hidden_layers)
            ]

    def is_moe(self, i: int) -> bool:
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        route = partial(softmax_topk, top_k=args.num_experts_per_tok, norm_topk_prob=args.norm_topk_prob)
        layers = []
        for i in range(args.num_hidden_layers):
            window = args.sliding_window if args.layer_types[i] == "sliding_attention" else None
            if args.is_moe(i):
                shared = MLP(args.hidden_size, args.shared_expert_intermediate_size, args.hidden_act)
                mlp = MoE(args.hidden_size, args.num_experts, route, shared=shared, shared_gate=True)
            else:
                mlp = MLP(args.hidden_size, args.intermediate_size, args.hidden_act)
            layers.append(DecoderLayer(args, Attention(args, qkv_bias=args.qkv_bias, window=window), mlp))
        super().__init__(args, layers)
        self.n_experts, self.top_k = args.num_experts, args.num_experts_per_tok
        self.expert_shape = ExpertShape(args.hidden_size, args.moe_intermediate_size, args.hidden_act)
