"""DeepSeek-V3: DeepSeek-V2's latent attention and layout (deepseek_v2.py) with sigmoid routing: a per-expert
`e_score_correction_bias` (kept fp32) steers the choice only, top-k inside the best `topk_group` of `n_group`
groups, weights from the unbiased scores. Rotary pairs interleaved unless `rope_interleave` is false. The
multi-token-prediction layer (layers >= num_hidden_layers) is skipped."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from ..errors import MoeError
from . import deepseek_v2
from .routing import sigmoid_group_topk


# ---- checkpoint layout (models/layouts.py explains the tables; checkpoint.py reads them) -----------------
CONFIG_KEYS, EXPERT_NAMES = deepseek_v2.CONFIG_KEYS, deepseek_v2.EXPERT_NAMES  # V2's layout


@dataclass
class ModelArgs(deepseek_v2.ModelArgs):
    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    n_shared_experts: int | None = 1
    n_routed_experts: int | None = 256
    routed_scaling_factor: float = 2.5
    n_group: int | None = 8
    topk_group: int | None = 4
    num_experts_per_tok: int | None = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    rope_interleave: bool = True
    max_position_embeddings: int = 4096


class Model(deepseek_v2.Model):
    fp32_keys = ("e_score_correction_bias",)  # routing choice: keep the bias exact whatever the dtype

    def __init__(self, args: ModelArgs):
        if args.scoring_func != "sigmoid" or args.topk_method != "noaux_tc":
            raise MoeError(f"deepseek_v3: scoring_func {args.scoring_func!r} / topk_method {args.topk_method!r} "
                           "not supported (sigmoid / noaux_tc)")
        route = partial(sigmoid_group_topk, top_k=args.num_experts_per_tok, n_group=args.n_group or 1,
                        topk_group=args.topk_group or 1, norm_topk_prob=args.norm_topk_prob,
                        scaling=args.routed_scaling_factor)
        make_moe = partial(deepseek_v2.DeepseekMoE, args, route, correction_bias=True)
        super().__init__(args, interleaved=args.rope_interleave, make_moe=make_moe)
