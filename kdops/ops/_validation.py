"""Argument validation shared by every public function of kdops.ops, kdops.losses and kdops.nn.

Every check runs before any kernel and raises ``TypeError`` (wrong kind of value) or
``ValueError`` (right kind, wrong value) naming the function, the argument, what was expected
and what came.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from .._dtype import FLOAT_DTYPES

Levels = Union[torch.Tensor, Sequence[torch.Tensor]]


def _where(op: str) -> str:
    """`op` is a kdops.ops function name ("masked_mse" -> "kdops.masked_mse") or already a
    qualified name of a loss or module ("PKDLoss", "MSDeformAttn")."""
    return f"kdops.{op}" if op[:1].islower() and "." not in op else op


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
        raise TypeError(f"{_where(op)}: `{name}` must be a torch.Tensor{what and ' ' + what}, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{_where(op)}: `{name}` must be {ndim}-D{what and ' ' + what}, got shape {_shape(x)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{_where(op)}: `{name}` must have dtype in ({names}), got {x.dtype}")
    if like is not None and x.device != like.device:
        raise ValueError(
            f"{_where(op)}: `{name}` is on {x.device} but the other inputs are on {like.device}; "
            "move every input to one device"
        )
    if shape is not None and _shape(x) != tuple(shape):
        raise ValueError(f"{_where(op)}: `{name}` must have shape {tuple(shape)}{what and ' ' + what}, got {_shape(x)}")
    return x


def check_pair(op: str, student, teacher, level: Optional[int] = None) -> None:
    """Student and teacher feature maps: (N,C,H,W), same shape, dtype and device."""
    sfx = "" if level is None else f"[{level}]"
    check_tensor(op, f"student{sfx}", student, ndim=4, what="(N,C,H,W)")
    check_tensor(op, f"teacher{sfx}", teacher, ndim=4, what="(N,C,H,W)")
    if student.shape != teacher.shape:
        raise ValueError(
            f"{_where(op)}: `teacher{sfx}` must have the shape of `student{sfx}` {_shape(student)}, got "
            f"{_shape(teacher)} (resize or project one of them first, e.g. kdops.losses.PKDLoss resizes)"
        )
    if student.dtype != teacher.dtype:
        raise TypeError(
            f"{_where(op)}: `student{sfx}` is {student.dtype} but `teacher{sfx}` is {teacher.dtype}; cast one to the other"
        )
    if student.device != teacher.device:
        raise ValueError(f"{_where(op)}: `student{sfx}` is on {student.device} but `teacher{sfx}` on {teacher.device}")


def as_levels(op: str, name: str, x) -> tuple[list, bool]:
    """Returns (list of levels, was_sequence)."""
    if isinstance(x, torch.Tensor):
        return [x], False
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise ValueError(f"{_where(op)}: `{name}` is an empty sequence; pass at least one (N,C,H,W) level")
        return list(x), True
    raise TypeError(f"{_where(op)}: `{name}` must be a tensor or a sequence of per-level tensors, got {type(x).__name__}")


def match_levels(op: str, name: str, x, n_levels: int, is_seq: bool) -> list:
    """An optional per-level argument: None, or a tensor (single level) / sequence of L tensors."""
    if x is None:
        return [None] * n_levels
    if is_seq:
        if not isinstance(x, (list, tuple)) or len(x) != n_levels:
            got = f"a sequence of {len(x)}" if isinstance(x, (list, tuple)) else type(x).__name__
            raise ValueError(f"{_where(op)}: `{name}` must be a sequence of {n_levels} tensors (one per level), got {got}")
        return list(x)
    if isinstance(x, (list, tuple)):
        raise TypeError(f"{_where(op)}: `{name}` must be a tensor when the features are a single tensor")
    return [x]


def level_scales(op: str, scale, n_levels: int, is_seq: bool) -> list:
    """A loss op's ``scale``: one finite number for every level, or (for sequences of levels) a
    list/tuple of L of them. Returns L floats."""
    if isinstance(scale, (list, tuple)):
        if not is_seq:
            raise TypeError(f"{_where(op)}: `scale` must be a number when the features are a single tensor")
        return [float(v) for v in check_numbers(op, "scale", scale, length=n_levels)]
    return [float(check_number(op, "scale", scale))] * n_levels


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
            raise TypeError(f"{_where(op)}: `{name}{sfx}` is {x.dtype} but `{name}[0]` is {first.dtype}; use one dtype")
        if x.shape[:2] != first.shape[:2]:
            raise ValueError(
                f"{_where(op)}: `{name}{sfx}` has (N,C) = {tuple(x.shape[:2])} but `{name}[0]` has "
                f"{tuple(first.shape[:2])}; every level needs the same batch and channels"
            )
    return first


def check_index_tensor(op: str, name: str, x, *, like: Optional[torch.Tensor], shape: tuple, what: str) -> torch.Tensor:
    """An int64 index tensor on the device of `like`; None in `shape` matches any size."""
    check_tensor(op, name, x, ndim=len(shape), dtypes=(torch.int64,), like=like, what=what)
    if any(want is not None and got != want for got, want in zip(x.shape, shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"{_where(op)}: `{name}` must have shape {want} {what}, got {_shape(x)}")
    return x


def per_level_numbers(op: str, name: str, x, n_levels: int, is_seq: bool) -> list:
    """One positive number per level (strides): a number for a single level, or a sequence of L."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        vals = [x] * n_levels if not is_seq or n_levels == 1 else None
    elif isinstance(x, (list, tuple)) and len(x) == n_levels:
        vals = list(x)
    else:
        vals = None
    if vals is None or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf
                               for v in vals):
        raise ValueError(f"{_where(op)}: `{name}` must be {n_levels} positive finite number(s) (one per level), "
                         f"got {x!r}")
    return vals


def parse_sizes(op: str, sizes) -> tuple:
    """(N,H,W) for one level or a sequence of them: (list of sizes, was_sequence)."""
    def is_size(s):
        return isinstance(s, (list, tuple, torch.Size)) and len(s) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in s)

    if is_size(sizes):
        return [tuple(sizes)], False
    if isinstance(sizes, (list, tuple)) and sizes and all(is_size(s) for s in sizes):
        return [tuple(s) for s in sizes], True
    raise ValueError(f"{_where(op)}: `sizes` must be one (N,H,W) or a sequence of (N,H,W) per level, got {sizes!r}")


def check_avg_factor(op: str, avg_factor, like: torch.Tensor):
    """None, a Python number or a 0-d/1-element tensor on the inputs' device (never read on the host)."""
    if avg_factor is None or isinstance(avg_factor, (int, float)) and not isinstance(avg_factor, bool):
        return avg_factor
    if isinstance(avg_factor, torch.Tensor):
        if avg_factor.numel() != 1 or not avg_factor.is_floating_point() and avg_factor.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{_where(op)}: `avg_factor` must be a number or a 1-element tensor, got shape "
                             f"{_shape(avg_factor)} {avg_factor.dtype}")
        if avg_factor.device != like.device and not (avg_factor.dim() == 0 and avg_factor.device.type == "cpu"):
            raise ValueError(f"{_where(op)}: `avg_factor` is on {avg_factor.device} but the inputs are on {like.device}")
        return avg_factor.reshape(())
    raise TypeError(f"{_where(op)}: `avg_factor` must be None, a number or a tensor, got {type(avg_factor).__name__}")


# --------------------------------------------------------------------------- scalar arguments
def check_number(op: str, name: str, x, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, integer: bool = False, allow_none: bool = False):
    """A real number (bool refused) that is finite and in [low, high] (``low_open``: > low).
    Returns it as a Python number (or None when ``allow_none``)."""
    if x is None and allow_none:
        return None
    kind = "an int" if integer else "a number"
    ok_type = isinstance(x, int) if integer else isinstance(x, (int, float))
    if isinstance(x, bool) or not ok_type:
        raise TypeError(f"{_where(op)}: `{name}` must be {kind}{' or None' if allow_none else ''}, "
                        f"got {type(x).__name__} {x!r}")
    bad = not math.isfinite(x) or (low is not None and (x <= low if low_open else x < low)) or (
        high is not None and x > high)
    if bad:
        lo = "" if low is None else (f" > {low:g}" if low_open else f" >= {low:g}")
        hi = "" if high is None else f"{' and' if lo else ''} <= {high:g}"
        raise ValueError(f"{_where(op)}: `{name}` must be a finite {kind[3:] if integer else 'number'}{lo}{hi}, "
                         f"got {x!r}")
    return x


def check_choice(op: str, name: str, x, choices: Sequence[str]) -> str:
    """One of a fixed set of strings."""
    if not isinstance(x, str) or x not in choices:
        raise ValueError(f"{_where(op)}: `{name}` must be one of {', '.join(repr(c) for c in choices)}, got {x!r}")
    return x


def check_flag(op: str, name: str, x) -> bool:
    """A bool (not a truthy number or string)."""
    if not isinstance(x, bool):
        raise TypeError(f"{_where(op)}: `{name}` must be True or False, got {type(x).__name__} {x!r}")
    return x


def paired_levels(op: str, names: Sequence[str], *args) -> Tuple[list, bool]:
    """Arguments that are all tensors or all sequences of one length (student and teacher
    features, logits, regressions...): returns (list of per-argument level lists, was_sequence)."""
    first, seq = as_levels(op, names[0], args[0])
    out = [first]
    for name, x in zip(names[1:], args[1:]):
        xs, x_seq = as_levels(op, name, x)
        if x_seq != seq or len(xs) != len(first):
            want = f"a sequence of {len(first)} tensors" if seq else "a tensor"
            got = f"a sequence of {len(xs)}" if x_seq else "a tensor"
            raise ValueError(f"{_where(op)}: `{name}` must be {want}, like `{names[0]}`, got {got}")
        out.append(xs)
    return out, seq


def check_numbers(op: str, name: str, x, *, length: Optional[int] = None, low: Optional[float] = None,
                  high: Optional[float] = None, low_open: bool = False) -> tuple:
    """A non-empty list/tuple of finite numbers (bools refused), each in [low, high] (``low_open``:
    > low); ``length`` fixes how many. Returns them as a tuple."""
    count = f"{length} " if length is not None else ""
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"{_where(op)}: `{name}` must be a list or tuple of {count}numbers, "
                        f"got {type(x).__name__} {x!r}")
    if not x or (length is not None and len(x) != length):
        raise ValueError(f"{_where(op)}: `{name}` must hold {count or 'at least one '}number(s), "
                         f"got {len(x)}: {x!r}")
    return tuple(check_number(op, f"{name}[{i}]", v, low=low, high=high, low_open=low_open) for i, v in enumerate(x))


def check_strides(op: str, strides, *, allow_none: bool = True):
    """FPN strides as a constructor takes them: a positive finite number (one level, or the same for
    every level where the callee allows it) or a non-empty sequence of them (one per level), or None
    when ``allow_none``. Returns the number or a tuple; the count is checked against the levels later
    (:func:`per_level_numbers`)."""
    if strides is None and allow_none:
        return None
    if isinstance(strides, (list, tuple)):
        return check_numbers(op, "strides", strides, low=0.0, low_open=True)
    if isinstance(strides, (int, float)) and not isinstance(strides, bool):
        return check_number(op, "strides", strides, low=0.0, low_open=True)
    raise TypeError(f"{_where(op)}: `strides` must be a positive number or a sequence of them (one per level)"
                    f"{' or None' if allow_none else ''}, got {type(strides).__name__} {strides!r}")


def check_box_args(op: str, boxes, batch_index, image_size, like: Optional[torch.Tensor] = None) -> None:
    """GT boxes as the box-driven losses take them: ``boxes`` (K,4) xyxy floating, ``batch_index``
    (K,) int64 on the same device, ``image_size`` None, (height, width) positive finite numbers or a
    (K,2) tensor of per-box image sizes. Shapes and kinds only: no value is read on the host."""
    check_tensor(op, "boxes", boxes, ndim=2, like=like, what="(K,4) xyxy in image pixels")
    if boxes.shape[1] != 4:
        raise ValueError(f"{_where(op)}: `boxes` must have shape (K,4) xyxy in image pixels, got {_shape(boxes)}")
    if batch_index is None:
        raise ValueError(f"{_where(op)}: `batch_index` (K,) int64, the image of each box, is needed with `boxes`")
    check_index_tensor(op, "batch_index", batch_index, like=boxes, shape=(boxes.shape[0],),
                       what="(the image of each box)")
    if image_size is None:
        return
    if isinstance(image_size, torch.Tensor):
        check_tensor(op, "image_size", image_size, ndim=2, like=boxes,
                     dtypes=(torch.int64, torch.int32, torch.float32, torch.float64),
                     shape=(boxes.shape[0], 2), what="(K,2) (height, width) per box")
        return
    if isinstance(image_size, (list, tuple)):
        check_numbers(op, "image_size", image_size, length=2, low=0.0, low_open=True)
        return
    raise TypeError(f"{_where(op)}: `image_size` must be None, (height, width) or a (K,2) tensor, "
                    f"got {type(image_size).__name__} {image_size!r}")


def check_dtype(op: str, name: str, x, *, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES, allow_none: bool = True):
    """A ``torch.dtype`` among ``dtypes`` (or None when ``allow_none``), checked before it reaches a
    binding (which would answer a string with a raw cast error). A dtype *name* is refused with the
    ``torch.<name>`` to pass instead. Returns it."""
    if x is None and allow_none:
        return None
    names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
    if isinstance(x, torch.dtype):
        if x not in dtypes:
            raise TypeError(f"{_where(op)}: `{name}` must be one of ({names}), got {x}")
        return x
    hint = ""
    if isinstance(x, str) and isinstance(getattr(torch, x.replace("torch.", ""), None), torch.dtype):
        hint = f" (pass torch.{x.replace('torch.', '')}, not the string)"
    raise TypeError(f"{_where(op)}: `{name}` must be a torch.dtype, one of ({names}){' or None' if allow_none else ''}, "
                    f"got {type(x).__name__} {x!r}{hint}")
