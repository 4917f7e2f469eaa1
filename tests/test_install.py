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
    """This interpreter's site-packages folders: torch and the other dependencies, found without a download."""
    return [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_bundled_model(tmp_path, child_env):
    src = tmp_path / "src"  # a copy, so the build's build/ and egg-info never land in the repo
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "moe_offload", src / "moe_offload", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in child_env.items() if k != "PYTHONPATH"}  # nothing may import the repo's copy
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    r = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "w"),
                        str(src)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "w").glob("moe_offload-*.whl")
    assert MODEL_IN_WHEEL in zipfile.ZipFile(wheel).namelist()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=env, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, env=env).stdout.strip()
    Path(site, "_outer.pth").write_text("\n".join(_outer_site_packages()) + "\n")  # paths only: no .pth hooks
    r = subprocess.run([*pip, "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run([str(venv / "bin" / "moe-offload"), "generate", "--prompt", "hi", "--max-new-tokens", "4",
                        "--ignore-eos"],
                       capture_output=True, text=True, cwd=elsewhere, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "decode: 4 tokens" in r.stderr
    code = ("import moe_offload; e = moe_offload.load(); print(moe_offload.__file__); print(e.path); "
            "print(len(e.generate('hi', max_new_tokens=3, ignore_eos=True).token_ids))")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=elsewhere, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    where, path, n = r.stdout.split()
    assert Path(where).resolve().is_relative_to(venv.resolve())  # the wheel's copy, not the repo's
    assert Path(path).resolve().is_relative_to(venv.resolve()) and n == "3"
    assert not os.listdir(elsewhere)  # nothing written to the caller's directory
