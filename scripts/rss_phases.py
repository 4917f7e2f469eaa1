"""Where the process's memory beyond the weights goes (issue 16: 600–700 MiB at Mixtral width): RSS by kind
(/proc/self/status: RssAnon heap and torch tensors, RssFile mapped files, RssShmem the expert read buffers)
after each phase of a bench worker's life — imports, load, then generations of fixed random prompts as the
bench runs them (the first is the warm-up) — and the peak, against resident_weight_bytes.

    PYTHONPATH=. python scripts/rss_phases.py STORE [--memory 3GiB] [--prompt-tokens 16] [--new-tokens 16]
                                                    [--prompts 3] [--threads 2] [--trim]
                                                    [--embed-rows resident|auto|disk]

--trim calls glibc's malloc_trim(0) after each phase (what the heap holds free but not given back).
Prints one line per phase (MiB) and a JSON line at the end.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time

MiB = 2**20


def status() -> dict[str, int]:
    keys = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k = line.split(":")[0]
            if k in keys:
                out[k] = int(line.split()[1]) * 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("store")
    p.add_argument("--memory", default=None)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trim", action="store_true")
    p.add_argument("--embed-rows", default=None, choices=["resident", "auto", "disk"])
    a = p.parse_args()
    libc = ctypes.CDLL("libc.so.6")
    rows = []

    def phase(name: str, **extra) -> None:
        if a.trim:
            libc.malloc_trim(0)
        s = status()
        rows.append({"phase": name, **s, **extra})
        print(f"{name:24s} " + " ".join(f"{k} {v / MiB:7.1f}" for k, v in s.items())
              + "".join(f" {k} {v / MiB:.1f}" if k in ("backbone", "resident") else f" {k} {v}"
                        for k, v in extra.items()),
              flush=True)

    phase("start")
    import torch

    torch.set_num_threads(a.threads)
    phase("import torch")
    from moe_offload.runtime.load import load
    from moe_offload.workload import prompts_for

    phase("import moe_offload")
    t0 = time.perf_counter()
    engine = load(a.store, device="cpu", memory=a.memory, embed_rows=a.embed_rows)
    info = engine.info
    phase("load", backbone=info["backbone_bytes"], load_s=round(time.perf_counter() - t0, 1))
    vocab = engine.args.vocab_size
    for i, ids in enumerate(prompts_for(vocab, a.prompt_tokens, a.prompts)):
        r = engine.generate(prompt_ids=ids, max_new_tokens=a.new_tokens + 1, ignore_eos=True, temperature=0.0)
        st = r.stats
        phase(f"generate {i}", resident=st.get("resident_weight_bytes", 0), misses=st.get("expert_misses"),
              decode_tok_s=round(st.get("decode_tokens_per_s", 0), 2))
    peak = max(r["VmHWM"] for r in rows)
    resident = max(r.get("resident", 0) for r in rows)
    print(json.dumps({"peak_rss": peak, "resident_weight_bytes": resident, "peak_minus_resident": peak - resident,
                      "phases": rows}))


if __name__ == "__main__":
    main()
