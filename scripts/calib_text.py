#!/usr/bin/env python3
"""Write a calibration text drawn from the bundled model's *training* distribution (not from heldout.txt).

``quantize --calib`` needs some text to fit activation-aware codecs and mixed-precision plans on.
Calibrating on part of ``heldout.txt`` and scoring on the rest mixes choice and test, and the two parts
of that small file differ in their language / code mix. LLM quantizers calibrate on text of the
training distribution instead; this script rebuilds the training documents exactly as
``scripts/train_tiny_moe.py`` does (same fortunes files, same stdlib chunks, same seed and split,
reusing its functions) and samples from the *train* split only:

* stratified by domain: each domain (fortunes-en/de/es/it/ru, python-stdlib) gets its share of the
  training corpus' bytes of the ``--bytes`` target; within a domain, documents are drawn in a
  ``--seed``-shuffled order, skipping those that would overrun the domain's quota, until it is filled;
* a document is excluded if it is one of the held-out documents, occurs inside ``heldout.txt``, or shares any line longer than
  ``--min-line`` characters with ``heldout.txt`` (near-duplicates: the training script de-duplicates
  exact copies only); the count is reported, and the written file is checked to share no such line;
* documents are joined as in ``heldout.txt`` (blank line between documents), in a shuffled order.

It also checks that the rebuilt held-out split reproduces the model folder's ``heldout.txt`` byte for
byte, i.e. that this machine's fortunes and stdlib are the ones the model was trained on.

Usage::

    python scripts/calib_text.py --out /tmp/calib_train.txt              # 36,000 bytes, seed 0
    moe-offload quantize --model models/tiny-moe --calib /tmp/calib_train.txt ...
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path


def long_lines(text: str, min_line: int) -> set[str]:
    return {ln.strip() for ln in text.split("\n") if len(ln.strip()) > min_line}


def sample_calibration(train: list[tuple[str, str]], held_text: str, target_bytes: int, seed: int = 0,
                       min_line: int = 40, held_docs: list[str] | None = None) -> tuple[str, dict]:
    """Stratified sample of (domain, text) training documents, none of them in / overlapping held_text.

    Returns the calibration text and a report (bytes and docs per domain, exclusions, overlap check)."""
    held_lines = long_lines(held_text, min_line)
    held_set = set(held_docs or [])
    total = Counter()
    by_dom: dict[str, list[str]] = {}
    for dom, text in train:
        total[dom] += len(text.encode("utf-8"))
        by_dom.setdefault(dom, []).append(text)
    all_bytes = sum(total.values())
    rng = random.Random(seed)
    chosen: list[str] = []
    rep = {"target_bytes": target_bytes, "seed": seed, "min_line": min_line, "domains": {},
           "excluded_in_heldout": 0, "excluded_line_overlap": 0}
    for dom in sorted(by_dom):
        quota = target_bytes * total[dom] / all_bytes
        docs = list(by_dom[dom])
        rng.shuffle(docs)
        got, n = 0, 0
        for d in docs:
            b = len(d.encode("utf-8")) + 2
            if got + b > quota:  # keeps the domain mix; smaller documents may still fit
                continue
            if d in held_set or d in held_text:
                rep["excluded_in_heldout"] += 1
                continue
            if long_lines(d, min_line) & held_lines:
                rep["excluded_line_overlap"] += 1
                continue
            chosen.append(d)
            got += b
            n += 1
            if quota - got < 50:
                break
        rep["domains"][dom] = {"docs": n, "bytes": got, "train_share": round(total[dom] / all_bytes, 4)}
    rng.shuffle(chosen)
    text = "\n\n".join(chosen) + "\n"
    overlap = long_lines(text, min_line) & held_lines
    rep["bytes"] = len(text.encode("utf-8"))
    rep["chars"] = len(text)
    rep["lines_over_min_line"] = len(long_lines(text, min_line))
    rep["lines_shared_with_heldout"] = len(overlap)
    if overlap:  # cannot happen: every chosen document was checked
        raise AssertionError(f"calibration text shares {len(overlap)} long lines with the held-out text")
    return text, rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="calibration text file to write")
    ap.add_argument("--model", default="models/tiny-moe", help="model folder holding heldout.txt")
    ap.add_argument("--bytes", type=int, default=36000, help="target size of the calibration text (UTF-8 bytes)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (the corpus split uses --train-seed)")
    ap.add_argument("--min-line", type=int, default=40, help="lines longer than this must not occur in heldout.txt")
    # the training script's corpus options, at its defaults
    ap.add_argument("--train-seed", type=int, default=1234)
    ap.add_argument("--code-frac", type=float, default=0.4)
    ap.add_argument("--max-code-mb", type=float, default=12.0)
    ap.add_argument("--code-chunk-chars", type=int, default=4000)
    ap.add_argument("--heldout-frac", type=float, default=0.02)
    ap.add_argument("--heldout-bytes", type=int, default=48000)
    ap.add_argument("--heldout-max-bytes", type=int, default=60000)
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train_tiny_moe as T

    cargs = argparse.Namespace(seed=args.train_seed, code_frac=args.code_frac, max_code_mb=args.max_code_mb,
                               code_chunk_chars=args.code_chunk_chars, heldout_frac=args.heldout_frac)
    corpus = T.build_corpus(cargs)
    held_file = Path(args.model) / "heldout.txt"
    held_text = held_file.read_text(encoding="utf-8")
    rebuilt, _ = T.heldout_sample(corpus["held"], args.heldout_bytes, args.heldout_max_bytes)
    same = rebuilt == held_text
    T.log(f"rebuilt held-out sample {'matches' if same else 'DIFFERS FROM'} {held_file}")
    text, rep = sample_calibration(corpus["train"], held_text, args.bytes, args.seed, args.min_line,
                                   held_docs=[t for _, t in corpus["held"]])
    rep["heldout_rebuilt_matches"] = same
    Path(args.out).write_text(text, encoding="utf-8")
    print(json.dumps(rep, indent=1))
    if not same:
        sys.exit("error: the rebuilt corpus does not reproduce heldout.txt (different fortunes/stdlib?)")


if __name__ == "__main__":
    main()
