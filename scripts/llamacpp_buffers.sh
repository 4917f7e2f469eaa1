#!/bin/sh
# The buffers llama.cpp (llama-cpp-python) allocates for a GGUF on this CPU: "CPU_Mapped" is the mmap of the
# file, "CPU_REPACK" a copy of the weights in anonymous memory in the layout its CPU kernels want.
#     scripts/llamacpp_buffers.sh MODEL.gguf [python]
PY=${2:-python}
"$PY" -c "
import sys
from llama_cpp import Llama
Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=True)
" "$1" 2>&1 | grep -E "buffer size|REPACK|repack" | sort | uniq -c
