"""Triton kernels: the CUDA backend of kdops.

Each module defines its kernels and host-side launchers; kdops.ops registers the
launchers as the CUDA implementation of the matching ``kdops::`` op. Under
``TRITON_INTERPRET=1`` (set before import) the same kernels run on CPU tensors,
which is how CI tests them.
"""
from __future__ import annotations

import os

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - triton ships with torch on Linux
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def tl_acc_dtype(dtype):
    """Triton accumulation dtype for a torch dtype: fp64 stays fp64, everything else fp32."""
    import torch

    return tl.float64 if dtype == torch.float64 else tl.float32


def grid_block(n: int, block: int) -> int:
    return max(1, (n + block - 1) // block)


def device_guard(t):
    """Makes the tensor's GPU current for a launch (DDP puts ranks on cuda:1, cuda:2, ...)."""
    import contextlib

    import torch

    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def block_size(gpu_block: int) -> int:
    """Elements per program: the tuned GPU block, or a large one under the interpreter
    (~5 ms per program instance there, so fewer, bigger programs)."""
    return 8192 if INTERPRET else gpu_block
