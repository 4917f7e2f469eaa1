"""utils: the page-cache hint and the tensor byte count every module shares."""

import os

import torch

from moe_offload.utils import drop_page_cache, files_under, tensor_bytes


def test_files_under_walks_folders_and_skips_missing_paths(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    for name in ("d/b.bin", "d/e/a.bin", "c.bin"):
        (tmp_path / name).write_bytes(b"x")
    got = files_under([tmp_path / "d", tmp_path / "c.bin", tmp_path / "missing"])
    assert got == [tmp_path / "d/b.bin", tmp_path / "d/e/a.bin", tmp_path / "c.bin"]
    assert files_under(tmp_path / "c.bin") == files_under(str(tmp_path / "c.bin")) == [tmp_path / "c.bin"]


def test_drop_page_cache_takes_a_file_a_folder_or_several(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    for name in ("a.bin", "d/b.bin"):
        (tmp_path / name).write_bytes(b"x" * 4096)
    calls = []
    monkeypatch.setattr("os.fsync", lambda fd: calls.append("fsync"))
    monkeypatch.setattr("os.posix_fadvise", lambda fd, off, n, advice: calls.append(advice))
    drop_page_cache(tmp_path / "a.bin")  # the store writer's call: one file, no fsync
    assert calls == [os.POSIX_FADV_DONTNEED]
    calls.clear()
    drop_page_cache([tmp_path], sync=True)  # bench's call: everything under a folder, written back first
    assert calls == ["fsync", os.POSIX_FADV_DONTNEED] * 2


def test_tensor_bytes_of_a_state_dict_or_tensors():
    state = {"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16),
             "c": torch.zeros(7, dtype=torch.uint8)}
    assert tensor_bytes(state) == tensor_bytes(state.values()) == 48 + 10 + 7
    assert tensor_bytes({}) == 0
