"""gpt-oss: attention with biases and a learned per-head sink logit, alternating sliding-window / full layers
(`layer_types`), yarn rope, router with bias (top-k -> softmax), experts with biases and the clamped SwiGLU
((up + 1) · gate · σ(1.702 · gate), gate <= 7, |up| <= 7). Checkpoints stack the experts: bf16 `gate_up_proj
[E, D, 2I]` with gate/up interleaved columns, or MXFP4 blocks/scales; STACKED_EXPERT_NAMES below splits
both into per-expert gate/up/down + biases. Norms multiply in fp32 with fp32 weights (`fp32_keys`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..errors import MoeError
from ..experts import ExpertShape
from .base import (Attention, BaseModelArgs, CausalLM, DecoderLayer, MoE, RMSNorm, apply_rope, attention_mask,
                   rope_tables, router_logits_fp32)
from .gguf_keys import gguf_special_ids, gguf_yarn
from .layouts import (dequantize_mxfp4, even, even_cols_t, mxfp4_even_rows, mxfp4_odd_rows, odd, odd_cols_t,
                      transposed, whole)
from .routing import topk_softmax


# ---- GGUF: llama.cpp's architecture for this family (gguf_import.py and gguf_export.py read it) ----------
GGUF = {"arch": "gpt-oss", "own_config": True, "rotary_permuted": False, "norm_topk_prob": True, "experts_key": "num_local_experts",
        "names": {"ffn_gate_inp.weight": "mlp.router.weight", "ffn_gate_inp.bias": "mlp.router.bias",
                  "attn_sinks.weight": "self_attn.sinks",
                  "post_attention_norm.weight": "post_attention_layernorm.weight"}}

# ---- checkpoint layout (models/layouts.py explains the tables; checkpoint.py reads them) -----------------
CONFIG_KEYS = (("intermediate_size", "num_local_experts|num_experts"),
               "model.layers.{layer}.mlp.router.weight")
# as transformers saves it: gate_up_proj [E, D, 2I] (gate/up interleaved columns), down_proj [E, I, D];
# or the released MXFP4 form: *_blocks [E, out, in/32, 16] + *_scales [E, out, in/32] (gate/up rows
# interleaved)
STACKED_EXPERT_NAMES = [{
    "gate": (("model.layers.{layer}.mlp.experts.gate_up_proj",), even_cols_t),
    "up": (("model.layers.{layer}.mlp.experts.gate_up_proj",), odd_cols_t),
    "down": (("model.layers.{layer}.mlp.experts.down_proj",), transposed),
    "gate_bias": (("model.layers.{layer}.mlp.experts.gate_up_proj_bias",), even),
    "up_bias": (("model.layers.{layer}.mlp.experts.gate_up_proj_bias",), odd),
    "down_bias": (("model.layers.{layer}.mlp.experts.down_proj_bias",), whole),
}, {
    "gate": (("model.layers.{layer}.mlp.experts.gate_up_proj_blocks",
              "model.layers.{layer}.mlp.experts.gate_up_proj_scales"), mxfp4_even_rows),
    "up": (("model.layers.{layer}.mlp.experts.gate_up_proj_blocks",
            "model.layers.{layer}.mlp.experts.gate_up_proj_scales"), mxfp4_odd_rows),
    "down": (("model.layers.{layer}.mlp.experts.down_proj_blocks",
              "model.layers.{layer}.mlp.experts.down_proj_scales"), dequantize_mxfp4),
    "gate_bias": (("model.layers.{layer}.mlp.experts.gate_up_proj_bias",), even),
    "up_bias": (("model.layers.{layer}.mlp.experts.gate_up_proj_bias",), odd),
    "down_bias": (("model.layers.{layer}.mlp.experts.down_proj_bias",), whole),
}]



def config_from_gguf(cfg: dict, g, I: int, moe_layers: list[int], dense: list[int]) -> None:
    """gpt-oss: attention biases and sinks, llama.cpp's fixed pattern of sliding layers (even layers slide),
    yarn without truncation (as transformers' GptOss), llama.cpp's fixed SwiGLU clamp (alpha 1.702, limit 7)."""
    a, m, shape = g.arch, g.meta, g.dims
    H, L = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    cfg["head_dim"] = int(m.get(f"{a}.attention.key_length") or shape("blk.0.attn_q.weight")[0] // H)
    cfg.update(intermediate_size=I, attention_bias=True, swiglu_alpha=1.702, swiglu_limit=7.0,
               sliding_window=int(m.get(f"{a}.attention.sliding_window", 128)),
               layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)])
    cfg.setdefault("rms_norm_eps", 1e-5)
    rp = gguf_yarn(g, truncate=False)
    cfg["rope_parameters"] = {**(rp or {"rope_type": "default"}), "rope_theta": float(cfg.pop("rope_theta", 150000.0))}
    cfg.pop("norm_topk_prob", None)
    missing = [k for k in (*[(la, p) for la in range(L) for p in ("gate", "up", "down")],) if k not in g.expert_bias]
    if missing:
        raise MoeError(f"{g.path}: layer {missing[0][0]} has no ffn_{missing[0][1]}_exps.bias (gpt-oss experts "
                       f"have biases)")
    gguf_special_ids(g, cfg)

@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "gpt_oss"
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float | None = 150000.0
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None
    sliding_window: int | None = 128
    layer_types: list | None = None
    attention_bias: bool = True
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                for i in range(self.num_hidden_layers)]
        if self.rope_parameters is None and self.rope_scaling is None:  # transformers' GptOssConfig default
            self.rope_parameters = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                    "truncate": False, "original_max_position_embeddings": 4096}



def sink_attention(q, k, v, sinks, mask, scale: float) -> torch.Tensor:
    """softmax over [q·k * scale | sink_h] per head, sink column dropped: q [B, H, T, Hd], k/v [B, K, S, Hd],
    sinks [H], mask bool [T, S] or None (all keys) -> [B, H, T, Hd]."""
    B, H, T, _ = q.shape
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # [B, H, T, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    logits = torch.cat([scores, sinks.to(scores.dtype).view(1, H, 1, 1).expand(B, H, T, 1)], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(logits, dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


class SinkAttention(Attention):
    def __init__(self, args: ModelArgs, window: int | None):
        super().__init__(args, qkv_bias=args.attention_bias, o_bias=args.attention_bias, window=window)
        self.sinks = nn.Parameter(torch.zeros(args.num_attention_heads))

    def attend(self, x, cos, sin, cache, pos: int, mask) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Hd]
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, K, T, Hd]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = cache.update(pos, k, v)  # [B, K, pos+T, Hd]
        if mask is None and T > 1:
            mask = attention_mask(pos, T, None, x.device)
        y = sink_attention(q, k, v, self.sinks, mask, self.head_dim ** -0.5)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class Router(nn.Linear):
    """`mlp.router.weight` [E, D] and `mlp.router.bias` [E]."""


class GptOssMoE(MoE):
    def __init__(self, args: ModelArgs, route):
        super().__init__(args.hidden_size, args.num_local_experts, route)  # weights cast to the hidden dtype
        del self.gate
        self.router = Router(args.hidden_size, args.num_local_experts, bias=True)

    def router_logits(self, h: torch.Tensor) -> torch.Tensor:
        return router_logits_fp32(h, self.router.weight, self.router.bias)  # [N, E] fp32

    def router_linear(self) -> nn.Linear:
        return self.router


class GptOssDecoderLayer(DecoderLayer):
    def __init__(self, args: ModelArgs, attn: Attention, mlp: nn.Module):
        super().__init__(args, attn, mlp)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, weight_in_fp32=True)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, weight_in_fp32=True)


class Model(CausalLM):
    fp32_keys = ("norm.weight",)  # transformers keeps gpt-oss norms in fp32 (`_keep_in_fp32_modules`)

    def __init__(self, args: ModelArgs):
        route = partial(topk_softmax, top_k=args.num_experts_per_tok)
        layers = []
        for i in range(args.num_hidden_layers):
            window = args.sliding_window if args.layer_types[i] == "sliding_attention" else None
            layers.append(GptOssDecoderLayer(args, SinkAttention(args, window), GptOssMoE(args, route)))
        super().__init__(args, layers)
        self.model.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, weight_in_fp32=True)
        self.n_experts, self.top_k = args.num_local_experts, args.num_experts_per_tok
        self.expert_shape = ExpertShape(args.hidden_size, args.intermediate_size, "swiglu_clamp", bias=True,
                                        swiglu_alpha=args.swiglu_alpha, swiglu_limit=args.swiglu_limit)

    def init_rope(self, device) -> None:
        cos, sin = rope_tables(self.args, self.args.head_dim, self.args.max_position_embeddings)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
