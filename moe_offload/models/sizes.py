"""Sizes of a model from config.json alone (no weights): parameter counts of the backbone and of one routed
expert, and the KV cache per token. Counted on the model built on the meta device, so every family's own
modules and hooks (router_linear, expert_shape, make_cache, kv_kind, fp32_keys) decide; the planner, bench
and the store's budgets read the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..costmodel import quant_bytes
from ..errors import MoeError

KV_BYTES = 2  # the planner's KV cache: bf16/fp16


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts of one model. `backbone_linear` is what a backbone quantizer touches (attention,
    dense MLPs, shared experts); `backbone_fixed` the rest (embeddings, lm_head, norms, routers, biases), of
    which `head_params` is an untied lm_head, which `quantize --head-bits` quantizes too (0 when tied)."""

    model_type: str
    n_layers: int  # decoder layers (MTP / next-token-prediction layers are not counted: decode does not run them)
    moe_layers: tuple[int, ...]
    n_experts: int  # routed experts per MoE layer
    top_k: int
    expert_params: int  # weights of one routed expert
    backbone_linear: int
    backbone_fixed: int
    kv_bytes_per_token: int  # all layers, 16-bit
    kv_kind: str  # "gqa" (2 x kv_heads x head_dim per layer) or "mla" (kv_lora_rank + rope dim per layer)
    embed_params: int  # the embedding table (of which a token reads one row)
    fp32_params: int  # backbone weights the family keeps in fp32 whatever the dtype (its fp32_keys)
    head_params: int = 0  # an untied lm_head (part of backbone_fixed)

    @property
    def n_routed(self) -> int:
        return len(self.moe_layers) * self.n_experts

    @property
    def routed_params(self) -> int:
        return self.n_routed * self.expert_params

    @property
    def backbone_params(self) -> int:
        return self.backbone_linear + self.backbone_fixed

    @property
    def total_params(self) -> int:
        return self.backbone_params + self.routed_params

    @property
    def active_params(self) -> int:
        """Weights one decode token touches: the whole backbone (embedding row aside, counted whole as is
        customary) and top_k experts in every MoE layer."""
        return self.backbone_params + len(self.moe_layers) * self.top_k * self.expert_params

    def expert_bytes(self, bits: int, group_size: int = 64) -> int:
        return quant_bytes(self.expert_params, bits, group_size)

    def backbone_bytes(self, bits: int, group_size: int = 64) -> int:
        """The backbone with its linears at `bits` (`quantize --attn-bits B --head-bits B`: attention, dense
        MLPs, shared experts and an untied lm_head); embeddings, norms and routers 16-bit."""
        if bits >= 16:
            return 2 * (self.backbone_linear + self.backbone_fixed)
        return (quant_bytes(self.backbone_linear, bits, group_size) + quant_bytes(self.head_params, bits, group_size)
                + 2 * (self.backbone_fixed - self.head_params))

    def resident_backbone_bytes(self, dtype: torch.dtype) -> int:
        """The backbone as the engine holds it unquantized in `dtype`: the family's fp32 keys in fp32."""
        return self.backbone_params * dtype.itemsize + self.fp32_params * (4 - dtype.itemsize)

    def kv_bytes(self, dtype: torch.dtype) -> int:
        """KV cache bytes per token over all layers in `dtype`."""
        return self.kv_bytes_per_token // KV_BYTES * dtype.itemsize


def model_sizes(cfg: dict) -> ModelSizes:
    """Counts for any supported model_type: the model built on meta (shapes, no memory). Routed experts are
    not modules of the skeleton: their count is expert_shape x n_experts x MoE layers."""
    from . import SUPPORTED, build

    mt = cfg.get("model_type")
    if mt not in SUPPORTED:
        raise MoeError(f"Model type {mt!r} not supported by the planner. Supported: {', '.join(SUPPORTED)}")
    shape_cfg = {k: v for k, v in cfg.items() if k not in ("rope_scaling", "rope_parameters")}  # shapes only
    with torch.device("meta"):
        _, model = build(shape_cfg)
    blocks = model.moe_blocks()
    routers = set()
    for _, moe in blocks:
        routers |= {id(p) for p in moe.router_linear().parameters()}
        if moe.shared_expert_gate is not None:
            routers |= {id(p) for p in moe.shared_expert_gate.parameters()}
    lin = fix = embed = fp32 = head = 0
    seen = set()
    for name, p in model.state_dict(keep_vars=True).items():  # parameters and persistent buffers (router biases)
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or id(p) in routers or "embed_tokens" in name or name.startswith("lm_head"):
            fix += p.numel()
        else:
            lin += p.numel()
        embed += p.numel() if "embed_tokens" in name else 0
        head += p.numel() if name.startswith("lm_head") and p.ndim == 2 else 0
        fp32 += p.numel() if name.endswith(model.fp32_keys) else 0
    s = model.expert_shape
    expert = 3 * s.hidden * s.intermediate + (2 * s.intermediate + s.hidden if s.bias else 0)
    return ModelSizes(model_type=cfg["model_type"], n_layers=len(model.model.layers),
                      moe_layers=tuple(i for i, _ in blocks), n_experts=model.n_experts, top_k=model.top_k,
                      expert_params=expert, backbone_linear=lin, backbone_fixed=fix,
                      kv_bytes_per_token=model.kv_bytes_per_token(torch.bfloat16), kv_kind=model.kv_kind,
                      embed_params=embed, fp32_params=fp32, head_params=head)
