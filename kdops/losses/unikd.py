r"""UniKD's losses and box tools (Lao et al., "UniKD: Universal Knowledge Distillation for Mimicking
Homogeneous or Heterogeneous Object Detectors", ICCV 2023), tensors in and tensors out.

UniKD trains in two stages (the modules are in :mod:`kdops.nn.unikd`):

1. Each Adaptive Knowledge Extractor (AKE) learns, on the frozen teacher's FPN, to detect: its
   knowledge embeddings z go through a DETR prediction head and :class:`UniKDMatchingLoss`
   (Deformable DETR's set loss; content queries are Hungarian-matched, positional queries come
   with their GT from :func:`sample_positional_boxes`).
2. The student, through :class:`kdops.nn.UniKDAdaptor`, mimics the teacher's knowledge embeddings:
   :class:`UniKDLoss`, a positive/negative decoupled MSE (positives of the content queries from
   :func:`content_positive_mask`).

Boxes: GTs are absolute (x1, y1, x2, y2) in input-image pixels with the image size (H, W); the
AKE's queries and predictions are normalised (cx, cy, w, h) in [0,1]
(:func:`xyxy_to_normalized_cxcywh` converts). No code was released; every choice the paper leaves
open is stated where it is made.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._dtype import acc_dtype
from ..ops._validation import check_choice, check_number, check_numbers, check_tensor

__all__ = [
    "UniKDLoss", "UniKDMatchingLoss", "content_positive_mask", "hungarian_match", "sample_positional_boxes",
    "unikd_decoupled_mse", "xyxy_to_normalized_cxcywh",
]

_EPS = 1e-12
_MARGIN = 1e-4  # sampled boxes keep this distance to the IoU bounds, so no rounding can cross them
_MATCH = "kdops.losses.hungarian_match"
_CONVERT = "kdops.losses.xyxy_to_normalized_cxcywh"


# ============================================================================ boxes

def xyxy_to_normalized_cxcywh(boxes: torch.Tensor, image_size) -> torch.Tensor:
    """(...,4) absolute (x1, y1, x2, y2) in an (H, W) image -> (...,4) (cx, cy, w, h) divided by
    (W, H, W, H): the AKE's box format."""
    H, W = check_numbers(_CONVERT, "image_size", _pair(image_size), length=2, low=0.0,
                         low_open=True)
    check_tensor(_CONVERT, "boxes", boxes, what="(...,4)")
    if boxes.dim() == 0 or boxes.shape[-1] != 4:
        raise ValueError(f"{_CONVERT}: `boxes` must be (...,4), got {tuple(boxes.shape)}")
    return _to_cxcywh(boxes) / boxes.new_tensor([W, H, W, H])


def _pair(x):
    return x.tolist() if isinstance(x, torch.Tensor) else x


def _to_cxcywh(b):
    return torch.stack([(b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2, b[..., 2] - b[..., 0],
                        b[..., 3] - b[..., 1]], -1)


def _to_xyxy(b):
    half = b[..., 2:] / 2
    return torch.cat([b[..., :2] - half, b[..., :2] + half], -1)


def _iou(a: torch.Tensor, b: torch.Tensor, aligned: bool, giou: bool = False) -> torch.Tensor:
    """IoU (or GIoU) of xyxy boxes: (A,4) x (B,4) -> (A,B), or aligned (...,4) pairs -> (...)."""
    if not aligned:
        a, b = a[:, None], b[None]
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    wh = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=_EPS)
    if not giou:
        return iou
    enc = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0)
    area_c = (enc[..., 0] * enc[..., 1]).clamp(min=_EPS)
    return iou - (area_c - union) / area_c


# ============================================================================ matching

def hungarian_match(cost: torch.Tensor, *, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Minimum-cost bipartite matching of a (Q,G) cost matrix (rectangular either way).

    Returns ``(rows, cols)``, int64 on ``cost``'s device, of length min(Q,G), rows increasing:
    :math:`\sum_k C[r_k, c_k]` is minimal among matchings that pair every row (Q <= G) or every
    column (Q > G). G = 0 or Q = 0 gives empty tensors.

    Args:
        cost: (Q,G) finite floating costs (read on the host: matching is a host algorithm).
        backend: "auto" (scipy's ``linear_sum_assignment`` when scipy imports, else the built-in
            one), "scipy", or "python" -- the shortest-augmenting-path Hungarian algorithm with
            potentials (Kuhn-Munkres as Jonker-Volgenant organise it, O(n^2 m) for n <= m),
            vectorised over columns with numpy.
    """
    check_tensor(_MATCH, "cost", cost, ndim=2, what="(Q,G)")
    check_choice(_MATCH, "backend", backend, ("auto", "scipy", "python"))
    c = cost.detach().to("cpu", torch.float64).numpy()
    if c.size and not bool(torch.isfinite(cost.detach()).all()):
        raise ValueError(f"{_MATCH}: `cost` must be finite, got {int((~torch.isfinite(cost)).sum())} "
                         "NaN/inf entries")
    if c.size == 0:
        rows, cols = [], []
    else:
        if backend == "auto":
            try:
                import scipy.optimize  # noqa: F401
                backend = "scipy"
            except ImportError:
                backend = "python"
        if backend == "scipy":
            from scipy.optimize import linear_sum_assignment
            rows, cols = linear_sum_assignment(c)
        else:
            rows, cols = _hungarian(c)
    dev = cost.device
    return (torch.as_tensor(rows, dtype=torch.int64).to(dev), torch.as_tensor(cols, dtype=torch.int64).to(dev))


def _hungarian(c):
    """Rows, cols of a minimum-cost assignment of the float64 numpy matrix c (n x m, any shape)."""
    import numpy as np

    if c.shape[0] > c.shape[1]:
        cols, rows = _hungarian(c.T)
        order = np.argsort(rows)
        return rows[order], cols[order]
    n, m = c.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)  # potentials; index 0 is the virtual start column
    p = np.zeros(m + 1, dtype=np.int64)  # p[j]: row (1-based) matched to column j, 0 = free
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv, used = np.full(m + 1, np.inf), np.zeros(m + 1, dtype=bool)
        while True:  # Dijkstra on reduced costs until a free column is reached
            used[j0] = True
            i0 = p[j0]
            free = ~used[1:]
            cur = c[i0 - 1] - u[i0] - v[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            masked = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(masked)) + 1
            delta = masked[j1 - 1]
            u[p[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:  # augment along the alternating path
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    cols = np.nonzero(p[1:])[0]
    rows = p[1:][cols] - 1
    order = np.argsort(rows)
    return rows[order], cols[order]


def _focal_cost(logits, labels, alpha, gamma):
    """Deformable DETR's HungarianMatcher class cost (Q,G)."""
    prob = logits.sigmoid()[:, labels]
    neg = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    return pos - neg


def _match_image(logits, boxes, gt, labels, weights, alpha, gamma):
    """Hungarian matching of one image's Q predictions to its G normalised cxcywh GTs."""
    with torch.no_grad():
        if gt.shape[0] == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=logits.device)
            return empty, empty
        logits, boxes = logits.to(gt.dtype), boxes.to(gt.dtype)
        cost = (weights[0] * _focal_cost(logits, labels, alpha, gamma) + weights[1] * torch.cdist(boxes, gt, p=1)
                - weights[2] * _iou(_to_xyxy(boxes), _to_xyxy(gt), aligned=False, giou=True))
        return hungarian_match(cost)


def _image_sizes(owner, image_sizes, N) -> List[Tuple[float, float]]:
    pairs = _pair(image_sizes)
    if not isinstance(pairs, (list, tuple)) or len(pairs) != N:
        raise ValueError(f"{owner}: `image_sizes` must be N={N} (H, W) pairs (a sequence or an (N,2) tensor), "
                         f"got {image_sizes!r}")
    return [check_numbers(owner, f"image_sizes[{n}]", p, length=2, low=0.0, low_open=True)
            for n, p in enumerate(pairs)]


def _check_predictions(owner, cls_logits, pred_boxes, num_classes=None):
    check_tensor(owner, "cls_logits", cls_logits, ndim=3, what="(N,Q,K)")
    if num_classes is not None and cls_logits.shape[2] != num_classes:
        raise ValueError(f"{owner}: `cls_logits` must be (N,Q,K) with K=num_classes={num_classes}, "
                         f"got {tuple(cls_logits.shape)}")
    N, Q = cls_logits.shape[:2]
    check_tensor(owner, "pred_boxes", pred_boxes, like=cls_logits, shape=(N, Q, 4),
                 what="(N,Q,4) normalised (cx,cy,w,h)")
    return N, Q, cls_logits.shape[2]


def _check_gts(owner, gt_boxes, gt_labels, image_sizes, N, K, like):
    """Normalised cxcywh GTs (acc dtype) and labels, one per image, after checking them."""
    for name, x in (("gt_boxes", gt_boxes), ("gt_labels", gt_labels)):
        if not isinstance(x, (list, tuple)) or len(x) != N:
            got = f"{len(x)} entries" if isinstance(x, (list, tuple)) else type(x).__name__
            raise ValueError(f"{owner}: `{name}` must be a list of N={N} tensors (one per image), got {got}")
    sizes = _image_sizes(owner, image_sizes, N)
    gts = []
    for n, (b, lab, (H, W)) in enumerate(zip(gt_boxes, gt_labels, sizes)):
        check_tensor(owner, f"gt_boxes[{n}]", b, ndim=2, like=like, what="(G,4) x1,y1,x2,y2")
        G = b.shape[0]
        if b.shape[1] != 4:
            raise ValueError(f"{owner}: `gt_boxes[{n}]` must be (G,4) x1,y1,x2,y2, got {tuple(b.shape)}")
        check_tensor(owner, f"gt_labels[{n}]", lab, dtypes=(torch.int64,), like=like, shape=(G,), what="(G,) int64")
        if G and bool(((lab < 0) | (lab >= K)).any()):
            raise ValueError(f"{owner}: `gt_labels[{n}]` must lie in [0, {K}) (K from `cls_logits`), got "
                             f"{lab.tolist()}")
        gts.append(_to_cxcywh(b.to(acc_dtype(like))) / b.new_tensor([W, H, W, H], dtype=acc_dtype(like)))
    return gts


def content_positive_mask(cls_logits: torch.Tensor, pred_boxes: torch.Tensor, gt_boxes: Sequence[torch.Tensor],
                          gt_labels: Sequence[torch.Tensor], image_sizes, *, cls_weight: float = 2.0,
                          l1_weight: float = 5.0, giou_weight: float = 2.0, focal_alpha: float = 0.25,
                          focal_gamma: float = 2.0) -> torch.Tensor:
    r"""Which content queries are positive in stage 2 (UniKD, Lao et al., ICCV 2023):
    those the Hungarian matching of stage 1 pairs with a GT, computed on the teacher's
    predictions ``ake.predict(z_T, reference)`` with :class:`UniKDMatchingLoss`'s cost.

    Args:
        cls_logits: (N,Q,K) the prediction head's logits on the teacher's z.
        pred_boxes: (N,Q,4) its normalised (cx, cy, w, h) boxes.
        gt_boxes: N tensors (G_n,4) absolute x1,y1,x2,y2; gt_labels: N int64 (G_n,) in [0, K).
        image_sizes: N (H, W) pairs or an (N,2) tensor.
        cls_weight, l1_weight, giou_weight, focal_alpha, focal_gamma: the matching cost's.

    Returns:
        (N,Q) bool, True at the min(Q, G_n) matched queries of each image. No gradient.
    """
    owner = "kdops.losses.content_positive_mask"
    N, Q, K = _check_predictions(owner, cls_logits, pred_boxes)
    weights = [check_number(owner, k, v, low=0.0) for k, v in
               (("cls_weight", cls_weight), ("l1_weight", l1_weight), ("giou_weight", giou_weight))]
    alpha = check_number(owner, "focal_alpha", focal_alpha, low=0.0, high=1.0)
    gamma = check_number(owner, "focal_gamma", focal_gamma, low=0.0)
    gts = _check_gts(owner, gt_boxes, gt_labels, image_sizes, N, K, cls_logits)
    mask = torch.zeros(N, Q, dtype=torch.bool, device=cls_logits.device)
    for n in range(N):
        rows, _ = _match_image(cls_logits[n], pred_boxes[n], gts[n], gt_labels[n], weights, alpha, gamma)
        mask[n, rows] = True
    return mask


# ============================================================================ stage 1

class UniKDMatchingLoss(nn.Module):
    r"""UniKD's stage-1 loss: the AKE as a detector (Lao et al., ICCV 2023), Deformable
    DETR's set loss (Zhu et al., ICLR 2021; Carion et al., ECCV 2020).

    Content queries are matched per image by the Hungarian algorithm with the cost
    :math:`\lambda_{cls} C_{focal} + \lambda_{L1}\lVert b - \hat b\rVert_1 - \lambda_{giou}\mathrm{GIoU}(b,\hat b)`
    (Deformable DETR's ``HungarianMatcher``: :math:`C_{focal} = \alpha(1-p)^\gamma(-\log p) -
    (1-\alpha)p^\gamma(-\log(1-p))` at the GT class); positional queries come with their GT
    (``assigned_gt``, -1 for negatives, from :func:`sample_positional_boxes`). With
    :math:`N_{gt} = \max(\sum_n G_n, 1)`:

    .. math::
        \mathcal{L}_{cls} = \frac{\lambda_{cls}}{N_{gt}}\sum_{n,q,k} \mathrm{FL}(x_{nqk}, t_{nqk}),\quad
        \mathcal{L}_{L1} = \frac{\lambda_{L1}}{N_{gt}}\sum_{(q,g)}\lVert b_q - \hat b_g\rVert_1,\quad
        \mathcal{L}_{giou} = \frac{\lambda_{giou}}{N_{gt}}\sum_{(q,g)} 1 - \mathrm{GIoU}(b_q, \hat b_g)

    FL the sigmoid focal loss, t one-hot at the matched GT's class (all zeros for unmatched or
    negative queries); the sums over (q,g) run over matched/positive pairs; boxes are normalised
    (cx, cy, w, h) (GIoU on their corners). Losses are returned already weighted (the weights are
    both matching costs and loss weights, as Deformable DETR's 2/5/2). Assumption: positional
    queries are normalised by the GT count too (the paper gives no normaliser for them).

    Args:
        num_classes: K.
        cls_weight, l1_weight, giou_weight: λ's (2, 5, 2).
        focal_alpha, focal_gamma: the focal loss's α, γ (0.25, 2).
    """

    def __init__(self, num_classes: int, cls_weight: float = 2.0, l1_weight: float = 5.0, giou_weight: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_classes = check_number(owner, "num_classes", num_classes, low=1, integer=True)
        self.weights = [check_number(owner, k, v, low=0.0) for k, v in
                        (("cls_weight", cls_weight), ("l1_weight", l1_weight), ("giou_weight", giou_weight))]
        self.focal_alpha = check_number(owner, "focal_alpha", focal_alpha, low=0.0, high=1.0)
        self.focal_gamma = check_number(owner, "focal_gamma", focal_gamma, low=0.0)

    def forward(self, cls_logits: torch.Tensor, pred_boxes: torch.Tensor, gt_boxes: Sequence[torch.Tensor],
                gt_labels: Sequence[torch.Tensor], image_sizes,
                assigned_gt: Optional[Sequence[torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        r"""Stage-1 set loss of one AKE's predictions (UniKD, Lao et al., ICCV 2023; Deformable DETR).

        Args:
            cls_logits: (N,Q,K) logits of ``ake.predict``; pred_boxes: (N,Q,4) normalised (cx,cy,w,h).
            gt_boxes: N tensors (G_n,4) absolute x1,y1,x2,y2; gt_labels: N int64 (G_n,) in [0, K).
            image_sizes: N (H, W) pairs or an (N,2) tensor (normalise the GTs).
            assigned_gt: None (content queries: Hungarian matching), or N int64 (Q,) tensors, the GT
                index of each positional query, -1 for a negative.

        Returns:
            {"loss_cls", "loss_bbox", "loss_giou"}: 0-d weighted losses (float32; float64 inputs:
            float64).
        """
        owner = type(self).__name__
        N, Q, K = _check_predictions(owner, cls_logits, pred_boxes, self.num_classes)
        gts = _check_gts(owner, gt_boxes, gt_labels, image_sizes, N, K, cls_logits)
        if assigned_gt is None:
            matches = [_match_image(cls_logits[n], pred_boxes[n], gts[n], gt_labels[n], self.weights,
                                    self.focal_alpha, self.focal_gamma) for n in range(N)]
        else:
            matches = self._given(owner, assigned_gt, gts, N, Q, cls_logits)
        acc = acc_dtype(cls_logits)
        logits = cls_logits.to(acc)
        target = torch.zeros_like(logits)
        for n, (rows, cols) in enumerate(matches):
            target[n, rows, gt_labels[n][cols]] = 1.0
        num_gt = max(sum(g.shape[0] for g in gts), 1)
        prob = logits.sigmoid()
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p_t = prob * target + (1 - prob) * (1 - target)
        a_t = self.focal_alpha * target + (1 - self.focal_alpha) * (1 - target)
        loss_cls = (a_t * ce * (1 - p_t) ** self.focal_gamma).sum() / num_gt
        empty = [pred_boxes.new_zeros(0, 4, dtype=acc)]
        pred = torch.cat([pred_boxes[n, rows].to(acc) for n, (rows, _) in enumerate(matches)] or empty)
        gt = torch.cat([gts[n][cols] for n, (_, cols) in enumerate(matches)] or empty)
        loss_bbox = (pred - gt).abs().sum() / num_gt
        loss_giou = (1 - _iou(_to_xyxy(pred), _to_xyxy(gt), aligned=True, giou=True)).sum() / num_gt
        w = self.weights
        return {"loss_cls": w[0] * loss_cls, "loss_bbox": w[1] * loss_bbox, "loss_giou": w[2] * loss_giou}

    @staticmethod
    def _given(owner, assigned_gt, gts, N, Q, like):
        if not isinstance(assigned_gt, (list, tuple)) or len(assigned_gt) != N:
            raise ValueError(f"{owner}: `assigned_gt` must be None or a list of N={N} (Q,) int64 tensors")
        out = []
        for n, a in enumerate(assigned_gt):
            check_tensor(owner, f"assigned_gt[{n}]", a, dtypes=(torch.int64,), like=like, shape=(Q,),
                         what="(Q,) int64, -1 for negatives")
            G = gts[n].shape[0]
            if Q and bool(((a < -1) | (a >= G)).any()):
                raise ValueError(f"{owner}: `assigned_gt[{n}]` must lie in [-1, {G}) (G = len(gt_boxes[{n}])), "
                                 f"got min {int(a.min())} max {int(a.max())}")
            rows = torch.nonzero(a >= 0).flatten()
            out.append((rows, a[rows]))
        return out


def sample_positional_boxes(gt_boxes: torch.Tensor, image_size, num: int = 200, pos_fraction: float = 0.5,
                            pos_iou: float = 0.6, neg_iou: float = 0.4,
                            generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Boxes for UniKD's positional queries (Lao et al., ICCV 2023): positives jittered
    around the GTs, negatives on the background.

    - ``round(num · pos_fraction)`` positives (none without a GT of positive area), assigned to
      the valid GTs in turn (a random permutation, repeated): each is the GT with its centre moved by
      :math:`U(-\tfrac14,\tfrac14)\cdot(w,h)` and its sides scaled by :math:`e^{U(-0.3,0.3)}`,
      clipped to the image, the first of 10 draws with IoU > ``pos_iou`` with its GT; if none
      passes, the GT itself (IoU 1). Every positive has IoU > pos_iou with its GT.
    - the rest are negatives: random boxes inside the image (centre uniform, sides
      :math:`e^{U(\log 0.02, \log 0.6)}\cdot(W,H)`, clipped), kept when their IoU with every GT
      is < ``neg_iou``; up to 10 rounds of draws. Fallback when too few pass: the accepted ones
      are repeated in turn; when none passes, the box (0, 0, s, s) with
      :math:`s^2 = \texttt{neg\_iou}\cdot\min_g \mathrm{area}_g / 4`, whose IoU with any GT g is at
      most area_s / area_g <= neg_iou / 4. Every negative has IoU < neg_iou with every GT.

    The checks run in float64 on the boxes already rounded to the output dtype, with a 1e-4
    margin inside both bounds, so no rounding of the result can break them. GTs with
    x2 <= x1 or y2 <= y1 (or non-finite) get no positives (their IoU with anything is 0).
    Deterministic given ``generator`` (CPU; None: torch's global generator).

    Args:
        gt_boxes: (G,4) absolute x1,y1,x2,y2 (G may be 0).
        image_size: (H, W).
        num: boxes to return (>= 1); pos_fraction: share of positives in [0,1].
        pos_iou: in [0, 1); neg_iou: in (0, 1].

    Returns:
        (boxes (num,4) x1,y1,x2,y2 absolute in gt_boxes' dtype and device, positives first;
        assigned_gt (num,) int64, the GT index of a positive, -1 for a negative). Convert with
        :func:`xyxy_to_normalized_cxcywh` for the AKE.
    """
    owner = "kdops.losses.sample_positional_boxes"
    check_tensor(owner, "gt_boxes", gt_boxes, ndim=2, what="(G,4) x1,y1,x2,y2")
    if gt_boxes.shape[1] != 4:
        raise ValueError(f"{owner}: `gt_boxes` must be (G,4) x1,y1,x2,y2, got {tuple(gt_boxes.shape)}")
    H, W = check_numbers(owner, "image_size", _pair(image_size), length=2, low=0.0, low_open=True)
    num = check_number(owner, "num", num, low=1, integer=True)
    pos_fraction = check_number(owner, "pos_fraction", pos_fraction, low=0.0, high=1.0)
    pos_iou = check_number(owner, "pos_iou", pos_iou, low=0.0, high=1.0 - 2 * _MARGIN)
    neg_iou = check_number(owner, "neg_iou", neg_iou, low=2 * _MARGIN, high=1.0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{owner}: `generator` must be None or a torch.Generator, got {type(generator).__name__}")
    f64, out_dtype = torch.float64, gt_boxes.dtype

    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=f64)

    def finish(b):  # clip to the image, round to the output dtype
        b = torch.stack([b[..., 0].clamp(0, W), b[..., 1].clamp(0, H), b[..., 2].clamp(0, W),
                         b[..., 3].clamp(0, H)], -1)
        return b.to(out_dtype).to(f64)

    gt = gt_boxes.detach().to("cpu", f64)
    valid = torch.isfinite(gt).all(1) & (gt[:, 2] > gt[:, 0]) & (gt[:, 3] > gt[:, 1])
    vidx = torch.nonzero(valid).flatten()
    vgt = gt[vidx]
    n_pos = int(round(num * pos_fraction)) if len(vidx) else 0
    n_neg, tries = num - n_pos, 10
    assign = vidx[torch.randperm(len(vidx), generator=generator)][torch.arange(n_pos) % max(len(vidx), 1)]
    g = gt[assign]
    c = _to_cxcywh(g)
    u = rand(tries, n_pos, 4) * 2 - 1
    centre = c[:, :2] + 0.25 * u[..., :2] * c[:, 2:]
    size = c[:, 2:] * torch.exp(0.3 * u[..., 2:])
    cand = finish(torch.cat([centre - size / 2, centre + size / 2], -1))  # (tries, n_pos, 4)
    ok = _iou(cand, g.expand_as(cand), aligned=True) > pos_iou + _MARGIN
    first = ok.to(torch.int8).argmax(0)
    pos = torch.where(ok.any(0)[:, None], cand[first, torch.arange(n_pos)], g)

    accepted, count = [], 0
    for _ in range(tries if n_neg else 0):
        k = max(n_neg, 16)
        centre = rand(k, 2) * torch.tensor([W, H], dtype=f64)
        size = torch.exp(math.log(0.02) + rand(k, 2) * math.log(0.6 / 0.02)) * torch.tensor([W, H], dtype=f64)
        cand = finish(torch.cat([centre - size / 2, centre + size / 2], -1))
        keep = (cand[:, 2] > cand[:, 0]) & (cand[:, 3] > cand[:, 1])
        if len(vgt):
            keep &= _iou(cand, vgt, aligned=False).amax(1) < neg_iou - _MARGIN
        accepted.append(cand[keep])
        count += int(keep.sum())
        if count >= n_neg:
            break
    neg = torch.cat(accepted) if accepted else gt.new_zeros(0, 4)
    if 0 < len(neg) < n_neg:
        neg = neg[torch.arange(n_neg) % len(neg)]
    elif len(neg) == 0 and n_neg:
        areas = (vgt[:, 2] - vgt[:, 0]) * (vgt[:, 3] - vgt[:, 1])
        s = math.sqrt(neg_iou * (float(areas.min()) if len(areas) else W * H) / 4)
        neg = finish(torch.tensor([[0.0, 0.0, s, s]], dtype=f64)).expand(n_neg, 4)
    boxes = torch.cat([pos, neg[:n_neg]]).to(gt_boxes.device, out_dtype)
    assigned = torch.cat([assign, torch.full((n_neg,), -1, dtype=torch.int64)]).to(gt_boxes.device)
    return boxes, assigned


# ============================================================================ stage 2

def unikd_decoupled_mse(student: torch.Tensor, teacher: torch.Tensor, pos_mask: torch.Tensor) -> torch.Tensor:
    r"""UniKD's decoupled knowledge-embedding MSE (Lao et al., ICCV 2023):

    .. math::
        D(z^S, z^T) = \frac{1}{|P|\,C}\sum_{(n,q)\in P}\lVert z^S_{nq} - z^T_{nq}\rVert^2
                    + \frac{1}{|\bar P|\,C}\sum_{(n,q)\in \bar P}\lVert z^S_{nq} - z^T_{nq}\rVert^2

    P the positive queries (over the whole batch), :math:`\bar P` the negatives; a term whose set
    is empty is exactly 0. The teacher is detached.

    Args:
        student, teacher: (N,Q,C) knowledge embeddings (same shape, dtype and device).
        pos_mask: (N,Q) bool.

    Returns:
        0-d float32 (float64 for float64 inputs). No host synchronisation.
    """
    owner = "kdops.losses.unikd_decoupled_mse"
    _check_pair(owner, ("student", "teacher", "pos_mask"), student, teacher, pos_mask)
    return _decoupled(student, teacher, pos_mask)


def _check_pair(owner, names, student, teacher, mask):
    check_tensor(owner, names[0], student, ndim=3, what="(N,Q,C)")
    check_tensor(owner, names[1], teacher, like=student, shape=tuple(student.shape),
                 what=f"(the shape of `{names[0]}`)")
    if teacher.dtype != student.dtype:
        raise TypeError(f"{owner}: `{names[0]}` is {student.dtype} but `{names[1]}` is {teacher.dtype}; cast one")
    if student.shape[2] == 0:
        raise ValueError(f"{owner}: `{names[0]}` must have C >= 1 channels, got {tuple(student.shape)}")
    check_tensor(owner, names[2], mask, dtypes=(torch.bool,), like=student, shape=tuple(student.shape[:2]),
                 what="(N,Q) bool")


def _decoupled(student, teacher, mask):
    acc = acc_dtype(student)
    d = (student.to(acc) - teacher.detach().to(acc)).pow(2).mean(-1)  # (N,Q)
    zero = d.new_zeros(())
    pos = torch.where(mask, d, zero).sum() / mask.sum().clamp(min=1).to(acc)
    neg = torch.where(mask, zero, d).sum() / (~mask).sum().clamp(min=1).to(acc)
    return pos + neg


class UniKDLoss(nn.Module):
    r"""UniKD's stage-2 distillation loss (Lao et al., ICCV 2023, the total KD loss):

    .. math::
        \mathcal{L}_{KD} = \lambda_1 D(z^S_{ct}, z^T_{ct}) + \lambda_2 D(z^S_{pos}, z^T_{pos})

    with D :func:`unikd_decoupled_mse`. Positive content queries: :func:`content_positive_mask`;
    positive positional queries: ``assigned_gt >= 0`` of :func:`sample_positional_boxes`.

    Args:
        content_weight: λ1 (10).
        positional_weight: λ2 (10).
    """

    def __init__(self, content_weight: float = 10.0, positional_weight: float = 10.0) -> None:
        super().__init__()
        self.content_weight = check_number(type(self).__name__, "content_weight", content_weight, low=0.0)
        self.positional_weight = check_number(type(self).__name__, "positional_weight", positional_weight, low=0.0)

    def forward(self, student_content: Optional[torch.Tensor], teacher_content: Optional[torch.Tensor],
                content_pos_mask: Optional[torch.Tensor], student_positional: Optional[torch.Tensor] = None,
                teacher_positional: Optional[torch.Tensor] = None,
                positional_pos_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        r"""Stage-2 loss (UniKD, Lao et al., ICCV 2023).

        Args:
            student_content, teacher_content: (N,Q_ct,C) z of the content AKE on the adapted
                student's / the teacher's maps; content_pos_mask: (N,Q_ct) bool.
            student_positional, teacher_positional: (N,Q_pos,C) of the positional AKE;
                positional_pos_mask: (N,Q_pos) bool.
            A kind whose three arguments are all None is left out of the result.

        Returns:
            {"loss_content": λ1·D, "loss_positional": λ2·D} for the kinds given (0-d, float32;
            float64 for float64 inputs); the teacher's side gets no gradient.
        """
        owner = type(self).__name__
        out = {}
        for key, w, names, args in (
                ("loss_content", self.content_weight, ("student_content", "teacher_content", "content_pos_mask"),
                 (student_content, teacher_content, content_pos_mask)),
                ("loss_positional", self.positional_weight,
                 ("student_positional", "teacher_positional", "positional_pos_mask"),
                 (student_positional, teacher_positional, positional_pos_mask))):
            if all(a is None for a in args):
                continue
            if any(a is None for a in args):
                missing = ", ".join(f"`{n}`" for n, a in zip(names, args) if a is None)
                raise ValueError(f"{owner}: give all of {', '.join(names)} or none of them; {missing} is None")
            _check_pair(owner, names, *args)
            out[key] = w * _decoupled(*args)
        if not out:
            raise ValueError(f"{owner}: give the content or the positional embeddings (all arguments are None)")
        return out
