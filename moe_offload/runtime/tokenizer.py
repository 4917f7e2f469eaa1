"""Tokenizer from tokenizer.json (the `tokenizers` library) and the folder's own Jinja chat template."""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import read_json
from ..errors import MoeError


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):  # AddedToken serialisation
        return tok.get("content")
    return tok


class Tokenizer:
    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as _Tok

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise MoeError(f"{folder}: no tokenizer.json (use --prompt-ids to feed token ids directly)")
        try:
            self.tok = _Tok.from_file(str(path))
        except Exception as e:
            raise MoeError(f"{path}: cannot load tokenizer ({e})") from None
        cfg_path = folder / "tokenizer_config.json"
        cfg = read_json(cfg_path) if cfg_path.is_file() else {}  # one line naming the file if it is garbage
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        template = cfg.get("chat_template")
        jinja_path = folder / "chat_template.jinja"
        if template is None and jinja_path.is_file():
            template = jinja_path.read_text()
        if isinstance(template, list):  # named templates: take "default"
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.chat_template = template

    @property
    def eos_token_id(self) -> int | None:
        return self.tok.token_to_id(self.eos_token) if self.eos_token else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not self.chat_template:
            raise MoeError("this model has no chat template")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise MoeError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        try:
            text = env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.TemplateError as e:
            raise MoeError(f"chat template failed: {e}") from None
        return self.encode(text, add_special_tokens=False)
