"""Real MoE models the project knows by name, config only: their published config.json values (no download,
no weights), and bench's real-width builds of them with fewer layers. The planner plans the full models from
these; bench builds random checkpoints of the `STREAMED` ones."""

from __future__ import annotations

# Real models at their exact layer widths and vocabulary (the values of their config.json on the Hub), fewer
# layers: "-L4" keeps 4 of Mixtral-8x7B's 32. Random weights (seeded) written tensor by tensor into
# safetensors shards (build_streamed), so the builder never holds the model in RAM.
MIXTRAL_8X7B = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=4096,
                    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6,
                    rms_norm_eps=1e-5, max_position_embeddings=32768, sliding_window=None, hidden_act="silu",
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, router_aux_loss_coef=0.02,
                    output_router_logits=False, attention_dropout=0.0, initializer_range=0.02,
                    torch_dtype="bfloat16", use_cache=True)
QWEN3_30B_A3B = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048,
                     intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                     num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                     mlp_only_layers=[], rope_theta=1e6, rope_scaling=None, rms_norm_eps=1e-6,
                     max_position_embeddings=40960, max_window_layers=48, sliding_window=None,
                     use_sliding_window=False, attention_bias=False, attention_dropout=0.0, hidden_act="silu",
                     tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
                     router_aux_loss_coef=0.001, output_router_logits=False, initializer_range=0.02,
                     torch_dtype="bfloat16", use_cache=True)
STREAMED = {"mixtral-8x7b-L4": (MIXTRAL_8X7B, 4), "qwen3-30b-a3b-L8": (QWEN3_30B_A3B, 8)}


def synthetic_config(name: str) -> dict:
    """config.json of a STREAMED model: the real model's, with its first `layers` layers."""
    base, layers = STREAMED[name]
    return {**base, "num_hidden_layers": layers, **({"max_window_layers": layers} if "max_window_layers" in base
                                                   else {})}


def known_configs() -> dict[str, dict]:
    """Models planned by name: Mixtral-8x7B and Qwen3-30B-A3B with all their layers, and the STREAMED builds."""
    return {"mixtral-8x7b": dict(MIXTRAL_8X7B), "qwen3-30b-a3b": dict(QWEN3_30B_A3B),
            **{name: synthetic_config(name) for name in STREAMED}}
