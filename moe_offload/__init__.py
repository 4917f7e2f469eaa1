"""moe-offload: run Mixture-of-Experts models that do not fit in fast memory."""

import os


def omp_wait(environ, others_running: int, cpus: int) -> dict[str, str]:
    """The OpenMP wait setting to add to `environ` (none where the user set one): sleep at once
    (OMP_WAIT_POLICY=PASSIVE) when other tasks want the CPU as this process starts (our threads default to
    every core, so any would share one with them), else spin 10000 pauses first (GOMP_SPINCOUNT). libgomp's
    default spin (300000 pauses: milliseconds) made decode 5-15x slower on a 2-core machine shared with other
    jobs (212 vs 38 tok/s on the bundled model, 2026-11-23); sleeping at once costs a wake-up in each of a
    decode token's ~50 parallel regions, 10-15 % of a Qwen3 token on a quiet machine (docs/perf.md, "OpenMP's
    wait", where both were measured)."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    return {"OMP_WAIT_POLICY": "PASSIVE"} if others_running >= 1 or cpus < 2 else {"GOMP_SPINCOUNT": "10000"}


def _others_running() -> int:
    """Runnable tasks on the machine besides this one that stay runnable: the least of three looks at /proc/stat's
    procs_running, 2 ms apart (a task that blinks by is not a load)."""
    import time

    least = None
    for i in range(3):
        try:
            with open("/proc/stat") as f:
                line = next((l for l in f if l.startswith("procs_running")), "procs_running 1")
            n = int(line.split()[1]) - 1
            least = n if least is None else min(least, n)
        except (OSError, ValueError, IndexError):
            return 0
        if i < 2:
            time.sleep(0.002)
    return max(least or 0, 0)


# Set before torch loads libgomp (nothing here imports torch). MOE_OFFLOAD_OMP_WAIT names the variable we set, so
# a child process (bench runs, servers' workers) chooses again for itself instead of taking ours as the user's.
_ours = os.environ.pop("MOE_OFFLOAD_OMP_WAIT", None)
if _ours in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
    os.environ.pop(_ours, None)
_chosen = omp_wait(os.environ, _others_running(), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1)
os.environ.update(_chosen, **({"MOE_OFFLOAD_OMP_WAIT": next(iter(_chosen))} if _chosen else {}))

__version__ = "0.1.0"


def load(path=None, device=None, dtype=None, memory=None, **offload):
    """Load an HF model folder or expert store; see `moe_offload.runtime.load.load`."""
    from .runtime.load import load as _load

    return _load(path, device=device, dtype=dtype, memory=memory, **offload)
