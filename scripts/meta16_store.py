"""Rewrite a store's 4-bit hqq experts with 8-bit meta (what `quantize --expert-bits 4` wrote before issue 16's
fix) as bf16 meta (what it writes now), without the Hugging Face checkpoint: the codes are kept byte for byte and
the meta is the bf16 (s, m) pairs the runtime already decoded the 8-bit meta to (hqq.decode_meta), so the weights
the kernels see — hence the tokens — are identical, and a loaded expert is then a view of its stored bytes.

    PYTHONPATH=. python scripts/meta16_store.py SRC_STORE DST_STORE

The backbone and the other files are hard-linked (copied across filesystems); SRC is only read.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from moe_offload.codecs import make_codec
from moe_offload.store.format import EXPERTS, MANIFEST, crc32_hex, open_store, round_up
from moe_offload.store.tiers import DiskTier


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    store = open_store(src)
    if dst.exists():
        sys.exit(f"{dst} exists")
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in (EXPERTS, MANIFEST):
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copyfile(f, dst / f.name)
    disk = DiskTier(store.experts_path, verify="always")
    shape, entries, offset = store.expert_shape, [], 0
    manifest = json.loads((src / MANIFEST).read_text())
    with open(dst / EXPERTS, "wb") as out:
        for item in manifest["experts"]:
            e = store.entries[item["layer"], item["expert"]]
            old = make_codec(e.codec)
            spec = dict(e.codec)
            if spec.get("name") == "hqq" and spec["bits"] == 4 and spec["meta_bits"] == 8:
                spec["meta_bits"] = 16
                new = make_codec(spec)
                blob = disk.read(e)[:e.nbytes]
                layout, total = new.layout(shape)
                import torch

                out_blob = torch.zeros(total, dtype=torch.uint8)
                for pm, secs in zip(old.packed(blob, shape), layout):
                    parts = {"codes": pm.packed, "sm": pm.sz}
                    for key, off, n, _, _ in secs:
                        t = parts[key].contiguous().view(-1).view(torch.uint8)
                        assert t.numel() == n, (key, t.numel(), n)
                        out_blob[off:off + n] = t
                data = out_blob.numpy().data
            else:
                data = disk.read(e)[:e.nbytes].numpy().data
            n = len(data)
            out.write(data)
            out.write(b"\0" * (round_up(n) - n))
            entries.append({**item, "offset": offset, "nbytes": n, "codec": spec, "checksum": crc32_hex(data)})
            offset += round_up(n)
    disk.close()
    manifest["experts"] = entries
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=1))
    s = open_store(dst)
    print(f"{len(entries)} experts: {store.expert_bytes / 2**20:.1f} -> {s.expert_bytes / 2**20:.1f} MiB -> {dst}")


if __name__ == "__main__":
    main()
