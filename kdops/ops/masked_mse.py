"""kdops.masked_mse: weighted feature MSE with factorised pixel x channel weights."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import reference
from .._dtype import acc_dtype
from ._registry import forbid_double_backward, needs_grad, register_op, saved_grad_autograd, use_kernel
from ._validation import Levels, check_choice, check_pair, check_tensor, level_scales, match_levels, paired_levels

OP = "masked_mse"
Weights = Optional[Union[torch.Tensor, Sequence[torch.Tensor]]]


def masked_mse(
    student: Levels,
    teacher: Levels,
    *,
    pixel_weight: Weights = None,
    channel_weight: Weights = None,
    reduction: str = "sum",
    scale: Union[float, Sequence[float]] = 1.0,
) -> torch.Tensor:
    r"""Weighted feature-imitation MSE with a factorised weight, in one pass.

    .. math::
        \mathcal{L} = \sum_{n,c,h,w} P_{n,h,w}\, Q_{n,c}\, (S_{n,c,h,w} - T_{n,c,h,w})^2

    with ``P = pixel_weight`` (fg/bg masks times spatial attention) and
    ``Q = channel_weight`` (channel attention); an absent factor is 1. This is the
    feature loss of FitNet (Romero et al. 2015; no weights), FGFI (Wang et al. 2019;
    P = imitation mask), DeFeat (Guo et al. 2021; P = a fg / b bg weights) and FGD
    (Yang et al. 2022; P = (alpha M_fg + beta M_bg) A^S, Q = A^C). The N*C*H*W weight
    tensor is never formed. Forward reads each input once; backward reads them again and
    writes the gradient once (nothing input-sized is kept between the two) -- except on the
    CPU when only the student needs a gradient (the KD case): the forward pass then writes the
    student's gradient as it reads the inputs, and backward scales it (in place, or not at all
    for an incoming gradient of 1, once the graph is freed): one pass over the inputs less, for
    one student-sized buffer held until backward.

    Args:
        student, teacher: (N,C,H,W) tensors of one shape, dtype (fp32/fp16/bf16/fp64)
            and device, or sequences of L such tensors (FPN levels; H,W may differ).
        pixel_weight: (N,H,W) per level, or None.
        channel_weight: (N,C) per level, or None.
        reduction: "sum", or "mean" (divides by N*C*H*W; an empty level gives 0).
        scale: a number, or for sequences one per level, multiplying each loss (and so its
            gradients) inside the op. Fold a constant loss weight here rather than multiplying
            the result: on the CPU in the KD case backward then has nothing left to scale when
            its incoming gradient is 1 (``total_loss.backward()`` over a sum of losses) -- one
            pass over the student's gradient less.

    Returns:
        A 0-d tensor, or (L,) per-level losses for sequences; float32 for
        fp32/fp16/bf16 inputs (a sum over millions of elements overflows fp16),
        float64 for float64. Gradients flow to every input that requires grad.
    """
    check_choice(OP, "reduction", reduction, ("sum", "mean"))
    (ss, ts), is_seq = paired_levels(OP, ("student", "teacher"), student, teacher)
    pws = match_levels(OP, "pixel_weight", pixel_weight, len(ss), is_seq)
    cws = match_levels(OP, "channel_weight", channel_weight, len(ss), is_seq)
    for i, (s, t, pw, cw) in enumerate(zip(ss, ts, pws, cws)):
        lvl = i if is_seq else None
        sfx = "" if lvl is None else f"[{lvl}]"
        check_pair(OP, s, t, lvl)
        N, C, H, W = s.shape
        if pw is not None:
            check_tensor(OP, f"pixel_weight{sfx}", pw, like=s, shape=(N, H, W), what="(N,H,W)")
        if cw is not None:
            check_tensor(OP, f"channel_weight{sfx}", cw, like=s, shape=(N, C), what="(N,C)")
    scales = level_scales(OP, scale, len(ss), is_seq)
    losses = [_level(*args, reduction) for args in zip(ss, ts, pws, cws, scales)]
    return torch.stack(losses) if is_seq else losses[0]


def _level(s, t, pw, cw, out_scale, reduction):
    if not use_kernel(OP, s.device):
        loss = reference.masked_mse(s, t, pixel_weight=pw, channel_weight=cw, reduction=reduction)
        return loss if out_scale == 1.0 else loss * out_scale
    acc = acc_dtype(s.dtype)
    scale = (1.0 / max(s.numel(), 1) if reduction == "mean" else 1.0) * out_scale
    pw = pw.to(acc) if pw is not None else None
    cw = cw.to(acc) if cw is not None else None
    if s.device.type == "cpu" and needs_grad(s) and not needs_grad(t, pw, cw):
        # CPU, the usual KD case (only the student learns): the gradient comes out of the forward
        # pass, which reads the inputs anyway; backward only scales it. One student-sized buffer is
        # held from forward to backward (as autograd holds the student itself) for one pass over the
        # inputs less: the loss and its gradient then cost what reading both maps and writing one does.
        return torch.ops.kdops.masked_mse_fwd_grad(s, t, pw, cw, scale)[0]
    return torch.ops.kdops.masked_mse_fwd(s, t, pw, cw, scale)


def _fake_fwd(s, t, pw, cw, scale):
    return s.new_empty((), dtype=acc_dtype(s.dtype))


def _fake_bwd(gl, s, t, pw, cw, scale, grad_input, grad_weights):
    acc = acc_dtype(s.dtype)
    grad = s.new_empty(s.shape) if grad_input else s.new_empty((0,))
    gpw = pw.new_empty(pw.shape) if (grad_weights and pw is not None) else s.new_empty((0,), dtype=acc)
    gcw = cw.new_empty(cw.shape) if (grad_weights and cw is not None) else s.new_empty((0,), dtype=acc)
    return grad, gpw, gcw


def _setup_context(ctx, inputs, output):
    s, t, pw, cw, scale = inputs
    ctx.save_for_backward(s, t, pw, cw)
    ctx.scale = scale


def _backward(ctx, gloss):
    forbid_double_backward(OP)
    s, t, pw, cw = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad, gpw, gcw = torch.ops.kdops.masked_mse_bwd(
        gloss, s, t, pw, cw, ctx.scale, bool(need[0] or need[1]), bool(need[2] or need[3])
    )
    return (
        grad if need[0] else None,
        -grad if need[1] else None,
        gpw if need[2] else None,
        gcw if need[3] else None,
        None,
    )


def _fake_fwd_grad(s, t, pw, cw, scale):
    return s.new_empty((), dtype=acc_dtype(s.dtype)), s.new_empty(s.shape)


register_op(OP, fake={"masked_mse_fwd": _fake_fwd, "masked_mse_bwd": _fake_bwd, "masked_mse_fwd_grad": _fake_fwd_grad},
            autograd={"masked_mse_fwd": (_backward, _setup_context),
                      "masked_mse_fwd_grad": saved_grad_autograd(OP, 5)})
