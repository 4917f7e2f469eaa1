"""`--model org/name` through the local Hugging Face cache (offline), with the cache's real layout:
models--org--name/refs/main holds a commit, snapshots/<commit>/ links each file to ../../blobs/<hash>."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_offload.errors import MoeError
from moe_offload.hub import cached_snapshot, hub_cache, resolve_model
from tests.conftest import CHILD_ENV

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(root: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """Lay `folder`'s files out as huggingface_hub caches them; returns the snapshot folder."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_cache_folder_follows_huggingface_hub_rules(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert hub_cache() == Path.home() / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hub_cache() == tmp_path / "hub"


def test_an_id_resolves_to_its_snapshot_and_a_local_folder_wins(monkeypatch, tmp_path, tiny_checkpoint):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = fake_cache(tmp_path / "hub", "org/tiny-moe", tiny_checkpoint("mixtral_gqa", tokenizer=True))
    assert resolve_model("org/tiny-moe") == snap
    assert cached_snapshot("org/tiny-moe", COMMIT) == snap  # a commit as the revision
    local = tmp_path / "org" / "tiny-moe"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("org/tiny-moe") == Path("org/tiny-moe")  # a path that exists is a path
    assert resolve_model("../x/y") == Path("../x/y")  # not an id: left to the path checks


def test_an_id_not_cached_is_one_line_that_says_how_to_fetch_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MoeError, match=r"not in the Hugging Face cache .*hf download org/absent"):
        resolve_model("org/absent")
    (tmp_path / "hub" / "models--org--norev" / "refs").mkdir(parents=True)
    (tmp_path / "hub" / "models--org--norev" / "refs" / "main").write_text(COMMIT)
    with pytest.raises(MoeError, match="has no snapshot for 'main'"):
        resolve_model("org/norev")


def test_generate_and_plan_take_a_cached_id(tmp_path, tiny_checkpoint):
    hf = tiny_checkpoint("mixtral_gqa", tokenizer=True)
    fake_cache(tmp_path / "hub", "org/tiny-moe", hf)
    env = {**CHILD_ENV, "HF_HUB_CACHE": str(tmp_path / "hub")}
    cli = [sys.executable, "-m", "moe_offload.cli"]
    args = ["generate", "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--json", "--dtype", "float32"]
    by_id = subprocess.run([*cli, *args, "-m", "org/tiny-moe"], capture_output=True, text=True, env=env,
                           timeout=300, cwd=tmp_path)
    by_path = subprocess.run([*cli, *args, "-m", str(hf)], capture_output=True, text=True, env=env,
                             timeout=300, cwd=tmp_path)
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout.split('"stats"')[0] == by_path.stdout.split('"stats"')[0]  # same text and token ids
    plan = subprocess.run([*cli, "plan", "-m", "org/tiny-moe", "--hardware", "rtx3060-12gb"], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    missing = subprocess.run([*cli, *args, "-m", "org/absent"], capture_output=True, text=True, env=env,
                             timeout=300, cwd=tmp_path)
    assert missing.returncode != 0
    assert missing.stderr.count("\n") == 1 and "hf download org/absent" in missing.stderr, missing.stderr
