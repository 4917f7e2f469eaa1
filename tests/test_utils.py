"""utils: the page-cache hint and the tensor byte count every module shares."""

import os

import pytest
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


def test_reuse_freed_memory_keeps_big_blocks_in_the_heap_and_restores_glibc_after(monkeypatch):
    """`quantize` makes many expert-sized temporaries (hundreds of MB at Mixtral's widths). glibc maps each
    one fresh and unmaps it on free, so every 4 KiB page faults in again: at Mixtral's widths most of a 4-bit
    RTN expert's time was that system time (scripts/quant_heap.py: 2.4 M faults an expert, none once the heap
    is reused). Inside reuse_freed_memory every allocation comes from the heap (M_MMAP_MAX 0) and nothing is
    trimmed (M_TRIM_THRESHOLD -1); on leaving, even by an exception, glibc's defaults come back and the heap is
    trimmed. (Whether one given block is reused depends on the heap's layout, so the page faults themselves are
    measured by the script, not asserted here.)"""
    from moe_offload import utils

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return 1

    monkeypatch.setattr(utils, "_libc", lambda: FakeLibc())
    with pytest.raises(RuntimeError):
        with utils.reuse_freed_memory() as ok:
            assert ok and calls == [("mallopt", utils.M_MMAP_MAX, 0), ("mallopt", utils.M_TRIM_THRESHOLD, -1)]
            raise RuntimeError("an encode failed")
    assert calls[2:] == [("mallopt", utils.M_MMAP_MAX, utils.MMAP_MAX_DEFAULT),
                         ("mallopt", utils.M_TRIM_THRESHOLD, utils.TRIM_DEFAULT), ("trim", 0)]
    monkeypatch.setattr(utils, "_libc", lambda: None)  # no glibc: a no-op
    with utils.reuse_freed_memory() as ok:
        assert ok is False


def test_quantize_encodes_its_experts_with_the_heap_reused(tmp_path, monkeypatch):
    import contextlib

    from moe_offload import utils
    from moe_offload.quant import codec, writer
    from tests.tiny import make_checkpoint

    inside, encodes = [], []

    @contextlib.contextmanager
    def recording():
        inside.append(True)
        try:
            yield True
        finally:
            inside.append(False)

    real = codec.HQQCodec.encode
    monkeypatch.setattr(utils, "reuse_freed_memory", recording)
    monkeypatch.setattr(codec.HQQCodec, "encode", lambda self, *a, **k: encodes.append(inside[-1:] == [True])
                        or real(self, *a, **k))
    make_checkpoint(tmp_path / "hf")
    writer.quantize(tmp_path / "hf", tmp_path / "store", expert_bits=4, quantizer="rtn")
    assert encodes and all(encodes)
