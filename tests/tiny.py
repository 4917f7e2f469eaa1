"""Tiny random Hugging Face MoE checkpoints, written by transformers' own classes and `save_pretrained`.

    from tests.tiny import make_checkpoint, SPECS
    folder = make_checkpoint(tmp_path / "m", "mixtral_gqa", tokenizer=True)

or, inside pytest, the session-cached `tiny_checkpoint` fixture from conftest.py. Every spec uses a large
`initializer_range` and random norm weights / biases so routing and logits are far from uniform.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

CONFIG_CLASSES = {
    "mixtral": "MixtralConfig",
    "qwen2_moe": "Qwen2MoeConfig",
    "qwen3_moe": "Qwen3MoeConfig",
    "olmoe": "OlmoeConfig",
}

COMMON = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, max_position_embeddings=128,
              initializer_range=0.15, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name: (model_type, config kwargs over COMMON). Two or more shapes per family: GQA and MHA, tied and untied.
SPECS: dict[str, tuple[str, dict]] = {
    "mixtral_gqa": ("mixtral", dict(num_hidden_layers=2, num_key_value_heads=2, intermediate_size=48,
                                    num_local_experts=4, num_experts_per_tok=2)),
    "mixtral_mha_swa_tied": ("mixtral", dict(num_hidden_layers=2, num_key_value_heads=4, intermediate_size=32,
                                             num_local_experts=6, num_experts_per_tok=3, sliding_window=6,
                                             tie_word_embeddings=True,
                                             rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "qwen2_moe_shared_dense": ("qwen2_moe", dict(num_hidden_layers=3, num_key_value_heads=2, intermediate_size=56,
                                                 moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                                 num_experts=6, num_experts_per_tok=2, norm_topk_prob=False,
                                                 mlp_only_layers=[1])),
    "qwen2_moe_mha_step2_tied": ("qwen2_moe", dict(num_hidden_layers=4, num_key_value_heads=4, intermediate_size=40,
                                                   moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                                   num_experts=5, num_experts_per_tok=3, norm_topk_prob=True,
                                                   decoder_sparse_step=2, tie_word_embeddings=True,
                                                   use_sliding_window=True, sliding_window=5, max_window_layers=2)),
    "qwen3_moe_gqa_dense": ("qwen3_moe", dict(num_hidden_layers=3, num_key_value_heads=2, head_dim=24,
                                              intermediate_size=48, moe_intermediate_size=20, num_experts=8,
                                              num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[0])),
    "qwen3_moe_mha_step2_tied": ("qwen3_moe", dict(num_hidden_layers=4, num_key_value_heads=4, intermediate_size=40,
                                                   moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                                   norm_topk_prob=False, decoder_sparse_step=2,
                                                   tie_word_embeddings=True, attention_bias=True)),
    "olmoe_gqa_clip": ("olmoe", dict(num_hidden_layers=2, num_key_value_heads=2, intermediate_size=32, num_experts=6,
                                     num_experts_per_tok=2, clip_qkv=0.6, norm_topk_prob=True)),
    "olmoe_mha_tied": ("olmoe", dict(num_hidden_layers=3, num_key_value_heads=4, intermediate_size=24, num_experts=4,
                                     num_experts_per_tok=2, norm_topk_prob=False, tie_word_embeddings=True,
                                     attention_bias=True)),
}

# Chat template in ChatML form with a BOS, written to chat_template.jinja by transformers 5.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0..4: pad, bos, eos


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """A few hundred deterministic sentences: prose, code, digits and non-ASCII (byte-level merges)."""
    rng = random.Random(seed)
    subjects = ["the model", "an expert", "the router", "a token", "the cache", "our engine", "this layer",
                "the prefetcher", "a user", "the disk", "café owner", "日本の猫"]
    verbs = ["reads", "loads", "routes", "computes", "streams", "evicts", "predicts", "writes", "ignores",
             "counts", "prefers", "copies"]
    objects = ["the weights", "four experts", "a long prompt", "every byte", "the next layer", "hidden states",
               "the KV cache", "some numbers", "a fresh blob", "the answer", "naïve guesses", "😀 emoji"]
    code = ["def fibonacci(n):", "    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
            "for i in range(10):", "    print(i * i)", "x = [a + b for a, b in zip(xs, ys)]",
            "import torch", "y = torch.zeros(4, 8)"]
    lines = []
    for _ in range(n):
        r = rng.random()
        if r < 0.2:
            lines.append(rng.choice(code))
        elif r < 0.3:
            lines.append(" ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(2, 6))))
        else:
            lines.append(f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)}"
                         f"{rng.choice(['.', '!', '?', ', and then it stops.'])}")
    return lines


def make_tokenizer(folder: str | os.PathLike, vocab_size: int = 400):
    """Train a byte-level BPE (adds BOS like Llama/Mixtral) and save it with `save_pretrained`.
    Returns the transformers tokenizer; its `len()` is the vocabulary the model must cover."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 chat_template=CHAT_TEMPLATE)
    hf.save_pretrained(str(folder))
    return hf


def hf_config(spec: str | tuple[str, dict], **overrides):
    """transformers config object for a spec name or (model_type, kwargs)."""
    import transformers

    model_type, kw = SPECS[spec] if isinstance(spec, str) else spec
    kw = {**COMMON, **kw, **overrides}
    return getattr(transformers, CONFIG_CLASSES[model_type])(**kw)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """transformers' init leaves norms at 1 and biases at 0: make them random so a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                mean = 1.0 if "norm" in name else 0.0
                p.copy_(mean + 0.2 * torch.randn(p.shape, generator=g, dtype=torch.float32))


def make_model(spec: str | tuple[str, dict], seed: int = 0, **overrides):
    """A random transformers CausalLM for the spec (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    config = hf_config(spec, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed)
    return model.eval()


def make_checkpoint(folder: str | os.PathLike, spec: str | tuple[str, dict] = "mixtral_gqa", *,
                    tokenizer: bool = False, dtype: str = "float32", seed: int = 0,
                    max_shard_size: str | int | None = None, **overrides) -> Path:
    """Write a tiny random checkpoint folder (config.json, safetensors, generation_config.json and,
    with `tokenizer=True`, a byte-level BPE tokenizer with a chat template). Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        hf_tok = make_tokenizer(folder)
        overrides.setdefault("vocab_size", len(hf_tok))
        overrides.setdefault("bos_token_id", hf_tok.bos_token_id)
        overrides.setdefault("eos_token_id", hf_tok.eos_token_id)
        overrides.setdefault("pad_token_id", hf_tok.pad_token_id)
    model = make_model(spec, seed, **overrides)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    kw = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(str(folder), **kw)
    return folder


def load_hf(folder: str | os.PathLike, experts_implementation: str | None = "eager"):
    """The checkpoint as transformers loads it (float32, eval), the reference for our engine."""
    from transformers import AutoModelForCausalLM

    kw = {"experts_implementation": experts_implementation} if experts_implementation else {}
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw).eval()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy tokens with EOS disabled."""
    inp = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, eos_token_id=None,
                             pad_token_id=0, temperature=None, top_p=None, top_k=None)
    return out[0, len(prompt_ids):].tolist()


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def assert_cached_equals_uncached(engine, ids: list[int], split: int = 7) -> None:
    """Token-by-token decode with the static KV cache, and a prefill chunk then single steps, both equal one
    uncached forward of `ids`."""
    model = engine.model
    full = engine.logits(ids)
    with torch.inference_mode():
        cache = model.make_cache(1, len(ids), engine.dtype, engine.device)
        steps = [model(torch.tensor([[t]]), i, cache)[0, -1] for i, t in enumerate(ids)]
        torch.testing.assert_close(torch.stack(steps), full, atol=1e-5, rtol=1e-5)
        cache = model.make_cache(1, len(ids), engine.dtype, engine.device)
        head = model(torch.tensor([ids[:split]]), 0, cache)[0]
        tail = [model(torch.tensor([[t]]), split + i, cache)[0, -1] for i, t in enumerate(ids[split:])]
        torch.testing.assert_close(torch.cat([head, torch.stack(tail)]), full, atol=1e-5, rtol=1e-5)
