r"""kdops.bckd_loc_loss: BCKD's localisation distillation, fused with box decoding and (G)IoU.

Pan et al., "Bridging Cross-task Protocol Inconsistency for Distillation in Dense Object
Detection" (ICCV 2023); semantics of the ``loss_score_kd`` branch of the authors' ``LDHead``
(github.com/TinyTigerPan/BCKD).

Gradient: the chain GIoU -> box -> decoder (distances; GFL's softmax integral,
:math:`\partial z_b = g_d\,p_b(b-d)`; DeltaXYWH with its clamp), written out in the kernels
and checked against autograd of the eager formulas and by float64 gradcheck.

Conventions, matching PyTorch autograd of the eager formulas: ties of max/min (e.g. a student
box edge equal to the teacher's) split the gradient evenly; ``clamp`` passes no gradient at its
bounds (IoU-loss floor, zero-width intersections, DeltaXYWH's ``wh_ratio_clip``).
``avg_factor`` divides as mmdet's ``weight_reduce_loss``: ``sum / (avg_factor + 1.19e-7)``.
Unlike the authors' head, the terms are not replaced by 0 for a level without positives
(that branch needs a host sync). No copy is made of logits or regression maps in either
supported layout; priors, per-anchor weights and strides are cast to float32 (small).
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from .. import reference
from ._dense_head import (
    check_anchor_weight, check_logits, check_reduction, divide_by_avg_factor, kernel_scale,
    n_anchor_sites,
)
from ._registry import (
    forbid_double_backward, level_grads, needs_grad, register_op, saved_grads_reusable, scale_grads, use_kernel,
)
from ._validation import check_avg_factor, check_tensor, match_levels, paired_levels

OP = "bckd_loc_loss"
Levels = Union[torch.Tensor, Sequence[torch.Tensor]]
_DECODERS = {"distance": 0, "gfl": 1, "delta_xywh": 2}
_LOSSES = {"giou": 0, "iou": 1}


def bckd_loc_loss(student_reg: Levels, teacher_reg: Levels, student_logits: Levels, teacher_logits: Levels,
                  priors: Levels, *, decoder: str = "distance", loss: str = "giou", weight=None, avg_factor=None,
                  reduction: str = "sum", reg_max: int = 16, strides=None,
                  means: Sequence[float] = (0.0, 0.0, 0.0, 0.0), stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                  wh_ratio_clip: float = 16 / 1000) -> torch.Tensor:
    r"""BCKD localisation distillation: decoding, (G)IoU and weighting fused per anchor.

    .. math::
        \mathcal{L} = \frac{1}{Z}\sum_a \underbrace{\max_k|\sigma(t_{ak}) - \sigma(s_{ak})|}_{\text{detached}}
        \, w_a \,\big(1 - \mathrm{GIoU}(\mathrm{dec}(r^s_a), \mathrm{dec}(r^t_a))\big)

    Teacher boxes and both logits are detached; the gradient flows to ``student_reg`` (and
    ``weight``). Boxes are decoded per anchor inside the kernel and never stored.

    Decoders (``priors`` give, per anchor, an (x1,y1,x2,y2) anchor or an (x,y) point):
      - ``"distance"``: mmdet's DistancePointBBoxCoder, (x-l, y-t, x+r, y+b) from the point
        (an anchor's centre); with ``strides`` the point is divided by the stride first.
      - ``"gfl"``: GFL's Integral (softmax over ``reg_max+1`` bins per side, expectation of the
        bin index), then the distance decoder at centre/stride -- exactly the authors'
        ``LDHead``, which works in stride units. ``strides`` is required.
      - ``"delta_xywh"``: mmdet's DeltaXYWHBBoxCoder.decode with ``means``, ``stds``,
        ``wh_ratio_clip`` (no ``max_shape`` clipping); ``priors`` must be anchors.
    ``loss="giou"``: mmdet's GIoULoss (bbox_overlaps eps 1e-6); ``"iou"``: 1 - max(IoU, 1e-6),
    mmdet's IoULoss(mode="linear").

    Args:
        student_reg, teacher_reg: (A,D) or (N,J*D,H,W), D = 4 or 4*(reg_max+1) for gfl; or
            sequences of L levels.
        student_logits, teacher_logits: (A,K) or (N,J*K,H,W), same anchors.
        priors: (M,4) anchors or (M,2) points with A a multiple of M (M = H*W*J rows shared by
            the N images, or one row per anchor), per level.
        weight: per-anchor weight, A values per level, or None.
        strides: a number (or, for flattened multi-level input, an (A,) tensor); a sequence of
            L numbers for sequences.
        avg_factor, reduction: as in :func:`bckd_cls_loss`.

    Returns:
        0-d loss, or (L,) per-level losses for sequences.
    """
    op = "bckd_loc_loss"
    check_reduction(op, reduction)
    if decoder not in _DECODERS:
        raise ValueError(f"kdops.{op}: `decoder` must be one of {sorted(_DECODERS)}, got {decoder!r}")
    if loss not in _LOSSES:
        raise ValueError(f"kdops.{op}: `loss` must be 'giou' or 'iou', got {loss!r}")
    if not isinstance(reg_max, int) or reg_max < 0:
        raise ValueError(f"kdops.{op}: `reg_max` must be an int >= 0, got {reg_max!r}")
    if len(tuple(means)) != 4 or len(tuple(stds)) != 4:
        raise ValueError(f"kdops.{op}: `means` and `stds` must have 4 values each, got {means!r}, {stds!r}")
    if decoder == "gfl" and strides is None:
        raise ValueError(f"kdops.{op}: decoder='gfl' needs `strides` (one per level)")
    if decoder == "delta_xywh" and strides is not None:
        raise ValueError(f"kdops.{op}: `strides` is only used by the 'distance' and 'gfl' decoders")
    (srs, *others), seq = paired_levels(
        op, ("student_reg", "teacher_reg", "student_logits", "teacher_logits", "priors"),
        student_reg, teacher_reg, student_logits, teacher_logits, priors)
    L = len(srs)
    ws = match_levels(op, "weight", weight, L, seq)
    if strides is None or not seq:
        sts = [strides] * L
    elif not isinstance(strides, (list, tuple)) or len(strides) != L:
        raise ValueError(f"kdops.{op}: `strides` must be a sequence of {L} numbers (one per level), got {strides!r}")
    else:
        sts = list(strides)
    D = 4 * (reg_max + 1) if decoder == "gfl" else 4
    levels = [_check_loc_level(op, f"[{i}]" if seq else "", D, decoder, *args)
              for i, args in enumerate(zip(srs, *others, ws, sts))]
    avg_factor = check_avg_factor(op, avg_factor, srs[0])
    cfg = (_DECODERS[decoder], _LOSSES[loss], reg_max, [float(m) for m in means], [float(s) for s in stds],
           abs(math.log(wh_ratio_clip)))
    if use_kernel(op, srs[0].device):
        res = _loc_kernel(op, levels, cfg, reduction, avg_factor)
        res = res if seq else res.reshape(())
    else:
        out = [_loc_reference(*lv, cfg, reduction, avg_factor, decoder, loss, wh_ratio_clip) for lv in levels]
        res = torch.stack(out) if seq else out[0]
    return divide_by_avg_factor(res, kernel_scale(reduction, 1, avg_factor)[1])


def _check_loc_level(op, sfx, D, decoder, sr, tr, sl, tl, pr, w, st):
    check_tensor(op, f"student_reg{sfx}", sr, what="(A,D) or (N,J*D,H,W)")
    check_tensor(op, f"teacher_reg{sfx}", tr, like=sr)
    if sr.dim() not in (2, 4) or sr.shape != tr.shape or sr.dtype != tr.dtype:
        raise ValueError(f"kdops.{op}: `student_reg{sfx}` and `teacher_reg{sfx}` must be (A,{D}) or (N,J*{D},H,W) "
                         f"of one shape and dtype, got {tuple(sr.shape)} {sr.dtype} and {tuple(tr.shape)} {tr.dtype}")
    if sr.shape[1] % D or (sr.dim() == 2 and sr.shape[1] != D) or sr.shape[1] == 0:
        raise ValueError(f"kdops.{op}: `student_reg{sfx}` must have {D} values per anchor for decoder={decoder!r}, "
                         f"got shape {tuple(sr.shape)}")
    check_logits(op, sl, tl, sfx)
    if sl.dtype != sr.dtype:
        raise TypeError(f"kdops.{op}: `student_logits{sfx}` is {sl.dtype} but `student_reg{sfx}` is {sr.dtype}")
    J = sr.shape[1] // D if sr.dim() == 4 else 1
    ok = sl.dim() == sr.dim() and (sl.shape[0] == sr.shape[0] if sr.dim() == 2 else
                                   (sl.shape[0], sl.shape[2], sl.shape[3]) == (sr.shape[0], sr.shape[2], sr.shape[3])
                                   and sl.shape[1] % J == 0)
    if not ok:
        raise ValueError(f"kdops.{op}: `student_logits{sfx}` {tuple(sl.shape)} must cover the anchors of "
                         f"`student_reg{sfx}` {tuple(sr.shape)} in the same layout")
    K = sl.shape[1] // J
    A = n_anchor_sites(sr) * J
    check_tensor(op, f"priors{sfx}", pr, ndim=2, like=sr, what="(M,4) anchors or (M,2) points")
    if pr.shape[1] not in (2, 4) or (decoder == "delta_xywh" and pr.shape[1] != 4):
        raise ValueError(f"kdops.{op}: `priors{sfx}` must be (M,4) anchors{'' if decoder == 'delta_xywh' else ' or (M,2) points'}, "
                         f"got shape {tuple(pr.shape)}")
    if A and (pr.shape[0] == 0 or A % pr.shape[0]):
        raise ValueError(f"kdops.{op}: `priors{sfx}` must have A={A} rows or a divisor of A (rows shared by the "
                         f"images), got shape {tuple(pr.shape)}")
    w = check_anchor_weight(op, w, A, sr, sfx)
    if isinstance(st, torch.Tensor):
        check_tensor(op, f"strides{sfx}", st, like=sr)
        if st.numel() != A:
            raise ValueError(f"kdops.{op}: a tensor `strides{sfx}` must hold one stride per anchor ({A}), got "
                             f"shape {tuple(st.shape)}")
        st = st.reshape(-1)
    elif st is not None and (not isinstance(st, (int, float)) or isinstance(st, bool) or not st > 0):
        raise ValueError(f"kdops.{op}: `strides{sfx}` must be positive numbers, got {st!r}")
    return sr, tr, sl, tl, pr, w, st, D, K, A


def _loc_kernel(op, levels, cfg, reduction, avg_factor):
    """Every level in one kdops::bckd_loc_loss_fwd call (one autograd node); returns (L,) losses."""
    dec, mode, reg_max, means, stds, max_ratio = cfg
    dev = levels[0][0].device
    srs, trs, sls, tls, prs, ws, sts, st_vals, scales = [], [], [], [], [], [], [], [], []
    for i, (sr, tr, sl, tl, pr, w, st, D, K, A) in enumerate(levels):
        if sr.device != dev:
            raise ValueError(f"kdops.{op}: `student_reg[{i}]` is on {sr.device} but `student_reg[0]` on {dev}; "
                             "move every level to one device")
        srs.append(sr)
        trs.append(tr)
        sls.append(sl)
        tls.append(tl)
        prs.append(pr)
        ws.append(w)
        sts.append(st if isinstance(st, torch.Tensor) else None)
        st_vals.append(float(st) if isinstance(st, (int, float)) else 0.0)
        scales.append(kernel_scale(reduction, A, avg_factor)[0])
    loss, _, _ = torch.ops.kdops.bckd_loc_loss_fwd(
        srs, trs, sls, tls, prs, ws, sts, st_vals, dec, mode, reg_max, means, stds, max_ratio, scales,
        needs_grad(*srs), needs_grad(*ws))
    return loss


def _loc_reference(sr, tr, sl, tl, pr, w, st, D, K, A, cfg, reduction, avg_factor, decoder, loss, wh_ratio_clip):
    """Devices without a kernel: the eager reference, one level."""
    _, _, reg_max, means, stds, _ = cfg
    scale, _ = kernel_scale(reduction, A, avg_factor)
    return reference.bckd_loc_loss(sr, tr, sl, tl, pr, decoder=decoder, loss=loss, weight=w, reduction="sum",
                                   reg_max=reg_max, strides=st, means=means, stds=stds,
                                   wh_ratio_clip=wh_ratio_clip) * scale


def _loc_fake(srs, trs, sls, tls, prs, ws, sts, st_vals, dec, mode, reg_max, means, stds, max_ratio, scales,
              grad_reg, grad_weight):
    acc = torch.float64 if any(s.dtype == torch.float64 for s in srs) else torch.float32  # any level in fp64
    gs = [torch.empty_like(s) if grad_reg else s.new_empty((0,)) for s in srs]
    gws = [w.new_empty(w.shape) if (grad_weight and w is not None) else s.new_empty((0,), dtype=acc)
           for s, w in zip(srs, ws)]
    return srs[0].new_empty((len(srs),), dtype=acc), gs, gws


class _LocAutograd(torch.autograd.Function):
    """Autograd of kdops::bckd_loc_loss_fwd: the op runs below autograd and its loss is this
    Function's only output; its differentiable inputs are just the student regressions and the
    weights (the other L-long lists pass through as one opaque argument). The op's gradient
    outputs are handed back through ``out`` as plain tensors. (torch.library.register_autograd
    would flatten all seven L-long tensor lists with pytree on every call and in backward:
    ~0.4 ms per step for five FPN levels, more than the whole backward pass otherwise costs.)"""

    @staticmethod
    def forward(ctx, keyset, args, out, *tensors):
        with torch._C._AutoDispatchBelowAutograd():
            loss, gs, gws = torch.ops.kdops.bckd_loc_loss_fwd.default.redispatch(
                keyset & torch._C._after_autograd_keyset, *args)
        L = len(gs)
        ctx.set_materialize_grads(False)
        ctx.levels = L
        ctx.weighted = [i for i, w in enumerate(args[5]) if w is not None]  # weight index per extra input
        ctx.save_for_backward(*gs, *(gws[i] for i in ctx.weighted))
        out.extend((gs, gws))
        return loss

    @staticmethod
    def backward(ctx, gloss):
        n_in = ctx.levels + len(ctx.weighted)
        if gloss is None:
            return (None,) * (3 + n_in)
        forbid_double_backward(OP)
        L = ctx.levels
        saved = ctx.saved_tensors
        need = ctx.needs_input_grad[3:]
        scales, reuse = level_grads(gloss, L), saved_grads_reusable(gloss)
        # one entry per differentiable input (regressions, then the given weights), in order
        todo = [g if n else None for g, n in zip(saved, need)]
        return (None, None, None, *scale_grads(todo, scales + [scales[i] for i in ctx.weighted], reuse))


def _loc_autograd(keyset, *args):
    srs, ws = args[0], args[5]
    tensors = [*srs, *(w for w in ws if w is not None)]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.kdops.bckd_loc_loss_fwd.default.redispatch(keyset & torch._C._after_autograd_keyset, *args)
    out = []
    loss = _LocAutograd.apply(keyset, args, out, *tensors)
    return loss, out[0], out[1]


register_op(OP, fake={"bckd_loc_loss_fwd": _loc_fake}, autograd={"bckd_loc_loss_fwd": _loc_autograd})

__all__ = ["bckd_loc_loss"]
