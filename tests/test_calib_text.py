"""scripts/calib_text.py: the calibration sample keeps the training mix and never overlaps the held-out text."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "calib_text", Path(__file__).resolve().parents[1] / "scripts" / "calib_text.py")
calib_text = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(calib_text)

SHARED = "this line is long enough to count as a shared line, over forty characters"


def _corpus():
    train = [("code", f"def f{i}(x):\n    return x + {i}  # a comment that makes this line long enough\n")
             for i in range(60)]
    train += [("prose", f"fortune number {i}: short and sweet") for i in range(200)]
    held_docs = ["a held-out fortune, never trained on", f"held document\n{SHARED}"]
    train += [("prose", held_docs[0]), ("prose", f"near duplicate\n{SHARED}\nwith another ending")]
    return train, held_docs


def test_sample_excludes_heldout_and_keeps_mix():
    train, held_docs = _corpus()
    held_text = "\n\n".join(held_docs) + "\n"
    text, rep = calib_text.sample_calibration(train, held_text, 4000, seed=0, held_docs=held_docs)
    assert held_docs[0] not in text and SHARED not in text
    assert rep["lines_shared_with_heldout"] == 0
    assert not (calib_text.long_lines(text, 40) & calib_text.long_lines(held_text, 40))
    # the domains' byte shares follow the training corpus' (within one document of the quota)
    tot = {d: sum(len(t.encode()) for dd, t in train if dd == d) for d in ("code", "prose")}
    for d, r in rep["domains"].items():
        quota = 4000 * tot[d] / sum(tot.values())
        assert quota - 80 <= r["bytes"] <= quota
    assert rep["bytes"] <= 4000
    assert calib_text.sample_calibration(train, held_text, 4000, seed=0, held_docs=held_docs)[0] == text
    assert calib_text.sample_calibration(train, held_text, 4000, seed=1, held_docs=held_docs)[0] != text


def test_sample_reports_exclusions():
    train, held_docs = _corpus()
    held_text = "\n\n".join(held_docs) + "\n"
    # a target larger than the corpus draws every document that is allowed: both bad ones get excluded
    text, rep = calib_text.sample_calibration(train, held_text, 10 ** 7, seed=0, held_docs=held_docs)
    assert rep["excluded_in_heldout"] == 1 and rep["excluded_line_overlap"] == 1
    assert rep["domains"]["prose"]["docs"] == 200 and rep["domains"]["code"]["docs"] == 60
    # a training document found inside the held-out text is excluded even when not listed as held out
    _, rep = calib_text.sample_calibration([("prose", "sweet")], held_text + "sweet dreams", 100)
    assert rep["excluded_in_heldout"] == 1 and rep["bytes"] == 1
