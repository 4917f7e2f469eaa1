"""What this CPU's vector units can do: AVX2, AVX-512 (F / BF16 / VNNI), AMX, NEON, from /proc/cpuinfo's flags
and torch's own dispatch level. A bottom-layer module: no moe_offload imports (bench, plan and kernels read it).

    capabilities(flags) -> {"avx2": True, "avx512f": False, ...}   # pure, from a flags set
    machine_info()      -> {"model_name", "flags": {...}, "torch_cpu_capability", "isa", ...}
    last_level_cache_bytes() -> the largest data cache cpu0 sees (sysfs), 0 when unknown
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# capability -> the /proc/cpuinfo flag names that mean it (x86 "flags", arm64 "Features"; any one suffices)
FLAGS = {
    "avx2": ("avx2",),
    "fma": ("fma",),
    "f16c": ("f16c",),
    "avx512f": ("avx512f",),
    "avx512bw": ("avx512bw",),
    "avx512vl": ("avx512vl",),
    "avx512_bf16": ("avx512_bf16",),
    "avx512_vnni": ("avx512_vnni", "avx512vnni"),
    "avx_vnni": ("avx_vnni",),
    "amx_bf16": ("amx_bf16",),
    "amx_int8": ("amx_int8",),
    "amx_tile": ("amx_tile",),
    "neon": ("neon", "asimd"),  # arm64 reports Advanced SIMD as "asimd"
    "sve": ("sve",),
    "i8mm": ("i8mm",),
    "bf16_arm": ("bf16",),  # arm64 FEAT_BF16 (x86's BF16 is avx512_bf16)
}


def parse_cpuinfo(text: str) -> dict:
    """The first processor's model name and its flag set, from /proc/cpuinfo text (x86 or arm64)."""
    model, flags = None, set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and model is None:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return {"model_name": model, "flags": flags}


def capabilities(flags: set[str]) -> dict[str, bool]:
    """Every capability in FLAGS: present in `flags` or not."""
    return {cap: any(f in flags for f in names) for cap, names in FLAGS.items()}


def best_isa(caps: dict[str, bool], machine: str = "") -> str:
    """One word for the widest vector path: amx > avx512_bf16 > avx512 > avx2 > neon > baseline."""
    if caps.get("amx_bf16") or caps.get("amx_int8"):
        return "amx"
    if caps.get("avx512_bf16"):
        return "avx512_bf16"
    if caps.get("avx512f"):
        return "avx512"
    if caps.get("avx2"):
        return "avx2"
    if caps.get("neon") or machine in ("aarch64", "arm64"):
        return "neon"
    return "baseline"


def torch_cpu_capability() -> str | None:
    """torch's CPU dispatch level ("AVX2", "AVX512", "DEFAULT", ...) or None without torch."""
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except (ImportError, AttributeError):
        return None


def machine_info(cpuinfo_path: str | os.PathLike = "/proc/cpuinfo") -> dict:
    """This machine's CPU for a benchmark record: model name, capability flags, torch's dispatch level."""
    try:
        parsed = parse_cpuinfo(Path(cpuinfo_path).read_text(errors="replace"))
    except OSError:
        parsed = {"model_name": None, "flags": set()}
    caps = capabilities(parsed["flags"])
    machine = platform.machine()
    return {"model_name": parsed["model_name"] or platform.processor() or None, "machine": machine,
            "logical_cpus": os.cpu_count(), "flags": caps, "isa": best_isa(caps, machine),
            "torch_cpu_capability": torch_cpu_capability()}


def parse_cache_size(text: str) -> int:
    """Bytes of a sysfs cache `size` ("491520K", "32M", "512"); 0 for anything else."""
    text = text.strip()
    unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    digits = text[:-1] if unit > 1 else text
    return int(digits) * unit if digits.isdigit() else 0


def last_level_cache_bytes(root: str | os.PathLike = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """The largest data or unified cache of cpu0 (its last level, usually L3), from sysfs; 0 when unknown. A probe
    that must read from RAM, not cache, cycles through more bytes than this (hardware.cold_bytes)."""
    best = 0
    for d in Path(root).glob("index*"):
        try:
            if (d / "type").read_text().strip() in ("Data", "Unified"):
                best = max(best, parse_cache_size((d / "size").read_text()))
        except OSError:
            continue
    return best


def describe(info: dict) -> str:
    """One line: 'AMD EPYC ... (x86_64, 2 CPUs): avx2, fma, f16c; torch AVX2'."""
    have = [k for k, v in info.get("flags", {}).items() if v]
    return (f"{info.get('model_name') or 'unknown CPU'} ({info.get('machine')}, {info.get('logical_cpus')} CPUs): "
            f"{', '.join(have) or 'no vector extensions found'}; torch {info.get('torch_cpu_capability')}")
