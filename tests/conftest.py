"""Shared fixtures. Keep this a small module of helpers; builders live in tests/tiny.py."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missing hub id otherwise retries for ~50 s

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import tiny  # noqa: E402

# Tiny models on a shared 2-core box: with 2 OpenMP threads a busy neighbour makes every op wait on a spinning
# thread (measured 5 tok/s vs 1400 tok/s with 1 thread). Subprocesses get the same through CHILD_ENV.
torch.set_num_threads(1)
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory `tiny_checkpoint(spec="mixtral_gqa", **make_checkpoint_kwargs) -> Path`, built once per session
    per distinct arguments. Treat the folder as read-only; copy it (copy_checkpoint) to damage it."""
    built: dict[str, object] = {}

    def get(spec: str = "mixtral_gqa", **kw):
        key = repr((spec, sorted(kw.items())))
        if key not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{spec}")
            built[key] = tiny.make_checkpoint(folder, spec, **kw)
        return built[key]

    return get


@pytest.fixture
def child_env():
    """Environment for CLI / server subprocesses: offline, one thread."""
    return dict(CHILD_ENV)
