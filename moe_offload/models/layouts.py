"""The words family files describe their checkpoint layout with (each family's table sits in its own file;
models/__init__.py collects them for checkpoint.py).

Per-expert checkpoints name one routed expert's tensor by a template and our part -> their part:
    EXPERT_NAMES = ("model.layers.{layer}.mlp.experts.{expert}.{part}.weight", SWIGLU)
Stacked checkpoints hold all experts of a layer in one tensor [E, ...]; one expert is still the unit, cut out of
the slab of expert e by a rule (alternative layouts: the first whose tensors the checkpoint has is used):
    STACKED_EXPERT_NAMES = [{our part: ((stacked names with {layer}), rule(one expert's slab of each name))}]
Our parts: gate / up [I, D] and down [D, I] as nn.Linear weights; gate_bias / up_bias [I], down_bias [D].
config.json's keys each family needs, and its router (whose rows must equal the expert count):
    CONFIG_KEYS = ((keys besides checkpoint.BASE_KEYS, "a|b" for either spelling, the expert count second),
                   "model.layers.{layer}.<router>.weight")
"""

from __future__ import annotations

import torch

PARTS = ("gate", "up", "down")
SWIGLU = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}  # transformers' names of our parts
W132 = {"gate": "w1", "up": "w3", "down": "w2"}  # Mixtral's (and PhiMoE's) names of our parts


def first_half(t):  # [2I, ...] -> rows 0..I-1
    return t[: t.shape[0] // 2]


def second_half(t):  # [2I, ...] -> rows I..2I-1
    return t[t.shape[0] // 2:]


def whole(t):
    return t


def transposed(t):  # [in, out] (x @ W layout) -> [out, in]
    return t.T


def even_cols_t(t):  # [D, 2I] with gate/up interleaved columns -> gate [I, D]
    return t[:, 0::2].T


def odd_cols_t(t):  # [D, 2I] with gate/up interleaved columns -> up [I, D]
    return t[:, 1::2].T


def even(t):  # [2I] interleaved gate/up bias -> gate's
    return t[0::2]


def odd(t):
    return t[1::2]


# MXFP4 (OCP microscaling): 32 e2m1 values per block, two per byte (low nibble first), one e8m0 scale per block
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 (exponent + 127) -> [..., G·32] fp32 (exact)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    vals = torch.stack([lut[(blocks & 0x0F).int()], lut[(blocks >> 4).int()]], dim=-1)  # [..., G, 16, 2]
    vals = torch.ldexp(vals.reshape(*blocks.shape[:-1], 32), scales.int().unsqueeze(-1) - 127)
    return vals.reshape(*blocks.shape[:-2], -1)


def mxfp4_even_rows(blocks, scales):  # [2I, D/32, 16] with gate/up interleaved rows -> gate [I, D]
    return dequantize_mxfp4(blocks, scales)[0::2]


def mxfp4_odd_rows(blocks, scales):
    return dequantize_mxfp4(blocks, scales)[1::2]
