"""Routing profiles: record which experts each MoE layer picks on calibration text, with the hidden states
that fed the router, then write per-expert activation statistics (routing_stats.json), the routing trace,
and optionally a trained shadow router, into a store folder.

Shape legend: T tokens, D hidden, A active experts per token, E experts.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .cli import add_model_args, command, load_engine
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


def _add_profile(p):
    add_model_args(p)
    p.add_argument("--text", required=True, help="calibration text file")
    p.add_argument("--out", required=True, help="store folder that receives routing_stats.json (and the shadow router)")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens of --text to profile at most")
    p.add_argument("--train-shadow", action="store_true", help="train the shadow router on this text")
    p.add_argument("--depth", type=int, default=2, help="layers ahead the shadow router predicts")
    add_quiet_arg(p)


@command("profile", "record routing statistics (and train the shadow router) on calibration text", _add_profile)
def cmd_profile(a) -> int:
    from .prefetch.predictors import Lookahead, PreviousToken, Shadow, evaluate

    text_path, out = Path(a.text), Path(a.out)
    if not text_path.is_file():
        raise UsageError(f"--text {text_path}: no such file")
    if not out.is_dir():
        raise UsageError(f"--out {out}: no such folder (give an expert store folder)")
    engine = load_engine(a)
    if engine.tokenizer is None:
        raise UsageError(f"{engine.path}: no tokenizer to encode --text")
    ids = engine.tokenizer.encode(text_path.read_text(errors="replace"))[: a.max_tokens]
    t0 = time.perf_counter()
    with Progress("profile", len(ids), "tokens", quiet=a.quiet) as bar:
        rec = record(engine, ids, progress=bar)
    stats = routing_stats(rec, engine.args.model_type)
    atomic_write_text(out / "routing_stats.json", json.dumps(stats, indent=1))
    print(f"profiled {rec.tokens} tokens over {len(rec.chosen)} MoE layers in {time.perf_counter() - t0:.1f} s "
          f"-> {out / 'routing_stats.json'}", file=sys.stderr)
    m = engine.model.top_k
    for d in (1, 2):
        la = evaluate(Lookahead(gates_of(engine.model), depth=d, m=m), rec.hidden, rec.chosen, distance=d)
        pt = evaluate(PreviousToken(sorted(rec.chosen), depth=d), rec.hidden, rec.chosen, distance=d)
        print(f"depth {d}: lookahead recall {la.recall:.3f}, previous-token recall {pt.recall:.3f}")
    if a.train_shadow:
        shadow = Shadow.train(rec.hidden, rec.chosen, rec.n_experts, depth=a.depth, m=m)
        shadow.save(out / "shadow_router.safetensors")
        for d in range(1, a.depth + 1):
            acc = evaluate(shadow, rec.hidden, rec.chosen, distance=d)
            print(f"depth {d}: shadow recall {acc.recall:.3f} (on the calibration text itself)")
    return 0
