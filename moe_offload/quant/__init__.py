"""Quantization: HQQ / RTN quantizer, bit packing, CPU kernels, low-rank residuals, mixed-precision plans.

Importing this package registers the "hqq" and "gguf" expert codecs in `moe_offload.experts.CODECS`.
"""

from .codec import HQQCodec, QuantExpert, expert_error  # noqa: F401  (registers the codec)
from .ggml import GGUFCodec  # noqa: F401,E402  (registers the "gguf" codec: GGUF files' quantized experts)
