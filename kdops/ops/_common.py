"""Validation and dispatch helpers shared by every op in kdops.ops.

Errors name the op, the argument, what was expected and what came, and are raised
before any kernel runs.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .._extension import HAS_C, warn_fallback

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
Levels = Union[torch.Tensor, Sequence[torch.Tensor]]


def _shape(x: torch.Tensor) -> tuple:
    return tuple(x.shape)


def check_tensor(
    op: str,
    name: str,
    x,
    *,
    ndim: Optional[int] = None,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    like: Optional[torch.Tensor] = None,
    shape: Optional[tuple] = None,
    what: str = "",
) -> torch.Tensor:
    """Checks type, rank, dtype, device and shape of one argument."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"kdops.{op}: `{name}` must be a torch.Tensor{what and ' ' + what}, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"kdops.{op}: `{name}` must be {ndim}-D{what and ' ' + what}, got shape {_shape(x)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"kdops.{op}: `{name}` must have dtype in ({names}), got {x.dtype}")
    if like is not None and x.device != like.device:
        raise ValueError(
            f"kdops.{op}: `{name}` is on {x.device} but the features are on {like.device}; "
            "move every input to one device"
        )
    if shape is not None and _shape(x) != tuple(shape):
        raise ValueError(f"kdops.{op}: `{name}` must have shape {tuple(shape)}{what and ' ' + what}, got {_shape(x)}")
    return x


def check_pair(op: str, student, teacher, level: Optional[int] = None) -> None:
    """Student and teacher feature maps: (N,C,H,W), same shape, dtype and device."""
    sfx = "" if level is None else f"[{level}]"
    check_tensor(op, f"student{sfx}", student, ndim=4, what="(N,C,H,W)")
    check_tensor(op, f"teacher{sfx}", teacher, ndim=4, what="(N,C,H,W)")
    if student.shape != teacher.shape:
        raise ValueError(
            f"kdops.{op}: `teacher{sfx}` must have the shape of `student{sfx}` {_shape(student)}, got "
            f"{_shape(teacher)} (resize or project one of them first, e.g. kdops.losses.PKDLoss resizes)"
        )
    if student.dtype != teacher.dtype:
        raise TypeError(
            f"kdops.{op}: `student{sfx}` is {student.dtype} but `teacher{sfx}` is {teacher.dtype}; cast one to the other"
        )
    if student.device != teacher.device:
        raise ValueError(f"kdops.{op}: `student{sfx}` is on {student.device} but `teacher{sfx}` on {teacher.device}")


def as_levels(op: str, name: str, x) -> tuple[list, bool]:
    """Returns (list of levels, was_sequence)."""
    if isinstance(x, torch.Tensor):
        return [x], False
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise ValueError(f"kdops.{op}: `{name}` is an empty sequence; pass at least one (N,C,H,W) level")
        return list(x), True
    raise TypeError(f"kdops.{op}: `{name}` must be a tensor or a sequence of per-level tensors, got {type(x).__name__}")


def match_levels(op: str, name: str, x, n_levels: int, is_seq: bool) -> list:
    """An optional per-level argument: None, or a tensor (single level) / sequence of L tensors."""
    if x is None:
        return [None] * n_levels
    if is_seq:
        if not isinstance(x, (list, tuple)) or len(x) != n_levels:
            got = f"a sequence of {len(x)}" if isinstance(x, (list, tuple)) else type(x).__name__
            raise ValueError(f"kdops.{op}: `{name}` must be a sequence of {n_levels} tensors (one per level), got {got}")
        return list(x)
    if isinstance(x, (list, tuple)):
        raise TypeError(f"kdops.{op}: `{name}` must be a tensor when the features are a single tensor")
    return [x]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and loss) dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def use_kernel(op: str, device: torch.device) -> bool:
    """True when torch.ops.kdops has a kernel for this device; else warn once (reference fallback)."""
    if HAS_C and device.type in ("cpu", "meta"):
        return True
    if HAS_C and device.type == "cuda" and cuda_backend_ready():
        return True
    warn_fallback(op, device.type)
    return False


def cuda_backend_ready() -> bool:
    from ..triton import HAS_TRITON

    return HAS_TRITON


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def forbid_double_backward(op: str) -> None:
    """Loss ops compute their gradient in the forward pass: it carries no graph back to the
    inputs, so higher-order gradients would silently be wrong. Refuse them clearly."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"kdops.{op} does not support double backward (create_graph=True): its gradient is "
            f"computed in the forward pass. Use kdops.reference.{op} where you need higher-order gradients."
        )


def register_cuda(name: str, fn) -> None:
    """Registers a Python (Triton) launcher as the CUDA kernel of kdops::<name>."""
    _LIB.impl(name, fn, "CUDA")


_LIB = torch.library.Library("kdops", "IMPL") if HAS_C else None


def check_levels(op: str, name: str, levels: list, is_seq: bool) -> torch.Tensor:
    """Per-level (N,C,H,W) maps with one N, C, dtype and device; returns the first level."""
    first = None
    for i, x in enumerate(levels):
        sfx = f"[{i}]" if is_seq else ""
        check_tensor(op, f"{name}{sfx}", x, ndim=4, like=first, what="(N,C,H,W)")
        if first is None:
            first = x
            continue
        if x.dtype != first.dtype:
            raise TypeError(f"kdops.{op}: `{name}{sfx}` is {x.dtype} but `{name}[0]` is {first.dtype}; use one dtype")
        if x.shape[:2] != first.shape[:2]:
            raise ValueError(
                f"kdops.{op}: `{name}{sfx}` has (N,C) = {tuple(x.shape[:2])} but `{name}[0]` has "
                f"{tuple(first.shape[:2])}; every level needs the same batch and channels"
            )
    return first


def check_index_tensor(op: str, name: str, x, *, like: Optional[torch.Tensor], shape: tuple, what: str) -> torch.Tensor:
    """An int64 index tensor on the device of `like`; None in `shape` matches any size."""
    check_tensor(op, name, x, ndim=len(shape), dtypes=(torch.int64,), like=like, what=what)
    if any(want is not None and got != want for got, want in zip(x.shape, shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"kdops.{op}: `{name}` must have shape {want} {what}, got {_shape(x)}")
    return x


def per_level_numbers(op: str, name: str, x, n_levels: int, is_seq: bool) -> list:
    """One positive number per level (strides): a number for a single level, or a sequence of L."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        vals = [x] * n_levels if not is_seq or n_levels == 1 else None
    elif isinstance(x, (list, tuple)) and len(x) == n_levels:
        vals = list(x)
    else:
        vals = None
    if vals is None or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in vals):
        raise ValueError(f"kdops.{op}: `{name}` must be {n_levels} positive number(s) (one per level), got {x!r}")
    return vals


def compiling(*tensors) -> bool:
    """True while torch.compile traces or any tensor is fake/meta: host-side data checks are
    skipped there (the kernels stay bounds-safe without them)."""
    if getattr(torch, "compiler", None) and torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake

    return any(t.device.type == "meta" or is_fake(t) for t in tensors)


def parse_sizes(op: str, sizes) -> tuple:
    """(N,H,W) for one level or a sequence of them: (list of sizes, was_sequence)."""
    def is_size(s):
        return isinstance(s, (list, tuple, torch.Size)) and len(s) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in s)

    if is_size(sizes):
        return [tuple(sizes)], False
    if isinstance(sizes, (list, tuple)) and sizes and all(is_size(s) for s in sizes):
        return [tuple(s) for s in sizes], True
    raise ValueError(f"kdops.{op}: `sizes` must be one (N,H,W) or a sequence of (N,H,W) per level, got {sizes!r}")
