"""A sentencepiece-style GGUF vocabulary (tokenizer.ggml.model = "llama": tokens, scores, token types, byte
pieces, no merges -- as llama.cpp writes Mixtral / Mistral files) loads and tokenizes like the Hugging Face
tokenizer it came from."""

from __future__ import annotations

import json

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")

from moe_offload import load
from moe_offload.gguf_export import export_gguf
from tests import tiny

TEXTS = ["hello world", "  two leading spaces and  two inside", "def fibonacci(n):\n    return n",
         "déjà vu 😀 — Ünïcödé ß 你好", "The quick brown fox.", "x", "<s> literal specials </s>", ""]


def llama_style_tokenizer(folder):
    """A byte-fallback BPE with Metaspace (what transformers' LlamaTokenizer builds), trained on the tiny corpus
    and saved as transformers saves Llama / Mistral tokenizers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    special = ["<unk>", "<s>", "</s>", *[f"<0x{i:02X}>" for i in range(256)]]
    tok.train_from_iterator(tiny.corpus(), trainers.BpeTrainer(vocab_size=700, special_tokens=special,
                                                              show_progress=False))
    tj = json.loads(tok.to_str())
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in tj["model"]["merges"]]
    ref = LlamaTokenizer(vocab=tj["model"]["vocab"], merges=merges, unk_token="<unk>", bos_token="<s>",
                         eos_token="</s>", add_bos_token=True)
    ref.save_pretrained(str(folder))
    return ref


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf-spm")
    hf = d / "hf"
    ref = llama_style_tokenizer(hf)
    model = tiny.make_model(("mixtral", dict(num_hidden_layers=2, num_key_value_heads=2, intermediate_size=32,
                                             num_local_experts=4, num_experts_per_tok=2)),
                            vocab_size=len(ref), bos_token_id=ref.bos_token_id, eos_token_id=ref.eos_token_id,
                            pad_token_id=0)
    model.to(torch.float16).save_pretrained(str(hf))
    export_gguf(hf, d / "spm-f16.gguf", "f16")
    return ref, hf, d / "spm-f16.gguf"


def test_the_file_holds_a_sentencepiece_vocabulary(spm_gguf):
    ref, _, path = spm_gguf
    r = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items() if k.startswith("tokenizer.ggml.")}
    assert f["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in f
    assert len(f["tokenizer.ggml.scores"]) == len(f["tokenizer.ggml.tokens"]) == len(ref)
    types = f["tokenizer.ggml.token_type"]
    assert types[f["tokenizer.ggml.tokens"].index("<0x41>")] == 6 and types[0] == 2  # BYTE, UNKNOWN
    assert f["tokenizer.ggml.bos_token_id"] == ref.bos_token_id and f["tokenizer.ggml.add_bos_token"] is True


def test_gguf_sentencepiece_vocab_tokenizes_like_the_hf_tokenizer(spm_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_OFFLOAD_CACHE", str(tmp_path / "cache"))
    ref, hf, path = spm_gguf
    ours, folder = load(path).tokenizer, load(hf).tokenizer
    for text in TEXTS:
        want = ref.encode(text)
        assert ours.encode(text, parse_special=True) == want, text
        assert ours.encode(text) == folder.encode(text), text  # specials in text stay text, as from the folder
        assert ours.decode(want, skip_special_tokens=True) == ref.decode(want, skip_special_tokens=True), text
    assert ref.encode("hello")[0] == ref.bos_token_id  # BOS added, as the folder's tokenizer does


def test_llama_cpp_tokenizes_the_file_like_the_hf_tokenizer(spm_gguf):
    """llama.cpp reads the same vocabulary the same way, except on text that starts with a space: sentencepiece
    (and llama.cpp) always add the "▁" prefix, transformers' Metaspace(prepend_scheme="first") does not add it
    before a leading space (" x": llama.cpp "▁▁"+"x", transformers "▁"+"x"), nor after a special token in the text
    -- a difference of the two tokenizer libraries, not of the file."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    ref, _, path = spm_gguf
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, vocab_only=True)
    for text in [t for t in TEXTS if not t.startswith(" ") and "<s>" not in t]:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ref.encode(text), text
    assert llm.tokenize(b" x", add_bos=False, special=True) != ref.encode(" x", add_special_tokens=False)
