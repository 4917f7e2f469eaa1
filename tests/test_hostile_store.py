"""Files and stores as a careless or hostile user hands them over: nothing the user made is lost, no damaged
or changed file is served as garbage, counts read from files are bounded before anything is allocated, and no
file outside a model folder is let in. Each refusal is one line on stderr and a non-zero exit
(docs/reliability.md, "Files and stores")."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moe_offload.cli import main as cli_main
from moe_offload.errors import MoeError
from moe_offload.runtime.load import load
from moe_offload.store import folders
from moe_offload.store import format as fmt
from moe_offload.store.format import convert, open_store
from tests.conftest import CHILD_ENV


def cli(*args: str) -> tuple[int, str, str]:
    """The CLI entry point in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def one_line(code: int, err: str, want_code: int, text: str) -> None:
    assert code == want_code, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert text in err, err


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    return tiny_checkpoint("mixtral_gqa", tokenizer=True)


@pytest.fixture(scope="module")
def store(hf, tmp_path_factory):
    return convert(hf, tmp_path_factory.mktemp("store") / "s").path


# ---- data never lost: what --out may name -----------------------------------------------------------------

@pytest.fixture
def proj(hf, tmp_path):
    """proj/tiny (a model) beside proj/NOTES.txt (the user's)."""
    proj = tmp_path / "proj"
    shutil.copytree(hf, proj / "tiny")
    (proj / "NOTES.txt").write_text("mine")
    return proj


@pytest.mark.parametrize("cmd", ["convert", "quantize"])
@pytest.mark.parametrize("out, how", [(".", "contains"), ("tiny", "is"), ("tiny/store", "lies inside"),
                                      ("link", "contains")])
def test_overwrite_never_touches_the_model_or_a_folder_holding_it(proj, cmd, out, how):
    (proj / "link").symlink_to(proj)  # a symlink to the folder holding the model
    before = tree(proj)
    extra = ["--expert-bits", "4"] if cmd == "quantize" else []
    code, _, err = cli(cmd, "--model", proj / "tiny", "--out", proj / out, "--overwrite", *extra)
    one_line(code, err, 2, f"{how} --model")
    assert tree(proj) == before


def test_overwrite_replaces_only_a_store_or_an_empty_folder(hf, store, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    code, _, err = cli("convert", "--model", hf, "--out", other, "--overwrite")
    one_line(code, err, 2, "not an expert store")
    assert (other / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("x")
    code, _, err = cli("convert", "--model", hf, "--out", tmp_path / "file", "--overwrite")
    one_line(code, err, 2, "not a folder")
    (tmp_path / "empty").mkdir()
    assert cli("convert", "--model", hf, "--out", tmp_path / "empty", "--overwrite")[0] == 0
    shutil.copytree(store, tmp_path / "old")
    code, _, err = cli("convert", "--model", hf, "--out", tmp_path / "old", "--overwrite", "--dtype",
                       "bfloat16")
    assert code == 0, err
    assert open_store(tmp_path / "old").manifest["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "old", "other"]  # no leftovers


# ---- data never lost: replacing a store, a killed run ---------------------------------------------------

KILLED = """
import os, signal, sys
from pathlib import Path
from moe_offload.store import format as fmt
hf, out, where = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if where == "rename-in":  # between moving the old store aside (or deleting it) and renaming the new one in
    real_rename, real_replace = os.rename, os.replace
    def rename(src, dst, *a, **kw):
        if Path(dst) == out and ".tmp-" in Path(src).name:
            die()
        return real_rename(src, dst, *a, **kw)
    os.rename, os.replace = rename, rename
else:  # in the middle of writing experts
    encode, n = fmt.DenseCodec.encode, [0]
    def failing(self, *a, **kw):
        n[0] += 1
        if n[0] == 3:
            die()
        return encode(self, *a, **kw)
    fmt.DenseCodec.encode = failing
fmt.convert(hf, out, overwrite=True)
"""


def killed_convert(hf: Path, out: Path, where: str) -> None:
    r = subprocess.run([sys.executable, "-c", KILLED, str(hf), str(out), where], env=CHILD_ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr


def test_a_kill_while_replacing_a_store_never_loses_it(hf, store, tmp_path):
    out = shutil.copytree(store, tmp_path / "s")
    before = tree(out)
    killed_convert(hf, out, "rename-in")
    assert not (out / fmt.MANIFEST).exists()  # the instant between the two renames
    code, _, err = cli("convert", "--model", hf, "--out", out)  # the next run puts the old store back
    assert code == 2 and f"restored {out}" in err and "already exists" in err
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_a_failed_rename_puts_the_old_store_back(hf, store, tmp_path, monkeypatch):
    out = shutil.copytree(store, tmp_path / "s")
    before = tree(out)
    real = os.rename

    def rename(src, dst):
        if Path(dst) == out and ".tmp-" in Path(src).name:
            raise OSError("EIO (simulated)")
        return real(src, dst)

    monkeypatch.setattr(folders.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        convert(hf, out, overwrite=True)
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_stale_temporaries_of_killed_runs_are_removed_and_nothing_else(hf, tmp_path):
    out = tmp_path / "s"
    killed_convert(hf, out, "experts")
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".s.tmp-")]
    assert len(stale) == 1 and (stale[0] / folders.MARK).is_file()
    foreign = tmp_path / ".s.tmp-mine"  # the name, but not our marker
    foreign.mkdir()
    live = tmp_path / f".s.tmp-{os.getpid()}-x"  # ours, but its writer (this process) is alive
    live.mkdir()
    (live / folders.MARK).write_text(f"{os.getpid()} {folders.socket.gethostname()}")
    other = tmp_path / ".t.tmp-1-x"  # another target's
    shutil.copytree(stale[0], other)
    convert(hf, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".s.tmp-mine", live.name, ".t.tmp-1-x", "s"])
    assert not (out / folders.MARK).exists()


# ---- no silent garbage: a damaged backbone, a store changed under a running process ------------------------

def copy_store(src: Path, dst: Path) -> Path:
    return shutil.copytree(src, dst)


def edit_manifest(store: Path, edit) -> None:
    m = json.loads((store / fmt.MANIFEST).read_text())
    edit(m)
    (store / fmt.MANIFEST).write_text(json.dumps(m))


def test_damaged_backbone_is_refused_and_old_stores_still_load(store, tmp_path):
    bad = copy_store(store, tmp_path / "bad")
    size = (bad / fmt.BACKBONE).stat().st_size
    with open(bad / fmt.BACKBONE, "r+b") as f:  # 64 bytes of 0xFF inside the tensor data
        f.seek(size // 2)
        f.write(b"\xff" * 64)
    code, out, err = cli("generate", "--model", bad, "--prompt-ids", "1,5,9", "--max-new-tokens", "2")
    one_line(code, err, 1, "backbone.safetensors: checksum mismatch")
    assert out == ""
    old = copy_store(store, tmp_path / "old")  # written before the checksum existed: loads unchecked
    edit_manifest(old, lambda m: m.pop("backbone_checksum"))
    want = load(store).generate(prompt_ids=[1, 5, 9], max_new_tokens=4, ignore_eos=True).token_ids
    assert load(old).generate(prompt_ids=[1, 5, 9], max_new_tokens=4, ignore_eos=True).token_ids == want


def test_store_replaced_under_a_running_engine_is_refused(hf, store, tmp_path):
    s = copy_store(store, tmp_path / "s")
    full = load(s)
    span = max(e.span for e in open_store(s).entries.values())
    engine = load(s, memory=full.info["backbone_bytes"] + 2 * span)  # the minimum: nearly every expert misses
    prompt = [1, 5, 9, 20, 33, 7]
    want = full.generate(prompt_ids=prompt, max_new_tokens=6, ignore_eos=True).token_ids
    assert engine.generate(prompt_ids=prompt, max_new_tokens=6, ignore_eos=True).token_ids == want
    convert(hf, s, overwrite=True, dtype=torch.bfloat16)  # another process converts over it
    with pytest.raises(MoeError, match=r"changed on disk while in use \(experts.bin was replaced\); restart"):
        engine.generate(prompt_ids=prompt, max_new_tokens=6, ignore_eos=True)


# ---- bounded and checked: manifest fields (a store), config fields (an HF folder) --------------------------

def deep_json(store: Path) -> None:
    (store / fmt.MANIFEST).write_text("[" * 100_000 + "]" * 100_000)


def huge_manifest(store: Path) -> None:
    os.truncate(store / fmt.MANIFEST, 65 << 20)  # sparse: never read


def _set(*path_value):
    *path, value = path_value

    def edit(m):
        for k in path[:-1]:
            m = m[k]
        m[path[-1]] = value(m[path[-1]]) if callable(value) else value
    return edit


MANIFEST_CASES = [  # (name, edit of the manifest dict or of the folder, text in the one line)
    ("n_experts-1e9", _set("n_experts", 10**9), "n_experts 1000000000 is out of range"),
    ("n_experts-float", _set("n_experts", 4.0), "n_experts must be an integer"),
    ("n_experts-not-config", _set("n_experts", 3), "n_experts 3 is not the config's expert count 4"),
    ("entries-missing", lambda m: m["experts"].pop(), "need 8 entries, the list has 7"),
    ("entries-not-a-list", _set("experts", {}), "the list has none"),
    ("negative-offset", _set("experts", 0, "offset", -4096), "offset -4096 is out of range"),
    ("negative-nbytes", _set("experts", 0, "nbytes", -1), "nbytes -1 is out of range"),
    ("nbytes-not-its-codec", _set("experts", 0, "nbytes", lambda n: n + 4), "its codec's blob is"),
    ("offset-past-the-file", _set("experts", 7, "offset", lambda o: o + (1 << 30)), "the store is truncated"),
    ("misaligned-offset", _set("experts", 0, "offset", lambda o: o + 1), "is not 4096-aligned"),
    ("overlapping", _set("experts", 1, "offset", 0), "overlaps the expert before it"),
    ("listed-twice", lambda m: m["experts"].__setitem__(1, dict(m["experts"][0])), "listed twice"),
    ("layer-outside-the-model", _set("moe_layers", [0, 5000]), "a moe_layers entry 5000 is out of range"),
    ("codec-dtype-__class__", _set("experts", 0, "codec", "dtype", "__class__"), "bad codec"),
    ("codec-unknown", _set("experts", 0, "codec", "name", "pickle"), "unknown expert codec 'pickle'"),
    ("dtype-__class__", _set("dtype", "__class__"), "dtype '__class__' is not one of"),
    ("activation-unknown", _set("expert_shape", "act", "__import__"), "is not a known activation"),
    ("top_k-0", _set("top_k", 0), "top_k 0 is out of range"),
    ("checksum-not-hex", _set("experts", 0, "checksum", "<script>"), "checksum must be 8 hex digits"),
    ("config-layers-1e6", _set("config", "num_hidden_layers", 10**6), "num_hidden_layers 1000000 is out of"),
    ("config-hidden-wrong", _set("config", "hidden_size", 80), "expert_shape.hidden 64 is not the config's"),
    ("config-missing-experts", lambda m: m["config"].pop("num_local_experts"), "num_local_experts or num_"),
    ("config-vocab-wrong", _set("config", "vocab_size", 500), "vocab_size is 500 but model.embed_tokens"),
    ("json-nested-100000-deep", deep_json, "not valid JSON"),
    ("manifest-65MiB", huge_manifest, "more than the 64 MiB"),
]


@pytest.mark.parametrize("case", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_bad_manifest_field_is_one_line(store, tmp_path, case):
    name, edit, text = case
    bad = copy_store(store, tmp_path / "bad")
    if edit in (deep_json, huge_manifest):
        edit(bad)
    else:
        edit_manifest(bad, edit)
    code, out, err = cli("generate", "--model", bad, "--memory", "100MiB", "--prompt-ids", "1,2",
                         "--max-new-tokens", "1")
    one_line(code, err, 1, text)
    assert out == ""


def _config(edit):
    def make(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        edit(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    return make


def _write(name: str, data: str | bytes):
    def make(folder: Path) -> None:
        (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return make


def _index(target: str):
    """An index whose weight_map sends every tensor to `target`; the real weights moved beside the folder."""
    def make(folder: Path) -> None:
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            weight_map = dict.fromkeys(f.keys(), target)
        shutil.move(folder / "model.safetensors", folder.parent / "outside.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return make


def _secret_tokenizer(folder: Path) -> None:
    secret = folder.parent / "secret.json"
    secret.write_text("{}")
    secret.chmod(0o600)
    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer_config.json").symlink_to(secret)


def _pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


CONFIG_CASES = [  # (name, damage to a copy of an HF folder, text in the one line)
    ("missing-hidden_size", _config(lambda c: c.pop("hidden_size")), "config.json: hidden_size is missing"),
    ("missing-num_local_experts", _config(lambda c: c.pop("num_local_experts")),
     "num_local_experts or num_experts is missing"),
    ("hidden_size-a-string", _config(lambda c: c.update(hidden_size="64")), "hidden_size must be an integer"),
    ("layers-1e6", _config(lambda c: c.update(num_hidden_layers=10**6)), "num_hidden_layers 1000000 is out"),
    ("layers-more-than-the-tensors", _config(lambda c: c.update(num_hidden_layers=3)), "holds layers 0..1"),
    ("hidden_size-not-the-tensors", _config(lambda c: c.update(hidden_size=80)),
     "hidden_size is 80 but model.embed_tokens.weight is 400×64"),
    ("vocab-not-the-tensors", _config(lambda c: c.update(vocab_size=500)), "vocab_size is 500 but"),
    ("experts-not-the-router", _config(lambda c: c.update(num_local_experts=6)),
     "num_local_experts is 6 but the router model.layers.0.block_sparse_moe.gate.weight has 4 rows"),
    ("config-a-list", _write("config.json", "[1, 2]"), "config.json: expected a JSON object, got list"),
    ("tokenizer_config-garbage", _write("tokenizer_config.json", "{\"bos_token\": "),
     "tokenizer_config.json: not valid JSON"),
    ("index-to-etc-passwd", _index("../../../etc/passwd"), "'../../../etc/passwd' leads outside the model"),
    ("index-to-outside-safetensors", _index("../outside.safetensors"), "'../outside.safetensors' leads out"),
    ("index-absolute", _index("/etc/passwd"), "'/etc/passwd' leads outside the model folder"),
    ("pickle-only", _pickle_only, "only safetensors weights are read, never pickle files such as"),
]


@pytest.mark.parametrize("cmd", ["convert", "generate"])
@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_model_folder_is_one_line(hf, tmp_path, case, cmd):
    name, damage, text = case
    folder = shutil.copytree(hf, tmp_path / "m")
    damage(folder)
    args = ["--out", tmp_path / "s"] if cmd == "convert" else ["--prompt", "hi", "--max-new-tokens", "1"]
    code, out, err = cli(cmd, "--model", folder, *args)
    one_line(code, err, 1, text)
    assert out == "" and not (tmp_path / "s").exists()


def test_tokenizer_file_linked_out_of_the_folder_is_not_copied_and_modes_are_kept(hf, tmp_path):
    folder = shutil.copytree(hf, tmp_path / "m")
    _secret_tokenizer(folder)
    code, _, err = cli("convert", "--model", folder, "--out", tmp_path / "s")
    one_line(code, err, 1, "tokenizer_config.json: a symlink to")
    assert "outside the model folder" in err and not (tmp_path / "s").exists()
    (folder / "tokenizer_config.json").unlink()
    shutil.copyfile(hf / "tokenizer_config.json", folder / "tokenizer_config.json")
    (folder / "tokenizer_config.json").chmod(0o600)  # private in the model: private in the store
    (folder / "tokenizer.json").chmod(0o640)
    assert cli("convert", "--model", folder, "--out", tmp_path / "s")[0] == 0
    assert (tmp_path / "s" / "tokenizer_config.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "s" / "tokenizer.json").stat().st_mode & 0o777 == 0o640


# ---- eval --text: bounded, text only -----------------------------------------------------------------------

def test_eval_text_must_be_utf8_and_is_read_up_to_a_bound(hf, tmp_path):
    from moe_offload.eval import read_text

    binary = tmp_path / "a.bin"
    binary.write_bytes(bytes(range(256)) * 4096)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café crème ".encode("latin-1") * 100)
    for path, text in ((binary, "a binary file (NUL bytes), not text"), (latin, "not UTF-8 text (byte 3)")):
        code, out, err = cli("eval", "--model", hf, "--text", path, "--gen-tokens", "0")
        one_line(code, err, 2, text)
    big = tmp_path / "big.txt"
    big.write_text("naïve café " * 200_000)  # 2.4 MB
    assert len(read_text(big, 1004).encode()) == 1003  # 77 × 13 bytes + "na", cut before the split "ï"
    code, out, err = cli("eval", "--model", hf, "--text", big, "--max-tokens", "100000", "--max-text-bytes",
                         "4KiB", "--gen-tokens", "0", "--json")
    assert code == 0, err
    assert 100 < json.loads(out)["tokens"] < 4096
    code, out, err = cli("eval", "--model", hf, "--text", big, "--max-text-bytes", "0", "--gen-tokens", "0")
    one_line(code, err, 2, "--max-text-bytes must be positive")
