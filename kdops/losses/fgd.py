r"""FGD: Focal and Global Knowledge Distillation for Detectors (Yang et al., CVPR 2022).

Per distilled FPN level, with the student's feature :math:`S` (after the optional 1x1
``align`` conv), the teacher's :math:`T`, both (N,C,H,W):

.. math::
    \mathcal{L} = \alpha \mathcal{L}_{fg} + \beta \mathcal{L}_{bg}
                + \gamma \mathcal{L}_{at} + \lambda \mathcal{L}_{global}

- focal feature loss (paper Eq. 6): :math:`\mathcal{L}_{fg} = \frac1N \sum M^{fg}_{nhw}
  A^S_{nhw}(T) A^C_{nc}(T) (S - T)^2_{nchw}`, :math:`\mathcal{L}_{bg}` the same with
  :math:`M^{bg}`; masks from the GT boxes (:func:`kdops.box_masks`, mode and rule "fgd").
- attention loss (Eq. 7): :math:`\mathcal{L}_{at} = \frac1N\big(\sum |A^C(S) - A^C(T)|
  + \sum |A^S(S) - A^S(T)|\big)` -- :func:`fgd_attention_loss`.
- global loss (Eq. 9): :math:`\mathcal{L}_{global} = \frac1N \sum (\mathcal{R}_S(S) -
  \mathcal{R}_T(T))^2` with GcBlocks :math:`\mathcal{R}` -- :func:`fgd_global_loss`.

with the attention maps :math:`A^S = HW\,\mathrm{softmax}_{hw}(\frac1C \sum_c |F| / t)`,
:math:`A^C = C\,\mathrm{softmax}_c(\frac1{HW} \sum_{hw} |F| / t)` (:func:`fgd_attention_maps`).

All of this is the authors' ``mmdet/distillation/losses/fgd.py`` (``FeatureLoss``, master
branch, after its Jan 2022 fix of the transposed mask indexing), checked against an eager
transcription of it in ``tests/losses/test_fgd.py``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._dtype import acc_dtype
from ..nn.fgd import FGDGlobal, GcBlock
from ..ops import box_masks, masked_mse
from ..ops.box_ranges import check_boxes

__all__ = ["FGDLoss", "FGD_PRESETS", "fgd_attention_maps", "fgd_attention_loss", "fgd_global_loss"]

Feats = Union[torch.Tensor, Sequence[torch.Tensor]]

# The authors' configs (configs/distillers/fgd/*.py of github.com/yzd-v/FGD, master; YOLOX on the
# yolox branch): weights, temperature, the FPN outputs distilled (hooked at neck.fpn_convs.<i>.conv,
# YOLOX at neck.out_convs.<i>) and their strides.
FGD_PRESETS: Dict[str, dict] = {
    "retinanet": dict(alpha_fgd=1e-3, beta_fgd=5e-4, gamma_fgd=5e-4, lambda_fgd=5e-6, temperature=0.5,
                      strides=(8, 16, 32, 64, 128)),
    "gfl": dict(alpha_fgd=1e-3, beta_fgd=5e-4, gamma_fgd=5e-4, lambda_fgd=5e-6, temperature=0.5,
                strides=(8, 16, 32, 64, 128)),
    "fcos": dict(alpha_fgd=1.6e-3, beta_fgd=8e-4, gamma_fgd=8e-4, lambda_fgd=8e-6, temperature=0.8,
                 strides=(8, 16, 32, 64, 128)),
    "reppoints": dict(alpha_fgd=1.6e-3, beta_fgd=8e-4, gamma_fgd=8e-4, lambda_fgd=8e-6, temperature=0.5,
                      strides=(8, 16, 32, 64, 128)),
    "faster_rcnn": dict(alpha_fgd=5e-5, beta_fgd=2.5e-5, gamma_fgd=5e-5, lambda_fgd=5e-7, temperature=0.5,
                        strides=(4, 8, 16, 32)),
    "mask_rcnn": dict(alpha_fgd=5e-5, beta_fgd=2.5e-5, gamma_fgd=5e-5, lambda_fgd=5e-7, temperature=0.5,
                      strides=(4, 8, 16, 32)),
    "solo": dict(alpha_fgd=1e-3, beta_fgd=5e-4, gamma_fgd=5e-4, lambda_fgd=5e-6, temperature=0.5,
                 strides=(4, 8, 16, 32)),
    "yolox": dict(alpha_fgd=2e-3, beta_fgd=1e-3, gamma_fgd=1e-3, lambda_fgd=1e-5, temperature=0.5,
                  strides=(8, 16, 32)),
}


# ------------------------------------------------------------------------------ validation

def _number(owner: str, name: str, value, *, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if positive else value >= 0)
    if not ok:
        what = "a positive finite number" if positive else "a finite number >= 0"
        raise ValueError(f"{owner}: `{name}` must be {what}, got {value!r}")
    return float(value)


def _levels(owner: str, name: str, x, count: Optional[int] = None) -> List[torch.Tensor]:
    """A tensor or a non-empty sequence of (N,C,H,W) floating tensors -> list."""
    if isinstance(x, torch.Tensor):
        xs = [x]
    elif isinstance(x, (list, tuple)) and len(x) > 0:
        xs = list(x)
    else:
        raise TypeError(f"{owner}: `{name}` must be a (N,C,H,W) tensor or a non-empty sequence of them (one per "
                        f"FPN level), got {type(x).__name__}")
    if count is not None and len(xs) != count:
        raise ValueError(f"{owner}: `{name}` must have {count} level(s), got {len(xs)}")
    for l, t in enumerate(xs):
        where = name if len(xs) == 1 and isinstance(x, torch.Tensor) else f"{name}[{l}]"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{owner}: `{where}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{owner}: `{where}` must have shape (N,C,H,W), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{owner}: `{where}` must be a floating tensor, got {t.dtype}")
    return xs


def _pair(owner: str, student: Feats, teacher: Feats, count: Optional[int] = None, same_channels: bool = True):
    S = _levels(owner, "student", student, count)
    T = _levels(owner, "teacher", teacher, len(S))
    for l, (s, t) in enumerate(zip(S, T)):
        if s.device != t.device:
            raise ValueError(f"{owner}: level {l}: `student` is on {s.device} and `teacher` on {t.device}")
        if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:] or (same_channels and s.shape[1] != t.shape[1]):
            want = "the same shape" if same_channels else "the same N, H and W"
            raise ValueError(f"{owner}: level {l}: `student` and `teacher` must have {want}, got "
                             f"{tuple(s.shape)} and {tuple(t.shape)}")
    return S, T


# ------------------------------------------------------------------------------- functions

def fgd_attention_maps(feat: torch.Tensor, temperature: float = 0.5):
    r"""FGD's spatial and channel attention of a feature map, differentiable (paper Eqs. 3-4).

    .. math::
        A^S = HW\,\mathrm{softmax}_{hw}\Big(\frac{1}{t\,C}\sum_c |F_{c}|\Big),\qquad
        A^C = C\,\mathrm{softmax}_{c}\Big(\frac{1}{t\,HW}\sum_{hw} |F_{hw}|\Big)

    (the authors' ``get_attention``). feat (N,C,H,W) -> (A^S (N,H,W), A^C (N,C)), computed in
    float32 (float64 for float64 input) without materialising |F|. On an empty map (C, H or W = 0)
    the means over the empty dimension are 0, so the other attention is uniform, never NaN.
    :func:`kdops.losses.fgd_attention` is this, validated and under ``torch.no_grad`` (teachers).
    """
    N, C, H, W = feat.shape
    acc = acc_dtype(feat)
    spatial = torch.linalg.vector_norm(feat, ord=1, dim=1, dtype=acc).reshape(N, H * W) / max(C, 1)
    channel = torch.linalg.vector_norm(feat, ord=1, dim=(2, 3), dtype=acc) / max(H * W, 1)
    s_att = (H * W) * F.softmax(spatial / temperature, dim=1)
    c_att = C * F.softmax(channel / temperature, dim=1)
    return s_att.reshape(N, H, W), c_att


def _attention_term(s_maps, t_maps, n: int) -> torch.Tensor:
    (ss, sc), (ts, tc) = s_maps, t_maps
    return ((sc - tc).abs().sum() + (ss - ts).abs().sum()) / max(n, 1)


def fgd_attention_loss(student: Feats, teacher: Feats, *, temperature: float = 0.5,
                       loss_weight: float = 1.0) -> torch.Tensor:
    r"""FGD's attention loss (paper Eq. 7, the authors' ``get_mask_loss``), summed over levels.

    .. math::
        \mathcal{L}_{at} = \frac{w}{N}\Big(\sum_{n,c} |A^C_{nc}(S) - A^C_{nc}(T)|
            + \sum_{n,h,w} |A^S_{nhw}(S) - A^S_{nhw}(T)|\Big)

    with :func:`fgd_attention_maps` at temperature t: an L1 *sum* divided by the batch size N
    (the paper's "L1 loss" reads as a mean; the code sums). w is FGD's gamma.
    The teacher is a constant (detached); the student gets gradients.

    Args:
        student, teacher: (N,C,H,W) tensors or sequences of FPN levels (same shapes per level).
        temperature: t > 0. loss_weight: w (gamma).

    Returns a 0-d float32 tensor (float64 for float64 inputs).
    """
    owner = "fgd_attention_loss"
    S, T = _pair(owner, student, teacher)
    t = _number(owner, "temperature", temperature, positive=True)
    w = _number(owner, "loss_weight", loss_weight)
    total = S[0].new_zeros((), dtype=acc_dtype(S[0]))
    for s, tt in zip(S, T):
        if s.numel() == 0:
            continue
        with torch.no_grad():
            t_maps = fgd_attention_maps(tt.detach(), t)
        total = total + _attention_term(fgd_attention_maps(s, t), t_maps, s.shape[0])
    return total * w


def _global_term(s: torch.Tensor, t: torch.Tensor, add_s: torch.Tensor, add_t: torch.Tensor) -> torch.Tensor:
    # sum((s + a_s) - (t + a_t))^2 = sum (s-t)^2 + 2 sum_nc d_nc sum_hw (s-t) + HW sum d^2, d = a_s - a_t:
    # the (N,C,H,W) sums run fused (masked_mse, two channel sums), no R(F) tensor is materialised.
    N, C, H, W = s.shape
    acc = acc_dtype(s)
    d = (add_s - add_t).reshape(N, C).to(acc)
    diff_sum = s.sum(dim=(2, 3), dtype=acc) - t.sum(dim=(2, 3), dtype=acc)
    total = masked_mse(s, t) + 2.0 * (d * diff_sum).sum() + (H * W) * d.pow(2).sum()
    return total / max(N, 1)


def fgd_global_loss(student: Feats, teacher: Feats, gc_student, gc_teacher=None, *,
                    loss_weight: float = 1.0) -> torch.Tensor:
    r"""FGD's global (relation) loss (paper Eq. 9, the authors' ``get_rela_loss``), summed over levels.

    .. math::
        \mathcal{L}_{global} = \frac{w}{N} \sum_{n,c,h,w}
            \big(\mathcal{R}_S(S) - \mathcal{R}_T(T)\big)^2_{nchw}

    with the GcBlocks :math:`\mathcal{R}(F) = F + \mathrm{add}(F)` (:class:`kdops.nn.GcBlock`);
    w is FGD's lambda. Evaluated as
    :math:`\sum (S-T)^2 + 2\sum_{nc} \delta_{nc} \sum_{hw}(S-T) + HW \sum \delta^2`,
    :math:`\delta = \mathrm{add}_S(S) - \mathrm{add}_T(T)`, so no (N,C,H,W) temporary is made.
    The teacher's features are constants (detached); both GcBlocks and the student get gradients.

    Args:
        student, teacher: (N,C,H,W) tensors or sequences of FPN levels (same shapes per level).
        gc_student: a :class:`~kdops.nn.GcBlock`, or a :class:`~kdops.nn.FGDGlobal` (then
            ``gc_teacher`` must be None), or a sequence of either, one per level.
        gc_teacher: the teacher's GcBlock(s) (the authors: a separate one); None = the same as
            ``gc_student`` (the paper's single R) unless ``gc_student`` is an FGDGlobal.
        loss_weight: w (lambda).

    Returns a 0-d float32 tensor (float64 for float64 inputs).
    """
    owner = "fgd_global_loss"
    S, T = _pair(owner, student, teacher)
    w = _number(owner, "loss_weight", loss_weight)

    def per_level(blocks, name):
        if blocks is None:
            return [None] * len(S)
        if isinstance(blocks, (GcBlock, FGDGlobal)):
            bl = [blocks]
        elif isinstance(blocks, (list, tuple, nn.ModuleList)):
            bl = list(blocks)
        else:
            raise TypeError(f"{owner}: `{name}` must be a kdops.nn.GcBlock, a kdops.nn.FGDGlobal or a sequence of "
                            f"them (one per level), got {type(blocks).__name__}")
        if len(bl) != len(S):
            raise ValueError(f"{owner}: `{name}` must have {len(S)} block(s) (one per level), got {len(bl)}")
        allowed = (GcBlock,) if name == "gc_teacher" else (GcBlock, FGDGlobal)
        for b in bl:
            if not isinstance(b, allowed):
                want = " or ".join(f"kdops.nn.{c.__name__}" for c in allowed)
                raise TypeError(f"{owner}: `{name}` must hold {want} modules, got {type(b).__name__}")
        return bl

    GS, GT = per_level(gc_student, "gc_student"), per_level(gc_teacher, "gc_teacher")
    total = S[0].new_zeros((), dtype=acc_dtype(S[0]))
    for l, (s, t, gs, gt) in enumerate(zip(S, T, GS, GT)):
        if isinstance(gs, FGDGlobal):
            if gt is not None:
                raise ValueError(f"{owner}: `gc_teacher` must be None when `gc_student` is an FGDGlobal")
            gs, gt = gs.student, gs.teacher_block
        gt = gs if gt is None else gt
        if s.shape[1] != gs.channels:
            raise ValueError(f"{owner}: level {l}: the GcBlocks have {gs.channels} channels, the features "
                             f"{s.shape[1]}")
        if s.numel() == 0:
            total = total + _touch([gs, gt], total)
            continue
        t = t.detach()
        total = total + _global_term(s, t, gs.channel_add(s), gt.channel_add(t))
    return total * w


def _touch(modules, like: torch.Tensor) -> torch.Tensor:
    """0 times every parameter: an empty level still reaches every trainable parameter (DDP)."""
    z = like.new_zeros(())
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            if p.requires_grad:
                z = z + 0.0 * p.sum().to(z.dtype)
    return z


# ------------------------------------------------------------------------------------ module

class FGDLoss(nn.Module):
    r"""FGD's complete loss -- focal, attention and global terms -- on one or more FPN levels.

    Per level l (the authors build one ``FeatureLoss`` per distilled level, all with the same
    weights, and add them up; so does this module, each level with its own ``align`` conv and
    its own GcBlocks):

    .. math::
        \mathcal{L} = w\sum_l \Big(\alpha\,\mathcal{L}^l_{fg} + \beta\,\mathcal{L}^l_{bg}
            + \gamma\,\mathcal{L}^l_{at} + \lambda\,\mathcal{L}^l_{global}\Big)

    - :math:`\mathcal{L}_{fg}, \mathcal{L}_{bg} = \frac1N \sum M A^S(T) A^C(T) (S-T)^2` with
      FGD's masks: :math:`M^{fg} = \max_k 1/(H_k W_k)` over the GT boxes covering a pixel,
      :math:`M^{bg}` = uncovered pixels / their count (:func:`kdops.box_masks`, mode "fgd",
      ``mask_rule``); fused in :func:`kdops.masked_mse`, no (N,C,H,W) weight.
    - :math:`\mathcal{L}_{at}`: :func:`fgd_attention_loss`; :math:`\mathcal{L}_{global}`:
      :func:`fgd_global_loss` with this level's :class:`~kdops.nn.FGDGlobal`.
    - S is the student's feature after ``align`` (a 1x1 conv C_s -> C_t with PyTorch's default
      init, present only when ``student_channels`` differs from ``teacher_channels``; the
      authors keep it in the loss, so it is trained with the student and dropped at export).
    - The teacher is a constant (detached, as under the authors' ``torch.no_grad``); its
      GcBlocks are trained.

    Defaults (the authors' configs; ``FGDLoss.from_preset(name, ...)`` applies a row):

    ============== ========= ========= ========= ========= ===== ============ =====================
    preset         alpha     beta      gamma     lambda    T     levels       configs
    ============== ========= ========= ========= ========= ===== ============ =====================
    retinanet      1e-3      5e-4      5e-4      5e-6      0.5   P3-P7        retina r101/x101 -> r50/r101
    gfl            1e-3      5e-4      5e-4      5e-6      0.5   P3-P7        gfl r101 -> r50
    solo           1e-3      5e-4      5e-4      5e-6      0.5   P2-P5        solo r101 -> r50
    fcos           1.6e-3    8e-4      8e-4      8e-6      0.8   P3-P7        fcos r101 -> r50
    reppoints      1.6e-3    8e-4      8e-4      8e-6      0.5   P3-P7        reppoints r101/x101 -> r50/r101
    faster_rcnn    5e-5      2.5e-5    5e-5      5e-7      0.5   P2-P5        faster r101, cascade x101 -> r50/r101
    mask_rcnn      5e-5      2.5e-5    5e-5      5e-7      0.5   P2-P5        mask r101, cascade x101 -> r50
    yolox          2e-3      1e-3      1e-3      1e-5      0.5   3 out_convs  yolox-l -> m (192 -> 256 ch)
    ============== ========= ========= ========= ========= ===== ============ =====================

    The constructor defaults are the RetinaNet row (the one-stage anchor-based setting).
    The authors' ``FeatureLoss`` signature defaults differ only in gamma (1e-3 on master, which
    no config uses; 5e-4 on the later yolox branch).

    Args:
        teacher_channels: C_t (>= 2). student_channels: C_s (default C_t: no ``align``).
        num_levels: levels distilled (one align conv and one FGDGlobal each).
        strides: one per level; needed unless ``image_size`` is given to forward with
            ``mask_rule="fgd"`` (FGD scales boxes by feature size / image size, not 1/stride).
        alpha_fgd, beta_fgd, gamma_fgd, lambda_fgd: the weights (>= 0). temperature: t > 0.
        mask_rule: box-to-pixel rule of :func:`kdops.box_ranges` ("fgd": FGD's
            [floor(x1 r), ceil(x2 r)] closed range; "center", "lgd").
        shared_global: one GcBlock for student and teacher (the paper's single R) instead of
            the authors' two.
        loss_weight: w, an overall factor (schedules set it; 0 keeps every parameter in the graph).

    Forward(student, teacher, boxes, batch_index, image_size=None, *, return_components=False):
        student: (N,C_s,H_l,W_l) or a sequence of ``num_levels`` such tensors; teacher
        likewise with C_t; boxes (K,4) xyxy in input-image pixels; batch_index (K,) int64
        (boxes of images outside [0, N) are ignored); image_size: None (use ``strides``),
        (height, width) for all images, or per image an (N,2) tensor or a sequence of N
        (height, width) -- FGD uses each image's unpadded ``img_shape``. Returns the 0-d loss
        (float32; float64 for float64 inputs), or with ``return_components`` a dict
        ``loss_fg, loss_bg, loss_attention, loss_global`` of weighted sums over levels that add
        up to it. Levels with no pixels (or N = 0) give exact zeros; K = 0 gives
        ``loss_fg`` = 0.

    Example (RetinaNet, batch of 2 padded to 800x1216, unpadded sizes per image)::

        fgd = FGDLoss.from_preset("retinanet", teacher_channels=256)   # 5 levels
        loss = fgd(student_fpn, teacher_fpn, gt_boxes, gt_batch_index,
                   image_size=[(800, 1199), (750, 1216)])
    """

    def __init__(self, teacher_channels: int = 256, student_channels: Optional[int] = None, *, num_levels: int = 1,
                 strides: Optional[Sequence[float]] = None, alpha_fgd: float = 1e-3, beta_fgd: float = 5e-4,
                 gamma_fgd: float = 5e-4, lambda_fgd: float = 5e-6, temperature: float = 0.5, mask_rule: str = "fgd",
                 shared_global: bool = False, loss_weight: float = 1.0) -> None:
        super().__init__()
        owner = "FGDLoss"
        for name, value, lo in (("teacher_channels", teacher_channels, 2), ("num_levels", num_levels, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{owner}: `{name}` must be an integer >= {lo}, got {value!r}")
        if student_channels is None:
            student_channels = teacher_channels
        if isinstance(student_channels, bool) or not isinstance(student_channels, int) or student_channels < 1:
            raise ValueError(f"{owner}: `student_channels` must be None or an integer >= 1, got {student_channels!r}")
        if strides is not None:
            if not isinstance(strides, (list, tuple)) or len(strides) != num_levels:
                raise ValueError(f"{owner}: `strides` must be None or a sequence of {num_levels} positive numbers "
                                 f"(one per level), got {strides!r}")
            strides = tuple(_number(owner, f"strides[{i}]", s, positive=True) for i, s in enumerate(strides))
        if mask_rule not in ("fgd", "center", "lgd"):
            raise ValueError(f"{owner}: `mask_rule` must be one of ('fgd', 'center', 'lgd'), got {mask_rule!r}")
        if not isinstance(shared_global, bool):
            raise TypeError(f"{owner}: `shared_global` must be a bool, got {type(shared_global).__name__}")
        self.teacher_channels, self.student_channels, self.num_levels = teacher_channels, student_channels, num_levels
        self.strides, self.mask_rule = strides, mask_rule
        self.alpha_fgd = _number(owner, "alpha_fgd", alpha_fgd)
        self.beta_fgd = _number(owner, "beta_fgd", beta_fgd)
        self.gamma_fgd = _number(owner, "gamma_fgd", gamma_fgd)
        self.lambda_fgd = _number(owner, "lambda_fgd", lambda_fgd)
        self.temperature = _number(owner, "temperature", temperature, positive=True)
        self.loss_weight = _number(owner, "loss_weight", loss_weight)
        self.align = None
        if student_channels != teacher_channels:
            self.align = nn.ModuleList(nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
                                       for _ in range(num_levels))
        self.global_blocks = nn.ModuleList(FGDGlobal(teacher_channels, shared=shared_global)
                                           for _ in range(num_levels))

    @classmethod
    def from_preset(cls, name: str, teacher_channels: int = 256, student_channels: Optional[int] = None,
                    **overrides) -> "FGDLoss":
        """An FGDLoss with the weights, temperature, level count and strides of the authors'
        config for a detector family (:data:`FGD_PRESETS`; see the class docstring's table);
        keyword ``overrides`` replace any of them."""
        if name not in FGD_PRESETS:
            raise ValueError(f"FGDLoss.from_preset: `name` must be one of {sorted(FGD_PRESETS)}, got {name!r}")
        kw = dict(FGD_PRESETS[name])
        kw["num_levels"] = len(kw["strides"])
        kw.update(overrides)
        return cls(teacher_channels, student_channels, **kw)

    def extra_repr(self) -> str:
        return (f"teacher_channels={self.teacher_channels}, student_channels={self.student_channels}, "
                f"num_levels={self.num_levels}, alpha_fgd={self.alpha_fgd}, beta_fgd={self.beta_fgd}, "
                f"gamma_fgd={self.gamma_fgd}, lambda_fgd={self.lambda_fgd}, temperature={self.temperature}, "
                f"mask_rule={self.mask_rule!r}, loss_weight={self.loss_weight}")

    # -------------------------------------------------------------------------------- helpers
    def _image_size(self, image_size, n: int, boxes: torch.Tensor, batch_index: torch.Tensor):
        """None, (h, w) or the (K,2) per-box tensor box_masks takes."""
        owner = "FGDLoss"
        if image_size is None:
            if self.strides is None:
                raise ValueError(f"{owner}: give `image_size` to forward or `strides` to the constructor "
                                 f"(the masks need one of them)")
            return None
        if isinstance(image_size, torch.Tensor):
            per_image = image_size
        elif (isinstance(image_size, (list, tuple)) and len(image_size) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in image_size)):
            h, w = image_size
            if not (math.isfinite(h) and math.isfinite(w) and h > 0 and w > 0):
                raise ValueError(f"{owner}: `image_size` (height, width) must be positive, got {image_size!r}")
            return float(h), float(w)
        elif isinstance(image_size, (list, tuple)) and all(
                isinstance(v, (list, tuple)) and len(v) == 2 for v in image_size):
            per_image = torch.tensor([[float(h), float(w)] for h, w in image_size], dtype=torch.float64,
                                     device=boxes.device)
        else:
            raise TypeError(f"{owner}: `image_size` must be None, (height, width), an (N,2) tensor or a sequence of "
                            f"N (height, width) pairs, got {type(image_size).__name__}")
        if per_image.dim() != 2 or per_image.shape != (n, 2):
            raise ValueError(f"{owner}: per-image `image_size` must be (N,2) = ({n}, 2), got {tuple(per_image.shape)}")
        if per_image.device != boxes.device:
            raise ValueError(f"{owner}: `image_size` is on {per_image.device}, `boxes` on {boxes.device}")
        if n == 0 or boxes.shape[0] == 0:
            return per_image.new_ones((boxes.shape[0], 2))
        # per box; boxes of images outside [0, N) are ignored by box_masks, so any row will do for them
        return per_image[batch_index.clamp(0, n - 1)]

    def _check_boxes(self, boxes, batch_index, device):
        owner = "FGDLoss"
        for name, value in (("boxes", boxes), ("batch_index", batch_index)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{owner}: `{name}` must be a torch.Tensor, got {type(value).__name__}")
        if boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
            raise ValueError(f"{owner}: `boxes` must be a floating (K,4) xyxy tensor, got {boxes.dtype} "
                             f"{tuple(boxes.shape)}")
        if batch_index.dtype != torch.int64 or batch_index.shape != (boxes.shape[0],):
            raise ValueError(f"{owner}: `batch_index` must be an int64 ({boxes.shape[0]},) tensor (one image per box), "
                             f"got {batch_index.dtype} {tuple(batch_index.shape)}")
        if boxes.device != device or batch_index.device != device:
            raise ValueError(f"{owner}: `boxes` ({boxes.device}) and `batch_index` ({batch_index.device}) must be on "
                             f"the features' device {device}")

    # -------------------------------------------------------------------------------- forward
    def forward(self, student: Feats, teacher: Feats, boxes: torch.Tensor, batch_index: torch.Tensor,
                image_size=None, *, return_components: bool = False):
        r"""FGD's loss over the FPN levels (Yang et al., "Focal and Global Knowledge Distillation
        for Detectors", CVPR 2022): per level, the focal term (fg/bg masks from the GT boxes
        times the teacher's attention), the attention term and the global (GcBlock) term, each
        divided by N as in the authors' code, summed over levels, times ``loss_weight``.

        Args:
            student: (N,C_s,H,W) or a sequence of ``num_levels`` such levels.
            teacher: (N,C_t,H,W) per level, same sizes (detached here).
            boxes: (K,4) GT boxes, xyxy in input-image pixels.
            batch_index: (K,) int64, the image of each box.
            image_size: None (use ``strides``), (h, w) for every image, an (N,2) tensor or a
                list of N (h, w): each image's unpadded size (mmdet's ``img_shape``), which scales
                boxes to feature pixels as the authors do.
            return_components: return ``{"loss_fg", "loss_bg", "loss_attention",
                "loss_global"}`` instead of their sum.

        Returns:
            0-d loss (float32; float64 for float64 inputs), or the dict of components.
            Empty levels and images without boxes contribute exact zeros.
        """
        owner = "FGDLoss"
        S, T = _pair(owner, student, teacher, self.num_levels, same_channels=False)
        for l, (s, t) in enumerate(zip(S, T)):
            if s.shape[1] != self.student_channels:
                raise ValueError(f"{owner}: `student` level {l} must have {self.student_channels} channels, "
                                 f"got {tuple(s.shape)}")
            if t.shape[1] != self.teacher_channels:
                raise ValueError(f"{owner}: `teacher` level {l} must have {self.teacher_channels} channels, "
                                 f"got {tuple(t.shape)}")
        device = S[0].device
        if any(x.device != device for x in S + T):
            raise ValueError(f"{owner}: all levels must be on one device")
        self._check_boxes(boxes, batch_index, device)
        N = S[0].shape[0]
        if any(x.shape[0] != N for x in S + T):
            raise ValueError(f"{owner}: every level must have the same batch size N, got "
                             f"{[tuple(x.shape) for x in S]}")
        img = self._image_size(image_size, N, boxes, batch_index)
        check_boxes(boxes, batch_index, N)  # warns once about boxes that cover nothing (host-readable only)
        strides = self.strides if self.strides is not None else (1.0,) * self.num_levels  # unused by rule "fgd"+size
        acc = acc_dtype(S[0])
        zero = S[0].new_zeros((), dtype=acc)
        parts = {"loss_fg": zero, "loss_bg": zero, "loss_attention": zero, "loss_global": zero}
        live = [l for l, s in enumerate(S) if s.shape[0] * s.shape[2] * s.shape[3] > 0]
        masks = {}
        if live:
            sizes = [(N, S[l].shape[2], S[l].shape[3]) for l in live]
            fgs, bgs = box_masks(boxes.detach(), batch_index, sizes, [strides[l] for l in live], rule=self.mask_rule,
                                 image_size=img, mode="fgd", dtype=acc)
            masks = {l: (fg, bg) for l, fg, bg in zip(live, fgs, bgs)}
        for l, (s, t) in enumerate(zip(S, T)):
            blocks = [self.global_blocks[l]] + ([self.align[l]] if self.align is not None else [])
            if l not in masks:
                parts["loss_global"] = parts["loss_global"] + _touch(blocks, zero)
                continue
            if self.align is not None:
                s = self.align[l](s)
            t = t.detach()
            fg, bg = masks[l]
            with torch.no_grad():
                t_maps = fgd_attention_maps(t, self.temperature)
            s_att, c_att = t_maps
            n = s.shape[0]
            # the feature terms' factors (and the loss weight) are folded into masked_mse: its CPU
            # backward then has no pass left to scale the student's gradient by
            w = float(self.loss_weight) / n
            if return_components:
                parts["loss_fg"] = parts["loss_fg"] + masked_mse(
                    s, t, pixel_weight=fg * s_att, channel_weight=c_att, scale=self.alpha_fgd * w)
                parts["loss_bg"] = parts["loss_bg"] + masked_mse(
                    s, t, pixel_weight=bg * s_att, channel_weight=c_att, scale=self.beta_fgd * w)
            else:  # one fused pass: both terms share (s - t)^2 and the attention
                pw = (self.alpha_fgd * fg + self.beta_fgd * bg) * s_att
                parts["loss_fg"] = parts["loss_fg"] + masked_mse(s, t, pixel_weight=pw, channel_weight=c_att, scale=w)
            parts["loss_attention"] = parts["loss_attention"] + self.gamma_fgd * _attention_term(
                fgd_attention_maps(s, self.temperature), t_maps, n)
            add_s, add_t = self.global_blocks[l](s, t)
            parts["loss_global"] = parts["loss_global"] + self.lambda_fgd * _global_term(s, t, add_s, add_t)
        parts = {k: v if k in ("loss_fg", "loss_bg") else v * self.loss_weight for k, v in parts.items()}
        if return_components:
            return parts
        return parts["loss_fg"] + parts["loss_attention"] + parts["loss_global"]
