"""The expert codecs by manifest name: `make_codec(spec)` for every codec a store can name.

It sits above the codecs it lists (experts.DenseCodec, quant's HQQCodec and GGUFCodec), so neither of them
imports the other to register itself.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import MoeError
from .experts import Codec, DenseCodec
from .quant.codec import HQQCodec
from .quant.ggml import GGUFCodec

CODECS: dict[str, Callable[[dict], Codec]] = {
    "dense": lambda spec: DenseCodec(spec["dtype"]),
    "hqq": HQQCodec,  # quant/codec.py: HQQ / RTN groups, optional low-rank residual
    "gguf": GGUFCodec,  # quant/ggml.py: GGUF files' quantized experts, as stored there
}


def make_codec(spec: dict) -> Codec:
    if spec.get("name") not in CODECS:
        raise MoeError(f"unknown expert codec {spec.get('name')!r}; known: {', '.join(CODECS)}")
    return CODECS[spec["name"]](spec)
