"""Progress lines on long work: the printer (fake clock and streams), and convert / quantize / profile / eval
with stderr captured (not a terminal): lines with a rate and an ETA; --quiet removes them."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from moe_offload.cli import main
from moe_offload.progress import Progress, fmt_seconds, status

LINE = re.compile(r"^(?P<desc>[^:]+(?:: [a-z ]+)?): (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+) \(\d+ %\), "
                  r"[\d.]+ (?P=unit)/s, .*(ETA [\d.]+ (s|min)|done in )", re.M)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_status_line_counts_rates_and_eta():
    assert status("convert", 12, 48, "experts", 2.0, nbytes=40_000_000) == \
        "convert: 12/48 experts (25 %), 6.0 experts/s, 20.0 MB/s, ETA 6.0 s"
    assert status("eval", 300, 300, "tokens", 1.5) == \
        "eval: 300/300 tokens (100 %), 200.0 tokens/s, done in 1.5 s"
    assert status("bench", 0, 4, "runs", 0.0) == "bench: 0/4 runs (0 %), - runs/s, ETA ?"
    assert [fmt_seconds(s) for s in (1.25, 42, 185, 7380)] == ["1.2 s", "42 s", "3 min 05 s", "2 h 03 min"]


def test_not_a_terminal_prints_every_tenth_and_every_period():
    clock, out = Clock(), io.StringIO()
    bar = Progress("convert", 20, "experts", stream=out, every_s=10, clock=clock)
    for _ in range(20):
        clock.t += 0.1
        bar.update(1, 1_000_000)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # at 10 %, 20 %, ..., 100 %; close adds nothing after the final count
    assert lines[0] == "convert: 2/20 experts (10 %), 10.0 experts/s, 10.0 MB/s, ETA 1.8 s"
    assert lines[-1].startswith("convert: 20/20 experts (100 %)") and "done in 2.0 s" in lines[-1]
    out.truncate(0)
    out.seek(0)
    bar = Progress("eval", 1000, "tokens", stream=out, every_s=10, clock=clock)
    for _ in range(3):  # slow: each step is under 10 % but takes 6 s -> a line every 10 s
        clock.t += 6
        bar.update(1)
    assert out.getvalue().splitlines() == ["eval: 2/1000 tokens (0 %), 0.2 tokens/s, ETA 1 h 39 min"]


def test_terminal_redraws_one_line_and_quiet_prints_nothing():
    clock, tty = Clock(), Tty()
    with Progress("quantize", 4, "experts", stream=tty, clock=clock) as bar:
        for _ in range(4):
            clock.t += 1
            bar.update()
        bar.write("layer 0: a message")
    text = tty.getvalue()
    assert text.count("\n") == 2 and text.endswith("\n") and "\r" in text  # the message, then the final line
    assert "layer 0: a message\n" in text and text.rstrip("\n").endswith("done in 4.0 s\x1b[K")
    quiet = io.StringIO()
    with Progress("quantize", 4, "experts", stream=quiet, quiet=True) as bar:
        bar.update(4)
    assert quiet.getvalue() == ""


def run(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    assert code == 0, err.getvalue()
    return out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 30)
    return path


def progress_lines(err: str, desc: str) -> list[re.Match]:
    return [m for m in LINE.finditer(err) if m["desc"] == desc]


def test_convert_and_quantize_report_experts_per_second_and_mb_per_second(tiny_checkpoint, tmp_path):
    hf = tiny_checkpoint("mixtral_gqa")  # 2 layers x 4 experts: a line at every expert (12.5 %)
    for cmd, desc in (("convert", "convert"), ("quantize", "quantize")):
        _, err = run(cmd, "--model", str(hf), "--out", str(tmp_path / cmd))
        lines = progress_lines(err, desc)
        assert len(lines) == 8 and all(m["unit"] == "experts" and m["total"] == "8" for m in lines), err
        assert " MB/s, ETA " in lines[0].group(0) and "done in" in lines[-1].group(0)
        _, err = run(cmd, "--model", str(hf), "--out", str(tmp_path / f"{cmd}-q"), "--quiet")
        assert not progress_lines(err, desc) and "experts/s" not in err, err


def test_profile_and_eval_report_tokens_per_second(tiny_checkpoint, tmp_path, text_file):
    hf = tiny_checkpoint("mixtral_gqa", tokenizer=True)
    store = tmp_path / "store"
    run("convert", "--model", str(hf), "--out", str(store), "--quiet")
    _, err = run("profile", "--model", str(store), "--text", str(text_file), "--out", str(store),
                 "--max-tokens", "300")
    assert progress_lines(err, "profile") and progress_lines(err, "profile")[0]["unit"] == "tokens", err
    _, err = run("profile", "--model", str(store), "--text", str(text_file), "--out", str(store), "--quiet")
    assert not progress_lines(err, "profile"), err
    _, err = run("eval", "--compare", str(hf), str(store), "--text", str(text_file), "--window", "32",
                 "--gen-tokens", "0")
    lines = [m for m in LINE.finditer(err) if m["desc"].startswith("eval ")]
    assert {m["desc"].split()[1] for m in lines} == {"1/2", "2/2"} and "ETA" in lines[0].group(0), err
    _, err = run("eval", "--model", str(store), "--text", str(text_file), "--gen-tokens", "0", "--quiet")
    assert "tokens/s" not in err, err
