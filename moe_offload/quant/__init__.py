"""Quantization: HQQ / RTN quantizer, bit packing, CPU kernels, low-rank residuals, mixed-precision plans.

Importing this package registers the "hqq" expert codec in `moe_offload.experts.CODECS`.
"""

from .codec import HQQCodec, QuantExpert, expert_error  # noqa: F401  (registers the codec)
