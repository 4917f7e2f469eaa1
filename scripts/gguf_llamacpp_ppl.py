"""Perplexity of a GGUF file in our engine and in llama.cpp (llama-cpp-python), same token ids, same windows,
and the share of positions where both pick the same top-1 token.

    # one file
    PYTHONPATH=. python scripts/gguf_llamacpp_ppl.py --model FILE.gguf --text TEXT
    # the bundled model exported to F16 and quantized by llama.cpp to each type, one row per type
    PYTHONPATH=. python scripts/gguf_llamacpp_ppl.py --hf moe_offload/_models/tiny-moe \
        --types f16,q8_0,q4_0,q4_k --text moe_offload/_models/tiny-moe/heldout.txt --out /tmp/gguf-q

Token ids come from the tokenizer our store built from the file's vocabulary; both sides score every position
of non-overlapping --window windows (Engine.perplexity's), no BOS added. Our side runs the store converted from
the file (quantized experts kept as codes, backbone bfloat16 for quantized files but the
quantized attention / lm_head, stored as 8-bit codes: convert_gguf backbone_bits "auto"), llama.cpp its CPU backend.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_offload import load
from moe_offload.eval import compare_llamacpp, read_text


def row(path: Path, text: str, max_tokens: int, window: int, threads: int | None) -> dict:
    engine = load(str(path))
    if engine.tokenizer is None:
        sys.exit(f"error: {path}: no tokenizer in the store built from it")
    ids = engine.tokenizer.encode(text)[:max_tokens]
    r = compare_llamacpp(engine, str(path), ids, min(window, engine.context_length), threads)
    r["bytes"] = path.stat().st_size
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a GGUF file")
    src.add_argument("--hf", help="a Hugging Face folder: exported (export-gguf) at each of --types")
    p.add_argument("--types", default="f16,q8_0,q4_0,q4_k", help="with --hf: export-gguf --type values")
    p.add_argument("--out", default="/tmp/gguf-llamacpp", help="with --hf: folder for the GGUF files")
    p.add_argument("--text", required=True)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    text = read_text(Path(a.text), 32 * a.max_tokens)
    if a.model:
        paths = [Path(a.model)]
    else:
        from moe_offload.gguf_export import export_gguf

        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for t in a.types.split(","):
            path = out / f"{Path(a.hf).name}-{t}.gguf"
            if not path.is_file():
                export_gguf(a.hf, path, t, a.threads, overwrite=True)
            paths.append(path)
    rows = [row(p_, text, a.max_tokens, a.window, a.threads) for p_ in paths]
    if a.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"{'file':<28} {'MiB':>6} {'tokens':>6} {'ppl ours':>9} {'ppl llama.cpp':>13} {'ratio':>7} "
          f"{'top-1 same':>10}")
    for r in rows:
        print(f"{Path(r['model']).name:<28} {r['bytes'] / 2**20:>6.1f} {r['tokens']:>6} {r['ppl_ours']:>9.3f} "
              f"{r['ppl_llamacpp']:>13.3f} {r['ppl_ratio']:>7.4f} {r['top1_agreement']:>10.4f}")
    return 0


if __name__ == "__main__":
    from moe_offload.errors import MoeError

    try:
        sys.exit(main())
    except MoeError as e:  # a bad file or text, no llama-cpp-python: one line, no traceback
        sys.exit(f"error: {e}")
