"""The command line as a user runs it (a subprocess): bad inputs give one line and an exit code; generate's
outputs, dtypes, tokenizer, stop strings, EOS and the chat template."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_offload import load
from moe_offload.cli import main as cli_main
from moe_offload.models import SUPPORTED
from tests import tiny
from tests.conftest import CHILD_ENV

CLI = [sys.executable, "-m", "moe_offload.cli"]
IDS = "5,9,17,33,60,7,3,11"


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A fresh interpreter, as a user runs it."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=CHILD_ENV, timeout=timeout)


def main(*args: str) -> subprocess.CompletedProcess:
    """The same entry point in this process (no interpreter start-up: 3 s each on our shared box)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def generate_json(model: Path, *args: str) -> dict:
    r = main("generate", "--model", str(model), "--json", *args)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout  # exactly one JSON object
    return json.loads(lines[0])


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- bad inputs: (name, how to make the model folder, extra args, exit code, text in the message, subprocess) ----

def _no_config(src, dst):
    copy_folder(src, dst).joinpath("config.json").unlink()
    return dst


def _missing_shard(src, dst):
    copy_folder(src, dst)
    sorted(dst.glob("model-*.safetensors"))[1].unlink()
    return dst


def _garbage(src, dst):
    copy_folder(src, dst).joinpath("model.safetensors").write_bytes(bytes(range(256)) * 64)
    return dst


def _truncated(src, dst):
    f = copy_folder(src, dst) / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return dst


def _edit_tensors(edit):
    def make(src, dst):
        copy_folder(src, dst)
        tensors = load_file(str(dst / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(dst / "model.safetensors"))
        return dst
    return make


def _edit_config(edit):
    def make(src, dst):
        copy_folder(src, dst)
        cfg = json.loads((dst / "config.json").read_text())
        edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
        return dst
    return make


def _bad_json(src, dst):
    copy_folder(src, dst).joinpath("config.json").write_text("{not json")
    return dst


BAD = [
    ("missing-folder", lambda src, dst: dst / "nope", ["--prompt-ids", IDS], 1, "does not exist", True),
    ("no-config", _no_config, ["--prompt-ids", IDS], 1, "no config.json", True),
    ("config-not-json", _bad_json, ["--prompt-ids", IDS], 1, "not valid JSON", False),
    ("missing-shard", _missing_shard, ["--prompt-ids", IDS], 1, "missing", True),
    ("garbage-safetensors", _garbage, ["--prompt-ids", IDS], 1, "model.safetensors", True),
    ("truncated-safetensors", _truncated, ["--prompt-ids", IDS], 1, "model.safetensors", True),
    ("missing-tensor", _edit_tensors(lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight")),
     ["--prompt-ids", IDS], 1, "missing tensor(s), e.g. model.layers.1.block_sparse_moe.experts.3.w2.weight", True),
    ("unexpected-tensor", _edit_tensors(lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)})),
     ["--prompt-ids", IDS], 1, "unexpected tensor(s), e.g. model.layers.0.extra.weight", True),
    ("unsupported-model-type", _edit_config(lambda c: c.update(model_type="llama4_moe")), ["--prompt-ids", IDS], 1,
     f"'llama4_moe' not supported. Supported: {', '.join(SUPPORTED)}", True),
    ("prompt-longer-than-context", None, ["--prompt-ids", ",".join(["5"] * 200)], 2, "context is 128 tokens", True),
    ("prompt-id-outside-vocab", None, ["--prompt-ids", "1,2,128"], 2, "outside the vocabulary", False),
    ("malformed-prompt-ids", None, ["--prompt-ids", "1,2,x"], 2, "--prompt-ids", True),
    ("negative-prompt-ids", None, ["--prompt-ids", "1,-2"], 2, "--prompt-ids", False),
    ("bad-memory-size", None, ["--prompt-ids", IDS, "--memory", "12 parsecs"], 2, "bad size", True),
    ("no-tokenizer-for-text", None, ["--prompt", "hello"], 1, "no tokenizer", False),
    ("no-prompt", None, [], 2, "--prompt", False),
    ("unknown-flag", None, ["--prompt-ids", IDS, "--frobnicate"], 2, "unrecognized arguments", False),
    ("bad-dtype", None, ["--prompt-ids", IDS, "--dtype", "int3"], 2, "invalid choice", False),
]


@pytest.fixture(scope="module")
def bad_runs(tiny_checkpoint, tmp_path_factory):
    """Run every bad case once: in a fresh interpreter (two at a time) where marked, else through main()."""
    good = tiny_checkpoint("mixtral_gqa")
    sharded = tiny_checkpoint("mixtral_gqa", max_shard_size="20KB")
    root = tmp_path_factory.mktemp("bad")

    def argv(case):
        name, make, args, *_ = case
        src = sharded if name == "missing-shard" else good
        model = make(src, root / name) if make else good
        return ["generate", "--model", str(model), *args, "--max-new-tokens", "2"]

    runs = {c[0]: main(*argv(c)) for c in BAD if not c[-1]}
    with ThreadPoolExecutor(2) as pool:
        runs.update(pool.map(lambda c: (c[0], cli(*argv(c))), [c for c in BAD if c[-1]]))
    return runs


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_and_an_exit_code(bad_runs, case):
    name, _, _, code, text, _ = case
    r = bad_runs[name]
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    lines = r.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert text in lines[0]
    assert r.stdout == ""


# ---- generate -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok_model(tiny_checkpoint):
    return tiny_checkpoint("mixtral_gqa", tokenizer=True)


@pytest.fixture(scope="module")
def hf(tok_model):
    from transformers import AutoTokenizer

    return tiny.load_hf(tok_model), AutoTokenizer.from_pretrained(str(tok_model))


def test_generate_json_is_one_object_with_transformers_tokens(tiny_checkpoint):
    folder = tiny_checkpoint("qwen3_moe_gqa_dense")
    out = generate_json(folder, "--prompt-ids", IDS, "--max-new-tokens", "16", "--ignore-eos")
    assert set(out) >= {"text", "token_ids", "prompt_tokens", "stats"}
    assert out["prompt_tokens"] == 8 and out["text"] == ""  # no tokenizer: ids only
    assert out["token_ids"] == tiny.hf_greedy(tiny.load_hf(folder), [int(i) for i in IDS.split(",")], 16)
    stats = out["stats"]
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes"):
        assert isinstance(stats[key], (int, float)) and stats[key] > 0, key
    assert stats["generation_tokens"] == 16 and stats["prompt_tokens"] == 8


def test_plain_generate_streams_text_and_prints_stats_to_stderr(tok_model, hf):
    args = ["--prompt", "The router reads", "--max-new-tokens", "12", "--ignore-eos"]
    script = Path(sys.executable).with_name("moe-offload")  # the console script, where installed
    r = subprocess.run([str(script) if script.exists() else CLI[0], *([] if script.exists() else CLI[1:]),
                        "generate", "--model", str(tok_model), *args],
                       capture_output=True, text=True, env=CHILD_ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    out = generate_json(tok_model, *args)
    assert r.stdout == out["text"] + "\n"
    assert out["text"] == hf[1].decode(out["token_ids"], skip_special_tokens=True)
    err = r.stderr.splitlines()
    assert err[0].startswith("prompt: ") and err[1].startswith("decode: 12 tokens") and "RSS" in err[2]
    prompt_ids = hf[1]("The router reads")["input_ids"]
    assert out["prompt_tokens"] == len(prompt_ids) and prompt_ids[0] == hf[1].bos_token_id
    assert out["token_ids"] == tiny.hf_greedy(hf[0], prompt_ids, 12)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_dtypes_generate_the_requested_length(tok_model, dtype):
    out = generate_json(tok_model, "--prompt-ids", IDS, "--dtype", dtype, "--max-new-tokens", "10", "--ignore-eos")
    assert len(out["token_ids"]) == 10 and out["stats"]["generation_tokens"] == 10


def test_stop_string_cuts_the_text(tok_model):
    args = ["--prompt", "for i in range", "--max-new-tokens", "24", "--ignore-eos"]
    full = generate_json(tok_model, *args)
    text = full["text"]
    assert len(text) > 8
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = generate_json(tok_model, *args, "--stop", stop)
    assert cut["text"] == text[: text.index(stop)]
    assert cut["finish_reason"] == "stop" and len(cut["token_ids"]) < len(full["token_ids"])
    assert cut["token_ids"] == full["token_ids"][: len(cut["token_ids"])]


def test_eos_stops_generation(tok_model, tmp_path):
    ref = generate_json(tok_model, "--prompt-ids", IDS, "--max-new-tokens", "16", "--ignore-eos")["token_ids"]
    k = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i])  # first fresh token from step 2 on
    folder = copy_folder(tok_model, tmp_path / "eos")
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["eos_token_id"] = [gen["eos_token_id"], ref[k]]
    (folder / "generation_config.json").write_text(json.dumps(gen))
    out = generate_json(folder, "--prompt-ids", IDS, "--max-new-tokens", "16")
    assert out["token_ids"] == ref[:k] and out["finish_reason"] == "stop"
    assert generate_json(folder, "--prompt-ids", IDS, "--max-new-tokens", "16", "--ignore-eos")["token_ids"] == ref


def test_chat_template_renders_like_transformers(tok_model, hf):
    model, tok = hf
    messages = [{"role": "user", "content": "Which expert computes the answer?"}]
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    engine = load(tok_model)
    assert engine.encode(messages=messages) == want
    system = [{"role": "system", "content": "Be brief."}, *messages,
              {"role": "assistant", "content": "The router knows."}, {"role": "user", "content": "Café?"}]
    assert engine.encode(messages=system) == \
        tok.apply_chat_template(system, add_generation_prompt=True, tokenize=True)["input_ids"]
    out = generate_json(tok_model, "--chat", "--prompt", messages[0]["content"], "--max-new-tokens", "8",
                        "--ignore-eos")
    assert out["prompt_tokens"] == len(want)
    assert out["token_ids"] == tiny.hf_greedy(model, want, 8)


def test_chat_template_from_tokenizer_config_json(tok_model, hf, tmp_path):
    """Older folders keep the template inside tokenizer_config.json instead of chat_template.jinja."""
    folder = copy_folder(tok_model, tmp_path / "old")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (folder / "chat_template.jinja").read_text()
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "chat_template.jinja").unlink()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert load(folder).encode(messages=messages) == \
        hf[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]


def test_chat_command_keeps_the_conversation(tok_model, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello router\n\nAnd the cache?\n/exit\nnever read\n"))
    r = main("chat", "--model", str(tok_model), "--max-new-tokens", "6", "--ignore-eos", "--system", "Be brief.")
    assert r.returncode == 0, r.stderr
    engine = load(tok_model)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello router"}]
    first = engine.generate(messages=history, max_new_tokens=6, ignore_eos=True).text
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And the cache?"}]
    second = engine.generate(messages=history, max_new_tokens=6, ignore_eos=True).text
    assert r.stdout == f"{first}\n{second}\n"
