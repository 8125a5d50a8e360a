r"""kdops.bckd_cls_loss and kdops.bckd_loc_loss: BCKD's distillation losses, fused.

Pan et al., "Bridging Cross-task Protocol Inconsistency for Distillation in Dense Object
Detection" (ICCV 2023); semantics of the authors' ``novel_kd_loss`` and of the
``loss_score_kd`` branch of their ``LDHead`` (github.com/TinyTigerPan/BCKD).

Gradients (derived here, checked against autograd of the eager formulas and by float64
gradcheck). Classification, per element with :math:`p=\sigma(t)`, :math:`q=\sigma(s)`,
:math:`d=p-q`, :math:`B=\mathrm{BCE}(s,p)`:
:math:`\partial_s [B|d|^\beta] = (q-p)|d|^\beta - B\,\beta|d|^{\beta-1}\mathrm{sign}(d)\,q(1-q)`
(the gap weight is not detached on the student side, as in the authors' code).
Localisation: the chain GIoU -> box -> decoder (distances; GFL's softmax integral,
:math:`\partial z_b = g_d\,p_b(b-d)`; DeltaXYWH with its clamp), written out in the kernels.

Conventions, matching PyTorch autograd of the eager formulas: ties of max/min (e.g. a student
box edge equal to the teacher's) split the gradient evenly; ``clamp`` passes no gradient at its
bounds (IoU-loss floor, zero-width intersections, DeltaXYWH's ``wh_ratio_clip``). Where
:math:`p = q` exactly the gap's gradient is 0 (for ``beta < 1`` PyTorch gives NaN there).
``avg_factor`` divides as mmdet's ``weight_reduce_loss``: ``sum / (avg_factor + 1.19e-7)``.
Unlike the authors' head, the terms are not replaced by 0 for a level without positives
(that branch needs a host sync). No copy is made of logits or regression maps in either
supported layout; priors, per-anchor weights and strides are cast to float32 (small).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from .. import reference
from .._extension import HAS_C
from ._common import (
    _LIB, acc_dtype, anchor_view, as_levels, check_avg_factor, check_tensor, divide_by_avg_factor, kernel_scale,
    level_grads, match_levels, needs_grad, register_cuda, saved_grads_reusable, scale_grads, use_kernel,
)

Levels = Union[torch.Tensor, Sequence[torch.Tensor]]
_DECODERS = {"distance": 0, "gfl": 1, "delta_xywh": 2}
_LOSSES = {"giou": 0, "iou": 1}


def _check_logits(op, s, t, sfx):
    check_tensor(op, f"student_logits{sfx}", s, what="(A,K) or (N,J*K,H,W)")
    check_tensor(op, f"teacher_logits{sfx}", t, like=s, what="(A,K) or (N,J*K,H,W)")
    if s.dim() not in (2, 4):
        raise ValueError(f"kdops.{op}: `student_logits{sfx}` must be (A,K) or (N,J*K,H,W), got shape {tuple(s.shape)}")
    if s.shape != t.shape:
        raise ValueError(f"kdops.{op}: `teacher_logits{sfx}` must have the shape of `student_logits{sfx}` "
                         f"{tuple(s.shape)}, got {tuple(t.shape)}")
    if s.dtype != t.dtype:
        raise TypeError(f"kdops.{op}: `student_logits{sfx}` is {s.dtype} but `teacher_logits{sfx}` is {t.dtype}")


def _n_anchor_sites(x):
    return x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[2] * x.shape[3]


def _check_weight(op, w, A, like, sfx):
    if w is None:
        return None
    check_tensor(op, f"weight{sfx}", w, like=like)
    if w.numel() != A:
        raise ValueError(f"kdops.{op}: `weight{sfx}` must hold one value per anchor ({A}), got shape {tuple(w.shape)}")
    return w.reshape(-1)


def _check_reduction(op, reduction, beta=None):
    if reduction not in ("sum", "mean"):
        raise ValueError(f"kdops.{op}: `reduction` must be 'sum' or 'mean', got {reduction!r}")
    if beta is not None and (not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0):
        raise ValueError(f"kdops.{op}: `beta` must be a number > 0, got {beta!r}")


# =========================================================================== classification
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
    _check_reduction(op, reduction, beta)
    ss, seq = as_levels(op, "student_logits", student_logits)
    ts, t_seq = as_levels(op, "teacher_logits", teacher_logits)
    if t_seq != seq or len(ts) != len(ss):
        raise ValueError(f"kdops.{op}: `student_logits` and `teacher_logits` must both be tensors or sequences of "
                         f"equal length, got {len(ss)} and {len(ts)} levels")
    ws = match_levels(op, "weight", weight, len(ss), seq)
    views = []
    for i, (s, t, w) in enumerate(zip(ss, ts, ws)):
        sfx = f"[{i}]" if seq else ""
        _check_logits(op, s, t, sfx)
        sites = _n_anchor_sites(s)
        if s.dim() == 2:
            K = s.shape[1]
        else:
            J = (w.numel() // sites if sites else 1) if w is not None else 1
            if J < 1 or s.shape[1] % J:
                raise ValueError(f"kdops.{op}: `weight{sfx}` implies {J} anchors per location, which does not "
                                 f"divide the {s.shape[1]} channels of `student_logits{sfx}`")
            K = s.shape[1] // J
        A = sites * (s.shape[1] // K if s.dim() == 4 and K else 1)
        views.append((s, t, _check_weight(op, w, A, s, sfx), K, A))
    avg_factor = check_avg_factor(op, avg_factor, ss[0])
    out = [_cls_level(s, t, w, K, A, beta, reduction, avg_factor) for s, t, w, K, A in views]
    loss = torch.stack(out) if seq else out[0]
    return divide_by_avg_factor(loss, kernel_scale(reduction, 1, avg_factor)[1])


def _cls_level(s, t, w, K, A, beta, reduction, avg_factor):
    scale, _ = kernel_scale(reduction, A, avg_factor)
    if not use_kernel("bckd_cls_loss", s.device):
        return reference.bckd_cls_loss(s, t, weight=w, beta=beta, reduction="sum") * scale
    acc = acc_dtype(s.dtype)
    loss, _, _ = torch.ops.kdops.bckd_cls_fwd(
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
    ctx.save_for_backward(output[1], output[2])


def _cls_backward(ctx, gloss, *_):
    if gloss is None:  # no gradient reached the loss (grads are not materialised)
        return (None,) * 7
    g, gw = ctx.saved_tensors
    need = ctx.needs_input_grad
    f = level_grads(gloss, 1)[0]
    g, gw = scale_grads([g if need[0] else None, gw if need[2] else None], [f, f], saved_grads_reusable(gloss))
    return (g, None, gw, None, None, None, None)


# =========================================================================== localisation
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
    _check_reduction(op, reduction)
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
    srs, seq = as_levels(op, "student_reg", student_reg)
    L = len(srs)
    names = ("teacher_reg", "student_logits", "teacher_logits", "priors")
    others = []
    for name, x in zip(names, (teacher_reg, student_logits, teacher_logits, priors)):
        xs, x_seq = as_levels(op, name, x)
        if x_seq != seq or len(xs) != L:
            raise ValueError(f"kdops.{op}: `{name}` must match `student_reg`: {'a sequence of ' + str(L) if seq else 'a tensor'}")
        others.append(xs)
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
    _check_logits(op, sl, tl, sfx)
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
    A = _n_anchor_sites(sr) * J
    check_tensor(op, f"priors{sfx}", pr, ndim=2, like=sr, what="(M,4) anchors or (M,2) points")
    if pr.shape[1] not in (2, 4) or (decoder == "delta_xywh" and pr.shape[1] != 4):
        raise ValueError(f"kdops.{op}: `priors{sfx}` must be (M,4) anchors{'' if decoder == 'delta_xywh' else ' or (M,2) points'}, "
                         f"got shape {tuple(pr.shape)}")
    if A and (pr.shape[0] == 0 or A % pr.shape[0]):
        raise ValueError(f"kdops.{op}: `priors{sfx}` must have A={A} rows or a divisor of A (rows shared by the "
                         f"images), got shape {tuple(pr.shape)}")
    w = _check_weight(op, w, A, sr, sfx)
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
    """Every level in one kdops::bckd_loc_fwd call (one autograd node); returns (L,) losses."""
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
    loss, _, _ = torch.ops.kdops.bckd_loc_fwd(
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
    acc = torch.float64 if any(s.dtype == torch.float64 for s in srs) else torch.float32
    gs = [torch.empty_like(s) if grad_reg else s.new_empty((0,)) for s in srs]
    gws = [w.new_empty(w.shape) if (grad_weight and w is not None) else s.new_empty((0,), dtype=acc)
           for s, w in zip(srs, ws)]
    return srs[0].new_empty((len(srs),), dtype=acc), gs, gws


class _LocAutograd(torch.autograd.Function):
    """Autograd of kdops::bckd_loc_fwd: the op runs below autograd and its loss is this
    Function's only output; its differentiable inputs are just the student regressions and the
    weights (the other L-long lists pass through as one opaque argument). The op's gradient
    outputs are handed back through ``out`` as plain tensors. (torch.library.register_autograd
    would flatten all seven L-long tensor lists with pytree on every call and in backward:
    ~0.4 ms per step for five FPN levels, more than the whole backward pass otherwise costs.)"""

    @staticmethod
    def forward(ctx, keyset, args, out, *tensors):
        with torch._C._AutoDispatchBelowAutograd():
            loss, gs, gws = torch.ops.kdops.bckd_loc_fwd.default.redispatch(
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
            return torch.ops.kdops.bckd_loc_fwd.default.redispatch(keyset & torch._C._after_autograd_keyset, *args)
    out = []
    loss = _LocAutograd.apply(keyset, args, out, *tensors)
    return loss, out[0], out[1]


if HAS_C:
    torch.library.register_fake("kdops::bckd_cls_fwd")(_cls_fake)
    torch.library.register_autograd("kdops::bckd_cls_fwd", _cls_backward, setup_context=_cls_setup)
    torch.library.register_fake("kdops::bckd_loc_fwd")(_loc_fake)
    _LIB.impl("bckd_loc_fwd", _loc_autograd, "Autograd", with_keyset=True)
    from ..triton import HAS_TRITON

    if HAS_TRITON:
        from ..triton.bckd import bckd_cls_fwd as _triton_cls, bckd_loc_fwd as _triton_loc

        register_cuda("bckd_cls_fwd", _triton_cls)
        register_cuda("bckd_loc_fwd", _triton_loc)

__all__ = ["bckd_cls_loss", "bckd_loc_loss"]
