"""What llama.cpp holds for a GGUF on this CPU with and without its repack: load the file through
llama-cpp-python (mmap on), evaluate three tokens, print the process's anonymous and file-backed RSS
(/proc/self/status RssAnon, RssFile) and its peak (VmHWM). Each mode runs in a fresh process. "no repack" is
bench.no_repack (llama.cpp's --no-repack: model params with use_extra_bufts off).

    PYTHONPATH=. python scripts/llamacpp_repack_rss.py MODEL.gguf [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys
from moe_offload.bench import no_repack
if sys.argv[2] == "off":
    no_repack()
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=int(sys.argv[3]), n_gpu_layers=0, use_mmap=True,
            verbose=False)
llm.eval([1, 2, 3])
st = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith(("RssAnon", "RssFile", "VmHWM")))
print(json.dumps({k: int(v.split()[0]) * 1024 for k, v in st.items()}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    for mode in ("on", "off"):
        r = subprocess.run([sys.executable, "-c", CHILD, a.gguf, mode, str(a.threads)], capture_output=True,
                           text=True, env=env)
        if r.returncode:
            print(f"repack {mode}: failed: {r.stderr.strip()[-300:]}")
            continue
        m = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"repack {mode}: anonymous {m['RssAnon'] / 2**30:.2f} GiB, file-backed {m['RssFile'] / 2**30:.2f} GiB, "
              f"peak {m['VmHWM'] / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
