"""The native 4-bit kernel (q4.c), compiled on first use with the system C compiler and loaded with ctypes.

    lib() -> the loaded library, or None: MOE_OFFLOAD_NATIVE=0, no AVX2/FMA/F16C, no compiler, or it failed
             (then kernels.py keeps torch's int4pack path; the reason is logged at debug level only)
    isa_flags() -> what this CPU adds to the AVX2 build: VNNI's int8 dot in one instruction (same bits);
             MOE_OFFLOAD_NATIVE_VNNI=0 builds without it

The shared object is cached per user in $MOE_OFFLOAD_NATIVE_CACHE, else $XDG_CACHE_HOME/moe-offload/native or
~/.cache/moe-offload/native, named by a hash of the source, the flags and the compiler's version, and written
under a temporary name then renamed, so concurrent processes never load a half-written file. $CC picks the
compiler (default cc). ctypes releases the GIL during the call; threads come from the kernel's OpenMP (with
torch imported first, its libgomp, so one pool).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path

import torch

from ...cpuinfo import capabilities, parse_cpuinfo

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("q4.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
VERSION = 14  # q4_version() of the source this module's signatures match


# q4.c's activation dtypes (Q4_F32, Q4_BF16, Q4_F16) and h16_mm's weight kinds
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
HALF_WEIGHTS = {torch.float16: 0, torch.bfloat16: 1}


def activations(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x as the kernels take it: contiguous, in a dtype they read (other dtypes as fp32), and its code."""
    code = DTYPES.get(x.dtype)
    return (x.contiguous(), code) if code is not None else (x.float().contiguous(), 0)


class Matrix(ctypes.Structure):
    """q4.c's q4_matrix: a unit's fixed arguments (pointers into tensors the unit keeps alive)."""

    _fields_ = [("w", ctypes.c_void_p), ("sz", ctypes.c_void_p), ("sg", ctypes.c_long), ("sn", ctypes.c_long),
                ("st", ctypes.c_long), ("N", ctypes.c_int), ("K", ctypes.c_int), ("gs", ctypes.c_int),
                ("il", ctypes.c_int)]


def enabled() -> bool:
    return os.environ.get("MOE_OFFLOAD_NATIVE", "1") != "0"


def lib(extra: tuple[str, ...] | None = None) -> ctypes.CDLL | None:
    """The kernel library, or None (see the module doc). Cheap after the first call per compiler. extra: the
    flags added to the AVX2 build (default isa_flags(); () is the AVX2 build, which the benches compare with)."""
    if not enabled():
        return None
    return _load(os.environ.get("CC", "cc"), isa_flags() if extra is None else extra)


def cache_dir() -> Path:
    if os.environ.get("MOE_OFFLOAD_NATIVE_CACHE"):
        return Path(os.environ["MOE_OFFLOAD_NATIVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moe-offload" / "native"


@functools.cache
def _caps() -> dict[str, bool]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    try:
        return capabilities(parse_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))["flags"])
    except OSError:
        return {}


def cpu_ok() -> bool:
    caps = _caps()
    return bool(caps.get("avx2") and caps.get("fma") and caps.get("f16c"))


def isa_flags() -> tuple[str, ...]:
    """Compiler flags for what this CPU adds that q4.c uses: VNNI (AVX-VNNI, else AVX-512 VNNI with VL), whose
    one-instruction int8 dot gives the same integers as AVX2's two (so the same bits, in fewer instructions)."""
    if os.environ.get("MOE_OFFLOAD_NATIVE_VNNI", "1") == "0":
        return ()
    caps = _caps()
    if caps.get("avx_vnni"):
        return ("-mavxvnni",)
    if caps.get("avx512_vnni") and caps.get("avx512vl"):
        return ("-mavx512vnni", "-mavx512vl")
    return ()


@functools.cache
def _load(cc: str, extra: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    if not cpu_ok():
        log.debug("native q4: this CPU lacks AVX2/FMA/F16C; torch's int4 kernel is used")
        return None
    try:
        path = _build(cc, extra)
        so = ctypes.CDLL(str(path))
        if so.q4_version() != VERSION:
            raise OSError(f"{path} is version {so.q4_version()}, expected {VERSION}")
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        if extra:  # a compiler without the flag: the AVX2 build
            log.debug("native q4: %s build unavailable (%s); the AVX2 one is used", " ".join(extra), e)
            return _load(cc)
        log.debug("native q4: unavailable (%s); torch's int4 kernel is used", e)
        return None
    vp, i, l = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    so.q4_mm.argtypes = [vp, vp, i, i, i, i, i, vp, vp, l, l, l, i, i]
    so.q4_mm.restype = i
    so.q4_call.argtypes = [vp, vp, i, i, vp, i]
    so.q4_call.restype = i
    so.q4_expert.argtypes = [vp, vp, i, i, vp, vp, i]
    so.q4_expert.restype = i
    so.q4_moe.argtypes = [vp, vp, i, i, vp, vp, vp, i, i]
    so.q4_moe.restype = i
    so.h16_mm.argtypes = [vp, vp, i, i, i, i, vp, i, i]
    so.h16_mm.restype = i
    so.q4_to_r64.argtypes = [vp, vp, i, i, i, i, i]
    so.q4_to_r64.restype = i
    so.rms_norm.argtypes = [vp, vp, i, i, i, vp, ctypes.c_float, i]
    so.rms_norm.restype = i
    so.rope.argtypes = [vp, vp, i, i, i, i, vp, vp]
    so.rope.restype = i
    so.attend1.argtypes = [vp, vp, vp, vp, i, i, i, i, i, l, ctypes.c_float, i]
    so.attend1.restype = i
    so.silu_rows.argtypes = [vp, vp, i, i, i]
    so.silu_rows.restype = i
    so.h16_moe.argtypes = [vp, vp, i, i, vp, vp, i, i, i, vp, i, i, i]
    so.h16_moe.restype = i
    so.q4_vnni.restype = i
    so.q4_dequant.argtypes = [vp, i, i, vp, i, i]
    so.q4_dequant.restype = i
    return so


def _build(cc: str, extra: tuple[str, ...] = ()) -> Path:
    """Compile q4.c (once per source, flags and compiler) into the cache; returns the .so's path."""
    flags = FLAGS + extra
    cmd = shlex.split(cc)
    ver = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=30)
    if ver.returncode:
        raise OSError(f"{cc} --version failed")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + repr(flags).encode() + ver.stdout.encode()).hexdigest()[:16]
    out = cache_dir() / f"q4-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([*cmd, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                           timeout=120)
        if r.returncode:
            raise OSError(f"{cc} failed: {r.stderr.strip()[-500:]}")
        os.replace(tmp, out)  # atomic: a concurrent build of the same key writes identical bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
