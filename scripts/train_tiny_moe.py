#!/usr/bin/env python3
"""Reproducibly train the tiny default Mixtral-style MoE model shipped in ``models/tiny-moe``.

Everything runs on CPU from text that ordinary packages ship, so the model can be rebuilt offline:

* corpus: Debian ``fortunes`` (English) plus ``fortunes-de/-es/-it/-ru`` and the Python standard
  library's own ``*.py`` sources (tests excluded), de-duplicated, shuffled with a fixed seed and split
  into train / held-out (~2 %);
* tokenizer: byte-level BPE (``tokenizers``), vocab 4096, special/role tokens, saved as a
  transformers fast tokenizer with a chat template;
* model: ``transformers.MixtralForCausalLM`` (8 experts, top-2), trained for a fixed number of
  steps with AdamW + warm-up + cosine decay, saved in bfloat16;
* evaluation (float32): held-out perplexity on ``heldout.txt`` (256-token windows, stride 256) and
  per-layer expert usage / normalised routing entropy, written to ``train_report.json`` and
  ``MODEL_CARD.md``.

Usage::

    python scripts/train_tiny_moe.py --out models/tiny-moe            # full run (defaults)
    python scripts/train_tiny_moe.py --out /tmp/x --steps 30          # smoke test
    python scripts/train_tiny_moe.py --eval-only --out models/tiny-moe  # recompute ppl / usage
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

# With the default (active, spinning) OpenMP wait policy, 2 torch threads on a 2-core machine shared with other
# busy processes slowed a training step ~5x (measured 16-25 s vs 3.5-4 s per step); passive waiting avoids it.
# Must be set before torch (and its OpenMP runtime) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

FORTUNE_ROOT = Path("/usr/share/games/fortunes")
FORTUNE_LANGS = {  # language -> (sub-folder of FORTUNE_ROOT, Debian package)
    "en": ("", "fortunes"),
    "de": ("de", "fortunes-de"),
    "es": ("es", "fortunes-es"),
    "it": ("it", "fortunes-it"),
    "ru": ("ru", "fortunes-ru"),
}
APT_CMD = "apt-get install -y fortunes fortunes-de fortunes-es fortunes-it fortunes-ru"
# ASCII-art / banner collections: pictures, not language.
SKIP_FORTUNE_FILES = {"ascii-art", "asciiart", "banner"}
SKIP_STDLIB_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SAMPLE_PROMPTS = ["def", "class", "The", "Der", "La", "Il", "Жизнь"]


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------- corpus
def fortune_files(lang: str) -> list[Path]:
    sub, _ = FORTUNE_LANGS[lang]
    d = FORTUNE_ROOT / sub if sub else FORTUNE_ROOT
    out = []
    for p in sorted(d.iterdir()):
        # regular files only: this skips sub-folders (incl. the offensive ``off/``) and the symlinks
        # (``*.u8`` aliases, and fortunes-it's links into the top-level English folder)
        if p.is_symlink() or not p.is_file():
            continue
        if p.suffix in (".dat", ".u8") or p.name.endswith((".dat", ".u8")) or p.name in SKIP_FORTUNE_FILES:
            continue
        out.append(p)
    return out


def read_fortunes(path: Path) -> list[str]:
    text = path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
    docs, cur = [], []
    for line in text.split("\n"):
        if line.strip() == "%":
            docs.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    docs.append("\n".join(cur))
    return [d.strip("\n").rstrip() for d in docs if d.strip()]


def pkg_version(pkg: str) -> str:
    try:
        return subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True,
                              check=True).stdout.strip() or "?"
    except (OSError, subprocess.CalledProcessError):
        return "?"


def check_fortunes() -> None:
    missing = [pkg for lang, (sub, pkg) in FORTUNE_LANGS.items()
               if not (FORTUNE_ROOT / sub).is_dir() or not fortune_files(lang)]
    if missing:
        log(f"error: fortune data missing (packages: {', '.join(missing)}). Install them with:\n  {APT_CMD}")
        sys.exit(1)


def split_code(text: str, max_chars: int) -> list[str]:
    """Split a source file into chunks of at most ~max_chars at blank-line boundaries."""
    blocks = text.split("\n\n")
    chunks, cur, size = [], [], 0
    for b in blocks:
        if cur and size + len(b) > max_chars:
            chunks.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(b)
        size += len(b) + 2
    if cur:
        chunks.append("\n\n".join(cur))
    return [c.strip("\n") for c in chunks if c.strip()]


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_STDLIB_DIRS)
        for f in sorted(filenames):
            if f.endswith(".py") and not f.startswith("test_"):
                files.append(Path(dirpath) / f)
    return root, files


def build_corpus(args) -> dict:
    check_fortunes()
    rng = random.Random(args.seed)
    seen: set[bytes] = set()
    docs: list[tuple[str, str]] = []  # (domain, text)
    stats: dict[str, dict] = {}

    def add(domain: str, text: str) -> bool:
        h = hashlib.sha1(text.encode("utf-8")).digest()
        if h in seen:
            stats[domain]["dups"] += 1
            return False
        seen.add(h)
        docs.append((domain, text))
        stats[domain]["docs"] += 1
        stats[domain]["bytes"] += len(text.encode("utf-8"))
        return True

    fortune_bytes = 0
    for lang in FORTUNE_LANGS:
        dom = f"fortunes-{lang}"
        stats[dom] = {"docs": 0, "bytes": 0, "dups": 0, "files": 0}
        for p in fortune_files(lang):
            stats[dom]["files"] += 1
            for d in read_fortunes(p):
                add(dom, d)
        fortune_bytes += stats[dom]["bytes"]

    # Python stdlib: shuffle the chunks, keep up to the byte budget that gives ~code_frac of the mix
    stats["python-stdlib"] = {"docs": 0, "bytes": 0, "dups": 0, "files": 0}
    root, files = stdlib_files()
    chunks = []
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        stats["python-stdlib"]["files"] += 1
        chunks.extend(split_code(text.replace("\r\n", "\n"), args.code_chunk_chars))
    rng.shuffle(chunks)
    budget = min(int(fortune_bytes * args.code_frac / (1.0 - args.code_frac)), int(args.max_code_mb * 1e6))
    used = 0
    for c in chunks:
        if used >= budget:
            break
        if add("python-stdlib", c):
            used += len(c.encode("utf-8"))

    rng.shuffle(docs)
    n_held = max(1, int(round(len(docs) * args.heldout_frac)))
    held, train = docs[:n_held], docs[n_held:]
    total = sum(s["bytes"] for s in stats.values())
    for s in stats.values():
        s["share"] = round(s["bytes"] / total, 4)
    log(f"corpus: {len(docs)} unique docs, {total / 1e6:.2f} MB; train {len(train)} docs, held-out {len(held)} docs")
    for k, s in stats.items():
        log(f"  {k:16s} files={s['files']:4d} docs={s['docs']:7d} dups={s['dups']:5d} "
            f"MB={s['bytes'] / 1e6:6.2f} share={s['share']:.3f}")
    return {"train": train, "held": held, "stats": stats, "total_bytes": total, "stdlib_root": str(root)}


def heldout_sample(held: list[tuple[str, str]], target_bytes: int, max_bytes: int) -> tuple[str, dict]:
    parts, size, doms = [], 0, {}
    for dom, text in held:
        b = len(text.encode("utf-8")) + 2
        if size + b > max_bytes:
            continue
        parts.append(text)
        size += b
        d = doms.setdefault(dom, {"docs": 0, "bytes": 0})
        d["docs"] += 1
        d["bytes"] += b
        if size >= target_bytes:
            break
    return "\n\n".join(parts) + "\n", doms


# ------------------------------------------------------------------------------------------ tokenizer
def train_tokenizer(train_docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_docs, trainer=trainer, length=len(train_docs))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[4:],
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


# -------------------------------------------------------------------------------------------- model
def make_config(args, tok):
    from transformers import MixtralConfig

    cfg = MixtralConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        hidden_act="silu",
        max_position_embeddings=512,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        use_cache=True,
        bos_token_id=tok.convert_tokens_to_ids(BOS),
        eos_token_id=tok.convert_tokens_to_ids(EOS),
        pad_token_id=tok.convert_tokens_to_ids(PAD),
        tie_word_embeddings=False,
        sliding_window=None,
        attention_dropout=0.0,
        num_experts_per_tok=args.top_k,
        num_local_experts=args.experts,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        router_jitter_noise=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    cfg._experts_implementation = args.experts_impl
    return cfg


def param_counts(model) -> dict:
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    active = total - expert + expert * cfg.num_experts_per_tok // cfg.num_local_experts
    return {
        "total": total,
        "experts": expert,
        "non_expert": total - expert,
        "embedding": embed,
        "lm_head": head,
        "active_per_token": active,
        "active_per_token_excl_embedding": active - embed,
    }


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    prog = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1.0 + math.cos(math.pi * prog))


def train(args, corpus) -> None:
    from transformers import GenerationConfig, MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    t_start = time.time()
    out = Path(args.out).resolve()  # models/tiny-moe is a link: replace the folder it points to
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    train_docs = [t for _, t in corpus["train"]]
    t0 = time.time()
    tok = train_tokenizer(train_docs, args.vocab)
    log(f"tokenizer: vocab {len(tok)} trained in {time.time() - t0:.1f}s")
    for s in ["def f(x):\n    return x  # ok", "Grüße, señor! Жизнь — это…", "\t\r\n  \x00"]:
        assert tok.decode(tok(s)["input_ids"]) == s, f"tokenizer round-trip failed on {s!r}"

    # token stream: <s> doc </s> <s> doc </s> ... cut into non-overlapping windows of seq_len
    t0 = time.time()
    bos, eos = tok.bos_token_id, tok.eos_token_id
    enc = tok._tokenizer.encode_batch(train_docs, add_special_tokens=False)
    ids = []
    for e in enc:
        ids.append(bos)
        ids.extend(e.ids)
        ids.append(eos)
    stream = torch.tensor(ids, dtype=torch.long)
    n_win = stream.numel() // args.seq_len
    windows = stream[: n_win * args.seq_len].view(n_win, args.seq_len)
    log(f"train stream: {stream.numel()} tokens ({sum(len(t.encode()) for t in train_docs) / stream.numel():.2f} "
        f"bytes/token), {n_win} windows of {args.seq_len}; tokenised in {time.time() - t0:.1f}s")

    torch.manual_seed(args.seed)
    cfg = make_config(args, tok)
    model = MixtralForCausalLM(cfg)
    model.train()
    log(f"experts implementation: {model.config._experts_implementation}")
    counts = param_counts(model)
    log(f"params: {json.dumps(counts)}")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    if args.amp == "bf16":
        def amp_ctx():
            return torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        amp_ctx = contextlib.nullcontext
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(n_win, generator=gen)
    pos = 0
    epoch = 0
    coef = cfg.router_aux_loss_coef
    E, K = cfg.num_local_experts, cfg.num_experts_per_tok
    hist = []
    t_train = time.time()
    last_t, last_step = t_train, 0
    stopped_early = False
    step = 0
    for step in range(args.steps):
        if args.max_minutes and (time.time() - t_train) > args.max_minutes * 60:
            stopped_early = True
            log(f"--max-minutes {args.max_minutes} reached: stopping after {step} steps")
            break
        if pos + args.batch_size > n_win:
            order = torch.randperm(n_win, generator=gen)
            pos = 0
            epoch += 1
        batch = windows[order[pos: pos + args.batch_size]]
        pos += args.batch_size
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        with amp_ctx():
            outp = model(input_ids=batch, output_router_logits=True, use_cache=False)
            # next-token cross-entropy (logits upcast to fp32, as transformers' own loss does)
            ce_t = torch.nn.functional.cross_entropy(
                outp.logits[:, :-1].float().reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
            # Load-balancing loss applied PER LAYER and averaged. transformers' built-in Mixtral aux loss pools
            # the routing statistics of all layers before balancing, which (measured in a first 1000-step run)
            # lets each layer keep a dominant expert (~50% of its top-2 slots) and dead ones as long as the
            # layers' favourites differ. Each per-layer term is 2.0 (= top_k) when perfectly balanced.
            aux_t = sum(load_balancing_loss_func((rl,), E, K) for rl in outp.router_logits) / len(outp.router_logits)
            loss = ce_t + coef * aux_t
        ce, aux = float(ce_t.detach()), float(aux_t.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip))
        opt.step()
        hist.append(ce)
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == args.steps:
            now = time.time()
            tps = (step + 1 - last_step) * args.batch_size * args.seq_len / max(1e-9, now - last_t)
            last_t, last_step = now, step + 1
            recent = sum(hist[-args.log_every:]) / len(hist[-args.log_every:])
            with torch.no_grad():
                ents = []
                for rl in outp.router_logits:
                    cnt = torch.bincount(torch.topk(rl.float(), K, dim=-1).indices.reshape(-1), minlength=E).double()
                    pr = cnt / cnt.sum()
                    ents.append(float(-(pr[pr > 0] * pr[pr > 0].log()).sum() / math.log(E)))
            log(f"step {step + 1:5d}/{args.steps} ce {ce:.4f} (avg {recent:.4f}) aux {aux:.4f} "
                f"lr {lr:.2e} gnorm {gnorm:.2f} ep {epoch} tok/s {tps:.0f} elapsed {now - t_train:.0f}s "
                f"batch-H/logE min {min(ents):.3f} mean {sum(ents) / len(ents):.3f}")
    else:
        step = args.steps
    steps_done = step if stopped_early else args.steps
    train_secs = time.time() - t_train
    tokens_seen = steps_done * args.batch_size * args.seq_len
    final_n = min(50, len(hist))
    final_loss = sum(hist[-final_n:]) / max(1, final_n)
    log(f"training done: {steps_done} steps, {tokens_seen} tokens, {train_secs:.0f}s, "
        f"final ce (mean of last {final_n} steps) {final_loss:.4f}")

    # ---- save (bf16) into the temporary folder
    model.eval()
    model.config.output_router_logits = False  # inference default; training used True (see card)
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=[eos, tok.convert_tokens_to_ids("<|end|>")],
        pad_token_id=tok.pad_token_id, do_sample=False, max_new_tokens=128,
    )
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    held_text, held_doms = heldout_sample(corpus["held"], args.heldout_bytes, args.heldout_max_bytes)
    (tmp / "heldout.txt").write_text(held_text, encoding="utf-8")
    log(f"heldout.txt: {len(held_text.encode())} bytes, docs per domain {held_doms}")
    del model, opt

    # ---- evaluate the saved folder in float32
    ev = evaluate(tmp, args)
    samples = greedy_samples(tmp, args)
    report = {
        "script": "scripts/train_tiny_moe.py",
        "command": " ".join(["python"] + [a for a in sys.argv]),
        "seed": args.seed,
        "steps": steps_done,
        "steps_requested": args.steps,
        "stopped_early_by_max_minutes": stopped_early,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_seen": tokens_seen,
        "epochs_fraction": round(tokens_seen / stream.numel(), 3),
        "train_stream_tokens": stream.numel(),
        "lr": args.lr, "min_lr": args.min_lr, "warmup": args.warmup, "weight_decay": args.weight_decay,
        "router_aux_loss_coef": coef,
        "router_aux_loss": "load_balancing_loss_func applied per layer, averaged over layers (not transformers' pooled default)",
        "experts_implementation": args.experts_impl,
        "autocast": args.amp,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "train_wall_seconds": round(train_secs, 1),
        "total_wall_seconds": round(time.time() - t_start + corpus["build_seconds"], 1),
        "final_loss": round(final_loss, 4),
        "final_loss_definition": f"mean token cross-entropy (nats) over the last {final_n} training steps, aux loss excluded",
        "loss_first_step": round(hist[0], 4) if hist else None,
        "params": counts,
        "corpus": {"stats": corpus["stats"], "total_bytes": corpus["total_bytes"],
                   "train_docs": len(corpus["train"]), "heldout_docs": len(corpus["held"]),
                   "stdlib_root": corpus["stdlib_root"], "heldout_txt_bytes": len(held_text.encode()),
                   "heldout_txt_per_domain": held_doms},
        "eval": ev,
        "samples": samples,
        "package_versions": {pkg: pkg_version(pkg) for _, pkg in FORTUNE_LANGS.values()},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": __import__("transformers").__version__,
                        "tokenizers": __import__("tokenizers").__version__,
                        "threads": torch.get_num_threads(), "machine": platform.machine()},
    }
    from safetensors import safe_open
    with safe_open(str(tmp / "model.safetensors"), "pt") as f:
        report["tensors"] = [(k, list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in sorted(f.keys())
                             if ".layers." not in k or ".layers.0." in k and ".experts." not in k
                             or ".layers.0." in k and ".experts.0." in k]
        report["num_tensors"] = len(f.keys())
    (tmp / "train_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp / "MODEL_CARD.md").write_text(model_card(report, args, cfg), encoding="utf-8")

    # ---- atomically-ish replace the output folder
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    log(f"saved {out} ({size / 1e6:.2f} MB): {sorted(p.name for p in out.iterdir())}")
    log(json.dumps({k: report[k] for k in ("steps", "tokens_seen", "train_wall_seconds", "final_loss")}))


# --------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(folder: Path, args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    cfg = model.config
    text = (Path(folder) / "heldout.txt").read_text(encoding="utf-8")
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    win = args.eval_window
    nll, ntok = 0.0, 0
    E, K = cfg.num_local_experts, cfg.num_experts_per_tok
    usage = torch.zeros(cfg.num_hidden_layers, E, dtype=torch.float64)
    for start in range(0, ids.numel() - 1, win):
        chunk = ids[start: start + win]
        if chunk.numel() < 2:
            break
        outp = model(input_ids=chunk[None], output_router_logits=True, use_cache=False)
        logits = outp.logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum"))
        ntok += chunk.numel() - 1
        for li, rl in enumerate(outp.router_logits):
            top = torch.topk(rl.float().softmax(-1), K, dim=-1).indices.reshape(-1)
            usage[li] += torch.bincount(top, minlength=E).double()
    ppl = math.exp(nll / ntok)
    frac = usage / usage.sum(-1, keepdim=True)
    ent = [float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(E)) for p in frac]
    res = {
        "heldout_bytes": len(text.encode("utf-8")),
        "heldout_tokens": ids.numel(),
        "window": win, "stride": win,
        "predicted_tokens": ntok,
        "mean_nll": round(nll / ntok, 4),
        "ppl": round(ppl, 3),
        "bits_per_byte": round(nll / math.log(2) / len(text.encode("utf-8")), 4),
        "expert_usage": [[round(float(x), 4) for x in row] for row in frac],
        "usage_entropy_normalised": [round(e, 4) for e in ent],
        "eval_dtype": "float32",
        "eval_seconds": round(time.time() - t0, 1),
    }
    log(f"held-out: {ids.numel()} tokens, ppl {ppl:.3f}, bits/byte {res['bits_per_byte']}")
    for li, (row, e) in enumerate(zip(frac, ent)):
        log(f"  layer {li}: usage " + " ".join(f"{float(x):.3f}" for x in row) + f"  H/log{E} {e:.4f}")
    return res


@torch.no_grad()
def greedy_samples(folder: Path, args) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    out = []
    for p in SAMPLE_PROMPTS:
        ids = [tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]
        g = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=args.sample_tokens, do_sample=False)
        text = tok.decode(g[0, 1:], skip_special_tokens=False)
        out.append({"prompt": p, "completion": text})
        log(f"--- sample [{p!r}]\n{text}")
    return out


# --------------------------------------------------------------------------------------- model card
def model_card(r: dict, args, cfg) -> str:
    pc, ev = r["params"], r["eval"]
    st = r["corpus"]["stats"]
    E = cfg.num_local_experts
    lines = []
    A = lines.append
    A("# tiny-moe: a small Mixtral-style mixture-of-experts model trained on CPU\n")
    A("Default test/demo model for moe-offload. It is a `transformers` `MixtralForCausalLM` trained from scratch "
      "by `scripts/train_tiny_moe.py` on CPU, on text that Debian/Python packages ship. It is a toy: it produces "
      "locally plausible English/German/Spanish/Italian/Russian-ish text and Python-ish code, not useful answers. "
      "It was never trained on chat data; the chat template only exists so chat code paths can be exercised.\n")
    A("## Architecture\n")
    A("| field | value |\n|---|---|")
    for k, v in [
        ("architecture", "MixtralForCausalLM (`model_type: mixtral`)"),
        ("vocab_size", cfg.vocab_size), ("hidden_size", cfg.hidden_size),
        ("num_hidden_layers", cfg.num_hidden_layers), ("num_attention_heads", cfg.num_attention_heads),
        ("num_key_value_heads (GQA)", cfg.num_key_value_heads), ("head_dim", cfg.head_dim),
        ("intermediate_size (per expert)", cfg.intermediate_size),
        ("num_local_experts", cfg.num_local_experts), ("num_experts_per_tok (top-k)", cfg.num_experts_per_tok),
        ("hidden_act", cfg.hidden_act), ("max_position_embeddings", cfg.max_position_embeddings),
        ("rope_theta", cfg.rope_parameters["rope_theta"]), ("sliding_window", cfg.sliding_window),
        ("tie_word_embeddings", cfg.tie_word_embeddings), ("rms_norm_eps", cfg.rms_norm_eps),
        ("router_aux_loss_coef", cfg.router_aux_loss_coef),
        ("stored dtype", "bfloat16 (`model.safetensors`)"),
    ]:
        A(f"| {k} | {v} |")
    A("")
    A("Tensors in `model.safetensors` (as written by `save_pretrained`; layer 0 shown, other layers alike):\n")
    A("| tensor | shape | dtype |\n|---|---|---|")
    for name, shape, dt in r["tensors"]:
        A(f"| `{name}` | {shape} | {dt} |")
    A("")
    A("Mixtral naming: per expert `w1` = gate projection, `w3` = up projection, `w2` = down projection "
      "(`down(silu(w1 x) * w3 x)`); `block_sparse_moe.gate` is the router (softmax over experts, top-k, "
      "renormalised). The saved `config.json` has `output_router_logits: false` (inference default); "
      "training added the Switch/Mixtral load-balancing loss with the coefficient above, computed per layer and "
      "averaged over layers (transformers' built-in Mixtral aux loss pools all layers' routing statistics first, "
      "which in a first run let every layer keep one dominant and some dead experts).\n")
    A("## Parameters\n")
    A("| count | value |\n|---|---|")
    A(f"| total | {pc['total']:,} |")
    A(f"| in experts | {pc['experts']:,} |")
    A(f"| outside experts (attention, norms, router, embedding, lm_head) | {pc['non_expert']:,} |")
    A(f"| embedding / lm_head (untied) | {pc['embedding']:,} / {pc['lm_head']:,} |")
    A(f"| active per token (non-expert + {cfg.num_experts_per_tok}/{E} of expert params) | {pc['active_per_token']:,} |")
    A(f"| active per token, excluding the embedding table | {pc['active_per_token_excl_embedding']:,} |")
    A("")
    A("## Tokenizer\n")
    A(f"Byte-level BPE (`tokenizers`), vocab {cfg.vocab_size}, trained on the training split; any text round-trips. "
      f"Special tokens: {', '.join('`' + t + '`' for t in SPECIAL_TOKENS)} (ids 0-{len(SPECIAL_TOKENS) - 1}). "
      "The tokenizer adds no special tokens by itself. Training documents were fed as `<s>` text `</s>`. "
      "Chat template (`<|role|>\\ncontent<|end|>\\n` per message, preceded by `<s>`; "
      "`add_generation_prompt` appends `<|assistant|>\\n`). `generation_config.json` stops on `</s>` or `<|end|>`.\n")
    A("## Training data\n")
    A(f"{r['corpus']['total_bytes'] / 1e6:.2f} MB of unique documents (SHA-1 de-duplicated), shuffled with seed "
      f"{r['seed']}; {args.heldout_frac:.0%} of documents held out ({r['corpus']['heldout_docs']} docs). "
      "Fortunes: one document per `%`-separated entry (the `.dat`/`.u8` index files, symlinks, the `off/` "
      "offensive folders and the ASCII-art files `ascii-art`, `de/asciiart`, `it/banner` are skipped). "
      f"Python: the `*.py` files of the standard library of the Python that ran the script ({r['environment']['python']}; "
      "`test`/`tests`/`idle_test` folders and `test_*.py` skipped), cut into chunks of at most "
      f"~{args.code_chunk_chars} characters at blank lines, a seeded random subset capped at "
      f"{args.code_frac:.0%} of the mix.\n")
    A("| source | Debian package / origin | licence (per its copyright file) | docs | MB | share |\n|---|---|---|---|---|---|")
    lic = {
        "fortunes-en": (f"`fortunes` {r['package_versions'].get('fortunes', '?')}", "BSD-style (fortune-mod); the cookie files are collected quotations from many authors, see /usr/share/doc/fortunes/copyright"),
        "fortunes-de": (f"`fortunes-de` {r['package_versions'].get('fortunes-de', '?')}", "GPL-2+"),
        "fortunes-es": (f"`fortunes-es` {r['package_versions'].get('fortunes-es', '?')}", "texts presumed public domain; packaging code GPL-2+"),
        "fortunes-it": (f"`fortunes-it` {r['package_versions'].get('fortunes-it', '?')}", "not copyrighted, \"consider this package freeware (public domain)\""),
        "fortunes-ru": (f"`fortunes-ru` {r['package_versions'].get('fortunes-ru', '?')}", "GPL-2"),
        "python-stdlib": (f"CPython {r['environment']['python']} standard library", "PSF License Agreement (Python Software Foundation License)"),
    }
    for k, s in st.items():
        pkg, l = lic.get(k, ("?", "?"))
        A(f"| {k} | {pkg} | {l} | {s['docs']:,} | {s['bytes'] / 1e6:.2f} | {s['share']:.1%} |")
    A("")
    A("`heldout.txt` is a mixed-domain sample of the held-out split "
      f"({r['corpus']['heldout_txt_bytes']:,} bytes; documents per source: "
      + ", ".join(f"{k} {v['docs']} docs / {v['bytes']:,} B" for k, v in sorted(r["corpus"]["heldout_txt_per_domain"].items()))
      + "), shipped so perplexity can be measured offline. It carries the licences of its sources above.\n")
    A("## Training\n")
    A(f"CPU only, fp32 weights and AdamW state with `torch.autocast` {r['autocast']} for the forward pass, "
      f"{r['environment']['threads']} threads (OMP_WAIT_POLICY={r['omp_wait_policy']}), `torch.manual_seed({r['seed']})`, torch "
      f"{r['environment']['torch']}, transformers {r['environment']['transformers']}, tokenizers "
      f"{r['environment']['tokenizers']}, experts implementation `{r['experts_implementation']}`. AdamW "
      f"(betas 0.9/0.95, weight decay {r['weight_decay']} on matrices), peak LR {r['lr']}, linear warm-up "
      f"{r['warmup']} steps then cosine to {r['min_lr']}, grad-clip {args.clip}; batch {r['batch_size']} x "
      f"{r['seq_len']} tokens (packed, non-overlapping windows).\n")
    A("| figure | value |\n|---|---|")
    A(f"| steps | {r['steps']:,}" + (" (stopped early by --max-minutes)" if r["stopped_early_by_max_minutes"] else "") + " |")
    A(f"| training tokens seen | {r['tokens_seen']:,} ({r['epochs_fraction']} epochs of the {r['train_stream_tokens']:,}-token training stream) |")
    A(f"| training wall time | {r['train_wall_seconds']:.0f} s ({r['train_wall_seconds'] / 60:.1f} min) |")
    A(f"| whole script wall time | {r['total_wall_seconds']:.0f} s |")
    A(f"| first-step loss | {r['loss_first_step']} |")
    A(f"| final training loss | {r['final_loss']} ({r['final_loss_definition']}) |")
    A(f"| held-out perplexity | **{ev['ppl']}** (float32, `heldout.txt`, {ev['heldout_tokens']:,} tokens, windows of {ev['window']} with stride {ev['stride']}, no `<s>`; mean NLL {ev['mean_nll']} nats, {ev['bits_per_byte']} bits/byte) |")
    A("")
    A("## Expert usage on heldout.txt\n")
    A(f"Fraction of the top-{cfg.num_experts_per_tok} routing slots each expert receives, per layer, and the "
      f"normalised entropy of that distribution (entropy / ln {E}; 1.0 = perfectly uniform).\n")
    A("| layer | " + " | ".join(f"e{i}" for i in range(E)) + " | norm. entropy |")
    A("|---|" + "---|" * E + "---|")
    for li, (row, e) in enumerate(zip(ev["expert_usage"], ev["usage_entropy_normalised"])):
        A(f"| {li} | " + " | ".join(f"{x:.3f}" for x in row) + f" | {e:.4f} |")
    A("")
    A("## Greedy samples\n")
    A(f"`<s>` + prompt, greedy decoding, {args.sample_tokens} new tokens, float32 (prompts have no trailing space "
      "because the byte-level BPE attaches the space to the following word):\n")
    for s in r["samples"]:
        A(f"Prompt `{s['prompt']}`:\n")
        A("```text\n" + s["completion"].replace("```", "`\u200b``") + "\n```\n")
    A("## Reproduce\n")
    A("Needs the Debian packages (`" + APT_CMD + "`) and the Python environment above; from the repository root:\n")
    A("```bash\n# train (writes models/tiny-moe/ via a temporary folder)\n"
      f"python scripts/train_tiny_moe.py --out models/tiny-moe --steps {r['steps_requested']} --max-minutes {args.max_minutes}\n"
      "# recompute held-out perplexity and expert usage from the saved folder\n"
      "python scripts/train_tiny_moe.py --eval-only --out models/tiny-moe\n```\n")
    A("Figures depend on the installed package versions (fortune files, the Python standard library) and on "
      "CPU floating-point behaviour; `--max-minutes` only stops early on a slow machine (this run: "
      + ("stopped early" if r["stopped_early_by_max_minutes"] else "not triggered") + ").\n")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models/tiny-moe")
    ap.add_argument("--eval-only", action="store_true", help="recompute held-out ppl and expert usage from --out")
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--max-minutes", type=float, default=70.0, help="safety stop for the training loop (0 = off)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--experts-impl", default="grouped_mm", choices=["grouped_mm", "eager", "batched_mm"])
    ap.add_argument("--amp", default="bf16", choices=["bf16", "none"],
                    help="CPU autocast for the forward pass (fp32 master weights and optimizer state)")
    ap.add_argument("--code-frac", type=float, default=0.4, help="share of Python code in the corpus (bytes)")
    ap.add_argument("--max-code-mb", type=float, default=12.0)
    ap.add_argument("--code-chunk-chars", type=int, default=4000)
    ap.add_argument("--heldout-frac", type=float, default=0.02)
    ap.add_argument("--heldout-bytes", type=int, default=48000, help="target size of heldout.txt")
    ap.add_argument("--heldout-max-bytes", type=int, default=60000)
    ap.add_argument("--eval-window", type=int, default=256)
    ap.add_argument("--sample-tokens", type=int, default=60)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if args.eval_only:
        folder = Path(args.out)
        ev = evaluate(folder, args)
        rep = folder / "train_report.json"
        if rep.exists():
            old = json.loads(rep.read_text(encoding="utf-8")).get("eval", {})
            log(f"train_report.json: ppl {old.get('ppl')} entropy {old.get('usage_entropy_normalised')}")
        print(json.dumps({k: ev[k] for k in ("ppl", "mean_nll", "heldout_tokens", "usage_entropy_normalised",
                                             "expert_usage")}, indent=1))
        return

    if not args.max_minutes:
        args.max_minutes = 0
    t0 = time.time()
    corpus = build_corpus(args)
    corpus["build_seconds"] = time.time() - t0
    log(f"corpus built in {corpus['build_seconds']:.1f}s")
    train(args, corpus)


if __name__ == "__main__":
    main()
