"""LGD (Zhang et al., "LGD: Label-Guided Self-Distillation for Object Detection", AAAI 2022) as a
kdops_detectron2 method: ``MODEL.KD.METHOD: "lgd"``, no teacher.

One step, as the authors' detectron2 ``DistillatorRetinaNet`` / ``DistillatorGeneralizedRCNN``:

- the student's own losses on its FPN features (KDDetector);
- :class:`kdops.nn.LGDInstructiveKnowledge` builds instructive maps from the GT (boxes, classes) and the
  student's FPN levels ``MODEL.KD.TAPS`` (default p3-p7 / p2-p6, every level the head reads);
- the student's own head on those maps with the same GT targets: the student's loss keys with ``_tea``
  appended (``loss_cls_tea``, ``loss_box_reg_tea``; ``loss_rpn_cls_tea``, ... for Faster R-CNN), times
  ``MODEL.KD.LGD.TEA_LOSS_WEIGHT``;
- ``loss_lgd``: :class:`kdops.losses.LGDLoss` (adapter, instance norm, levels concatenated, MSE) times
  ``MODEL.KD.LOSS_WEIGHT`` (lambda = 1); the only term the KD warm-up / stop factor scales.

Schedule (the release's ``train.py``): before ``LGD.DISTILL_START_ITER`` the student's side of
``loss_lgd`` is detached (the adapter still learns); before ``LGD.FREEZE_BACKBONE_ITERS`` the student's
bottom-up backbone (not the FPN) gets no gradient from any loss -- the release sets those gradients to
None after backward; here a forward hook detaches ``backbone.bottom_up``'s outputs, the same update
without that backward. Under DDP the frozen iterations leave parameters unused: the LGD configs set
``MODEL.KD.FIND_UNUSED_PARAMETERS: True``. The LGD modules train with the student's optimizer (the
release uses a second optimizer with the same settings).
"""
from __future__ import annotations

from typing import Dict

import torch

from kdops.losses import LGDLoss
from kdops.nn import LGDInstructiveKnowledge

from .methods import KDContext, KDMethod, register_method


def _num_classes(cfg) -> int:
    if cfg.MODEL.KD.STUDENT_META_ARCHITECTURE == "RetinaNet":
        return int(cfg.MODEL.RETINANET.NUM_CLASSES)
    return int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)


@register_method("lgd")
class LGDMethod(KDMethod):
    """LGD, teacher-free (see the module docstring)."""

    needs_teacher = False

    def __init__(self, cfg, student, student_shapes, teacher_shapes=None) -> None:
        super().__init__(cfg, student, student_shapes, teacher_shapes)
        g = cfg.MODEL.KD.LGD
        channels = {student_shapes[t].channels for t in self.taps}
        if len(channels) != 1:
            raise ValueError(f"MODEL.KD.METHOD 'lgd' needs one channel count over MODEL.KD.TAPS {self.taps}, got "
                             f"{sorted(channels)}")
        for key in ("DISTILL_START_ITER", "FREEZE_BACKBONE_ITERS"):
            if int(g[key]) < 0:
                raise ValueError(f"MODEL.KD.LGD.{key} must be >= 0, got {g[key]}")
        if float(g.TEA_LOSS_WEIGHT) < 0:
            raise ValueError(f"MODEL.KD.LGD.TEA_LOSS_WEIGHT must be >= 0, got {g.TEA_LOSS_WEIGHT}")
        c = channels.pop()
        self.lgd = LGDInstructiveKnowledge(_num_classes(cfg), c, num_heads=int(g.NUM_HEADS),
                                           add_context_box=bool(g.ADD_CONTEXT_BOX),
                                           detach_appearance=bool(g.DETACH_APPEARANCE),
                                           empty_image_object=str(g.EMPTY_IMAGE_OBJECT))
        self.lgd_loss = LGDLoss(c, loss_weight=self.loss_weight)
        self.distill_start_iter = int(g.DISTILL_START_ITER)
        self.freeze_backbone_iters = int(g.FREEZE_BACKBONE_ITERS)
        self.tea_loss_weight = float(g.TEA_LOSS_WEIGHT)
        bottom_up = getattr(student.backbone, "bottom_up", None)
        if bottom_up is None:
            raise ValueError(f"MODEL.KD.METHOD 'lgd': the student's backbone ({type(student.backbone).__name__}) has "
                             "no bottom_up network to freeze (an FPN backbone is expected)")
        bottom_up.register_forward_hook(self._freeze_hook)

    @property
    def backbone_frozen(self) -> bool:
        return self.training and self.iteration < self.freeze_backbone_iters

    @property
    def distilling(self) -> bool:
        return self.iteration >= self.distill_start_iter

    def _freeze_hook(self, _module, _inputs, outputs):
        if self.backbone_frozen:
            return {k: v.detach() for k, v in outputs.items()}
        return None

    def scheduled(self, key: str) -> bool:
        """Only ``loss_lgd`` follows the KD warm-up / stop factor; the ``*_tea`` losses train the LGD modules."""
        return key == "loss_lgd"

    def forward(self, ctx: KDContext) -> Dict[str, torch.Tensor]:
        """``*_tea`` (the student's head on the instructive maps) and ``loss_lgd``."""
        feats = [ctx.features[t] for t in self.taps]
        inst = self.lgd(feats, ctx.boxes, ctx.labels, ctx.batch_index, ctx.padded_size)
        losses = {k: v * self.tea_loss_weight for k, v in ctx.head_losses(dict(zip(self.taps, inst)),
                                                                           suffix="_tea").items()}
        losses["loss_lgd"] = self.lgd_loss(feats, inst, detach_student=not self.distilling)
        return losses
