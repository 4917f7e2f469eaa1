"""The built wheel, installed into a fresh venv, runs the bundled model from any directory (issue 17)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_IN_WHEEL = "moe_offload/_models/tiny-moe/model.safetensors"


def _outer_site_packages() -> list[str]:
    """This interpreter's site-packages: torch and the other dependencies, found without a download."""
    names = ("site-packages", "dist-packages")
    return [p for p in sys.path if os.path.isdir(p) and p.rstrip("/").endswith(names)]


def _run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_bundled_model(tmp_path, child_env):
    src = tmp_path / "src"  # a copy, so the build's build/ and egg-info never land in the repo
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "moe_offload", src / "moe_offload", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in child_env.items() if k != "PYTHONPATH"}  # nothing may import the repo's copy
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    r = _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path / "w", src],
             env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "w").glob("moe_offload-*.whl")
    assert MODEL_IN_WHEEL in zipfile.ZipFile(wheel).namelist()

    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", venv], env=env).returncode == 0
    py = venv / "bin" / "python"
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env).stdout
    # plain paths: their folders join sys.path, their own .pth hooks (the repo's editable install) do not run
    Path(site.strip(), "_outer.pth").write_text("\n".join(_outer_site_packages()) + "\n")
    r = _run([*pip, "--python", py, "install", "--no-deps", "--no-index", wheel], env=env)
    assert r.returncode == 0, r.stderr[-2000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    gen = ["generate", "--prompt", "hi", "--max-new-tokens", "4", "--ignore-eos"]
    r = _run([venv / "bin" / "moe-offload", *gen], cwd=elsewhere, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "decode: 4 tokens" in r.stderr
    code = ("import moe_offload; e = moe_offload.load(); print(moe_offload.__file__); print(e.path); "
            "print(len(e.generate('hi', max_new_tokens=3, ignore_eos=True).token_ids))")
    r = _run([py, "-c", code], cwd=elsewhere, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    where, path, n = r.stdout.split()
    assert Path(where).resolve().is_relative_to(venv.resolve())  # the wheel's copy, not the repo's
    assert Path(path).resolve().is_relative_to(venv.resolve()) and n == "3"
    assert not os.listdir(elsewhere)  # nothing written to the caller's directory


@pytest.mark.skipif(shutil.which("git") is None or not (Path(__file__).parents[1] / ".git").exists(),
                    reason="not a git checkout")
def test_a_venv_symlink_is_ignored_too():
    """`.venv` as a symlink (a worktree sharing the main checkout's venv) was committed once: the pattern `.venv/`
    matches directories only, and checking out that commit replaced the real venv with the link."""
    root = Path(__file__).parents[1]
    r = subprocess.run(["git", "check-ignore", "-q", "--no-index", ".venv"], cwd=root)
    assert r.returncode == 0
