"""moe-offload: run Mixture-of-Experts models that do not fit in fast memory."""

import os

# Idle OpenMP threads sleep instead of spinning: our loader threads share the cores with torch's, and on a
# busy 2-core machine spinning made decode 5-15x slower (212 vs 38 tok/s on the bundled model). Must be set
# before torch loads libgomp; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


def load(path=None, device=None, dtype=None, memory=None, **offload):
    """Load an HF model folder or expert store; see `moe_offload.runtime.load.load`."""
    from .runtime.load import load as _load

    return _load(path, device=device, dtype=dtype, memory=memory, **offload)
