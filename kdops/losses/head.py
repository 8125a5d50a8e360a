r"""HEAD: HEtero-Assists Distillation for heterogeneous detectors (Wang et al., ECCV 2022).

The framework-free pieces of HEAD, tensors in and tensors out; the detector wiring (hooks,
sampling, the assistant R-CNN head, the schedules) belongs to an integration.

A one-stage student (e.g. RetinaNet) gets an *assistant*: an R-CNN head like the two-stage
teacher's (e.g. Faster R-CNN), fed with proposals made from the student's own dense head.

- :func:`head_proposals` -- the student's dense head used as an RPN, with every proposal's
  source pixel and anchor ``[level, batch, y, x, j]`` (the authors' ``RetinaRPNHead`` with
  ``with_pos`` priors).
- :class:`HEADAKDLoss` -- assistant KD: the assistant's ``shared_fcs`` features mimic the
  teacher's on the same RoIs.
- :class:`HEADCKDLoss` -- cross-architecture KD: the student dense head's feature at each
  RoI's source pixel, mapped by a linear adapter, mimics the teacher's R-CNN feature of that RoI.
- :class:`HEADContrastiveCKDLoss` with :class:`HEADMemoryPool` -- the same pairing under the
  contrastive loss of the authors' library (todd ``CKDLoss``, their implementation of G-DetKD's
  contrastive KD, Yao et al., ICCV 2021), with a cross-rank memory of teacher features.
- :class:`HEADDenseLoss` -- the one-stage/one-stage (homogeneous assistant) case: a 1x1 conv
  adapter and a plain MSE over every pixel of every level.

Sources of the authors' code (github.com/LutingWang/HEAD, commit 345fc77a unless noted, and
github.com/LutingWang/todd at 5161c5b = todd_ai 0.2.3a4, the version the HEAD release pins; the
March 2022 todd 532ddbc the early HEAD configs used computes the same):
``head/dense_heads.py`` (``RetinaRPNHead``: max over classes, mmdet 2.20 ``RPNHead`` post
processing, ``_bbox_post_process`` carrying the positions), ``head/prior_generators.py``
(``PosMixin``: [level, y, x, anchor] per prior), ``head/samplers.py`` (GT proposals get source
rows of -1 and their GT index), ``head/adapts.py`` (``CustomAdapt``: drops rows whose level is
< 0, reorders to [level, batch, y, x]), ``configs/_base_/models/head_dag_retina_faster.py`` (AKD)
and ``head_retina_faster.py`` (CKD), ``configs/kd/gdet.py`` at 1179b780 (the contrastive form),
todd ``losses/ckd.py``, ``adapts/decouple.py``, ``losses/functional.py`` (``MSELoss``) and
``schedulers/linear.py`` (``WarmupScheduler``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._dtype import acc_dtype
from ..ops import gather_level_features, masked_mse, nms_mask
from ..ops._validation import (
    as_levels, check_choice, check_flag, check_levels, check_number, check_numbers, check_tensor,
)
from ..reference.box_coders import delta2bbox

__all__ = [
    "HEADAKDLoss", "HEADCKDLoss", "HEADContrastiveCKDLoss", "HEADDenseLoss", "HEADMemoryPool", "HEADPaddedProposals",
    "HEADProposals",
    "head_gt_sources", "head_proposals",
]

Levels = Union[torch.Tensor, Sequence[torch.Tensor]]
Decoder = Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
PROPOSALS = "kdops.losses.head_proposals"
GT_SOURCES = "kdops.losses.head_gt_sources"
#: the level written in the source row of a GT box the R-CNN sampler added as a proposal
GT_LEVEL = -1


# ============================================================================ proposals

class HEADProposals(NamedTuple):
    """What :func:`head_proposals` returns: one tensor per image for each field.

    - ``boxes``: (P_n,4) x1,y1,x2,y2 in image pixels, float32 (float64 for float64 input);
    - ``scores``: (P_n,) objectness, sigmoid of the largest class logit (times the sigmoid of the
      ``score_factors`` logit when given), in decreasing order;
    - ``sources``: (P_n,5) int64 rows [level, batch, y, x, j] -- the student pixel and anchor
      each proposal was decoded from (``batch`` is n).
    """

    boxes: List[torch.Tensor]
    scores: List[torch.Tensor]
    sources: List[torch.Tensor]


class HEADPaddedProposals(NamedTuple):
    """What :func:`head_proposals` returns with ``padded=True``: fixed shapes, computed without
    reading the device. P = min(``max_per_img``, candidates per image).

    - ``boxes`` (N,P,4), ``scores`` (N,P), ``sources`` (N,P,5): as :class:`HEADProposals`, each
      image's proposals first in decreasing score, then padding (removed candidates, score order);
    - ``valid`` (N,P) bool: which slots hold a proposal (a prefix of each row).
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    sources: torch.Tensor
    valid: torch.Tensor


def head_proposals(
    cls_scores: Levels,
    bbox_preds: Levels,
    priors: Levels,
    decoder: Decoder = "delta_xywh",
    *,
    nms_pre: int = 2000,
    iou_threshold: float = 0.7,
    max_per_img: int = 1000,
    min_bbox_size: float = 0.0,
    img_shape=None,
    means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
    stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    wh_ratio_clip: float = 16 / 1000,
    score_factors: Optional[Levels] = None,
    nms_across_levels: bool = False,
    padded: bool = False,
) -> Union[HEADProposals, HEADPaddedProposals]:
    r"""Proposals from a one-stage student's dense head, with the source of each (HEAD, Wang et
    al., ECCV 2022): the student's head serves as the RPN of the assistant R-CNN head.

    Per image n and level l (anchors a = (y, x, j) in mmdet's (h, w, j) order):

    .. math::
        o_a = \sigma\big(\max_k z_{a,k}\big),\qquad
        \mathcal{A}_{n,l} = \operatorname{top}_{\texttt{nms\_pre}}\{o_a\},\qquad
        b_a = \mathrm{dec}(\delta_a, p_a)

    then boxes with :math:`w \le` ``min_bbox_size`` or :math:`h \le` ``min_bbox_size`` are
    dropped, NMS (IoU > ``iou_threshold`` suppresses) runs per level -- levels never suppress
    each other (mmdet's ``batched_nms`` with the level as the class) -- and the ``max_per_img``
    best survivors are kept. This is the authors' ``RetinaRPNHead``: the class logits reduced by a
    max over classes (``'bs (num_anchors num_classes) h w -> bs num_anchors h w'``), then mmdet
    2.20's ``RPNHead._get_bboxes_single`` / ``_bbox_post_process`` with the training
    ``rpn_proposal`` config (nms_pre 2000, IoU 0.7, max_per_img 1000, min_bbox_size 0), the
    priors carrying [level, y, x, j] (``PosMixin``) to every kept proposal.

    **Point heads (FCOS)**: ``decoder="distance"``, ``score_factors`` = the centerness logits and
    ``nms_across_levels=True`` give the authors' ``FCOSRPNHead`` (the class logits reduced by a max
    over classes, then mmdet 2.20's ``BaseDenseHead._get_bboxes_single`` / ``_bbox_post_process``):
    per level the top ``nms_pre`` by :math:`o_a`, each kept candidate's score multiplied by
    :math:`\sigma(c_a)` of its centerness logit, boxes :math:`(x-l, y-t, x+r, y+b)`, and one NMS over
    all levels of an image (mmdet's ``batched_nms`` with every label 0). The release keeps
    zero-width boxes there (``min_bbox_size=-1`` does the same); the default 0 drops them.

    Differences from the authors' path (the same proposals, but for exact ties): the top-k is a
    stable sort (tied scores keep the lower (h, w, j) index; mmdet's ``sort`` leaves their order
    to the backend), the images are processed together, and NMS computes IoUs in float64 from the
    fp32 boxes, group by group (mmdet: one fp32 ``batched_nms`` call per image, whose coordinate
    offsets can move an IoU lying within ~1e-4 of the threshold across it); survivors of equal
    score keep their candidate order (level, then top-k rank).

    Host synchronisation: none with ``padded=True``. NMS is :func:`kdops.nms_mask` (exact greedy
    NMS, IoU in float64 as torchvision's, returning a keep mask of fixed shape) on each group's
    candidates padded to the largest level, and the ``max_per_img`` best survivors are a stable
    sort of the masked scores: every shape depends only on the input shapes, so the whole call
    runs on meta tensors and never waits for the GPU. The per-image lists (``padded=False``,
    the default) cost one host read, the number of proposals per image. Runs under
    ``torch.no_grad``: proposals are constants, as mmdet detaches the head outputs before
    ``get_bboxes``.

    Args:
        cls_scores: L levels (N,J·K,H,W) of class logits (pre-sigmoid), channel j·K + k.
        bbox_preds: L levels (N,J·4,H,W) of box regression, channel j·4 + c.
        priors: L levels (H·W·J,4) anchors x1,y1,x2,y2 in mmdet's (h, w, j) row order (the
            head's ``prior_generator.grid_priors``). J is read from ``bbox_preds``.
        decoder: "distance" (point heads, FCOS: ``priors`` (H·W·J,4) whose first two columns are the
            point x, y -- mmdet's ``grid_priors(..., with_stride=True)`` -- and ``bbox_preds`` the
            distances l, t, r, b in pixels, already multiplied by the stride where the head
            normalises them), or "delta_xywh" (mmdet's ``DeltaXYWHBBoxCoder.decode`` with ``means``, ``stds``,
            ``wh_ratio_clip``, clipped to ``img_shape``), or a callable (deltas (M,4), priors
            (M,4)) -> boxes (M,4), e.g. ``lambda d, p: head.bbox_coder.decode(p, d)`` (then
            clipping is the callable's business; ``img_shape`` still clips its output).
        nms_pre: candidates kept per image and level before NMS (int; <= 0 keeps all).
        iou_threshold: NMS IoU threshold in [0, 1].
        max_per_img: proposals kept per image after NMS (int >= 1).
        min_bbox_size: boxes need w and h above it (a negative value keeps every box, as mmdet).
        img_shape: None, (h, w) for every image, or N (h, w) pairs: boxes are clipped to
            [0, w] x [0, h] (mmdet's ``max_shape``).
        means, stds, wh_ratio_clip: the DeltaXYWH coder's settings (RetinaNet: 0, 1, 16/1000).
        score_factors: None, or L levels (N,J,H,W) of logits (FCOS: the centerness) whose sigmoid
            multiplies each candidate's score after the top-k and before NMS.
        nms_across_levels: False: NMS within each (image, level), as the RetinaNet path; True: within
            each image over all its levels, as the FCOS path.
        padded: False: per-image lists (:class:`HEADProposals`); True: fixed-shape tensors with a
            validity mask (:class:`HEADPaddedProposals`), no host synchronisation.

    Returns:
        :class:`HEADProposals` (boxes, scores, sources), lists of N tensors (P_n,4), (P_n,),
        (P_n,5); an image without a surviving proposal gets empty tensors. ``sources[:, :4]``
        indexes the student's head maps: ``kdops.gather_level_features(maps,
        sources[:, :4], validate=False)``. With ``padded=True``, :class:`HEADPaddedProposals`.
    """
    cls_l, seq = as_levels(PROPOSALS, "cls_scores", cls_scores)
    reg_l, reg_seq = as_levels(PROPOSALS, "bbox_preds", bbox_preds)
    pri_l, pri_seq = as_levels(PROPOSALS, "priors", priors)
    if (reg_seq, len(reg_l)) != (seq, len(cls_l)) or (pri_seq, len(pri_l)) != (seq, len(cls_l)):
        raise ValueError(f"{PROPOSALS}: `cls_scores`, `bbox_preds` and `priors` must hold the same number of "
                         f"levels, got {len(cls_l)}, {len(reg_l)} and {len(pri_l)}")
    check_levels(PROPOSALS, "cls_scores", cls_l, seq)  # one N, dtype, device; also checks each is 4-D
    first = cls_l[0]
    N = first.shape[0]
    for i, (c, r, p) in enumerate(zip(cls_l, reg_l, pri_l)):
        sfx = f"[{i}]" if seq else ""
        check_tensor(PROPOSALS, f"bbox_preds{sfx}", r, ndim=4, like=first, what="(N,J*4,H,W)")
        check_tensor(PROPOSALS, f"priors{sfx}", p, ndim=2, like=first, what="(H*W*J,4) anchors")
        n, JK, H, W = c.shape
        if r.shape[0] != n or r.shape[2:] != c.shape[2:] or r.shape[1] % 4 or r.shape[1] == 0:
            raise ValueError(f"{PROPOSALS}: `bbox_preds{sfx}` must be (N,J*4,H,W) = ({n},J*4,{H},{W}) with J >= 1, "
                             f"got {tuple(r.shape)}")
        J = r.shape[1] // 4
        if JK % J or JK == 0:
            raise ValueError(f"{PROPOSALS}: `cls_scores{sfx}` must have J*K channels with J = {J} anchors per "
                             f"location (from `bbox_preds{sfx}`), got {JK}")
        if tuple(p.shape) != (H * W * J, 4):
            raise ValueError(f"{PROPOSALS}: `priors{sfx}` must have shape (H*W*J,4) = ({H * W * J},4), got "
                             f"{tuple(p.shape)}")
    if not (isinstance(decoder, str) or callable(decoder)):
        raise TypeError(f"{PROPOSALS}: `decoder` must be 'delta_xywh' or a callable (deltas, priors) -> boxes, "
                        f"got {type(decoder).__name__}")
    if isinstance(decoder, str):
        check_choice(PROPOSALS, "decoder", decoder, ("delta_xywh", "distance"))
    fac_l = None
    if score_factors is not None:
        fac_l, fac_seq = as_levels(PROPOSALS, "score_factors", score_factors)
        if (fac_seq, len(fac_l)) != (seq, len(cls_l)):
            raise ValueError(f"{PROPOSALS}: `score_factors` must hold as many levels as `cls_scores` "
                             f"({len(cls_l)}), got {len(fac_l)}")
        for i, (f, r) in enumerate(zip(fac_l, reg_l)):
            sfx = f"[{i}]" if seq else ""
            check_tensor(PROPOSALS, f"score_factors{sfx}", f, ndim=4, like=first, what="(N,J,H,W) logits")
            want = (r.shape[0], r.shape[1] // 4) + tuple(r.shape[2:])
            if tuple(f.shape) != want:
                raise ValueError(f"{PROPOSALS}: `score_factors{sfx}` must be (N,J,H,W) = {want}, got "
                                 f"{tuple(f.shape)}")
    if not isinstance(nms_across_levels, bool):
        raise TypeError(f"{PROPOSALS}: `nms_across_levels` must be a bool, got {type(nms_across_levels).__name__}")
    check_flag(PROPOSALS, "padded", padded)
    nms_pre = check_number(PROPOSALS, "nms_pre", nms_pre, integer=True)
    iou_threshold = check_number(PROPOSALS, "iou_threshold", iou_threshold, low=0.0, high=1.0)
    max_per_img = check_number(PROPOSALS, "max_per_img", max_per_img, low=1, integer=True)
    min_bbox_size = check_number(PROPOSALS, "min_bbox_size", min_bbox_size)
    means = check_numbers(PROPOSALS, "means", means, length=4)
    stds = check_numbers(PROPOSALS, "stds", stds, length=4, low=0.0, low_open=True)
    wh_ratio_clip = check_number(PROPOSALS, "wh_ratio_clip", wh_ratio_clip, low=0.0, low_open=True, high=1.0)
    shapes = _image_shapes(img_shape, N)

    with torch.no_grad():
        boxes, scores, sources = _candidates(cls_l, reg_l, pri_l, decoder, nms_pre, means, stds, wh_ratio_clip,
                                             shapes, fac_l)
        ks = [_topk_size(c.shape[2] * c.shape[3] * (r.shape[1] // 4), nms_pre) for c, r in zip(cls_l, reg_l)]
        out = _select(boxes, scores, sources, ks, iou_threshold, max_per_img, min_bbox_size, nms_across_levels)
    return out if padded else _unpad(out)


def _image_shapes(img_shape, N: int):
    """None, or a list of N (h, w) pairs of positive finite numbers."""
    if img_shape is None:
        return None

    def pair(x):
        return (isinstance(x, (list, tuple)) and len(x) >= 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf for v in x[:2]))

    if pair(img_shape) and not any(isinstance(v, (list, tuple)) for v in img_shape):
        return [tuple(img_shape[:2])] * N
    if isinstance(img_shape, (list, tuple)) and len(img_shape) == N and all(pair(s) for s in img_shape):
        return [tuple(s[:2]) for s in img_shape]
    raise ValueError(f"{PROPOSALS}: `img_shape` must be None, (h, w) or one (h, w) per image ({N}), "
                     f"positive and finite, got {img_shape!r}")


def _candidates(cls_l, reg_l, pri_l, decoder, nms_pre, means, stds, wh_ratio_clip, shapes, fac_l=None):
    """The sync-free part: per level top-k of the objectness, decoded boxes and their sources.
    Returns boxes (N,A,4), scores (N,A) and sources (N,A,5) over the A candidates of all levels."""
    acc = acc_dtype(reg_l[0])
    N = cls_l[0].shape[0]
    dev = cls_l[0].device
    all_boxes, all_scores, all_src = [], [], []
    for lvl, (c, r, p) in enumerate(zip(cls_l, reg_l, pri_l)):
        _, JK, H, W = c.shape
        J = r.shape[1] // 4
        A = H * W * J
        # max over the K class logits of each anchor, then (N, H*W*J) in (h, w, j) order
        obj = c.unflatten(1, (J, JK // J)).amax(2).permute(0, 2, 3, 1).reshape(N, A)
        score = torch.sigmoid(obj.to(acc))
        k = _topk_size(A, nms_pre)
        score, idx = torch.sort(score, dim=1, descending=True, stable=True)
        score, idx = score[:, :k], idx[:, :k]
        deltas = r.permute(0, 2, 3, 1).reshape(N, A, 4).to(acc)
        deltas = deltas.gather(1, idx.unsqueeze(-1).expand(N, k, 4))
        anchors = p.to(acc)[idx]  # (N, k, 4)
        flat_d, flat_p = deltas.reshape(-1, 4), anchors.reshape(-1, 4)
        if decoder == "distance":
            xy = flat_p[:, :2]
            boxes = torch.cat([xy - flat_d[:, :2], xy + flat_d[:, 2:]], 1)
        elif isinstance(decoder, str):
            boxes = delta2bbox(flat_p, flat_d, means, stds, wh_ratio_clip)
        else:
            boxes = decoder(flat_d, flat_p)
            if not isinstance(boxes, torch.Tensor) or tuple(boxes.shape) != (N * k, 4):
                got = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
                raise ValueError(f"{PROPOSALS}: `decoder` must return (M,4) boxes for (M,4) deltas and priors "
                                 f"(M = {N * k}), got {got}")
            boxes = boxes.to(acc)
        all_boxes.append(boxes.reshape(N, k, 4))
        if fac_l is not None:  # FCOS: the centerness rescales the kept candidates (after the top-k)
            fac = fac_l[lvl].permute(0, 2, 3, 1).reshape(N, A).to(acc).gather(1, idx)
            score = score * torch.sigmoid(fac)
        all_scores.append(score)
        src = torch.stack([torch.full_like(idx, lvl), torch.arange(N, device=dev).unsqueeze(1).expand(N, k),
                           idx // (J * W), (idx // J) % W, idx % J], dim=-1)
        all_src.append(src)
    boxes = torch.cat(all_boxes, 1)
    if shapes is not None and N > 0:  # clamps with Python bounds: no host-to-device copy (a sync)
        boxes = boxes.clamp(min=0)
        chunks = [(boxes, shapes[0])] if len(set(shapes)) == 1 else zip(boxes.split(1), shapes)
        boxes = torch.cat([torch.stack([b[..., 0].clamp(max=w), b[..., 1].clamp(max=h), b[..., 2].clamp(max=w),
                                        b[..., 3].clamp(max=h)], -1) for b, (h, w) in chunks])
    return boxes, torch.cat(all_scores, 1), torch.cat(all_src, 1)


def _topk_size(A: int, nms_pre: int) -> int:
    """Candidates a level of A anchors keeps before NMS."""
    return A if nms_pre <= 0 or nms_pre >= A else nms_pre


def _select(boxes, scores, sources, ks, iou_threshold, max_per_img, min_bbox_size,
            across_levels: bool = False) -> HEADPaddedProposals:
    """Size filter, NMS per (image, level) -- per image with ``across_levels`` -- and the top
    ``max_per_img`` per image, in fixed shapes: no value is read on the host.

    ``boxes`` (N,A,4), ``scores`` (N,A), ``sources`` (N,A,5) hold each image's candidates level by
    level, ``ks[l]`` of level l, each level in decreasing score (the top-k's order)."""
    N, A = scores.shape
    dev = scores.device
    if min_bbox_size >= 0:
        wh = boxes[..., 2:] - boxes[..., :2]
        ok = (wh > min_bbox_size).all(-1)
    else:
        ok = torch.ones((N, A), dtype=torch.bool, device=dev)
    if across_levels:  # one group per image: its candidates in decreasing score
        order = torch.sort(scores, dim=1, descending=True, stable=True)[1]
        keep_sorted = nms_mask(boxes.gather(1, order.unsqueeze(-1).expand(N, A, 4)), iou_threshold,
                               ok.gather(1, order))
        keep = torch.zeros_like(ok).scatter(1, order, keep_sorted)
    else:  # one group per (image, level), levels padded to the largest k (padding is not valid)
        L, K = len(ks), max(ks, default=0)
        ar = torch.arange(K, device=dev)
        offsets = [sum(ks[:lvl]) for lvl in range(L)]
        idx = torch.stack([(ar + off).clamp(max=max(A - 1, 0)) for off in offsets]).reshape(-1)  # (L*K,)
        real = torch.stack([ar < k for k in ks]).reshape(1, -1)
        keep_p = nms_mask(boxes[:, idx].reshape(N * L, K, 4), iou_threshold,
                          (ok[:, idx] & real).reshape(N * L, K)).reshape(N, L * K)
        back = torch.cat([ar[:k] + lvl * K for lvl, k in enumerate(ks)]) if L else ar[:0]  # (A,)
        keep = keep_p[:, back]
    P = min(max_per_img, A)
    masked = torch.where(keep, scores, torch.full((), -math.inf, dtype=scores.dtype, device=dev))
    sel = torch.sort(masked, dim=1, descending=True, stable=True)[1][:, :P]
    return HEADPaddedProposals(boxes.gather(1, sel.unsqueeze(-1).expand(N, P, 4)), scores.gather(1, sel),
                               sources.gather(1, sel.unsqueeze(-1).expand(N, P, 5)), keep.gather(1, sel))


def _unpad(p: HEADPaddedProposals) -> HEADProposals:
    """The per-image lists of the valid proposals (valid ones come first: one host read)."""
    sizes = p.valid.sum(1).tolist()
    return HEADProposals([b[:n] for b, n in zip(p.boxes, sizes)], [s[:n] for s, n in zip(p.scores, sizes)],
                         [s[:n] for s, n in zip(p.sources, sizes)])


def head_gt_sources(num_gts: Sequence[int], device=None) -> torch.Tensor:
    r"""The source rows of the GT boxes the R-CNN sampler adds as proposals (HEAD, Wang et al.,
    ECCV 2022; ``add_gt_as_proposals=True``): [-1, n, -1, -1, g] for GT g of image n, as the
    authors' sampler writes them (``head/samplers.py``). The CKD losses skip rows whose level is
    < 0, as the authors' ``CustomAdapt`` does.

    Args:
        num_gts: the number of GT boxes of each image (ints >= 0).
        device: where the rows go.

    Returns:
        (sum(num_gts),5) int64 rows, image by image (built on the host, then copied to ``device``).
    """
    if not isinstance(num_gts, (list, tuple)):
        raise TypeError(f"{GT_SOURCES}: `num_gts` must be a list of ints (one per image), got "
                        f"{type(num_gts).__name__}")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in num_gts):
        raise ValueError(f"{GT_SOURCES}: `num_gts` must be a list of ints >= 0 (one per image), got {num_gts!r}")
    rows = [[GT_LEVEL, b, -1, -1, g] for b, n in enumerate(num_gts) for g in range(n)]
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, 5)


# ============================================================================ shared helpers

def _no_autocast(device: torch.device):
    """Autocast off on ``device`` (the adapters run in the accumulation dtype, not autocast's)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _linear(x: torch.Tensor, layer: nn.Linear, acc: torch.dtype) -> torch.Tensor:
    """``layer(x)`` computed in ``acc`` (inputs and parameters cast, autocast off)."""
    with _no_autocast(x.device):
        bias = None if layer.bias is None else layer.bias.to(acc)
        return F.linear(x.to(acc), layer.weight.to(acc), bias)


def _zero_touching(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An exact 0 that depends on ``x`` (a zero gradient, not None) without reading its values."""
    return x.reshape(-1)[:0].sum().to(dtype)


def _touch_all(tensors, dtype: torch.dtype) -> torch.Tensor:
    """An exact 0 depending on every tensor: each gets a zero gradient, not None, even when no row
    reads it (the eager fallback of ``gather_level_features`` leaves unread levels out of the graph)."""
    return sum(_zero_touching(x, dtype) for x in tensors)


def _check_channels(owner: str, name: str, x) -> int:
    return check_number(owner, name, x, low=1, integer=True)


def _check_rows(owner: str, name: str, x, *, like=None, rows=None, channels=None, what="(R,C)"):
    check_tensor(owner, name, x, ndim=2, like=like, what=what)
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{owner}: `{name}` must have {rows} rows {what}, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{owner}: `{name}` must have {channels} channels {what}, got shape {tuple(x.shape)}")
    return x


class _SourceAdapter(nn.Module):
    """The student side of CKD: gather the dense-head feature at each source row, map it to the
    teacher's channels with one linear layer, or with one of ``num_anchors`` layers chosen by the
    row's anchor index j (todd's ``Decouple``: one Linear(C_s, num_anchors·C_t), chunk j)."""

    def __init__(self, owner: str, in_channels: int, out_channels: int, num_anchors: Optional[int], bias: bool):
        super().__init__()
        self.owner = owner
        self.in_channels = _check_channels(owner, "in_channels", in_channels)
        self.out_channels = _check_channels(owner, "out_channels", out_channels)
        self.num_anchors = None if num_anchors is None else check_number(owner, "num_anchors", num_anchors, low=1,
                                                                          integer=True)
        check_flag(owner, "bias", bias)
        self.adapter = nn.Linear(self.in_channels, self.out_channels * (self.num_anchors or 1), bias=bias)

    def check(self, feats, sources) -> Tuple[list, torch.Tensor]:
        levels, seq = as_levels(self.owner, "student_feats", feats)
        first = check_levels(self.owner, "student_feats", levels, seq)
        if first.shape[1] != self.in_channels:
            raise ValueError(f"{self.owner}: `student_feats` must have in_channels = {self.in_channels} channels, "
                             f"got {first.shape[1]}")
        check_tensor(self.owner, "sources", sources, ndim=2, dtypes=(torch.int64,), like=first,
                     what="(R,5) int64 rows [level, batch, y, x, j]")
        if sources.shape[1] != 5:
            raise ValueError(f"{self.owner}: `sources` must have shape (R,5) rows [level, batch, y, x, j], got "
                             f"{tuple(sources.shape)}")
        return levels, first

    def valid(self, levels, sources) -> torch.Tensor:
        """(R,) bool, on the device: the row points inside a level (GT rows, level < 0, do not)."""
        lvl, b, y, x, j = sources.unbind(1)
        ok = torch.zeros_like(lvl, dtype=torch.bool)
        for i, f in enumerate(levels):
            N, _, H, W = f.shape
            ok |= (lvl == i) & (b >= 0) & (b < N) & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        if self.num_anchors is not None:
            ok &= (j >= 0) & (j < self.num_anchors)
        return ok

    def validate(self, ok, sources) -> None:
        bad = (sources[:, 0] >= 0) & ~ok
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            raise ValueError(f"{self.owner}: `sources` row {r} = {sources[r].tolist()} is out of range (rows are "
                             f"[level, batch, y, x, j] with j < num_anchors = {self.num_anchors}; GT rows have "
                             "level -1). Pass validate=False to skip this check (such rows are then ignored)")

    def forward(self, levels, sources, acc) -> torch.Tensor:
        rows = gather_level_features(levels, sources[:, :4].contiguous(), validate=False)
        y = _linear(rows, self.adapter, acc)
        if self.num_anchors is None:
            return y
        j = sources[:, 4].clamp(0, self.num_anchors - 1)
        return y.unflatten(1, (self.num_anchors, self.out_channels)).gather(
            1, j.view(-1, 1, 1).expand(-1, 1, self.out_channels)).squeeze(1)


# ============================================================================ AKD

class HEADAKDLoss(nn.Module):
    r"""HEAD's assistant KD (AKD): the assistant R-CNN head mimics the teacher's on the same RoIs.

    .. math::
        \mathcal{L}_{AKD} = \sum_{l} \frac{w}{R\,C_t}\sum_{r,c}
            \big(\mathrm{Linear}_l(A_l)_{rc} - T_{l,rc}\big)^2

    over the distilled layers l -- in the release ``shared_fcs[0]`` and ``shared_fcs[-1]`` of a
    ``Shared2FCBBoxHead`` (the ``nn.Linear`` outputs, before the ReLU), R x 1024 each -- with
    one trainable Linear adapter per layer on the assistant side (PyTorch's default init) and
    :math:`w` = ``loss_weight``. The teacher's features are constants (detached).

    Released code (``configs/_base_/models/head_dag_retina_faster.py``): two ``MSELoss``
    terms (todd: ``weight * F.mse_loss(pred, target)``, the mean over R·C elements) of weight
    2.0, each ramped linearly from 0 to 2.0 over the first 2000 iterations
    (``WarmupScheduler``) -- the ramp is the training loop's job, not this loss's, as is the
    release's ``weight_transfer`` (the assistant head starts as a copy of the teacher's R-CNN
    head). The paper's AKD weight is :math:`\lambda^A = 5`: ``loss_weight=5.0``; the default is
    the released 2.0 (the normalisation is the code's in both cases: the mean over R·C). The
    authors log the two layers as two losses; here they are summed.

    Args:
        in_channels: the assistant's channels per layer: one int for every layer or one per layer.
        out_channels: the teacher's channels per layer (int or one per layer); 1024 in the release.
        num_layers: how many layers are distilled (2 in the release).
        loss_weight: w (finite, >= 0).

    Forward(assistant_feats, teacher_feats) takes ``num_layers`` tensors each, (R,C_in_l) and
    (R,C_t_l) with one R (the sampled RoIs of the batch, GT RoIs included), and returns a 0-d
    float32 loss (float64 for float64 inputs); R = 0 gives exactly 0 with zero gradients.
    """

    OWNER = "HEADAKDLoss"

    def __init__(self, in_channels: Union[int, Sequence[int]] = 1024, out_channels: Union[int, Sequence[int]] = 1024,
                 num_layers: int = 2, loss_weight: float = 2.0) -> None:
        super().__init__()
        o = self.OWNER
        self.num_layers = check_number(o, "num_layers", num_layers, low=1, integer=True)
        ins = self._per_layer("in_channels", in_channels)
        outs = self._per_layer("out_channels", out_channels)
        self.loss_weight = check_number(o, "loss_weight", loss_weight, low=0.0)
        self.adapters = nn.ModuleList(nn.Linear(i, t) for i, t in zip(ins, outs))

    def _per_layer(self, name, x) -> List[int]:
        if isinstance(x, (list, tuple)):
            if len(x) != self.num_layers:
                raise ValueError(f"{self.OWNER}: `{name}` must give one channel count per layer ({self.num_layers}), "
                                 f"got {x!r}")
            return [_check_channels(self.OWNER, f"{name}[{i}]", v) for i, v in enumerate(x)]
        return [_check_channels(self.OWNER, name, x)] * self.num_layers

    def forward(self, assistant_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor],
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        r"""AKD (Wang et al., ECCV 2022): :math:`\sum_l w\,\mathrm{MSE}(\mathrm{Linear}_l(A_l), T_l)`.

        Args:
            assistant_feats: ``num_layers`` tensors (R,C_in_l): the assistant head's layer
                outputs (``shared_fcs[0]``, ``shared_fcs[-1]`` before the ReLU) for the R RoIs.
            teacher_feats: ``num_layers`` tensors (R,C_t_l): the teacher head's outputs of the
                same layers for the same RoIs, in the same order (detached here).
            valid: None (every row counts) or (R,) bool: the rows that count (the others, e.g.
                the empty slots of :func:`kdops.losses.head_sample_rois`, add nothing); the mean
                is over the valid rows' elements, without a host read.

        Returns:
            0-d float32 loss (float64 for float64 inputs), summed over layers; no (valid) row gives 0.
        """
        o = self.OWNER
        a_l, t_l = self._layers("assistant_feats", assistant_feats), self._layers("teacher_feats", teacher_feats)
        first = a_l[0]
        for i, (a, t, m) in enumerate(zip(a_l, t_l, self.adapters)):
            _check_rows(o, f"assistant_feats[{i}]", a, like=first, rows=first.shape[0], channels=m.in_features,
                        what="(R,C_in)")
            _check_rows(o, f"teacher_feats[{i}]", t, like=first, rows=first.shape[0], channels=m.out_features,
                        what="(R,C_t)")
        if valid is not None:
            check_tensor(o, "valid", valid, ndim=1, dtypes=(torch.bool,), like=first, shape=(first.shape[0],),
                         what="(R,) bool, one flag per row")
        acc = acc_dtype(first)
        loss = first.new_zeros((), dtype=acc)
        zero = torch.zeros((), dtype=acc, device=first.device)
        for a, t, m in zip(a_l, t_l, self.adapters):
            d = _linear(a, m, acc) - t.detach().to(acc)
            if valid is None:
                loss = loss + d.pow(2).sum() / max(d.numel(), 1)
            else:
                d = torch.where(valid.unsqueeze(1), d, zero)
                loss = loss + d.pow(2).sum() / (valid.sum().to(acc).clamp(min=1) * d.shape[1])
        return loss * self.loss_weight

    def _layers(self, name, x) -> list:
        if isinstance(x, torch.Tensor) and self.num_layers == 1:
            return [x]
        if not isinstance(x, (list, tuple)):
            raise TypeError(f"{self.OWNER}: `{name}` must be a list of {self.num_layers} (R,C) tensors, got "
                            f"{type(x).__name__}")
        if len(x) != self.num_layers:
            raise ValueError(f"{self.OWNER}: `{name}` must hold num_layers = {self.num_layers} tensors, got {len(x)}")
        return list(x)


# ============================================================================ CKD (MSE)

class HEADCKDLoss(nn.Module):
    r"""HEAD's cross-architecture KD: the student's dense-head feature at the pixel each RoI came
    from, mapped to the teacher's channels, mimics the teacher's R-CNN feature of that RoI.

    .. math::
        \mathcal{L}_{CKD} = \frac{w}{|\mathcal{R}|\,C_t}\sum_{r\in\mathcal{R}}\sum_c
            \big(\mathrm{Linear}_{j_r}(S_{l_r}[b_r,:,y_r,x_r])_c - T_{rc}\big)^2

    with :math:`\mathcal{R}` the RoIs whose source row [l, b, y, x, j] (from
    :func:`head_proposals`, carried through the R-CNN sampler) points inside the maps; GT boxes
    added as proposals carry level -1 (:func:`head_gt_sources`) and are left out, as the
    authors' ``CustomAdapt`` drops rows with a negative level. :math:`S_l` is the student head's
    last classification conv (``cls_convs[-1]``, after its ReLU), :math:`T` the teacher's
    ``shared_fcs[-1]`` output (before the ReLU) for the same RoIs, treated as constants. The
    rows are read with :func:`kdops.gather_level_features` (one kernel, deterministic
    scatter-add backward) instead of the authors' per-level boolean-mask loop.

    Released code (``configs/_base_/models/head_retina_faster.py``): one ``Linear(256, 1024)``
    with bias shared by all anchors, ``MSELoss`` (mean over the kept R·C elements) of weight 2.0,
    warmed up linearly over 2000 iterations by the training loop. The authors' library also has
    per-anchor adapters (todd ``Decouple``: ``num_anchors=9``, used without bias in their
    earlier configs): ``num_anchors=J`` picks adapter :math:`j_r` for each RoI. That adapter is
    todd's layout, one ``Linear(C_s, J·C_t)`` (``source.adapter``) whose output chunk j serves
    anchor j, so their weights load unchanged. For a one-stage assistant (dense head to dense
    head) see :class:`HEADDenseLoss`.

    Args:
        in_channels: C_s, the student head's channels (256).
        out_channels: C_t, the teacher R-CNN feature's channels (1024).
        loss_weight: w (finite, >= 0); 2.0 as released.
        num_anchors: None (one adapter) or J (one adapter per anchor index).
        bias: whether the adapters have a bias (True as released).

    Forward(student_feats, sources, teacher_feats, *, validate=False) returns a 0-d float32 loss
    (float64 for float64 inputs); with no kept RoI it is exactly 0 with zero gradients.
    """

    OWNER = "HEADCKDLoss"

    def __init__(self, in_channels: int = 256, out_channels: int = 1024, loss_weight: float = 2.0,
                 num_anchors: Optional[int] = None, bias: bool = True) -> None:
        super().__init__()
        self.loss_weight = check_number(self.OWNER, "loss_weight", loss_weight, low=0.0)
        self.source = _SourceAdapter(self.OWNER, in_channels, out_channels, num_anchors, bias)

    def forward(self, student_feats: Levels, sources: torch.Tensor, teacher_feats: torch.Tensor, *,
                validate: bool = False) -> torch.Tensor:
        r"""HEAD's CKD (Wang et al., ECCV 2022): MSE between adapted student head features at the
        RoIs' source pixels and the teacher's R-CNN features of those RoIs.

        Args:
            student_feats: L levels (N,C_s,H,W): the student dense head's ``cls_convs[-1]``
                outputs (one N, C_s, dtype and device).
            sources: (R,5) int64 rows [level, batch, y, x, j], one per RoI; rows with level < 0
                (GT RoIs) are skipped.
            teacher_feats: (R,C_t), the teacher's ``shared_fcs[-1]`` features of the same RoIs
                (detached here).
            validate: raise ValueError when a row with level >= 0 points outside the maps (or
                has j >= num_anchors); this reads the device (one sync). Without it such rows are
                skipped like GT rows.

        Returns:
            0-d float32 (float64 for float64 inputs) loss.
        """
        o = self.OWNER
        levels, first = self.source.check(student_feats, sources)
        _check_rows(o, "teacher_feats", teacher_feats, like=first, rows=sources.shape[0],
                    channels=self.source.out_channels, what="(R,C_t), one row per source row")
        check_flag(o, "validate", validate)
        ok = self.source.valid(levels, sources)
        if validate:
            self.source.validate(ok, sources)
        acc = acc_dtype(first)
        y = self.source(levels, sources, acc)
        d = torch.where(ok.unsqueeze(1), y - teacher_feats.detach().to(acc), torch.zeros((), dtype=acc,
                                                                                        device=y.device))
        n = ok.sum().to(acc).clamp(min=1) * self.source.out_channels
        return (d.pow(2).sum() / n + _touch_all(levels, acc)) * self.loss_weight


# ============================================================================ contrastive CKD

class HEADMemoryPool:
    r"""The teacher-feature memory of :class:`HEADContrastiveCKDLoss` (todd's ``MemoryPool``).

    Holds the pushed (R,C) rows of the last ``size`` batches, newest first. Under an initialised
    ``torch.distributed`` process group every push gathers all ranks' rows (``all_gather``) and
    stores them with this rank's rows first, so each rank sees the whole global batch. Rows are
    stored detached, in float32 (float64 for float64), with a validity flag: pieces are padded
    to a fixed row count for ``all_gather`` and padded or invalid rows never count.

    Args:
        size: batches kept (10, todd's default).
        rows: the fixed rows per rank and push (pieces are padded to it, no host sync; a push
            with more rows raises ValueError on that rank -- before the collective, so the other
            ranks then wait in theirs: choose it above the largest possible push, e.g. images per
            GPU x RoIs sampled per image). None: pad to the largest push of the ranks, which
            costs one small ``all_gather`` of the row counts and a host sync per push (no padding
            in a single process).
        group: the process group (None: the default group when initialised).

    The pool is plain state, not a buffer: it is not in the ``state_dict`` and starts empty
    after a restart (as the authors'); a push moves older rows to the newest push's device.
    """

    OWNER = "HEADMemoryPool"

    def __init__(self, size: int = 10, rows: Optional[int] = None, group=None) -> None:
        self.size = check_number(self.OWNER, "size", size, low=1, integer=True)
        self.rows = check_number(self.OWNER, "rows", rows, low=1, integer=True, allow_none=True)
        self.group = group
        self._feats: List[torch.Tensor] = []
        self._valid: List[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self._feats)

    def reset(self) -> None:
        """Forgets every stored batch."""
        self._feats, self._valid = [], []

    @staticmethod
    def _world(group) -> Tuple[int, int]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(group), dist.get_world_size(group)
        return 0, 1

    def push(self, feats: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
        """Stores (R,C) rows (and their (R,) bool validity; None: all valid) as the newest batch,
        gathered over the ranks (a collective: every rank must push)."""
        check_tensor(self.OWNER, "feats", feats, ndim=2, what="(R,C)")
        if valid is None:
            valid = torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device)
        check_tensor(self.OWNER, "valid", valid, ndim=1, dtypes=(torch.bool,), like=feats,
                     shape=(feats.shape[0],), what="(R,) one flag per row")
        if self._feats and (self._feats[0].shape[1] != feats.shape[1]):
            raise ValueError(f"{self.OWNER}: `feats` has {feats.shape[1]} channels but the pool holds "
                             f"{self._feats[0].shape[1]}; call reset() first")
        acc = acc_dtype(feats)
        x = feats.detach().to(acc)
        rank, world = self._world(self.group)
        R = x.shape[0]
        if self.rows is not None and R > self.rows:
            raise ValueError(f"{self.OWNER}: pushed {R} rows but the pool was built with rows = {self.rows} per rank")
        if world > 1:
            import torch.distributed as dist

            P = self.rows
            if P is None:  # negotiate the piece size: one small collective and a host sync
                n = torch.tensor([R], dtype=torch.int64, device=x.device)
                ns = [torch.empty_like(n) for _ in range(world)]
                dist.all_gather(ns, n, group=self.group)
                P = int(torch.stack(ns).max())
            piece = x.new_zeros((P, x.shape[1] + 1))
            piece[:R, :-1] = x
            piece[:R, -1] = valid.to(acc)
            pieces = [torch.empty_like(piece) for _ in range(world)]
            dist.all_gather(pieces, piece, group=self.group)
            pieces.insert(0, pieces.pop(rank))  # this rank's rows first
            both = torch.cat(pieces)
            x, valid = both[:, :-1], both[:, -1] > 0.5
        elif self.rows is not None and R < self.rows:
            x = torch.cat([x, x.new_zeros((self.rows - R, x.shape[1]))])
            valid = torch.cat([valid, valid.new_zeros((self.rows - R,))])
        if self._feats and (self._feats[0].device != x.device or self._feats[0].dtype != x.dtype):
            self._feats = [f.to(device=x.device, dtype=x.dtype) for f in self._feats]
            self._valid = [v.to(x.device) for v in self._valid]
        self._feats.insert(0, x)
        self._valid.insert(0, valid)
        del self._feats[self.size:], self._valid[self.size:]

    @property
    def memory(self) -> torch.Tensor:
        """(M,C): every stored row, newest batch first (this rank's rows first within it)."""
        if not self._feats:
            raise RuntimeError(f"{self.OWNER}: the pool is empty (push first)")
        return torch.cat(self._feats)

    @property
    def valid(self) -> torch.Tensor:
        """(M,) bool: which rows of :attr:`memory` are real (not padding, not skipped rows)."""
        if not self._valid:
            raise RuntimeError(f"{self.OWNER}: the pool is empty (push first)")
        return torch.cat(self._valid)


def _pairwise_iou(b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area[:, None] + area[None, :] - inter).clamp(min=eps)


class HEADContrastiveCKDLoss(nn.Module):
    r"""HEAD's RoI-to-source-pixel pairing under a contrastive loss: InfoNCE between the adapted
    student dense-head feature at each RoI's source pixel and the teacher R-CNN features, with a
    memory of past teacher features.

    The loss is the authors' library's ``CKDLoss`` (todd, ``losses/ckd.py``), which implements
    the contrastive KD of G-DetKD (Yao et al., ICCV 2021, arXiv 2108.07482; the "CKD" there is
    *contrastive* KD); the HEAD repository's early ``configs/kd/gdet*.py`` (their G-DetKD
    baseline) feed it exactly this pairing (``CustomAdapt`` + ``Index`` + ``Decouple``). It is
    not the loss of the HEAD paper, whose cross-architecture term is :class:`HEADCKDLoss`.

    With :math:`p_n` the L2-normalised adapted student row n, :math:`t_m` the L2-normalised
    teacher rows held by the memory pool (this batch's rows first, then the other ranks', then
    the previous ``pool_size - 1`` batches), :math:`\tau` = ``temperature``:

    .. math::
        \mathcal{L} = \frac{w}{|\mathcal{R}|}\sum_{n\in\mathcal{R}}\Big(
            \log\sum_{m\in\mathcal{N}(n)} e^{t_m\cdot p_n/\tau} - t_n\cdot p_n/\tau\Big)

    where :math:`\mathcal{N}(n)` (the negatives) is every valid memory row except row n itself
    and this batch's rows of the same image whose box overlaps n's with IoU > ``iou_threshold``
    (the positive is *not* in the denominator, unlike the textbook InfoNCE). This is the
    authors' ``ckd_loss``: ``-log(exp(s_nn) / sum(exp(s_mn) over non-ignored m))``, with the
    ignored pairs from ``ious > 0.5`` of each image's boxes, computed here as a log-sum-exp.
    The teacher side is detached and stored in the pool before the loss is computed, as the
    authors do; only the student side (and the adapter) gets gradients.

    Defaults of those configs (``configs/kd/gdet.py`` at 1179b780) and of todd: ``Decouple``
    adapters (``num_anchors=9``, ``bias=False``), weight 0.5, temperature 0.07, a pool of 10
    batches, IoU 0.5.

    Where this differs from the authors' code:

    - GT rows (level < 0) and rows outside the maps are skipped, as their ``CustomAdapt``
      does before the loss (their ``gdet`` config samples no GT proposals).
    - The positive is always excluded from the denominator (theirs only through IoU(b, b) = 1
      > 0.5, which fails for a zero-area box). IoU = inter / max(union, 1e-6), as todd 0.2.3a4.
    - A row with no negative at all is left out of the mean (theirs gives -inf).
    - Under DDP the ranks may hold different numbers of rows (pieces are padded, see
      :class:`HEADMemoryPool`); their ``all_gather`` needs equal counts.

    Args:
        in_channels, out_channels: C_s (256) and C_t (1024).
        loss_weight: w (finite, >= 0); 0.5 in those configs.
        num_anchors: per-anchor adapters (9 there) or None (one adapter).
        bias: adapter bias (False there).
        temperature: :math:`\tau` > 0 (0.07).
        pool_size: batches kept in the memory (10).
        iou_threshold: same-image pairs above it are not negatives (0.5).
        pool_rows: see :class:`HEADMemoryPool` ``rows``.

    Forward(student_feats, sources, teacher_feats, boxes, *, validate=False) returns a 0-d
    float32 loss (float64 for float64 inputs); it pushes the batch's teacher rows into
    :attr:`pool` (a collective under ``torch.distributed``: every rank must call it).
    """

    OWNER = "HEADContrastiveCKDLoss"

    def __init__(self, in_channels: int = 256, out_channels: int = 1024, loss_weight: float = 0.5,
                 num_anchors: Optional[int] = 9, bias: bool = False, temperature: float = 0.07,
                 pool_size: int = 10, iou_threshold: float = 0.5, pool_rows: Optional[int] = None) -> None:
        super().__init__()
        o = self.OWNER
        self.loss_weight = check_number(o, "loss_weight", loss_weight, low=0.0)
        self.temperature = check_number(o, "temperature", temperature, low=0.0, low_open=True)
        self.iou_threshold = check_number(o, "iou_threshold", iou_threshold)
        self.source = _SourceAdapter(o, in_channels, out_channels, num_anchors, bias)
        self.pool = HEADMemoryPool(pool_size, pool_rows)

    def forward(self, student_feats: Levels, sources: torch.Tensor, teacher_feats: torch.Tensor,
                boxes: torch.Tensor, *, validate: bool = False) -> torch.Tensor:
        r"""Contrastive KD (todd's ``CKDLoss``, after Yao et al., ICCV 2021) on HEAD's source-pixel
        pairing (Wang et al., ECCV 2022).

        Args:
            student_feats: L levels (N,C_s,H,W), the student head's ``cls_convs[-1]`` outputs.
            sources: (R,5) int64 rows [level, batch, y, x, j]; level < 0 rows are skipped.
            teacher_feats: (R,C_t) teacher ``shared_fcs[-1]`` features of the same RoIs.
            boxes: (R,4) the RoIs x1,y1,x2,y2 (for the same-image IoU > threshold exclusion).
            validate: as in :class:`HEADCKDLoss` (one host sync).

        Returns:
            0-d float32 (float64 for float64 inputs); exactly 0 with zero gradients when no row
            is kept.
        """
        o = self.OWNER
        levels, first = self.source.check(student_feats, sources)
        R = sources.shape[0]
        _check_rows(o, "teacher_feats", teacher_feats, like=first, rows=R, channels=self.source.out_channels,
                    what="(R,C_t), one row per source row")
        _check_rows(o, "boxes", boxes, like=first, rows=R, channels=4, what="(R,4) x1,y1,x2,y2")
        check_flag(o, "validate", validate)
        ok = self.source.valid(levels, sources)
        if validate:
            self.source.validate(ok, sources)
        acc = acc_dtype(first)
        t = F.normalize(teacher_feats.detach().to(acc), dim=1)
        self.pool.push(t, ok)
        memory, mem_ok = self.pool.memory.to(acc), self.pool.valid
        p = F.normalize(self.source(levels, sources, acc), dim=1)
        with _no_autocast(p.device):  # the (R, M) similarities stay in the accumulation dtype
            sim = p @ memory.t() / self.temperature
        b = boxes.detach().to(acc)
        same = sources[:, 1].unsqueeze(1) == sources[:, 1].unsqueeze(0)
        own = (same & (_pairwise_iou(b) > self.iou_threshold)) | torch.eye(R, dtype=torch.bool, device=b.device)
        allowed = mem_ok.unsqueeze(0).expand(R, -1).clone()
        allowed[:, :R] &= ~own  # this rank's rows of this batch come first in the memory
        neg_inf = torch.full((), -math.inf, dtype=acc, device=sim.device)
        lse = torch.logsumexp(torch.where(allowed, sim, neg_inf), dim=1)
        pos = (p * t).sum(1) / self.temperature
        keep = ok & allowed.any(1)
        per_row = torch.where(keep, lse - pos, torch.zeros((), dtype=acc, device=sim.device))
        return (per_row.sum() / keep.sum().to(acc).clamp(min=1) + _touch_all(levels, acc)) * self.loss_weight


# ============================================================================ dense (homogeneous)

class HEADDenseLoss(nn.Module):
    r"""HEAD for a one-stage assistant (dense head to dense head): every pixel of every level.

    .. math::
        \mathcal{L} = w\sum_l \frac{1}{N C H_l W_l}\sum_{n,c,h,w}
            \big(\mathrm{Conv}_{1\times1}(S_l) - T_l\big)^2_{nchw}

    The authors' early ``configs/kd/head.py`` (commit 56589e73): the RetinaNet head's
    ``cls_convs[-1]`` maps through one 1x1 ``Conv2d(256, 256)`` shared by the levels, MSE
    (mean per level, summed over levels) against the one-stage assistant's ``cls_convs[-1]``
    maps (detached), weight 1.0. The MSE is :func:`kdops.masked_mse` (``reduction="mean"``).

    Args:
        in_channels: the student maps' channels; out_channels: the target maps' channels.
        loss_weight: w (finite, >= 0), 1.0 as in that config.
    """

    OWNER = "HEADDenseLoss"

    def __init__(self, in_channels: int = 256, out_channels: int = 256, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.loss_weight = check_number(self.OWNER, "loss_weight", loss_weight, low=0.0)
        self.adapter = nn.Conv2d(_check_channels(self.OWNER, "in_channels", in_channels),
                                 _check_channels(self.OWNER, "out_channels", out_channels), kernel_size=1)

    def forward(self, student_feats: Levels, teacher_feats: Levels) -> torch.Tensor:
        r"""Dense HEAD mimicry (Wang et al., ECCV 2022, one-stage assistant).

        Args:
            student_feats: L levels (N,C_in,H,W) (or one tensor).
            teacher_feats: L levels (N,C_out,H,W) with the same N, H, W per level (detached).

        Returns:
            0-d float32 loss (float64 for float64 inputs); empty levels add exactly 0.
        """
        o = self.OWNER
        s_l, seq = as_levels(o, "student_feats", student_feats)
        t_l, t_seq = as_levels(o, "teacher_feats", teacher_feats)
        if (seq, len(s_l)) != (t_seq, len(t_l)):
            raise ValueError(f"{o}: `teacher_feats` must have one level per level of `student_feats` "
                             f"({len(s_l)}), got {len(t_l)}")
        first = check_levels(o, "student_feats", s_l, seq)
        check_levels(o, "teacher_feats", t_l, seq)
        if first.shape[1] != self.adapter.in_channels:
            raise ValueError(f"{o}: `student_feats` must have in_channels = {self.adapter.in_channels} channels, "
                             f"got {first.shape[1]}")
        for i, (s, t) in enumerate(zip(s_l, t_l)):
            sfx = f"[{i}]" if seq else ""
            check_tensor(o, f"teacher_feats{sfx}", t, like=first)
            want = (s.shape[0], self.adapter.out_channels) + tuple(s.shape[2:])
            if tuple(t.shape) != want:
                raise ValueError(f"{o}: `teacher_feats{sfx}` must have shape {want}, got {tuple(t.shape)}")
        acc = acc_dtype(first)
        w = self.adapter.weight.to(acc)
        bias = self.adapter.bias.to(acc) if self.adapter.bias is not None else None
        ys = []
        with _no_autocast(first.device):
            for s in s_l:
                if s.numel() == 0:  # conv2d refuses empty maps: an exact zero map, zero gradients
                    shape = (s.shape[0], self.adapter.out_channels) + tuple(s.shape[2:])
                    ys.append(s.new_zeros(shape, dtype=acc) + _zero_touching(s, acc) + _zero_touching(w, acc))
                else:
                    ys.append(F.conv2d(s.to(acc), w, bias))
        ts = [t.detach().to(acc) for t in t_l]
        return masked_mse(ys, ts, reduction="mean", scale=float(self.loss_weight)).sum()
