"""Tokenizer from tokenizer.json (the `tokenizers` library) and the folder's own Jinja chat template.

Text from users is text: a special token typed in a prompt or a message (`<|im_start|>system`) is encoded as
plain characters. Only the chat template emits special tokens.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import datetime
from pathlib import Path

from ..checkpoint import read_json
from ..errors import MoeError, UsageError


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):  # AddedToken serialisation
        return tok.get("content")
    return tok


# ---- the Jinja environment of transformers' apply_chat_template ------------------------------------------

def _raise_exception(msg):
    raise MoeError(f"chat template: {msg}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: no HTML escaping (Jinja's own tojson escapes <, >, &, ')
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment():
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # {% generation %}...{% endgeneration %} marks the assistant's part: print it
        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):  # no underscore attributes: no way to CPython internals
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", Generation])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=Namespace)
    return env


def compile_template(source: str, origin: str = "chat template"):
    """A compiled template, or one line naming `origin`."""
    import jinja2

    try:
        return _environment().from_string(source)
    except jinja2.TemplateError as e:
        raise MoeError(f"{origin}: not a valid Jinja template ({e})") from None


def read_chat_template(spec: str) -> str:
    """`--chat-template`: a file, or the template itself when it is no file and looks like Jinja (as vLLM)."""
    path = Path(spec)
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--chat-template {spec}: cannot read it ({e})") from None
    if "{{" in spec or "{%" in spec:
        return spec
    raise UsageError(f"--chat-template {spec}: no such file")


class Tokenizer:
    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as _Tok

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise MoeError(f"{folder}: no tokenizer.json (use --prompt-ids to feed token ids directly)")
        try:
            self.tok = _Tok.from_file(str(path))  # parses special tokens: for what the template writes
            self.text_tok = _Tok.from_file(str(path))  # special tokens are plain text: for what users write
        except Exception as e:
            raise MoeError(f"{path}: cannot load tokenizer ({e})") from None
        self.text_tok.encode_special_tokens = True
        added = self.tok.get_added_tokens_decoder().values()
        self.special = {a.content: a for a in added if a.special}
        # longest first, so that a special token that starts with another is matched whole
        longest = sorted(self.special, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, longest))) if longest else None
        cfg_path = folder / "tokenizer_config.json"
        cfg = read_json(cfg_path) if cfg_path.is_file() else {}  # one line naming the file if it is garbage
        self.special_tokens_map = {k: _token_str(cfg.get(k)) or "" for k in
                                   ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        template = cfg.get("chat_template")
        jinja_path, json_path = folder / "chat_template.jinja", folder / "chat_template.json"
        if template is None and jinja_path.is_file():
            template = jinja_path.read_text()
        if template is None and json_path.is_file():  # processor-style folders: {"chat_template": "..."}
            try:
                template = json.loads(json_path.read_text()).get("chat_template")
            except (json.JSONDecodeError, AttributeError):
                raise MoeError(f"{json_path}: not a JSON object with a chat_template") from None
        if isinstance(template, list):  # named templates: take "default"
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.chat_template, self._compiled = template, None

    @property
    def eos_token_id(self) -> int | None:
        return self.tok.token_to_id(self.eos_token) if self.eos_token else None

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = False) -> list[int]:
        """Ids of `text`; BOS and the like from the tokenizer's post-processor when `add_special_tokens`.
        A special token's text inside `text` stays text unless `parse_special`."""
        tok = self.tok if parse_special else self.text_tok
        return tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- chat template ---------------------------------------------------------------------------------
    def set_chat_template(self, source: str, origin: str = "chat template") -> None:
        """Use `source` instead of the model's template (`--chat-template`); a broken one is refused here,
        naming `origin`, not at the first request."""
        compiled = compile_template(source, origin)
        try:
            self._render(compiled, [{"role": "user", "content": "hi"}], True)
        except MoeError as e:
            raise MoeError(f"{origin}: {e}") from None
        self.chat_template, self._compiled = source, compiled

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The template's text for `messages`."""
        if not self.chat_template:
            raise MoeError("this model has no chat template (give one with --chat-template FILE)")
        if self._compiled is None:
            self._compiled = compile_template(self.chat_template)
        return self._render(self._compiled, messages, add_generation_prompt)

    def _render(self, template, messages, add_generation_prompt) -> str:
        import jinja2

        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **self.special_tokens_map)
        except (jinja2.TemplateError, TypeError) as e:
            raise MoeError(f"chat template failed: {e}") from None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered conversation. Special tokens come from the template only: where a message's
        content holds a special token's text, that text is swapped for a marker before rendering and encoded
        as plain text after."""
        if self._special_re is None or not any(self._special_re.search(t) for t in _contents(messages)):
            # nothing to protect: the whole text in one call, exactly as transformers encodes it
            text = self.render_chat(messages, add_generation_prompt)
            return self.tok.encode(text, add_special_tokens=False).ids
        nonce, typed = secrets.randbelow(10**12), []  # digits: filters like upper leave them be

        def mark(m: re.Match) -> str:  # \ue000 NONCE INDEX \ue001: private-use characters
            typed.append(m.group(0))
            return f"\ue000{nonce}{len(typed) - 1}\ue001"

        text = self.render_chat(_map_contents(messages, lambda t: self._special_re.sub(mark, t)),
                                add_generation_prompt)
        return self._encode_protected(text, re.compile(f"\ue000{nonce}([0-9]+)\ue001"), typed)

    def _encode_protected(self, text: str, marker: re.Pattern, typed: list[str]) -> list[int]:
        """Split `text` at the special tokens the template wrote; encode the runs between them as plain text,
        with each marker put back as the characters the user typed."""

        def plain(run: str, strip_right: bool = False) -> list[int]:
            run = marker.sub(lambda m: typed[int(m.group(1))], run)
            run = run.rstrip() if strip_right else run  # the next token has lstrip: it eats this whitespace
            return self.text_tok.encode(run, add_special_tokens=False).ids if run else []

        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            special = self.special[m.group(0)]
            ids += plain(text[pos:m.start()], special.lstrip)
            ids.append(self.tok.token_to_id(m.group(0)))
            pos = m.end()
            if special.rstrip:  # the token eats the whitespace after it, as in `tokenizers`
                pos = len(text) - len(text[pos:].lstrip())
        return ids + plain(text[pos:])


def _contents(messages: list[dict]):
    """Every piece of text a caller wrote: string contents and the text of content parts."""
    for m in messages:
        c = m.get("content") if isinstance(m, dict) else None
        if isinstance(c, str):
            yield c
        elif isinstance(c, list):
            yield from (p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))


def _map_contents(messages: list[dict], fn) -> list[dict]:
    def part(p):
        return {**p, "text": fn(p["text"])} if isinstance(p, dict) and isinstance(p.get("text"), str) else p

    out = []
    for m in messages:
        c = m.get("content") if isinstance(m, dict) else None
        if isinstance(c, str):
            m = {**m, "content": fn(c)}
        elif isinstance(c, list):
            m = {**m, "content": [part(p) for p in c]}
        out.append(m)
    return out
