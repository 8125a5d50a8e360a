"""How the bench's process gets its memory, and what a fresh page costs.

On the CPU every tensor comes from glibc's malloc. Blocks of 32 MiB and more -- and, depending on
what was freed before, smaller ones too -- are mapped fresh from the kernel on every allocation and
returned on free, so an op that allocates a large gradient pays one page fault per 4 KiB page (about
1 us on the 2-vCPU VMs kdops is measured on: 21 ms of a 30 ms exp over 87 MB). Whether a given
allocation pays it depends on the heap's history, which made the same roof pass measure 2.1 ms in one
case and 9.1 ms in the next.

``configure_allocator("warm")`` (the bench's default) tells glibc to serve every block from its heap
and never give memory back, so after the warm-up no implementation pays page faults -- as on a GPU,
whose caching allocator keeps freed blocks -- and the timings measure the kernels.
``configure_allocator("system")`` leaves glibc's defaults (what a plain CPU training process sees);
:func:`page_fault_us` measures the cost of a fresh page, which the table's header reports so the
share of a fresh gradient can be worked out (bytes / 4096 x cost).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import time
from typing import Optional

ALLOCATORS = ("warm", "system")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_state = {"mode": "system"}


def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallopt  # noqa: B018  (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


def configure_allocator(mode: str) -> str:
    """Set how this process allocates (see the module docstring) and say what was done, for the
    table's header. ``mode``: 'warm' or 'system'. Once 'warm', a process stays warm."""
    if mode not in ALLOCATORS:
        raise ValueError(f"kdops bench: --allocator must be one of {', '.join(ALLOCATORS)}, got {mode!r}")
    if mode == "system":
        if _state["mode"] == "warm":
            raise ValueError("kdops bench: this process's allocator is already warm; run a new process for 'system'")
        return "system (glibc defaults: large blocks are mapped fresh and pay page faults)"
    libc = _libc()
    if libc is None or not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        return "system (warm asked for, but this C library has no glibc mallopt: page faults included)"
    _state["mode"] = "warm"
    return "warm (glibc keeps freed memory: no page faults after warm-up, like a GPU's caching allocator)"


def page_fault_us(n_bytes: int = 32 << 20, reps: int = 5) -> float:
    """Microseconds per fresh 4 KiB page: writing zeros over a fresh anonymous mapping, minus
    writing them again over the same (now resident) pages; the median of ``reps`` mappings."""
    import torch

    pages = n_bytes // 4096
    costs = []
    for _ in range(reps):
        m = mmap.mmap(-1, pages * 4096)
        try:
            t = torch.frombuffer(m, dtype=torch.uint8)
            t0 = time.perf_counter()
            t.fill_(1)
            fresh = time.perf_counter() - t0
            t0 = time.perf_counter()
            t.fill_(2)
            warm = time.perf_counter() - t0
            costs.append(max(fresh - warm, 0.0) / pages * 1e6)
            del t
        finally:
            m.close()
    costs.sort()
    return costs[len(costs) // 2]
