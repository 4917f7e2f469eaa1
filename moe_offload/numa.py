"""NUMA: which memory node is near the compute, and which experts go there.

On a multi-socket host, RAM on the other socket is read across the inter-socket link at a fraction of local
bandwidth. The experts read most often (routing_stats.json) belong on the node local to the GPU (for
host->device copies) or, CPU-only, local to the compute threads; the rest on the other nodes.

Detection reads sysfs (`root` points tests at a fake tree):
    /sys/devices/system/node/node<N>/cpulist, meminfo, distance
    /sys/bus/pci/devices/<domain:bus:dev.fn>/numa_node      (-1: the platform does not say)

Allocation on a node uses libnuma's `numa_alloc_onnode` through ctypes when libnuma.so.1 loads and
`numa_available()` is >= 0. Without it there is no mbind from Python's standard library, so placement is
advisory: `Placement.enforced` is False and `Placement.report()` says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

Key = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class Node:
    id: int
    cpus: tuple[int, ...]
    mem_total: int  # bytes
    mem_free: int  # bytes
    distance: tuple[int, ...] = ()  # SLIT row: distance[j] to node j (10 = local)


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]"""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def _meminfo(path: Path) -> tuple[int, int]:
    total = free = 0
    if path.is_file():
        for line in path.read_text().splitlines():  # "Node 0 MemTotal:       24684100 kB"
            m = re.match(r"Node\s+\d+\s+(MemTotal|MemFree):\s+(\d+)\s*kB", line)
            if m:
                if m.group(1) == "MemTotal":
                    total = int(m.group(2)) * 1024
                else:
                    free = int(m.group(2)) * 1024
    return total, free


def detect(root: str | os.PathLike = "/") -> list[Node]:
    """The NUMA nodes, by id. A machine (or container) without /sys/devices/system/node is one node 0 with
    every CPU and os.sysconf's memory."""
    base = Path(root) / "sys/devices/system/node"
    nodes = []
    for d in sorted(base.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        cpus = parse_cpulist((d / "cpulist").read_text()) if (d / "cpulist").is_file() else []
        total, free = _meminfo(d / "meminfo")
        dist = tuple(int(x) for x in (d / "distance").read_text().split()) if (d / "distance").is_file() else ()
        nodes.append(Node(int(d.name[4:]), tuple(cpus), total, free, dist))
    if not nodes:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        avail = os.sysconf("SC_AVPHYS_PAGES")
        nodes = [Node(0, tuple(range(os.cpu_count() or 1)), pages * size, avail * size)]
    return nodes


def pci_numa_node(pci_address: str, root: str | os.PathLike = "/") -> int | None:
    """NUMA node of a PCI device ('0000:65:00.0'); None when unknown (-1 or no such file)."""
    p = Path(root) / "sys/bus/pci/devices" / pci_address.lower() / "numa_node"
    if not p.is_file():
        return None
    n = int(p.read_text().strip())
    return n if n >= 0 else None


def gpu_pci_address(index: int = 0) -> str | None:
    """PCI address of CUDA device `index` as sysfs names it, or None without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        pr = torch.cuda.get_device_properties(index)
        return f"{pr.pci_domain_id:04x}:{pr.pci_bus_id:02x}:{pr.pci_device_id:02x}.0"
    except (ImportError, AttributeError, RuntimeError):
        return None


def compute_node(nodes: list[Node], cpus: set[int] | None = None) -> int:
    """The node holding most of `cpus` (default: this process's CPU affinity)."""
    cpus = set(os.sched_getaffinity(0)) if cpus is None else cpus
    return max(nodes, key=lambda n: (len(cpus & set(n.cpus)), -n.id)).id


def local_node(root: str | os.PathLike = "/", gpu: str | None = None, cpus: set[int] | None = None) -> int:
    """The node the experts should be near: the GPU's (PCI address `gpu`) when sysfs knows it, else the node
    of the compute threads."""
    nodes = detect(root)
    if gpu is not None:
        n = pci_numa_node(gpu, root)
        if n is not None and any(x.id == n for x in nodes):
            return n
    return compute_node(nodes, cpus)


@dataclass
class Placement:
    local: int
    node_of: dict[Key, int] = field(default_factory=dict)  # expert -> node; absent: not in host RAM
    bytes_on: dict[int, int] = field(default_factory=dict)
    enforced: bool = False  # True when memory will really be bound to the node (libnuma)
    noop: bool = False
    reason: str = ""

    def report(self) -> str:
        if self.noop:
            return f"NUMA: {self.reason}: placement is a no-op"
        parts = ", ".join(f"node {n}: {sum(1 for v in self.node_of.values() if v == n)} experts "
                          f"{b / 2**30:.2f} GiB" for n, b in sorted(self.bytes_on.items()))
        how = "allocated with numa_alloc_onnode" if self.enforced else f"advisory only ({self.reason})"
        return f"NUMA: hottest experts on node {self.local} (local to the compute); {parts}; {how}"


def _freq_items(routing_stats) -> dict[Key, float]:
    """Accept {(layer, expert): freq}, {layer: [freq per expert]}, or routing_stats.json's dict
    ({"layers": {"3": {"frequency": [...]}}})."""
    if isinstance(routing_stats, Mapping) and "layers" in routing_stats:
        return {(int(L), e): float(f) for L, d in routing_stats["layers"].items() for e, f in enumerate(d["frequency"])}
    out = {}
    for k, v in routing_stats.items():
        if isinstance(k, tuple):
            out[(int(k[0]), int(k[1]))] = float(v)
        else:
            out.update({(int(k), e): float(f) for e, f in enumerate(v)})
    return out


def place_experts(routing_stats, sizes: int | Mapping[Key, int], capacity: Mapping[int, int], local: int,
                  nodes: list[Node] | None = None) -> Placement:
    """Hottest experts first onto node `local` until its `capacity` (bytes) is full, then onto the other nodes
    nearest first (SLIT distance from `local` when known, else by id). Experts that fit nowhere are left out
    (they stay on disk). One node -> no-op."""
    enforced, why = numa_available()
    if len(capacity) <= 1:
        return Placement(local=local, noop=True, reason="single NUMA node")
    if local not in capacity:
        raise ValueError(f"local node {local} has no capacity entry ({sorted(capacity)})")
    dist = {n.id: n.distance for n in nodes or []}
    row = dist.get(local, ())
    order = sorted(capacity, key=lambda n: (n != local, row[n] if n < len(row) else 0, n))
    size = (lambda k: sizes) if isinstance(sizes, int) else sizes.__getitem__
    freq = _freq_items(routing_stats)
    p = Placement(local=local, enforced=enforced, reason=why, bytes_on={n: 0 for n in order})
    for key in sorted(freq, key=lambda k: (-freq[k], k)):  # hottest first, each onto the nearest node with room
        n = next((n for n in order if p.bytes_on[n] + size(key) <= capacity[n]), None)
        if n is not None:
            p.node_of[key] = n
            p.bytes_on[n] += size(key)
    return p


# ---- allocation through libnuma -------------------------------------------------------------------------------

_LIB: ctypes.CDLL | None = None
_LIB_ERR = ""


def _libnuma() -> ctypes.CDLL | None:
    global _LIB, _LIB_ERR
    if _LIB is None and not _LIB_ERR:
        name = ctypes.util.find_library("numa") or "libnuma.so.1"
        try:
            lib = ctypes.CDLL(name)
            lib.numa_available.restype = ctypes.c_int
            lib.numa_alloc_onnode.restype = ctypes.c_void_p
            lib.numa_alloc_onnode.argtypes = [ctypes.c_size_t, ctypes.c_int]
            lib.numa_free.restype = None
            lib.numa_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            if lib.numa_available() < 0:
                _LIB_ERR = "libnuma loaded but numa_available() < 0 (kernel without NUMA support)"
            else:
                _LIB = lib
        except OSError:
            _LIB_ERR = "libnuma.so.1 not found (install libnuma1); Python has no mbind of its own"
    return _LIB


def numa_available() -> tuple[bool, str]:
    lib = _libnuma()
    return lib is not None, ("" if lib is not None else _LIB_ERR)


def _free(ptr: int, nbytes: int) -> None:
    _LIB.numa_free(ptr, nbytes)


def alloc_on_node(nbytes: int, node: int):
    """uint8 torch tensor [nbytes] whose pages are bound to `node` (libnuma numa_alloc_onnode; page-aligned,
    zero-filled by the kernel on first touch). The memory is freed with numa_free when the tensor and its
    views are gone. Raises OSError without libnuma."""
    import torch

    lib = _libnuma()
    if lib is None:
        raise OSError(f"cannot allocate on NUMA node {node}: {_LIB_ERR}")
    n = max(1, nbytes)
    ptr = lib.numa_alloc_onnode(n, node)
    if not ptr:
        raise MemoryError(f"numa_alloc_onnode({n}, {node}) failed")
    buf = (ctypes.c_ubyte * n).from_address(ptr)
    weakref.finalize(buf, _free, ptr, n)  # torch.frombuffer keeps `buf` alive as long as the tensor
    return torch.frombuffer(buf, dtype=torch.uint8)[:nbytes]


def node_of_address(ptr: int) -> int | None:
    """The node a (touched) page lives on, via move_pages(2) query mode through libnuma; None if unknown."""
    lib = _libnuma()
    if lib is None:
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    pages = (ctypes.c_void_p * 1)(ptr - ptr % page)
    status = (ctypes.c_int * 1)(-1)
    lib.numa_move_pages.restype = ctypes.c_int
    lib.numa_move_pages.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p,
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    if lib.numa_move_pages(0, 1, pages, None, status, 0) != 0 or status[0] < 0:
        return None
    return status[0]
