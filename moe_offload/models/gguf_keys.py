"""GGUF metadata read the same way by the families that build their whole config from a GGUF file
(deepseek_v2, gpt_oss): `g` is a gguf_import.GGUFModel (its .arch and .meta)."""

from __future__ import annotations


def gguf_yarn(g, **extra) -> dict | None:
    """rope_scaling for a file with {arch}.rope.scaling.type = yarn (None without)."""
    a, m = g.arch, g.meta
    if m.get(f"{a}.rope.scaling.type") != "yarn":
        return None
    return {"rope_type": "yarn", "factor": float(m[f"{a}.rope.scaling.factor"]),
            "original_max_position_embeddings": int(m[f"{a}.rope.scaling.original_context_length"]),
            "beta_fast": float(m.get(f"{a}.rope.scaling.yarn_beta_fast", 32.0)),
            "beta_slow": float(m.get(f"{a}.rope.scaling.yarn_beta_slow", 1.0)), **extra}


def gguf_special_ids(g, cfg: dict) -> None:
    for k in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{k}" in g.meta:
            cfg[k] = int(g.meta[f"tokenizer.ggml.{k}"])
