"""Quantization: HQQ / RTN quantizer, bit packing, CPU kernels, low-rank residuals, mixed-precision plans.

The "hqq" and "gguf" expert codecs are listed by name in `moe_offload.codecs`.
"""

from .codec import HQQCodec, QuantExpert, expert_error  # noqa: F401
from .ggml import GGUFCodec  # noqa: F401  (GGUF files' quantized experts)
