"""`--model org/name`: a model id resolved through the local Hugging Face cache, offline, by the rules of
huggingface_hub (cache folder, `models--org--name/refs/<revision>`, `snapshots/<commit>/`). Nothing is
downloaded: an id that is not cached is one line saying how to fetch it."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import MoeError

REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")  # org/name, no '..'


def hub_cache() -> Path:
    """HF_HUB_CACHE, else HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub (~/.cache by default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def is_repo_id(text: str) -> bool:
    return bool(REPO_ID.fullmatch(text)) and ".." not in text


def cached_snapshot(repo_id: str, revision: str = "main") -> Path:
    """The snapshot folder of `repo_id` at `revision` (a branch in refs/, or a commit) in the local cache."""
    repo = hub_cache() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    if re.fullmatch(r"[0-9a-f]{40}", commit) and (snapshots / commit).is_dir():
        return snapshots / commit
    found = sorted(p for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
    if len(found) == 1 and not ref.is_file():  # one snapshot and no ref to say otherwise
        return found[0]
    where = f"{repo} has no snapshot for '{revision}'" if repo.is_dir() else f"not in {hub_cache()}"
    raise MoeError(f"model '{repo_id}' is not a local folder and is not in the Hugging Face cache ({where}); "
                   f"fetch it with `hf download {repo_id}` (or set HF_HUB_CACHE), then run again offline")


def resolve_model(path: str | os.PathLike) -> Path:
    """A local path as given; an `org/name` that is not a local path: its cached snapshot."""
    p = Path(path)
    if p.exists() or not is_repo_id(str(path)):
        return p
    return cached_snapshot(str(path))
