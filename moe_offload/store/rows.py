"""Embedding rows on demand (`--embed-rows disk`): the table stays in the store's backbone file and a forward
reads the rows of its tokens with positioned reads, so the budget's bytes go to experts instead.

    backbone.safetensors: [8-byte header length][JSON header][... model.embed_tokens.weight [V, D] ...]
    token t's row: D * itemsize bytes at data_start + offset(table) + t * D * itemsize (row-major)

A decode token reads one row, a prefill one per distinct prompt token: buffered os.pread of a few KiB, never a
mapping of the table (mapped pages count as RSS and would bring the table back). No row cache: a row read from
the page cache costs microseconds against a token's milliseconds.

When: `disk` asks for it, `resident` (the default) keeps the table, `auto` reads rows when a --memory budget in
bytes is given and the table would take more than AUTO_SHARE of it. A tied table (lm_head is the table) or one
stored quantized stays resident: auto silently, `disk` refused in one line.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from torch import nn

from ..errors import MoeError, UsageError

MODES = ("resident", "auto", "disk")
AUTO_SHARE = 0.05  # auto: rows on demand when the table is more than this share of --memory
KEY = "model.embed_tokens.weight"
FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def tensor_span(path: Path, name: str) -> tuple[int, str, list[int]]:
    """(byte offset in the file, safetensors dtype name, shape) of tensor `name`, from the header alone."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header[name]
    return 8 + n + meta["data_offsets"][0], meta["dtype"], list(meta["shape"])


def why_resident(source, tied: bool) -> str | None:
    """Why the table cannot be read by rows from `source` (the store's backbone), or None when it can."""
    if tied:
        return "the embedding table is tied to lm_head (tie_word_embeddings), which needs the whole table"
    if KEY not in source.key_to_shard:
        quantized = [k for k in source.keys() if k.startswith("model.embed_tokens.")]
        return (f"the embedding table is stored quantized ({quantized[0]})" if quantized
                else f"the backbone has no {KEY}")
    if source.dtype_of(KEY) not in FLOATS:
        return f"the embedding table is stored as {source.dtype_of(KEY)}, not 16/32-bit floats"
    return None


def choose(mode: str, memory, table_bytes: int, why_not: str | None) -> bool:
    """True: read rows on demand. `memory`: the budget in bytes, a Share, or None. Explicit `disk` that cannot
    be done: one UsageError line; `auto` falls back to the resident table without a word."""
    if mode == "disk":
        if why_not:
            raise UsageError(f"--embed-rows disk: {why_not}; use --embed-rows resident or auto")
        return True
    if mode == "auto":  # a Share counts the backbone outside its share: reading rows would free nothing for experts
        return why_not is None and isinstance(memory, int) and table_bytes > AUTO_SHARE * memory
    return False


class DiskEmbedding(nn.Module):
    """nn.Embedding's forward with the table left in the file: no parameters, nothing in the state dict."""

    def __init__(self, path: Path, name: str, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.path = Path(path)
        self.offset, st_dtype, (self.num_embeddings, self.embedding_dim) = tensor_span(self.path, name)
        self.stored, self.dtype, self.device = FLOATS[st_dtype], dtype, device
        self.row_bytes = self.embedding_dim * self.stored.itemsize
        self.table_bytes = self.num_embeddings * self.embedding_dim * dtype.itemsize  # what resident would hold
        self.fd = os.open(self.path, os.O_RDONLY)

    def read_rows(self, ids: list[int]) -> bytearray:
        """The rows of `ids` (in order, repeats read once) as one buffer of len(ids) * row_bytes."""
        rows = {}
        for t in dict.fromkeys(ids):
            if not 0 <= t < self.num_embeddings:
                raise IndexError(f"token id {t} is outside the vocabulary (0..{self.num_embeddings - 1})")
            rows[t] = os.pread(self.fd, self.row_bytes, self.offset + t * self.row_bytes)
            if len(rows[t]) != self.row_bytes:
                raise MoeError(f"{self.path}: short read of embedding row {t}: the store is truncated")
        return bytearray(b"".join(rows[t] for t in ids))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [...] -> [..., D] in the model's dtype: the same values as the resident table's rows."""
        ids = tokens.reshape(-1).tolist()
        rows = torch.frombuffer(self.read_rows(ids), dtype=self.stored).view(len(ids), self.embedding_dim)
        return rows.to(device=self.device, dtype=self.dtype).view(*tokens.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows from {self.path.name}"

    def __del__(self):
        fd, self.fd = getattr(self, "fd", None), None
        if fd is not None:
            os.close(fd)
