"""Routing profiles: record which experts each MoE layer picks on calibration text, with the hidden states
that fed the router, then write per-expert activation statistics (routing_stats.json), the routing trace,
and optionally a trained shadow router, into a store folder.

Shape legend: T tokens, D hidden, A active experts per token, E experts.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .args import add_model_args, load_engine
from .errors import UsageError
from .progress import Progress, add_quiet_arg
from .routes import RouteLog, hooked
from .utils import atomic_write_text


@dataclass
class Recording:
    hidden: dict[int, torch.Tensor]  # layer -> [T, D] fp32, the router's input
    chosen: dict[int, torch.Tensor]  # layer -> [T, A] expert ids
    n_experts: int
    top_k: int

    @property
    def tokens(self) -> int:
        return next(iter(self.chosen.values())).shape[0]

    def counts(self) -> dict[int, list[int]]:
        return {L: torch.bincount(c.flatten(), minlength=self.n_experts).tolist() for L, c in self.chosen.items()}

    def steps(self) -> list[list[list[int]]]:
        """steps[t][i] = experts of the i-th MoE layer for token t."""
        layers = sorted(self.chosen)
        return [[self.chosen[L][t].tolist() for L in layers] for t in range(self.tokens)]


@torch.inference_mode()
def record(engine, ids: list[int], window: int = 256, progress: Progress | None = None) -> Recording:
    """Forward `ids` in windows of `window` tokens (like perplexity) and record every MoE layer's routing.
    `progress`: updated with the tokens of each window."""
    log = RouteLog(hidden=True)
    window = min(window, engine.context_length)  # a model with a shorter context gets shorter windows
    with hooked(engine.model, log):
        for start in range(0, len(ids), window):
            chunk = ids[start:start + window]
            if chunk:
                engine.logits(chunk)
                if progress is not None:
                    progress.update(len(chunk))
    sink: dict = {}
    for layer, idx, h in log.calls:
        sink.setdefault(layer, []).append((h, idx))
    hidden = {L: torch.cat([h for h, _ in v]) for L, v in sink.items()}
    chosen = {L: torch.cat([c for _, c in v]) for L, v in sink.items()}
    return Recording(hidden, chosen, engine.model.n_experts, engine.model.top_k)


def routing_stats(rec: Recording, model_type: str) -> dict:
    """Per layer: activation counts and frequency per expert, and the normalised entropy of the usage."""
    layers = {}
    for L, counts in rec.counts().items():
        total = sum(counts)
        p = torch.tensor(counts, dtype=torch.float64) / max(total, 1)
        ent = float(-(p[p > 0] * p[p > 0].log()).sum() / torch.log(torch.tensor(float(rec.n_experts))))
        layers[str(L)] = {"counts": counts, "frequency": [c / max(rec.tokens, 1) for c in counts],
                          "normalized_entropy": ent}
    return {"format": "moe-offload-routing-stats", "version": 1, "model_type": model_type,
            "n_experts": rec.n_experts, "top_k": rec.top_k, "tokens": rec.tokens, "layers": layers}


def gates_of(model) -> dict[int, torch.Tensor]:
    return {L: moe.router_linear().weight.detach() for L, moe in model.moe_blocks()}


@dataclass
class ProfileResult:
    recording: Recording
    stats: dict  # routing_stats.json's content
    seconds: float  # recording and writing routing_stats.json


def profile(engine, ids: list[int], out: str | os.PathLike | None = None,
            progress: Progress | None = None) -> ProfileResult:
    """Record `engine`'s routing on the token ids (`progress`: updated per window, closed once recorded) and
    its routing statistics; with `out` (a store folder) write them there as routing_stats.json."""
    t0 = time.perf_counter()
    with progress or contextlib.nullcontext():
        rec = record(engine, ids, progress=progress)
    stats = routing_stats(rec, engine.args.model_type)
    if out is not None:
        atomic_write_text(Path(out) / "routing_stats.json", json.dumps(stats, indent=1))
    return ProfileResult(rec, stats, time.perf_counter() - t0)


@dataclass
class PredictorRecall:
    recall: dict[int, tuple[float, float]]  # distance -> (lookahead, previous-token) recall
    shadow: dict[int, float]  # distance -> the trained shadow router's recall (on the text itself)


def predictor_recall(engine, rec: Recording, train_shadow: bool = False, depth: int = 2,
                     out: str | os.PathLike | None = None) -> PredictorRecall:
    """How well the prefetch predictors foresee the recorded routing 1 and 2 layers ahead; train_shadow:
    train the shadow router to predict `depth` layers ahead (saved to `out` when given) and measure it too."""
    from .prefetch.predictors import Lookahead, PreviousToken, Shadow, evaluate

    m = engine.model.top_k
    recall = {}
    for d in (1, 2):
        la = evaluate(Lookahead(gates_of(engine.model), depth=d, m=m), rec.hidden, rec.chosen, distance=d)
        pt = evaluate(PreviousToken(sorted(rec.chosen), depth=d), rec.hidden, rec.chosen, distance=d)
        recall[d] = (la.recall, pt.recall)
    shadow_recall = {}
    if train_shadow:
        shadow = Shadow.train(rec.hidden, rec.chosen, rec.n_experts, depth=depth, m=m)
        if out is not None:
            shadow.save(Path(out) / "shadow_router.safetensors")
        for d in range(1, depth + 1):
            shadow_recall[d] = evaluate(shadow, rec.hidden, rec.chosen, distance=d).recall
    return PredictorRecall(recall, shadow_recall)


def add_args(p):
    add_model_args(p)
    p.add_argument("--text", required=True, help="calibration text file")
    p.add_argument("--out", required=True, help="store folder that receives routing_stats.json (and the shadow router)")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens of --text to profile at most")
    p.add_argument("--train-shadow", action="store_true", help="train the shadow router on this text")
    p.add_argument("--depth", type=int, default=2, help="layers ahead the shadow router predicts")
    add_quiet_arg(p)


def run(a) -> int:
    text_path, out = Path(a.text), Path(a.out)
    if not text_path.is_file():
        raise UsageError(f"--text {text_path}: no such file")
    if not out.is_dir():
        raise UsageError(f"--out {out}: no such folder (give an expert store folder)")
    engine = load_engine(a)
    if engine.tokenizer is None:
        raise UsageError(f"{engine.path}: no tokenizer to encode --text")
    ids = engine.tokenizer.encode(text_path.read_text(errors="replace"))[: a.max_tokens]
    r = profile(engine, ids, out, Progress("profile", len(ids), "tokens", quiet=a.quiet))
    rec = r.recording
    print(f"profiled {rec.tokens} tokens over {len(rec.chosen)} MoE layers in {r.seconds:.1f} s -> "
          f"{out / 'routing_stats.json'}", file=sys.stderr)
    p = predictor_recall(engine, rec, a.train_shadow, a.depth, out)
    for d, (la, pt) in p.recall.items():
        print(f"depth {d}: lookahead recall {la:.3f}, previous-token recall {pt:.3f}")
    for d, acc in p.shadow.items():
        print(f"depth {d}: shadow recall {acc:.3f} (on the calibration text itself)")
    return 0
