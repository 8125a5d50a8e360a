r"""kdops.bckd_cls_loss: BCKD's classification distillation, fused (loss and gradient in one pass).

Pan et al., "Bridging Cross-task Protocol Inconsistency for Distillation in Dense Object
Detection" (ICCV 2023); semantics of the authors' ``novel_kd_loss`` (github.com/TinyTigerPan/BCKD).

Gradient (derived here, checked against autograd of the eager formula and by float64
gradcheck), per element with :math:`p=\sigma(t)`, :math:`q=\sigma(s)`, :math:`d=p-q`,
:math:`B=\mathrm{BCE}(s,p)`:
:math:`\partial_s [B|d|^\beta] = (q-p)|d|^\beta - B\,\beta|d|^{\beta-1}\mathrm{sign}(d)\,q(1-q)`
(the gap weight is not detached on the student side, as in the authors' code). Where
:math:`p = q` exactly the gap's gradient is 0 (for ``beta < 1`` PyTorch gives NaN there).
``avg_factor`` divides as mmdet's ``weight_reduce_loss``: ``sum / (avg_factor + 1.19e-7)``.
The logits are read in place in either layout (no copy); per-anchor weights are cast to the
accumulation dtype (small).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from .. import reference
from .._dtype import acc_dtype
from ._dense_head import (
    anchor_view, check_anchor_weight, check_logits, check_reduction, divide_by_avg_factor,
    kernel_scale, n_anchor_sites,
)
from ._registry import forbid_double_backward, level_grads, needs_grad, register_op, saved_grads_reusable, scale_grads, use_kernel
from ._validation import check_avg_factor, match_levels, paired_levels

OP = "bckd_cls_loss"
Levels = Union[torch.Tensor, Sequence[torch.Tensor]]


def bckd_cls_loss(student_logits: Levels, teacher_logits: Levels, *, weight=None, beta: float = 1.0,
                  reduction: str = "sum", avg_factor=None) -> torch.Tensor:
    r"""BCKD classification distillation, loss and student gradient in one pass.

    .. math::
        \mathcal{L} = \frac{1}{Z}\sum_a w_a \sum_k \mathrm{BCE}(s_{ak}, p_{ak})\,|p_{ak} - \sigma(s_{ak})|^{\beta},
        \qquad p = \sigma(t)\ \text{(teacher detached)}

    The gap :math:`|p-\sigma(s)|^\beta` is *not* detached: its gradient flows to the student,
    as in the authors' ``novel_kd_loss``. :math:`Z` = 1 (``reduction="sum"``), A (``"mean"``),
    or ``avg_factor + 1.19e-7`` when ``avg_factor`` is given (mmdet's ``weight_reduce_loss``).

    Args:
        student_logits, teacher_logits: (A,K) or mmdet's (N,J*K,H,W) head output (J anchors per
            location; anchors ordered (n,h,w,j) as ``permute(0,2,3,1).reshape(-1,K)``), read in
            place through their strides -- or sequences of L such tensors (FPN levels).
        weight: per-anchor weight (label weights), A values per level, or None. For
            (N,J*K,H,W) inputs with J > 1 it also fixes J (A = N*H*W*J).
        beta: exponent of the gap (> 0; 1 in the paper).
        reduction: "sum" or "mean" (over anchors); ignored when ``avg_factor`` is given.
        avg_factor: None, a number or a 1-element tensor (kept on device: no host sync).

    Returns:
        0-d loss, or (L,) per-level losses for sequences; float32 (float64 for float64 inputs).
        Gradients flow to ``student_logits`` (and ``weight`` if it requires grad).
    """
    op = "bckd_cls_loss"
    check_reduction(op, reduction, beta)
    (ss, ts), seq = paired_levels(op, ("student_logits", "teacher_logits"), student_logits, teacher_logits)
    ws = match_levels(op, "weight", weight, len(ss), seq)
    views = []
    for i, (s, t, w) in enumerate(zip(ss, ts, ws)):
        sfx = f"[{i}]" if seq else ""
        check_logits(op, s, t, sfx)
        sites = n_anchor_sites(s)
        if s.dim() == 2:
            K = s.shape[1]
        else:
            J = (w.numel() // sites if sites else 1) if w is not None else 1
            if J < 1 or s.shape[1] % J:
                raise ValueError(f"kdops.{op}: `weight{sfx}` implies {J} anchors per location, which does not "
                                 f"divide the {s.shape[1]} channels of `student_logits{sfx}`")
            K = s.shape[1] // J
        A = sites * (s.shape[1] // K if s.dim() == 4 and K else 1)
        views.append((s, t, check_anchor_weight(op, w, A, s, sfx), K, A))
    avg_factor = check_avg_factor(op, avg_factor, ss[0])
    out = [_cls_level(s, t, w, K, A, beta, reduction, avg_factor) for s, t, w, K, A in views]
    loss = torch.stack(out) if seq else out[0]
    return divide_by_avg_factor(loss, kernel_scale(reduction, 1, avg_factor)[1])


def _cls_level(s, t, w, K, A, beta, reduction, avg_factor):
    scale, _ = kernel_scale(reduction, A, avg_factor)
    if not use_kernel("bckd_cls_loss", s.device):
        return reference.bckd_cls_loss(s, t, weight=w, beta=beta, reduction="sum") * scale
    acc = acc_dtype(s.dtype)
    loss, _, _ = torch.ops.kdops.bckd_cls_loss_fwd(
        anchor_view(s, K), anchor_view(t.detach(), K), w.to(acc) if w is not None else None,
        float(beta), scale, needs_grad(s), needs_grad(w))
    return loss


def _cls_fake(s, t, w, beta, scale, grad_student, grad_weight):
    acc = acc_dtype(s.dtype)
    g = torch.empty_like(s) if grad_student else s.new_empty((0,))
    gw = w.new_empty((w.numel(),)) if (grad_weight and w is not None) else s.new_empty((0,), dtype=acc)
    return s.new_empty((), dtype=acc), g, gw


def _cls_setup(ctx, inputs, output):
    # the gradient outputs never receive gradients: without this autograd would allocate
    # zero tensors the size of the logits for them on every backward
    ctx.set_materialize_grads(False)
    # they are saved results, not functions of the inputs with a derivative: without this they
    # would come back requiring grad, with this node as grad_fn (a silently wrong double backward)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[1], output[2])


def _cls_backward(ctx, gloss, *_):
    if gloss is None:  # no gradient reached the loss (grads are not materialised)
        return (None,) * 7
    forbid_double_backward(OP)
    g, gw = ctx.saved_tensors
    need = ctx.needs_input_grad
    f = level_grads(gloss, 1)[0]
    g, gw = scale_grads([g if need[0] else None, gw if need[2] else None], [f, f], saved_grads_reusable(gloss))
    return (g, None, gw, None, None, None, None)


register_op(OP, fake={"bckd_cls_loss_fwd": _cls_fake}, autograd={"bckd_cls_loss_fwd": (_cls_backward, _cls_setup)})

__all__ = ["bckd_cls_loss"]
