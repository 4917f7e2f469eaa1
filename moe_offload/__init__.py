"""moe-offload: run Mixture-of-Experts models that do not fit in fast memory."""

__version__ = "0.1.0"


def load(path=None, device=None, dtype=None, memory=None, **offload):
    """Load an HF model folder or expert store; see `moe_offload.runtime.engine.load`."""
    from .runtime.engine import load as _load

    return _load(path, device=device, dtype=dtype, memory=memory, **offload)
