"""Files and stores as a careless or hostile user hands them over: nothing the user made is lost, no damaged
or changed file is served as garbage, counts read from files are bounded before anything is allocated, and no
file outside a model folder is let in. Each refusal is one line on stderr and a non-zero exit
(docs/reliability.md, "Files and stores")."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from moe_offload.cli import main as cli_main
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
