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


def register_cuda(name: str, fn) -> None:
    """Registers a Python (Triton) launcher as the CUDA kernel of kdops::<name>."""
    _LIB.impl(name, fn, "CUDA")


_LIB = torch.library.Library("kdops", "IMPL") if HAS_C else None


# --------------------------------------------------------------------------- dense-head helpers
FLT_EPS = float(torch.finfo(torch.float32).eps)


def check_avg_factor(op: str, avg_factor, like: torch.Tensor):
    """None, a Python number or a 0-d/1-element tensor on the inputs' device (never read on the host)."""
    if avg_factor is None or isinstance(avg_factor, (int, float)) and not isinstance(avg_factor, bool):
        return avg_factor
    if isinstance(avg_factor, torch.Tensor):
        if avg_factor.numel() != 1 or not avg_factor.is_floating_point() and avg_factor.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"kdops.{op}: `avg_factor` must be a number or a 1-element tensor, got shape "
                             f"{_shape(avg_factor)} {avg_factor.dtype}")
        if avg_factor.device != like.device and not (avg_factor.dim() == 0 and avg_factor.device.type == "cpu"):
            raise ValueError(f"kdops.{op}: `avg_factor` is on {avg_factor.device} but the inputs are on {like.device}")
        return avg_factor.reshape(())
    raise TypeError(f"kdops.{op}: `avg_factor` must be None, a number or a tensor, got {type(avg_factor).__name__}")


def divide_by_avg_factor(loss: torch.Tensor, avg_factor) -> torch.Tensor:
    """mmdet's weight_reduce_loss(reduction="mean", avg_factor): sum / (avg_factor + float32 eps)."""
    if avg_factor is None:
        return loss
    return loss / (avg_factor + FLT_EPS)


def anchor_view(x: torch.Tensor, per_anchor: int) -> torch.Tensor:
    """A dense-head tensor as a strided (N,H,W,J,C) view, without a copy.

    (A,C) -> (1,1,A,1,C); mmdet's (N,J*C,H,W) -> (N,H,W,J,C), anchors ordered (n,h,w,j)
    exactly as ``x.permute(0,2,3,1).reshape(-1, C)`` orders them. Kernels read the strides.
    """
    if x.dim() == 2:
        return x.unsqueeze(0).unsqueeze(0).unsqueeze(3)
    N, JC, H, W = x.shape
    return x.unflatten(1, (JC // per_anchor if per_anchor else 1, per_anchor)).permute(0, 3, 4, 1, 2)


def scale_grad(g: torch.Tensor, gloss: torch.Tensor) -> torch.Tensor:
    """g * gloss for a gradient computed in forward. On the CPU, when the incoming gradient is
    exactly 1 (``loss.backward()`` on a sum), g itself is returned: a pass over the gradient and
    an allocation saved. Reading gloss there costs no device sync; never on GPU or when tracing.

    The returned gradient shares its version counter with the saved g, so with
    ``retain_graph=True`` an in-place change of ``.grad`` (e.g. ``zero_grad(set_to_none=False)``)
    before a second backward raises PyTorch's standard "modified by an inplace operation"
    error instead of giving a wrong gradient (``set_to_none=True``, the default, is fine)."""
    if (g.device.type == "cpu" and type(gloss) is torch.Tensor and gloss.device.type == "cpu"
            and gloss.numel() == 1 and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(gloss) and bool(gloss == 1)):
        return g
    return g * gloss


def kernel_scale(reduction: str, n: int, avg_factor):
    """(scale applied inside the kernel, avg_factor left to divide by afterwards).

    A Python-number avg_factor is folded into the kernel (loss * 1/(avg_factor + eps)); a tensor
    one stays on the device and is divided afterwards (no host sync)."""
    if avg_factor is None:
        return (1.0 / max(n, 1) if reduction == "mean" else 1.0), None
    if isinstance(avg_factor, torch.Tensor):
        return 1.0, avg_factor
    return 1.0 / (avg_factor + FLT_EPS), None
