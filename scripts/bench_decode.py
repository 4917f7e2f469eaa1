"""Decode speed of our engine vs transformers on a Mixtral-shaped random model, same run, same prompt.

    .venv/bin/python scripts/bench_decode.py [--threads 2] [--new-tokens 64] [--repeats 3]

Builds the model with transformers (hidden 1024, 8 experts, intermediate 3584, 8 layers, 32 heads / 8 kv heads,
vocab 32000, bf16) into a temporary folder, then times greedy decoding with EOS disabled. Decode tok/s is
measured the same way for both: (time to generate 1 + N tokens - time to generate 1 token) / N, warm-up
excluded, best of `--repeats` taken round-robin. bf16 rounding makes a random 8-layer model's greedy
tokens drift apart from the first few steps on (both sides are equally far from fp32), so the token column
is information, not a check; tests/test_models.py checks tokens in fp32. transformers runs with every CPU
experts implementation given (eager and grouped_mm by default; batched_mm is ~10x slower on CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SHAPE = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2,
             max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)


def build(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    config = MixtralConfig(**SHAPE, initializer_range=0.05)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(folder))


def decode_rates(runners: dict, prompt: list[int], n: int, repeats: int) -> tuple[dict, dict]:
    """runners: name -> generate(prompt, k) -> token ids. Round-robin over the runners in every repeat so a
    neighbour's load hits all of them alike. Returns (name -> best decode tok/s, name -> tokens of 1 + n)."""
    best, tokens = {name: float("inf") for name in runners}, {}
    for run in runners.values():
        run(prompt, 4)  # warm-up
    for _ in range(repeats):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run(prompt, 1)
            t1 = time.perf_counter()
            tokens[name] = run(prompt, n + 1)
            t2 = time.perf_counter()
            best[name] = min(best[name], (t2 - t1) - (t1 - t0))
    return {name: n / t for name, t in best.items()}, tokens


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--experts-implementations", default="eager,grouped_mm")
    p.add_argument("--folder", default=None, help="reuse / keep the model here instead of a temp folder")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from transformers import AutoModelForCausalLM

    from moe_offload import load

    tmp = None
    folder = Path(a.folder) if a.folder else Path(tmp := tempfile.mkdtemp(prefix="bench-decode-"))
    if not (folder / "config.json").is_file():
        t = time.perf_counter()
        build(folder)
        print(f"built {folder} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    prompt = torch.randint(3, SHAPE["vocab_size"], (a.prompt_tokens,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    engine = load(folder, device="cpu", dtype="bfloat16")
    runners = {"moe-offload": lambda ids, k: engine.generate(prompt_ids=ids, max_new_tokens=k,
                                                              ignore_eos=True).token_ids}
    for impl in a.experts_implementations.split(","):
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16,
                                                  experts_implementation=impl).eval()

        def theirs(ids, k, hf=hf):
            inp = torch.tensor([ids])
            with torch.inference_mode():
                out = hf.generate(inp, attention_mask=torch.ones_like(inp), do_sample=False, max_new_tokens=k,
                                  min_new_tokens=k, eos_token_id=None, pad_token_id=0, temperature=None,
                                  top_p=None, top_k=None)
            return out[0, len(ids):].tolist()

        runners[f"transformers {impl}"] = theirs

    rates, tokens = decode_rates(runners, prompt, a.new_tokens, a.repeats)
    own = engine.generate(prompt_ids=prompt, max_new_tokens=a.new_tokens + 1, ignore_eos=True).stats
    ref = tokens["moe-offload"]
    rows = []
    for name, rate in rates.items():
        same = next((i for i, (x, y) in enumerate(zip(tokens[name], ref)) if x != y), len(ref))
        rows.append((name, rate, own["decode_tokens_per_s"] if name == "moe-offload" else None,
                     None if name == "moe-offload" else same))

    load_avg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nMixtral-shaped random model, bf16, CPU, {a.threads} threads, prompt {a.prompt_tokens} tokens, "
          f"{a.new_tokens} decode tokens, best of {a.repeats}; load average {load_avg}")
    print(f"{'engine':<26}{'decode tok/s':>14}{'(own stats)':>13}{'leading tokens = ours':>23}")
    for name, rate, own, same in rows:
        own_s, same_s = (f"{own:.2f}" if own is not None else "-"), (f"{same}/{a.new_tokens + 1}" if same is not None else "-")
        print(f"{name:<26}{rate:>14.2f}{own_s:>13}{same_s:>23}")
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
