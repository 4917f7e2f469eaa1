"""One module per Hugging Face `model_type`; each exposes `ModelArgs` and `Model`, and keeps its quirks: its
checkpoint layout (data tables, models/layouts.py, collected by `family_table`) and its hooks
(base.FamilyHooks)."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import MoeError

SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "phimoe", "deepseek_v2",
             "deepseek_v3", "gpt_oss")


def get_module(model_type: str | None) -> ModuleType:
    if model_type not in SUPPORTED:
        raise MoeError(f"Model type {model_type!r} not supported. Supported: {', '.join(SUPPORTED)}")
    return importlib.import_module(f"{__name__}.{model_type}")


def family_table(name: str) -> dict:
    """{model_type: that family file's table `name`} for each family defining it ("EXPERT_NAMES", ...)."""
    return {mt: getattr(m, name) for mt in SUPPORTED if hasattr(m := get_module(mt), name)}


def build(config: dict):
    """config.json dict -> (args, model skeleton). Build under `torch.device('meta')` to skip allocation."""
    mod = get_module(config.get("model_type"))
    args = mod.ModelArgs.from_dict(config)
    return args, mod.Model(args)
