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


def _faults(fn) -> int:
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_reuse_freed_memory_serves_repeated_big_temporaries_from_the_heap_without_page_faults():
    """`quantize` makes many expert-sized temporaries (hundreds of MB at Mixtral's widths). glibc maps each
    one fresh and unmaps it on free, so every 4 KiB page faults in again: at Mixtral's widths most of a 4-bit
    RTN expert's time was that system time (scripts/quant_heap.py). Inside reuse_freed_memory a freed block's
    pages serve the next one; on leaving, glibc's behaviour comes back."""
    from moe_offload.utils import reuse_freed_memory

    n = 64 << 20  # bytes: above glibc's largest dynamic mmap threshold (32 MiB), as an expert's temporaries

    def temporary():
        torch.ones(n // 4).sum()  # written: every page touched

    temporary()
    fresh = _faults(temporary)
    with reuse_freed_memory() as ok:
        if not ok:
            pytest.skip("no glibc mallopt here")
        temporary()  # the heap grows once
        inside = min(_faults(temporary) for _ in range(3))
    after = min(_faults(temporary) for _ in range(2))
    pages = n // 4096
    assert fresh > pages // 2 and after > pages // 2  # the default: a new mapping each time
    assert inside < pages // 20


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
