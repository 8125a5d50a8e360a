r"""HEAD's R-CNN sampling in fixed shapes: the assistant's RoIs without a host synchronisation.

HEAD (Wang et al., ECCV 2022) trains an assistant R-CNN head on the proposals of a one-stage
student. The authors (mmdet 2.20) and mmdet 3.x assign and sample those proposals with
``MaxIoUAssigner`` + ``RandomSampler`` (Faster R-CNN's ``train_cfg.rcnn``), whose
``nonzero``/``randperm`` calls and per-image Python loops read the device on every step.
:func:`head_sample_rois` computes the same assignment and draws from the same sampling law on
padded, fixed-shape tensors for all images at once: nothing in it reads a device value, so it
runs on meta tensors and never waits for the GPU.

- :func:`head_pad_gt` -- per-image GT boxes and labels as padded tensors with a validity mask.
- :func:`head_box_iou` -- mmdet's ``bbox_overlaps`` (mode ``'iou'``, eps 1e-6), term for term.
- :func:`head_sample_rois` -- ``MaxIoUAssigner`` then ``RandomSampler`` (GT boxes added as
  proposals), returning :class:`HEADRoISamples`: the RoIs of every image in fixed slots with
  their sources, labels, assigned GT boxes and masks.
- :func:`head_rcnn_loss` -- mmdet's ``BBoxHead.loss`` on those slots (empty slots weighted 0,
  tensor normalisers instead of ``.item()``), with the head's own loss modules and box coder.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from ..ops._validation import check_flag, check_number, check_tensor

__all__ = ["HEADRoISamples", "head_box_iou", "head_pad_gt", "head_rcnn_loss", "head_sample_rois"]

SAMPLE = "kdops.losses.head_sample_rois"
RCNN_LOSS = "kdops.losses.head_rcnn_loss"
PAD_GT = "kdops.losses.head_pad_gt"
#: the level written in the source row of a GT box (as :data:`kdops.losses.head.GT_LEVEL`)
_GT_LEVEL = -1


class HEADRoISamples(NamedTuple):
    """What :func:`head_sample_rois` returns: S = min(``num``, G + P) slots per image, image by
    image (N·S rows), sampled RoIs first -- positives, then negatives, each in candidate order
    (GT boxes first), as mmdet's ``SamplingResult`` -- then empty slots.

    - ``rois`` (N·S,5): [n, x1, y1, x2, y2] in the boxes' dtype (mmdet's ``bbox2roi`` layout);
    - ``sources`` (N·S,5) int64: the proposal's source row [level, n, y, x, j]; a GT box's is
      [-1, n, -1, -1, g] (:func:`kdops.losses.head_gt_sources`), an empty slot's [-1, n, -1, -1, -1];
    - ``labels`` (N·S,) int64: the assigned GT's class for positives, ``num_classes`` (background)
      for negatives and empty slots;
    - ``gt_boxes`` (N·S,4): the assigned GT box of positives, the RoI itself elsewhere (so a box
      coder's targets are finite everywhere);
    - ``pos`` (N·S,) bool: positive samples; ``valid`` (N·S,) bool: sampled (positive or negative).
    """

    rois: torch.Tensor
    sources: torch.Tensor
    labels: torch.Tensor
    gt_boxes: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor


def head_pad_gt(boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image GT boxes (G_n,4) and labels (G_n,) as padded (N,G,4), (N,G) int64 and a (N,G)
    bool validity mask, G = max G_n (read from the shapes: no host synchronisation)."""
    if not isinstance(boxes, (list, tuple)) or not isinstance(labels, (list, tuple)) or len(boxes) != len(labels):
        raise TypeError(f"{PAD_GT}: `boxes` and `labels` must be lists with one tensor per image, got "
                        f"{type(boxes).__name__} and {type(labels).__name__}")
    if not boxes:
        raise ValueError(f"{PAD_GT}: `boxes` holds no image")
    for n, (b, lab) in enumerate(zip(boxes, labels)):
        check_tensor(PAD_GT, f"boxes[{n}]", b, ndim=2, like=boxes[0], what="(G_n,4) x1,y1,x2,y2")
        check_tensor(PAD_GT, f"labels[{n}]", lab, ndim=1, dtypes=(torch.int64,), what="(G_n,) int64")
        if not b.is_floating_point() or b.dtype != boxes[0].dtype:
            raise TypeError(f"{PAD_GT}: `boxes[{n}]` must be floating and of `boxes[0]`'s dtype ({boxes[0].dtype}), "
                            f"got {b.dtype}")
        if b.shape[1] != 4 or lab.shape[0] != b.shape[0] or lab.device != b.device:
            raise ValueError(f"{PAD_GT}: image {n}: `boxes` must be (G_n,4) and `labels` (G_n,) on the same device, "
                             f"got {tuple(b.shape)} and {tuple(lab.shape)}")
    N, G = len(boxes), max(b.shape[0] for b in boxes)
    first = boxes[0]
    gt_boxes = first.new_zeros((N, G, 4))
    gt_labels = torch.zeros((N, G), dtype=torch.int64, device=first.device)
    gt_valid = torch.zeros((N, G), dtype=torch.bool, device=first.device)
    for n, (b, lab) in enumerate(zip(boxes, labels)):
        g = b.shape[0]
        gt_boxes[n, :g] = b
        gt_labels[n, :g] = lab
        gt_valid[n, :g] = True
    return gt_boxes, gt_labels, gt_valid


def head_box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    r"""IoU of every box of ``a`` (..., G, 4) with every box of ``b`` (..., M, 4), as mmdet's
    ``bbox_overlaps(a, b, mode='iou')`` computes it (the ``MaxIoUAssigner``'s ``BboxOverlaps2D``):

    .. math::
        \mathrm{IoU} = \frac{I}{\max(|a| + |b| - I,\ \epsilon)},\quad
        I = \max(0, \min(x_2) - \max(x_1))\,\max(0, \min(y_2) - \max(y_1))

    in the inputs' dtype, term for term (so thresholds decide as mmdet's do). Returns (..., G, M).
    """
    area1 = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area2 = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt = torch.max(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.min(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1[..., None] + area2[..., None, :] - overlap
    union = torch.max(union, union.new_tensor([eps]))
    return overlap / union


def _rank(key: torch.Tensor) -> torch.Tensor:
    """Each entry's rank in its row by increasing key (ties: lower index first)."""
    order = torch.sort(key, dim=1, stable=True)[1]
    ar = torch.arange(key.shape[1], device=key.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ar)


def _neg_range(neg_iou_thr) -> Tuple[float, float]:
    if isinstance(neg_iou_thr, (tuple, list)):
        if len(neg_iou_thr) != 2:
            raise ValueError(f"{SAMPLE}: `neg_iou_thr` must be a number or a (low, high) pair, got {neg_iou_thr!r}")
        lo = check_number(SAMPLE, "neg_iou_thr[0]", neg_iou_thr[0])
        return lo, check_number(SAMPLE, "neg_iou_thr[1]", neg_iou_thr[1], low=lo)
    return 0.0, check_number(SAMPLE, "neg_iou_thr", neg_iou_thr)


def head_sample_rois(
    boxes: torch.Tensor,
    valid: torch.Tensor,
    sources: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_valid: torch.Tensor,
    *,
    num_classes: int,
    num: int = 512,
    pos_fraction: float = 0.25,
    neg_pos_ub: float = -1,
    add_gt_as_proposals: bool = True,
    pos_iou_thr: float = 0.5,
    neg_iou_thr: Union[float, Tuple[float, float]] = 0.5,
    min_pos_iou: float = 0.5,
    match_low_quality: bool = False,
    generator: Optional[torch.Generator] = None,
) -> HEADRoISamples:
    r"""The assistant R-CNN head's RoIs (HEAD, Wang et al., ECCV 2022): mmdet's ``MaxIoUAssigner``
    and ``RandomSampler`` (Faster R-CNN's ``train_cfg.rcnn``) on the student's proposals, for
    every image at once and in fixed shapes -- no value is read on the host.

    **Assignment** (``MaxIoUAssigner.assign_wrt_overlaps``, per image, IoU :func:`head_box_iou`):
    a proposal whose best IoU with a GT box is in [``neg_low``, ``neg_high``) (``neg_iou_thr`` =
    t means [0, t)) is negative; one with best IoU >= ``pos_iou_thr`` is assigned its best GT
    (the first of equal IoUs); with ``match_low_quality`` every proposal at a GT's own best IoU
    (>= ``min_pos_iou``) is assigned that GT (the last such GT wins, ``gt_max_assign_all``).
    Others are ignored. An image without GT has only negatives.

    **Sampling** (``RandomSampler``): with ``add_gt_as_proposals`` the GT boxes come first among
    the candidates, each assigned to itself. Of the positives, ``int(num * pos_fraction)`` are
    kept uniformly at random (all when fewer); negatives fill the rest up to ``num`` (at most
    ``int(neg_pos_ub * max(1, #pos))`` with ``neg_pos_ub >= 0``), uniformly at random. The
    random subsets are the smallest keys of i.i.d. uniform draws (``torch.rand`` with
    ``generator``), which is the law of mmdet's ``randperm`` choice: the same distribution, not
    the same draws. When every candidate fits, nothing is random and the slots are exactly
    mmdet's ``SamplingResult`` (positives then negatives, each in candidate order).

    Args:
        boxes: (N,P,4) proposals x1,y1,x2,y2 (e.g. :func:`kdops.losses.head_proposals` with
            ``padded=True``).
        valid: (N,P) bool, which proposals exist.
        sources: (N,P,5) int64 source rows [level, n, y, x, j] of the proposals.
        gt_boxes, gt_labels, gt_valid: (N,G,4) in the boxes' dtype, (N,G) int64 in
            [0, num_classes) (not checked: that would read the device), (N,G) bool
            (:func:`head_pad_gt`).
        num_classes: C; the background label.
        num, pos_fraction, neg_pos_ub, add_gt_as_proposals: ``RandomSampler``'s settings
            (Faster R-CNN: 512, 0.25, -1, True).
        pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality: ``MaxIoUAssigner``'s (Faster
            R-CNN's R-CNN stage: 0.5, 0.5, 0.5, False); ``gt_max_assign_all`` is True, as its default.
        generator: the random generator of the draws (None: the default one of the device).

    Returns:
        :class:`HEADRoISamples`, N·S rows with S = min(num, G + P) (G + P without GT: P).
    """
    check_tensor(SAMPLE, "boxes", boxes, ndim=3, what="(N,P,4) x1,y1,x2,y2")
    if boxes.shape[2] != 4 or not boxes.is_floating_point():
        raise ValueError(f"{SAMPLE}: `boxes` must be a floating (N,P,4) tensor, got {boxes.dtype} "
                         f"{tuple(boxes.shape)}")
    N, P = boxes.shape[:2]
    check_tensor(SAMPLE, "valid", valid, dtypes=(torch.bool,), like=boxes, shape=(N, P), what="(N,P) bool")
    check_tensor(SAMPLE, "sources", sources, dtypes=(torch.int64,), like=boxes, shape=(N, P, 5),
                 what="(N,P,5) int64 [level, n, y, x, j]")
    check_tensor(SAMPLE, "gt_boxes", gt_boxes, ndim=3, like=boxes, what="(N,G,4) in the boxes' dtype")
    G = gt_boxes.shape[1]
    if gt_boxes.shape != (N, G, 4) or gt_boxes.dtype != boxes.dtype:
        raise ValueError(f"{SAMPLE}: `gt_boxes` must be ({N},G,4) {boxes.dtype}, got {gt_boxes.dtype} "
                         f"{tuple(gt_boxes.shape)}")
    check_tensor(SAMPLE, "gt_labels", gt_labels, dtypes=(torch.int64,), like=boxes, shape=(N, G),
                 what="(N,G) int64")
    check_tensor(SAMPLE, "gt_valid", gt_valid, dtypes=(torch.bool,), like=boxes, shape=(N, G), what="(N,G) bool")
    num_classes = check_number(SAMPLE, "num_classes", num_classes, low=1, integer=True)
    num = check_number(SAMPLE, "num", num, low=1, integer=True)
    pos_fraction = check_number(SAMPLE, "pos_fraction", pos_fraction, low=0.0, high=1.0)
    neg_pos_ub = check_number(SAMPLE, "neg_pos_ub", neg_pos_ub)
    check_flag(SAMPLE, "add_gt_as_proposals", add_gt_as_proposals)
    pos_iou_thr = check_number(SAMPLE, "pos_iou_thr", pos_iou_thr)
    neg_lo, neg_hi = _neg_range(neg_iou_thr)
    min_pos_iou = check_number(SAMPLE, "min_pos_iou", min_pos_iou)
    check_flag(SAMPLE, "match_low_quality", match_low_quality)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{SAMPLE}: `generator` must be a torch.Generator or None, got {type(generator).__name__}")

    dev = boxes.device
    with torch.no_grad():
        # -- MaxIoUAssigner on the proposals: -1 ignored, 0 negative, g + 1 assigned to GT g
        iou = head_box_iou(gt_boxes, boxes)  # (N,G,P)
        real = gt_valid.unsqueeze(-1) & valid.unsqueeze(1)  # padded GT and padded proposals never match
        iou = torch.where(real, iou, torch.full((), -1.0, dtype=iou.dtype, device=dev))
        if G > 0:
            best, arg = iou.max(dim=1)
        else:
            best = torch.full((N, P), -1.0, dtype=boxes.dtype, device=dev)
            arg = torch.zeros((N, P), dtype=torch.int64, device=dev)
        minus1 = torch.full((), -1, dtype=torch.int64, device=dev)
        assigned = torch.where((best >= neg_lo) & (best < neg_hi), torch.zeros_like(minus1), minus1)
        assigned = torch.where(best >= pos_iou_thr, arg + 1, assigned)
        if match_low_quality and G > 0:
            gt_best = iou.max(dim=2).values  # (N,G)
            hit = (iou == gt_best.unsqueeze(-1)) & ((gt_best >= min_pos_iou) & gt_valid).unsqueeze(-1)
            last = G - 1 - hit.flip(1).to(torch.uint8).argmax(1)  # the last GT hitting each proposal
            assigned = torch.where(hit.any(1), last + 1, assigned)
        assigned = torch.where(gt_valid.any(1, keepdim=True), assigned, torch.zeros_like(assigned))

        # -- the candidates: GT boxes (assigned to themselves) then proposals
        n_idx = torch.arange(N, device=dev)
        if add_gt_as_proposals and G > 0:
            g_idx = torch.arange(G, device=dev)
            gt_src = torch.stack([torch.full((N, G), _GT_LEVEL, dtype=torch.int64, device=dev),
                                  n_idx.unsqueeze(1).expand(N, G), torch.full((N, G), -1, dtype=torch.int64,
                                                                              device=dev),
                                  torch.full((N, G), -1, dtype=torch.int64, device=dev), g_idx.expand(N, G)], -1)
            cand = torch.cat([gt_boxes, boxes], 1)
            cand_ok = torch.cat([gt_valid, valid], 1)
            cand_src = torch.cat([gt_src, sources], 1)
            cand_gt = torch.cat([(g_idx + 1).expand(N, G), assigned], 1)
        else:
            cand, cand_ok, cand_src, cand_gt = boxes, valid, sources, assigned
        M = cand.shape[1]
        S = min(num, M)

        # -- RandomSampler: uniform subsets as the smallest keys of i.i.d. uniform draws
        u = torch.rand((N, M), generator=generator, device=dev)
        two = torch.full((), 2.0, dtype=u.dtype, device=dev)
        pos_c = cand_ok & (cand_gt > 0)
        neg_c = cand_ok & (cand_gt == 0)
        pos_sel = pos_c & (_rank(torch.where(pos_c, u, two)) < int(num * pos_fraction))
        n_pos = pos_sel.sum(1, keepdim=True)
        n_neg = num - n_pos
        if neg_pos_ub >= 0:
            n_neg = torch.minimum(n_neg, (n_pos.clamp(min=1).double() * neg_pos_ub).floor().long())
        neg_sel = neg_c & (_rank(torch.where(neg_c, u, two)) < n_neg)
        ar = torch.arange(M, device=dev)
        key = torch.where(pos_sel, ar, torch.where(neg_sel, ar + M, ar + 2 * M))
        slot = torch.sort(key, dim=1)[1][:, :S]  # (N,S): positives, negatives, then the rest

        pos = pos_sel.gather(1, slot)
        ok = pos | neg_sel.gather(1, slot)
        roi_boxes = cand.gather(1, slot.unsqueeze(-1).expand(N, S, 4))
        src = cand_src.gather(1, slot.unsqueeze(-1).expand(N, S, 5))
        empty = torch.stack([torch.full((N, S), _GT_LEVEL, dtype=torch.int64, device=dev),
                             n_idx.unsqueeze(1).expand(N, S)] + [torch.full((N, S), -1, dtype=torch.int64,
                                                                           device=dev)] * 3, -1)
        src = torch.where(ok.unsqueeze(-1), src, empty)
        if G > 0:
            g = (cand_gt.gather(1, slot) - 1).clamp(min=0)
            labels = torch.where(pos, gt_labels.gather(1, g), torch.full((), num_classes, dtype=torch.int64,
                                                                         device=dev))
            matched = torch.where(pos.unsqueeze(-1), gt_boxes.gather(1, g.unsqueeze(-1).expand(N, S, 4)), roi_boxes)
        else:
            labels = torch.full((N, S), num_classes, dtype=torch.int64, device=dev)
            matched = roi_boxes
        img = n_idx.to(boxes.dtype).view(N, 1, 1).expand(N, S, 1)
        rois = torch.cat([img, roi_boxes], -1)
    return HEADRoISamples(rois.reshape(N * S, 5), src.reshape(N * S, 5), labels.reshape(-1),
                          matched.reshape(N * S, 4), pos.reshape(-1), ok.reshape(-1))


def head_rcnn_loss(
    cls_score: torch.Tensor,
    bbox_pred: torch.Tensor,
    samples: HEADRoISamples,
    *,
    loss_cls: Callable[..., torch.Tensor],
    loss_bbox: Callable[..., torch.Tensor],
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    class_agnostic: bool = False,
) -> Dict[str, torch.Tensor]:
    r"""An R-CNN head's GT loss on the fixed slots of :func:`head_sample_rois`: mmdet's
    ``BBoxHead.loss`` (with ``BBoxHead.get_targets``), the same values without a host read.

    With :math:`n` = max(1, #sampled RoIs), :math:`y_r` the slot's label and :math:`\mathcal{P}`
    the positive slots:

    .. math::
        \mathcal{L}_{cls} = \mathrm{loss\_cls}(s, y, w = [r\ \mathrm{sampled}], n),\qquad
        \mathcal{L}_{bbox} = \mathrm{loss\_bbox}\big(\delta_{r, y_r}[r\in\mathcal{P}],\
            \mathrm{encode}(roi_r, gt_r)[r\in\mathcal{P}], n\big)

    where the box regression of class :math:`y_r` (or the class-agnostic one) and its target are
    zeroed outside :math:`\mathcal{P}` (so ``loss_bbox`` must give 0 for equal zero inputs, as
    L1, smooth L1, MSE and balanced L1 do) -- mmdet indexes the positive rows instead, and reads
    ``avg_factor`` with ``.item()``; here :math:`n` is a tensor. ``acc`` is mmdet's top-1
    accuracy in percent over the sampled slots.

    Args:
        cls_score: (R,C+1) class logits of the N·S slots (background last).
        bbox_pred: (R,4·C) class-specific deltas, or (R,4) with ``class_agnostic``.
        samples: the :class:`HEADRoISamples` the head ran on.
        loss_cls: ``loss_cls(cls_score, labels, weight, avg_factor=n)`` (mmdet's CrossEntropyLoss).
        loss_bbox: ``loss_bbox(pred, target, avg_factor=n)`` (mmdet's L1Loss, SmoothL1Loss, ...).
        encode: ``encode(rois (R,4), gt_boxes (R,4)) -> (R,4)`` regression targets (the head's
            ``bbox_coder.encode``; it sees the RoI itself as the GT of non-positive slots).
        class_agnostic: one box per RoI instead of one per class.

    Returns:
        ``{"loss_cls", "loss_bbox", "acc"}``.
    """
    R = samples.valid.shape[0]
    check_tensor(RCNN_LOSS, "cls_score", cls_score, ndim=2, what="(R,C+1) logits")
    check_tensor(RCNN_LOSS, "bbox_pred", bbox_pred, ndim=2, like=cls_score, what="(R,4*C) or (R,4) deltas")
    check_flag(RCNN_LOSS, "class_agnostic", class_agnostic)
    C = cls_score.shape[1] - 1
    want = 4 if class_agnostic else 4 * C
    if cls_score.shape[0] != R or bbox_pred.shape != (R, want) or C < 1:
        raise ValueError(f"{RCNN_LOSS}: `cls_score` must be ({R},C+1) with C >= 1 and `bbox_pred` ({R},{want}) for the "
                         f"{R} slots of `samples`, got {tuple(cls_score.shape)} and {tuple(bbox_pred.shape)}")
    for name, fn in (("loss_cls", loss_cls), ("loss_bbox", loss_bbox), ("encode", encode)):
        if not callable(fn):
            raise TypeError(f"{RCNN_LOSS}: `{name}` must be callable, got {type(fn).__name__}")
    n = samples.valid.sum().to(cls_score.dtype).clamp(min=1)
    out = {"loss_cls": loss_cls(cls_score, samples.labels, samples.valid.to(cls_score.dtype), avg_factor=n)}
    top = cls_score.detach().topk(1, dim=1)[1].squeeze(1)
    out["acc"] = ((top == samples.labels) & samples.valid).sum().to(cls_score.dtype) * (100.0 / n)
    if class_agnostic:
        pred = bbox_pred
    else:
        pred = bbox_pred.view(R, C, 4).gather(1, samples.labels.clamp(max=C - 1).view(R, 1, 1).expand(R, 1, 4))
        pred = pred.squeeze(1)
    with torch.no_grad():
        target = encode(samples.rois[:, 1:], samples.gt_boxes).to(pred.dtype)
    pos = samples.pos.unsqueeze(1)
    zero = torch.zeros((), dtype=pred.dtype, device=pred.device)
    out["loss_bbox"] = loss_bbox(torch.where(pos, pred, zero), torch.where(pos, target, zero), avg_factor=n)
    return out
