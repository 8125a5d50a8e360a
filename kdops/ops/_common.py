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
            f"kdops.{op}: `{name}` is on {x.device} but the other inputs are on {like.device}; "
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


def use_kernel(op: str, device: torch.device, schema: Optional[str] = None) -> bool:
    """True when torch.ops.kdops has a kernel for this device; else warn once (reference fallback).
    ``schema`` (e.g. "ms_deform_attn_fwd") asks the dispatcher itself whether a CUDA kernel is
    registered, for ops whose CUDA kernel may come from C++ as well as from Triton."""
    if HAS_C and device.type in ("cpu", "meta"):
        return True
    if HAS_C and device.type == "cuda" and cuda_backend_ready(schema):
        return True
    warn_fallback(op, device.type)
    return False


def cuda_backend_ready(schema: Optional[str] = None) -> bool:
    if schema is not None:
        return has_kernel(schema, "CUDA")
    from ..triton import HAS_TRITON

    return HAS_TRITON


def has_kernel(schema: str, dispatch_key: str) -> bool:
    """Whether kdops::<schema> has a kernel for the dispatch key (C++ or Python registered)."""
    return HAS_C and torch._C._dispatch_has_kernel_for_dispatch_key(f"kdops::{schema}", dispatch_key)


def host_readable(t: torch.Tensor) -> bool:
    """True when t's values can be read on the host without a device sync or a graph break:
    a real CPU tensor outside torch.compile tracing (not a FakeTensor / meta tensor)."""
    if t.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


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
if HAS_C:
    torch.library.register_fake("kdops::scale_grads_")(lambda grads, factors: None)


def register_loss_op(name: str, *, fake_fwd, fake_bwd, backward, setup_context, triton_module: str) -> None:
    """Attaches to kdops::<name>_fwd / <name>_bwd (schemas in csrc/ops.cpp) their fake kernels,
    the autograd formula, and the Triton launchers of kdops/triton/<triton_module>.py as the
    CUDA kernels. No-op without the compiled extension (the reference runs instead)."""
    if not HAS_C:
        return
    torch.library.register_fake(f"kdops::{name}_fwd")(fake_fwd)
    torch.library.register_fake(f"kdops::{name}_bwd")(fake_bwd)
    torch.library.register_autograd(f"kdops::{name}_fwd", backward, setup_context=setup_context)
    from ..triton import HAS_TRITON

    if HAS_TRITON:
        import importlib

        mod = importlib.import_module(f"kdops.triton.{triton_module}")
        register_cuda(f"{name}_fwd", getattr(mod, f"{name}_fwd"))
        register_cuda(f"{name}_bwd", getattr(mod, f"{name}_bwd"))


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


def _host_gloss(gloss: torch.Tensor) -> bool:
    """The incoming gradient may be read on the host: a plain CPU tensor outside tracing."""
    return (type(gloss) is torch.Tensor and gloss.device.type == "cpu" and not gloss.requires_grad
            and not torch.compiler.is_compiling() and not torch._C._functorch.is_functorch_wrapped_tensor(gloss))


def level_grads(gloss: torch.Tensor, n_levels: int) -> list:
    """The incoming gradient of a (L,) per-level loss as L factors for :func:`scale_grad`: Python
    floats read once on the CPU (one read for all levels), else 0-d views (no device sync)."""
    if _host_gloss(gloss):
        return gloss.reshape(-1).tolist()
    return list(gloss.unbind(0)) if n_levels > 1 else [gloss.reshape(())]


def saved_grads_reusable(gloss: torch.Tensor) -> bool:
    """True in an eager backward that frees its graph afterwards (no ``retain_graph``): a gradient
    saved by the forward pass is then needed by nobody else, so it may be scaled in place instead
    of copied (PyTorch's compiled backward donates saved buffers on the same condition)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return (keep_graph is not None and type(gloss) is torch.Tensor and not gloss.requires_grad
            and not torch.compiler.is_compiling() and not torch._C._functorch.is_functorch_wrapped_tensor(gloss)
            and not keep_graph())


def scale_grad(g: torch.Tensor, gloss, in_place: bool = False) -> torch.Tensor:
    """g * gloss for a gradient computed in forward; ``in_place`` (see saved_grads_reusable) scales
    the saved g itself: no allocation, one pass less over memory. On the CPU, when the incoming
    gradient is exactly 1 (``loss.backward()`` on a sum), g itself is returned. Reading gloss there
    costs no device sync; never on GPU or when tracing. ``gloss`` may be a float read on the host
    already (level_grads).

    The returned gradient shares its version counter with the saved g, so with
    ``retain_graph=True`` an in-place change of ``.grad`` (e.g. ``zero_grad(set_to_none=False)``)
    before a second backward raises PyTorch's standard "modified by an inplace operation"
    error instead of giving a wrong gradient (``set_to_none=True``, the default, is fine)."""
    if isinstance(gloss, float):
        if gloss == 1.0:
            return g
    elif _host_gloss(gloss) and g.device.type == "cpu" and gloss.numel() == 1 and bool(gloss == 1):
        return g
    return g.mul_(gloss) if in_place else g * gloss


def scale_grads(grads: list, factors: list, in_place: bool) -> list:
    """:func:`scale_grad` over a list (None entries stay None). In place on the CPU with factors
    read on the host, every tensor is scaled by one kdops::scale_grads_ call: one pool of tasks
    instead of one OpenMP region per tensor, each of which waits out a whole scheduler time slice
    for a descheduled thread when other processes keep the cores busy."""
    if (in_place and HAS_C and all(isinstance(f, float) for f in factors)
            and all(g is None or g.device.type == "cpu" for g in grads)):
        todo = [(g, f) for g, f in zip(grads, factors) if g is not None and f != 1.0 and g.numel()]
        if todo:
            torch.ops.kdops.scale_grads_([g for g, _ in todo], [f for _, f in todo])
        return list(grads)
    return [None if g is None else scale_grad(g, f, in_place) for g, f in zip(grads, factors)]


def kernel_scale(reduction: str, n: int, avg_factor):
    """(scale applied inside the kernel, avg_factor left to divide by afterwards).

    A Python-number avg_factor is folded into the kernel (loss * 1/(avg_factor + eps)); a tensor
    one stays on the device and is divided afterwards (no host sync)."""
    if avg_factor is None:
        return (1.0 / max(n, 1) if reduction == "mean" else 1.0), None
    if isinstance(avg_factor, torch.Tensor):
        return 1.0, avg_factor
    return 1.0 / (avg_factor + FLT_EPS), None
