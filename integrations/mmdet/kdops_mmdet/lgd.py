"""LGD, label-guided self-distillation (Zhang et al., AAAI 2022), for mmdet 3.x students: ``kdops.LGDDetector``.

    model = dict(type='kdops.LGDDetector', student=dict(type='RetinaNet', ...),
                 distill_start_iter=30000, freeze_backbone_iters=20000)
    custom_hooks = [dict(type='kdops.KDScheduleHook')]   # tells the model the iteration

No pretrained teacher: the "instructive knowledge" is built from the labels (boxes and classes, through
the label encoder) and the student's own FPN features (appearance), mapped back onto every FPN level
(:class:`kdops.nn.LGDInstructiveKnowledge`), and the student distils it (:class:`kdops.losses.LGDLoss`).
One training step, as the authors' ``DistillatorRetinaNet`` / ``DistillatorGeneralizedRCNN`` do it:

- the student's own detection losses on its FPN features;
- the instructive features through the student's *own* head with the same GT targets: the same loss
  keys with ``_tea`` appended (``loss_cls_tea``, ``loss_bbox_tea``, and for Faster R-CNN the RPN and
  R-CNN ones); these train the LGD modules and, through the appearance branch, the student;
- ``loss_lgd``: the student's FPN features through the adapter vs the detached instructive features,
  instance-normalised, all levels concatenated, mean squared error, times ``loss_weight`` (lambda = 1).

Schedule (the authors' ``train.py``; iterations from :class:`KDScheduleHook`, which calls
``set_iteration``): before ``distill_start_iter`` (30k of 180k in the released configs) ``loss_lgd``
still trains the adapter but the student's features are detached in it; before
``freeze_backbone_iters`` (20k) the student's backbone (not its FPN) receives no gradient at all, from any
loss (the release sets ``p.grad = None`` on ``student.backbone.bottom_up`` before the optimizer step;
here the backbone's outputs are detached, which leaves the same parameters without gradients and skips
their backward). With DDP this leaves the backbone unused for those iterations: the configs set
``find_unused_parameters=True``.

The LGD modules (``lgd.*``) and the adapter (``lgd_loss.*``) are trained with the student; the release
uses a second optimizer of the same settings for the label-guided modules, which is the same as one
optimizer here (give them another learning rate with ``paramwise_cfg.custom_keys={'lgd.': ...}``).
Validation, test and export use the student alone (``student.*``): ``python -m
kdops_mmdet.export_student`` gives a plain mmdet checkpoint.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
from mmdet.models.detectors import BaseDetector, SingleStageDetector, TwoStageDetector

from kdops.losses import LGDLoss
from kdops.nn import LGDInstructiveKnowledge

from .distiller import StudentInference, model_config
from .registry import MODELS


def _gt(samples, device):
    """GT boxes (K,4), labels (K,) and image indices (K,) of a batch, concatenated."""
    boxes, labels, index = [], [], []
    for i, ds in enumerate(samples):
        gt = ds.gt_instances
        b = gt.bboxes
        b = b.tensor if hasattr(b, "tensor") else b
        boxes.append(b.to(device=device, dtype=torch.float32).reshape(-1, 4))
        labels.append(gt.labels.to(device=device, dtype=torch.int64).reshape(-1))
        index.append(torch.full((labels[-1].numel(),), i, dtype=torch.int64, device=device))
    return torch.cat(boxes), torch.cat(labels), torch.cat(index)


@MODELS.register_module()
class LGDDetector(StudentInference, BaseDetector):
    """LGD self-distillation of an mmdet detector (see the module docstring).

    Args:
        student: the student's model config (dict) or a config path: a one-stage detector with a neck
            and a dense head (RetinaNet, ATSS, FCOS, GFL, ...) or a two-stage one with a neck (Faster
            R-CNN). The student's FPN channels and number of classes size the LGD modules.
        lgd: keyword arguments of :class:`kdops.nn.LGDInstructiveKnowledge` beyond those read from the
            student (e.g. ``add_context_box``, ``detach_appearance``, ``num_heads``).
        loss_weight: lambda of ``loss_lgd`` (1.0 in the release).
        tea_loss_weight: factor on the ``*_tea`` losses (1.0 in the release).
        distill_start_iter: iterations with the student detached in ``loss_lgd`` (30000 in the release's
            2x configs, 20000 in its 1x ones).
        freeze_backbone_iters: iterations without gradients into the student's backbone (20000).
    """

    owner = "kdops.LGDDetector"

    def __init__(self, student, lgd: Optional[dict] = None, loss_weight: float = 1.0,
                 tea_loss_weight: float = 1.0, distill_start_iter: int = 30000,
                 freeze_backbone_iters: int = 20000, data_preprocessor=None, init_cfg=None) -> None:
        if data_preprocessor is not None:
            raise ValueError(f"{self.owner}: the student's data_preprocessor is used; set it in model.student")
        for name, v in (("distill_start_iter", distill_start_iter), ("freeze_backbone_iters", freeze_backbone_iters)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{self.owner}: {name} must be an int >= 0, got {v!r}")
        for name, v in (("loss_weight", loss_weight), ("tea_loss_weight", tea_loss_weight)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                raise ValueError(f"{self.owner}: {name} must be a number >= 0, got {v!r}")
        for name, v in (("lgd", lgd),):
            if v is not None and not isinstance(v, dict):
                raise TypeError(f"{self.owner}: {name} must be a dict of keyword arguments, got {type(v).__name__}")
        super().__init__(data_preprocessor=None, init_cfg=init_cfg)
        self.student = MODELS.build(model_config(student, "model.student"))
        self.data_preprocessor = self.student.data_preprocessor
        channels, num_classes = self._read_student()
        self.lgd = LGDInstructiveKnowledge(num_classes=num_classes, channels=channels, **dict(lgd or {}))
        self.lgd_loss = LGDLoss(channels=channels)
        self.loss_weight = float(loss_weight)
        self.tea_loss_weight = float(tea_loss_weight)
        self.distill_start_iter = distill_start_iter
        self.freeze_backbone_iters = freeze_backbone_iters
        self.iteration: Optional[int] = None  # None: no schedule hook (then: distillation on, backbone free)
        self.kd_scale: Dict[str, float] = {"lgd": 1.0}

    # ------------------------------------------------------------ construction
    def _read_student(self):
        s = self.student
        if not getattr(s, "with_neck", False):
            raise ValueError(f"{self.owner}: the student needs an FPN neck (LGD works on its levels), got "
                             f"{type(s).__name__} without one")
        if isinstance(s, SingleStageDetector) and getattr(s, "bbox_head", None) is not None:
            num_classes = int(s.bbox_head.num_classes)
        elif isinstance(s, TwoStageDetector) and s.with_rpn:
            num_classes = int(s.roi_head.bbox_head.num_classes)
        else:
            raise ValueError(f"{self.owner}: the student must be a one-stage detector with a dense head or a "
                             f"two-stage detector with an RPN, got {type(s).__name__}")
        channels = getattr(s.neck, "out_channels", None)
        if not isinstance(channels, int):
            raise ValueError(f"{self.owner}: cannot read the student's FPN channels (neck.out_channels = "
                             f"{channels!r})")
        return channels, num_classes

    # ---------------------------------------------------------------- schedule
    def set_iteration(self, iteration: int) -> None:
        """The 0-based training iteration (:class:`KDScheduleHook` calls this before every iteration)."""
        self.iteration = int(iteration)

    def set_kd_scale(self, scale) -> None:
        """The schedule hook's factor on ``loss_lgd`` (1 unless the hook is given a warm-up or a stop)."""
        self.kd_scale["lgd"] = float(scale["lgd"] if isinstance(scale, dict) else scale)

    @property
    def distilling(self) -> bool:
        """Whether ``loss_lgd`` reaches the student's features at this iteration."""
        return self.iteration is None or self.iteration >= self.distill_start_iter

    @property
    def backbone_frozen(self) -> bool:
        return self.iteration is not None and self.iteration < self.freeze_backbone_iters

    # ---------------------------------------------------------------- training
    def _features(self, inputs: torch.Tensor):
        s = self.student
        x = s.backbone(inputs)
        if self.backbone_frozen:
            x = tuple(t.detach() for t in x)
        return list(s.neck(x))

    def _head_losses(self, feats: Sequence[torch.Tensor], samples) -> dict:
        """The student's detection losses on ``feats`` (its FPN features or the instructive ones)."""
        s = self.student
        feats = tuple(feats)
        if isinstance(s, SingleStageDetector):
            return s.bbox_head.loss(feats, samples)
        # TwoStageDetector.loss after extract_feat (mmdet 3.3), on the given features
        losses = dict()
        proposal_cfg = s.train_cfg.get("rpn_proposal", s.test_cfg.rpn)
        rpn_samples = copy.deepcopy(samples)
        for ds in rpn_samples:  # the RPN is class-agnostic
            ds.gt_instances.labels = torch.zeros_like(ds.gt_instances.labels)
        rpn_losses, proposals = s.rpn_head.loss_and_predict(feats, rpn_samples, proposal_cfg=proposal_cfg)
        for key in list(rpn_losses):
            if "loss" in key and "rpn" not in key:
                rpn_losses[f"rpn_{key}"] = rpn_losses.pop(key)
        losses.update(rpn_losses)
        losses.update(s.roi_head.loss(feats, proposals, samples))
        return losses

    def loss(self, batch_inputs: torch.Tensor, batch_data_samples) -> dict:
        feats = self._features(batch_inputs)
        losses = self._head_losses(feats, batch_data_samples)
        boxes, labels, index = _gt(batch_data_samples, feats[0].device)
        pad_h, pad_w = batch_data_samples[0].metainfo["batch_input_shape"]
        instructive = self.lgd(feats, boxes, labels, index, image_size=(int(pad_h), int(pad_w)))
        for key, value in self._head_losses(instructive, batch_data_samples).items():
            name = f"{key}_tea"
            if isinstance(value, (list, tuple)):
                losses[name] = [v * self.tea_loss_weight for v in value]
            else:
                losses[name] = value * self.tea_loss_weight if "loss" in key else value
        losses["loss_lgd"] = (self.lgd_loss(feats, instructive, detach_student=not self.distilling)
                              * (self.loss_weight * self.kd_scale["lgd"]))
        return losses

    # ---------------------------------------------------------------- inference
