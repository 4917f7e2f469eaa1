"""Does llama.cpp (llama-cpp-python) load a GGUF and decode a few tokens here, with and without its extra buffer
types (CPU_REPACK, and AMX where its build has it)? Each mode runs in a child process, so a crash is reported
as the child's exit status instead of ending this script.

    PYTHONPATH=. python scripts/llamacpp_smoke.py FILE.gguf [--threads 2]

On the Xeon of 2026-12-04 (AVX-512, AMX), llama-cpp-python 0.3.36 built with GGML_NATIVE=ON put the attention and
output matrices in its AMX buffer and died of SIGSEGV in its first decode on both synthetic MoE files; with the
extra buffers off (`--no-repack`) it decoded (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = """
import sys
from moe_offload.bench import no_repack
if sys.argv[2] == "off":
    no_repack()
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=int(sys.argv[3]), verbose=False)
llm.eval([1, 2, 3, 4])
print("decoded 4 tokens")
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    import llama_cpp

    print(f"llama-cpp-python {llama_cpp.__version__}; {llama_cpp.llama_print_system_info().decode().strip()}")
    for mode in ("on", "off"):
        r = subprocess.run([sys.executable, "-c", CHILD, a.gguf, mode, str(a.threads)], capture_output=True,
                           text=True)
        said = (r.stdout.strip().splitlines() or ["-"])[-1]
        print(f"extra buffers {mode:>3}: exit {r.returncode} ({said})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
