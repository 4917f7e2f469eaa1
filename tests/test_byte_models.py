"""The planner's byte model of a quantized expert (costmodel.quant_bytes: b/8 bytes per weight + one fp16 scale
and zero per group, over the expert's weight count) against the codec's real blob layout (quant/codec.py:
per-matrix sections, 64-byte aligned). They are the same bytes for the HQQ spec with fp16 meta whenever the group
divides both input dims and every section fills whole 64-byte lines, which holds for released models; the
default spec for 2/3 bits (8-bit meta) stores less than the planner counts; 4-bit's default stores bf16 meta."""

import pytest
import torch

from moe_offload.costmodel import quant_bytes
from moe_offload.experts import DenseCodec, ExpertShape
from moe_offload.quant.codec import HQQCodec

SHAPES = {"mixtral-8x7b": (4096, 14336), "qwen3-30b-a3b": (2048, 768), "deepseek-v3": (7168, 2048),
          "olmoe-1b-7b": (2048, 1024), "small": (256, 512)}


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_planner_bytes_equal_the_codec_layout_with_fp16_meta(name, bits, group_size):
    D, I = SHAPES[name]
    codec = HQQCodec({"bits": bits, "group_size": group_size, "meta_bits": 16})
    assert codec.nbytes(ExpertShape(D, I, "silu")) == quant_bytes(3 * D * I, bits, group_size)


@pytest.mark.parametrize("name", SHAPES)
def test_planner_16_bit_bytes_equal_the_dense_codec(name):
    D, I = SHAPES[name]
    assert DenseCodec(torch.bfloat16).nbytes(ExpertShape(D, I, "silu")) == quant_bytes(3 * D * I, 16)


def test_where_the_two_byte_models_part():
    shape = ExpertShape(96, 40, "silu")  # g64 does not divide 40 or 96: the codec takes groups of 40 and 48
    assert HQQCodec({"bits": 4, "group_size": 64, "meta_bits": 16}).nbytes(shape) != quant_bytes(3 * 96 * 40, 4)
    D, I = SHAPES["mixtral-8x7b"]  # the default 2/3-bit specs keep 8-bit meta: fewer bytes than the plan counts
    for bits, g in ((2, 32), (3, 64)):
        assert HQQCodec({"bits": bits}).nbytes(ExpertShape(D, I, "silu")) < quant_bytes(3 * D * I, bits, g)
    # the default 4-bit spec stores the int4 kernel's bf16 meta (a loaded unit is a view of its blob): the
    # plan's bytes exactly
    assert HQQCodec({"bits": 4}).nbytes(ExpertShape(D, I, "silu")) == quant_bytes(3 * D * I, 4, 64)
