"""Registration and dispatch of the kdops ops, and the autograd helpers they share.

An op is: its schemas in csrc/ops.cpp, its kernels (csrc/cpu/<op>.cpp, kdops/triton/<op>.py,
csrc/cuda/<op>.cu), and one :func:`register_op` call in kdops/ops/<op>.py that attaches the
fake (meta) kernels, autograd and the CUDA launchers.
"""
from __future__ import annotations

import importlib
from typing import Callable, Mapping, Optional, Tuple, Union

import torch

from .._extension import HAS_C, warn_fallback

_LIB = torch.library.Library("kdops", "IMPL") if HAS_C else None
if HAS_C:
    torch.library.register_fake("kdops::scale_grads_")(lambda grads, factors: None)


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


def compiling(*tensors) -> bool:
    """True while torch.compile traces or any tensor is fake/meta: host-side data checks are
    skipped there (the kernels stay bounds-safe without them)."""
    if getattr(torch, "compiler", None) and torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake

    return any(t.device.type == "meta" or is_fake(t) for t in tensors)


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def forbid_double_backward(op: str) -> None:
    """Called first in the backward of every op whose backward has no derivative of its own
    (the loss ops, whose gradient comes from a dedicated backward kernel or from the forward pass,
    and ms_deform_attn): with ``create_graph=True`` the gradient would carry no graph back to the
    inputs and higher-order gradients would silently be wrong, so they are refused. Not checked
    while torch.compile traces (it traces backward formulas with grad mode on); a compiled graph
    refuses double backward itself unless its backward is differentiable."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"kdops.{op} does not support double backward (create_graph=True, e.g. a gradient "
            f"penalty): its backward has no derivative of its own. Use kdops.reference.{op} where "
            "you need higher-order gradients.")


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
    """g * gloss for a gradient computed in forward.

    ``in_place`` (see :func:`saved_grads_reusable`: the graph is freed after this backward, so
    nobody else holds g) scales the saved g itself and returns it -- no allocation, one pass less
    over memory, and when the incoming gradient is exactly 1 (``loss.backward()``) no pass at
    all. Otherwise (``retain_graph=True``) a new tensor is returned, always: the saved g must
    stay as it is for the next backward, and the caller may edit what it gets (gradient
    clipping). ``gloss`` may be a float read on the host already (:func:`level_grads`); a
    tensor is read on the host only when that costs no device sync (never on GPU or when
    tracing)."""
    if not in_place:
        return g * gloss
    if isinstance(gloss, float):
        if gloss == 1.0:
            return g
    elif _host_gloss(gloss) and g.device.type == "cpu" and gloss.numel() == 1 and bool(gloss == 1):
        return g
    return g.mul_(gloss)


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


def saved_grad_autograd(op: str, n_inputs: int) -> Tuple[Callable, Callable]:
    """(backward, setup_context) of a ``*_fwd_grad`` schema whose outputs are (loss, the first input's
    gradient of the loss): the forward pass wrote the gradient, backward only scales it by the
    incoming gradient (:func:`scale_grad`; in place once the graph is freed) and the other
    ``n_inputs - 1`` inputs get none."""

    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # the saved gradient output gets no gradient: no zeros for it
        ctx.mark_non_differentiable(output[1])  # a saved result, not a differentiable function of the inputs
        ctx.save_for_backward(output[1])

    def backward(ctx, gloss, *_):
        if gloss is None:  # no gradient reached the loss (grads are not materialised)
            return (None,) * n_inputs
        forbid_double_backward(op)
        (g,) = ctx.saved_tensors
        return (scale_grad(g, gloss, saved_grads_reusable(gloss)),) + (None,) * (n_inputs - 1)

    return backward, setup_context


Fake = Callable
#: (backward, setup_context) for torch.library.register_autograd, or a kernel for the Autograd
#: dispatch key taking the dispatch keyset first (for ops whose autograd is a custom Function).
Autograd = Union[Tuple[Callable, Callable], Callable]


def register_op(op: str, *, fake: Mapping[str, Fake], autograd: Optional[Mapping[str, Autograd]] = None,
                cuda: Optional[str] = "triton") -> str:
    """Attaches everything Python adds to the schemas of one op (csrc/ops.cpp): the same call for
    every op, at the bottom of kdops/ops/<op>.py.

    Args:
        op: the op's name (its files are kdops/ops/<op>.py, kdops/triton/<op>.py, ...).
        fake: schema name -> fake (meta) kernel, for every schema of the op.
        autograd: schema name -> (backward, setup_context), or a keyset-taking kernel for the
            Autograd key. Schemas without an entry are not differentiable.
        cuda: where the CUDA kernels come from: "triton" (the launchers of kdops/triton/<op>.py,
            one function named after each schema), "cuda" (the C++ kernels csrc/cuda/<op>.cu
            registered by the extension, falling back to Triton when the extension was built
            without CUDA), or None (the op's Python code handles CUDA tensors itself).

    Returns the CUDA backend in use: "cuda", "triton" or "none". Without the compiled extension
    nothing is registered (the references run instead) and "none" is returned.
    """
    if not HAS_C:
        return "none"
    for schema, fn in fake.items():
        torch.library.register_fake(f"kdops::{schema}")(fn)
    for schema, ag in (autograd or {}).items():
        if schema not in fake:
            raise ValueError(f"register_op({op!r}): autograd given for {schema!r}, which has no fake kernel")
        if callable(ag):
            _LIB.impl(schema, ag, "Autograd", with_keyset=True)
        else:
            backward, setup_context = ag
            torch.library.register_autograd(f"kdops::{schema}", backward, setup_context=setup_context)
    if cuda is None:
        return "none"
    if cuda == "cuda" and all(has_kernel(schema, "CUDA") for schema in fake):
        return "cuda"
    if cuda not in ("cuda", "triton"):
        raise ValueError(f"register_op({op!r}): `cuda` must be 'triton', 'cuda' or None, got {cuda!r}")
    from ..triton import HAS_TRITON

    if not HAS_TRITON:
        return "none"
    module = importlib.import_module(f"kdops.triton.{op}")
    for schema in fake:
        _LIB.impl(schema, getattr(module, schema), "CUDA")
    return "triton"
