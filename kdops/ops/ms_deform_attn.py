"""kdops.ms_deform_attn: multi-scale deformable attention (Deformable DETR's core op).

CUDA backends. Two kernels implement the CUDA dispatch key of kdops::ms_deform_attn_{fwd,bwd}:
the CUDA C++ one (csrc/cuda/ms_deform_attn.cu, registered from C++ when kdops is built with
CUDA) and the Triton one (kdops/triton/ms_deform_attn.py). The default is the CUDA C++ kernel
when it was compiled, else Triton. ``KDOPS_MSDA_BACKEND=triton`` (set before importing kdops)
registers the Triton launchers over the C++ ones. :func:`cuda_backend` says which one is active.
"""
from __future__ import annotations

import os

import torch

from .. import reference
from ._registry import forbid_double_backward, host_readable, register_op, use_kernel
from ._validation import check_tensor

OP = "ms_deform_attn"
INDEX_DTYPES = (torch.int64, torch.int32)


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    r"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021).

    .. math::
        \mathrm{out}[n,q,m,:] = \sum_{l=1}^{L} \sum_{p=1}^{P} A_{nqmlp}\,
            \mathrm{bilinear}\big(V^{l}_{n,:,:,m,:},\; x_{nqmlp} W_l - \tfrac12,\; y_{nqmlp} H_l - \tfrac12\big)

    where ``V^l`` is level l of ``value`` seen as an (H_l, W_l) map, ``(x, y) =
    sampling_locations[n,q,m,l,p]`` are normalised to [0,1], and bilinear interpolation reads
    zero outside the map (``grid_sample`` with ``align_corners=False, padding_mode="zeros"``).
    The semantics of mmcv's / Deformable DETR's ``MultiScaleDeformableAttnFunction`` without
    ``im2col_step`` (no batch-divisibility limit).

    Args:
        value: (N, S, M, D), S = sum_l H_l*W_l; fp32/fp16/bf16 (fp64 on CPU).
        spatial_shapes: (L, 2) int64 (int32 accepted) rows (H_l, W_l).
        level_start_index: (L,) int, the exclusive cumulative sum of H_l*W_l.
        sampling_locations: (N, Q, M, L, P, 2), last dim (x, y). Cast to value's dtype (as mmcv).
        attention_weights: (N, Q, M, L, P). Cast to value's dtype (as mmcv).

    Returns:
        (N, Q, M*D) in value's dtype, accumulated in fp32 (fp64 for fp64). Gradients flow to
        value, sampling_locations and attention_weights.

    Validation: shapes, dtypes and devices always. ``S == sum(H*W)``, ``H, W >= 0`` and
    ``level_start_index`` consistency need the host values of ``spatial_shapes``; they are checked
    when ``spatial_shapes`` is a CPU tensor and the call is not being traced by torch.compile.
    For CUDA ``spatial_shapes`` they are not checked (that would cost a device sync on every call);
    the kernels then mask every read to lie inside ``value``, so inconsistent shapes give wrong
    numbers, never an out-of-bounds access. ``spatial_shapes`` and ``level_start_index`` on
    another device than ``value`` are moved to it.
    """
    N, S, M, D, Q, L, P = _validate(value, spatial_shapes, level_start_index, sampling_locations,
                                   attention_weights)
    dev = value.device
    shapes = spatial_shapes.to(dev, torch.int64)
    starts = level_start_index.to(dev, torch.int64)
    loc = sampling_locations.to(value.dtype)
    attn = attention_weights.to(value.dtype)
    if not use_kernel(OP, dev, schema="ms_deform_attn_fwd"):
        return reference.ms_deform_attn(value, shapes, starts, loc, attn)
    return torch.ops.kdops.ms_deform_attn_fwd(value, shapes, starts, loc, attn)


def _validate(value, spatial_shapes, level_start_index, loc, attn):
    check_tensor(OP, "value", value, ndim=4, what="(N,S,M,D)")
    check_tensor(OP, "spatial_shapes", spatial_shapes, ndim=2, dtypes=INDEX_DTYPES, what="(L,2)")
    L = spatial_shapes.shape[0]
    if spatial_shapes.shape[1] != 2:
        raise ValueError(f"kdops.{OP}: `spatial_shapes` must be (L,2) rows (H,W), got {tuple(spatial_shapes.shape)}")
    check_tensor(OP, "level_start_index", level_start_index, dtypes=INDEX_DTYPES, shape=(L,), what="(L,)")
    N, S, M, D = value.shape
    check_tensor(OP, "sampling_locations", loc, ndim=6, like=value, what="(N,Q,M,L,P,2)")
    Q, P = loc.shape[1], loc.shape[4]
    check_tensor(OP, "sampling_locations", loc, shape=(N, Q, M, L, P, 2), what="(N,Q,M,L,P,2)")
    check_tensor(OP, "attention_weights", attn, like=value, shape=(N, Q, M, L, P), what="(N,Q,M,L,P)")
    if host_readable(spatial_shapes) and host_readable(level_start_index):
        hw = spatial_shapes.long()
        if L and bool((hw < 0).any()):
            raise ValueError(f"kdops.{OP}: `spatial_shapes` must be non-negative, got {hw.tolist()}")
        # Python integers: an int64 product or sum could wrap around to S
        sizes = [h * w for h, w in hw.tolist()]
        total = sum(sizes)
        if total != S:
            raise ValueError(
                f"kdops.{OP}: `value` has S={S} rows but `spatial_shapes` {hw.tolist()} sums to "
                f"sum(H*W)={total}; value must be the levels' (H*W) rows concatenated")
        expect = [sum(sizes[:i]) for i in range(L)]
        if level_start_index.long().tolist() != expect:
            raise ValueError(
                f"kdops.{OP}: `level_start_index` must be the exclusive cumulative sum of H*W, "
                f"{expect}, got {level_start_index.tolist()}")
    return N, S, M, D, Q, L, P


def cuda_backend() -> str:
    """The kernel behind kdops::ms_deform_attn on CUDA: "cuda" (C++), "triton" or "none"."""
    return _CUDA_BACKEND


def _fake_fwd(value, spatial_shapes, level_start_index, loc, attn):
    N, _, M, D = value.shape
    return value.new_empty((N, loc.shape[1], M * D))


def _fake_bwd(grad_output, value, spatial_shapes, level_start_index, loc, attn, grad_value, grad_sampling,
              deterministic):
    empty = value.new_empty((0,))
    return (value.new_empty(value.shape) if grad_value else empty,
            loc.new_empty(loc.shape) if grad_sampling else empty,
            attn.new_empty(attn.shape) if grad_sampling else empty)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    forbid_double_backward(OP)
    value, shapes, starts, loc, attn = ctx.saved_tensors
    need = ctx.needs_input_grad
    gv, gl, ga = torch.ops.kdops.ms_deform_attn_bwd(
        grad_output.contiguous(), value, shapes, starts, loc, attn, need[0], need[3] or need[4],
        torch.are_deterministic_algorithms_enabled())
    return (gv if need[0] else None, None, None, gl if need[3] else None, ga if need[4] else None)


_want = os.environ.get("KDOPS_MSDA_BACKEND", "").lower()
if _want not in ("", "cuda", "triton"):
    raise ValueError(f"KDOPS_MSDA_BACKEND must be 'cuda' or 'triton', got {_want!r}")
# CUDA C++ kernel by default (csrc/cuda/ms_deform_attn.cu, when the extension was built with CUDA),
# the Triton kernel when asked for or when there is no C++ one.
_CUDA_BACKEND = register_op(OP, fake={"ms_deform_attn_fwd": _fake_fwd, "ms_deform_attn_bwd": _fake_bwd},
                            autograd={"ms_deform_attn_fwd": (_backward, _setup_context)},
                            cuda="triton" if _want == "triton" else "cuda")
