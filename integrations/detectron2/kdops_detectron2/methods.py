"""The distillation methods KDDetector dispatches to, one registry entry each.

A method is an ``nn.Module`` subclass of :class:`KDMethod` registered under a name
(``MODEL.KD.METHOD``). It owns its trainable parts (connectors, FGD's GcBlocks, LGD's encoders),
which train with the student and are dropped at export, and it turns one :class:`KDContext`
(the student's tapped features, the teacher's if it ``needs_teacher``, GT boxes, image sizes)
into a dict of losses; the loss math lives in :mod:`kdops.losses`, not here.

Adding a method, e.g. a teacher-free one (LGD)::

    from kdops_detectron2 import KDMethod, register_method

    @register_method("lgd")
    class LGDMethod(KDMethod):
        needs_teacher = False                       # no MODEL.KD.TEACHER section allowed

        def __init__(self, cfg, student, student_shapes, teacher_shapes=None):
            super().__init__(cfg, student, student_shapes, teacher_shapes)
            self.lgd = ...                          # kdops.nn.LGDInstructiveKnowledge(...)
            self.lgd_loss = ...                     # kdops.losses.LGDLoss(...)

        def scheduled(self, key):                   # only the distillation term follows the
            return key == "loss_lgd"                # warm-up / stop factor; *_tea losses don't

        def forward(self, ctx):
            feats = [ctx.features[t] for t in self.taps]
            inst = self.lgd(feats, ctx.boxes, ctx.labels, ctx.batch_index, ctx.padded_size)
            losses = ctx.head_losses(dict(zip(self.taps, inst)), suffix="_tea")  # student's own head
            losses["loss_lgd"] = self.lgd_loss(feats, [x.detach() for x in inst])
            return losses
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Type

import torch
import torch.nn as nn
from detectron2.layers import ShapeSpec
from detectron2.structures import ImageList, Instances

from kdops.losses import FeatureMimicLoss, FGDLoss, PKDLoss

from .config import resolve_taps
from .heads import student_head_losses

METHODS: Dict[str, Type["KDMethod"]] = {}


def register_method(name: str) -> Callable[[Type["KDMethod"]], Type["KDMethod"]]:
    """Class decorator: registers a :class:`KDMethod` subclass as ``MODEL.KD.METHOD = name``."""
    key = name.lower()

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, KDMethod)):
            raise TypeError(f"register_method({name!r}): {cls!r} is not a KDMethod subclass")
        if key in METHODS and METHODS[key] is not cls:
            raise KeyError(f"register_method: a KD method named {key!r} is already registered ({METHODS[key]})")
        cls.method_name = key
        METHODS[key] = cls
        return cls

    return deco


@dataclass
class KDContext:
    """What a method sees in one training step (all on the student's device).

    Attributes:
        student: the plain detectron2 student (RetinaNet / GeneralizedRCNN), training mode.
        images: the student's padded, normalised batch; ``images.tensor`` is (N,3,H_pad,W_pad).
        features: ``student.backbone(images.tensor)``: level name -> (N,C,H,W), with gradients.
        teacher_features: the teacher backbone's output on the same images (re-normalised with the
            teacher's pixel mean/std), computed under ``no_grad``; None for teacher-free methods.
        gt_instances: one ``Instances`` per image (``gt_boxes``, ``gt_classes``).
        boxes: (K,4) float xyxy GT boxes of the whole batch, resized-image pixels.
        labels: (K,) int64 class indices (0-based, detectron2's ``gt_classes``).
        batch_index: (K,) int64, the image of each box.
        image_sizes: N (height, width) unpadded sizes after resizing (``images.image_sizes``).
        padded_size: (H_pad, W_pad), from ``images.tensor.shape``.
        iteration: the iteration KDTrainer's schedule hook last set (0 before any).
    """

    student: nn.Module
    images: ImageList
    features: Dict[str, torch.Tensor]
    teacher_features: Optional[Dict[str, torch.Tensor]]
    gt_instances: List[Instances]
    boxes: torch.Tensor
    labels: torch.Tensor
    batch_index: torch.Tensor
    image_sizes: List[Tuple[int, int]]
    padded_size: Tuple[int, int]
    iteration: int = 0
    extra: dict = field(default_factory=dict)

    def head_losses(self, features: Dict[str, torch.Tensor], suffix: str = "") -> Dict[str, torch.Tensor]:
        """The student's own head (RPN + ROI heads for GeneralizedRCNN) on other ``features``,
        with this batch's GT targets: :func:`kdops_detectron2.student_head_losses`."""
        return student_head_losses(self.student, features, self.images, self.gt_instances, suffix=suffix)


class KDMethod(nn.Module):
    """Base of the registered methods.

    Class attributes:
        needs_teacher: whether KDDetector builds and runs a frozen teacher for this method
            (``MODEL.KD.TEACHER.*`` required); False: a teacher section is a config error.

    Constructor ``(cfg, student, student_shapes, teacher_shapes)``: the full KD config, the
    student module (to read its structure or register hooks on it; do not store it as an
    attribute, it would be registered twice), ``student.backbone.output_shape()`` and the
    teacher's (None without a teacher). ``self.taps`` holds the tapped level names, ``self.strides``
    their strides on the student, ``self.loss_weight`` ``MODEL.KD.LOSS_WEIGHT``.

    ``forward(ctx: KDContext) -> Dict[str, Tensor]``: the method's losses (names ``loss_*``, none
    of the student's own keys). KDDetector multiplies those for which ``scheduled(key)`` is true by
    the warm-up / stop factor (also at factor 0: the terms stay in the graph).
    """

    needs_teacher: bool = True
    method_name: str = ""

    def __init__(self, cfg, student: nn.Module, student_shapes: Dict[str, ShapeSpec],
                 teacher_shapes: Optional[Dict[str, ShapeSpec]] = None) -> None:
        super().__init__()
        self.taps = resolve_taps(cfg)
        for name, shapes in (("student", student_shapes), ("teacher", teacher_shapes)):
            if shapes is None:
                continue
            missing = [t for t in self.taps if t not in shapes]
            if missing:
                raise ValueError(f"MODEL.KD.TAPS: the {name}'s backbone has no level {missing} "
                                 f"(it outputs {sorted(shapes)})")
        self.strides = [int(student_shapes[t].stride) for t in self.taps]
        self.loss_weight = float(cfg.MODEL.KD.LOSS_WEIGHT)
        self.iteration = 0

    def set_iteration(self, iteration: int) -> None:
        """Called by KDTrainer's schedule hook before every step."""
        self.iteration = int(iteration)

    def scheduled(self, key: str) -> bool:
        """Whether loss ``key`` is multiplied by the KD schedule factor (default: all)."""
        return True

    def forward(self, ctx: KDContext) -> Dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """The method's losses for one step (see the class docstring)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for feature methods
    def pairs(self, ctx: KDContext) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """(student levels, teacher levels) at ``self.taps``; teacher detached."""
        s = [ctx.features[t] for t in self.taps]
        t = [ctx.teacher_features[t].detach() for t in self.taps]
        return s, t


def make_connectors(taps: List[str], student_shapes, teacher_shapes, mode: str, default_always: bool):
    """A ``ModuleDict`` tap -> 1x1 conv (student channels -> teacher channels), or None.

    ``mode`` is ``MODEL.KD.CONNECTOR``: "none" never, "conv1x1" on every tap, "auto" on every tap
    when ``default_always`` (FitNet's regressor, DeFeat's adapter) else only where channels differ.
    Channels that differ with ``mode="none"`` are an error.
    """
    convs = {}
    for t in taps:
        cs, ct = student_shapes[t].channels, teacher_shapes[t].channels
        want = mode == "conv1x1" or (mode == "auto" and (default_always or cs != ct))
        if mode == "none" and cs != ct:
            raise ValueError(f"MODEL.KD.CONNECTOR 'none': level {t} has {cs} student and {ct} teacher channels")
        if want:
            convs[t] = nn.Conv2d(cs, ct, kernel_size=1)
    return nn.ModuleDict(convs) if convs else None


class _FeatureMethod(KDMethod):
    connector_always = False

    def __init__(self, cfg, student, student_shapes, teacher_shapes=None) -> None:
        super().__init__(cfg, student, student_shapes, teacher_shapes)
        self.connectors = make_connectors(self.taps, student_shapes, teacher_shapes, cfg.MODEL.KD.CONNECTOR,
                                          self.connector_always)

    def connected(self, ctx: KDContext) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        s, t = self.pairs(ctx)
        if self.connectors is not None:
            s = [self.connectors[name](x) if name in self.connectors else x for name, x in zip(self.taps, s)]
        return s, t


@register_method("pkd")
class PKDMethod(_FeatureMethod):
    """PKD (Cao et al., NeurIPS 2022), :class:`kdops.losses.PKDLoss` on the tapped levels after the
    connectors (where channels differ): ``loss_pkd``. mmrazor's COCO setting: P3-P6, weight 10."""

    def __init__(self, cfg, student, student_shapes, teacher_shapes=None) -> None:
        super().__init__(cfg, student, student_shapes, teacher_shapes)
        self.loss = PKDLoss(loss_weight=self.loss_weight)

    def forward(self, ctx: KDContext) -> Dict[str, torch.Tensor]:
        """``{"loss_pkd": PKDLoss(connected student levels, teacher levels)}``."""
        s, t = self.connected(ctx)
        return {"loss_pkd": self.loss(s, t)}


@register_method("fitnet")
class FitNetMethod(_FeatureMethod):
    """FitNet hints (Romero et al., ICLR 2015) on the FPN: a 1x1 conv regressor per level and a plain
    MSE (:class:`kdops.losses.FeatureMimicLoss`, ``normalize="numel"``): ``loss_fitnet``."""

    connector_always = True

    def __init__(self, cfg, student, student_shapes, teacher_shapes=None) -> None:
        super().__init__(cfg, student, student_shapes, teacher_shapes)
        self.loss = FeatureMimicLoss(normalize="numel", loss_weight=self.loss_weight)

    def forward(self, ctx: KDContext) -> Dict[str, torch.Tensor]:
        """``{"loss_fitnet": mean squared error, summed over levels}``."""
        s, t = self.connected(ctx)
        return {"loss_fitnet": self.loss(s, t)}


@register_method("defeat")
class DeFeatMethod(_FeatureMethod):
    """DeFeat (Guo et al., CVPR 2021) as LutingWang/HEAD re-implements it: GT-box foreground and
    background masks, each normalised per image, ``FG_WEIGHT`` / ``BG_WEIGHT`` (1 / 4), summed
    squared error (:class:`kdops.losses.FeatureMimicLoss`, ``mask_mode="defeat"``, boxes / stride),
    an adapter conv per level: ``loss_defeat``. The COCO weight is 1/256."""

    connector_always = True

    def __init__(self, cfg, student, student_shapes, teacher_shapes=None) -> None:
        super().__init__(cfg, student, student_shapes, teacher_shapes)
        d = cfg.MODEL.KD.DEFEAT
        self.loss = FeatureMimicLoss(fg_weight=float(d.FG_WEIGHT), bg_weight=float(d.BG_WEIGHT), normalize="none",
                                     loss_weight=self.loss_weight, strides=[float(s) for s in self.strides],
                                     mask_mode="defeat")

    def forward(self, ctx: KDContext) -> Dict[str, torch.Tensor]:
        """``{"loss_defeat": ...}`` with masks from ``ctx.boxes`` / ``ctx.batch_index``."""
        s, t = self.connected(ctx)
        return {"loss_defeat": self.loss(s, t, boxes=ctx.boxes, batch_index=ctx.batch_index)}


@register_method("fgd")
class FGDMethod(KDMethod):
    """FGD (Yang et al., CVPR 2022): :class:`kdops.losses.FGDLoss` (focal + attention + global terms,
    its own ``align`` conv when channels differ, one GcBlock pair per level) with the masks of the
    GT boxes scaled by each image's unpadded size, as the authors' code: ``loss_fgd``."""

    def __init__(self, cfg, student, student_shapes, teacher_shapes=None) -> None:
        super().__init__(cfg, student, student_shapes, teacher_shapes)
        f = cfg.MODEL.KD.FGD
        cs = {student_shapes[t].channels for t in self.taps}
        ct = {teacher_shapes[t].channels for t in self.taps}
        if len(cs) != 1 or len(ct) != 1:
            raise ValueError(f"MODEL.KD.METHOD 'fgd' needs one channel count over MODEL.KD.TAPS {self.taps}, "
                             f"got student {sorted(cs)} and teacher {sorted(ct)}")
        if cfg.MODEL.KD.CONNECTOR == "conv1x1":
            raise ValueError("MODEL.KD.CONNECTOR 'conv1x1' does not apply to FGD (FGDLoss aligns the channels "
                             "itself); use 'auto'")
        self.loss = FGDLoss(ct.pop(), cs.pop(), num_levels=len(self.taps), strides=[float(s) for s in self.strides],
                            alpha_fgd=float(f.ALPHA), beta_fgd=float(f.BETA), gamma_fgd=float(f.GAMMA),
                            lambda_fgd=float(f.LAMBDA), temperature=float(f.TEMPERATURE),
                            loss_weight=self.loss_weight)

    def forward(self, ctx: KDContext) -> Dict[str, torch.Tensor]:
        """``{"loss_fgd": FGDLoss(student levels, teacher levels, boxes, image sizes)}``."""
        s, t = self.pairs(ctx)
        return {"loss_fgd": self.loss(s, t, ctx.boxes, ctx.batch_index, image_size=[tuple(x) for x in ctx.image_sizes])}
