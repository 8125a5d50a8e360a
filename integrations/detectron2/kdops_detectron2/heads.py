"""The student's own detection losses on given FPN features: detectron2's training forward of
``RetinaNet`` and ``GeneralizedRCNN`` from the line after ``self.backbone(images.tensor)`` on.

KDDetector runs the student's backbone once, taps the features, and calls
:func:`student_head_losses` on them; a method that sends other features (LGD's instructive maps)
through the same head with the same GT targets calls it again (``KDContext.head_losses``).
"""
from __future__ import annotations

from typing import Dict, List

import torch
from detectron2.modeling.meta_arch import GeneralizedRCNN, RetinaNet
from detectron2.structures import ImageList, Instances


def student_head_losses(student: torch.nn.Module, features: Dict[str, torch.Tensor], images: ImageList,
                        gt_instances: List[Instances], suffix: str = "") -> Dict[str, torch.Tensor]:
    """The loss dict the student's training forward returns, computed on ``features``.

    Args:
        student: a detectron2 ``RetinaNet`` or ``GeneralizedRCNN`` (with a proposal generator),
            in training mode.
        features: level name -> (N,C,H,W), at least the levels its head reads
            (``head_in_features`` / the RPN's and ROI heads' ``in_features``), the layout of
            ``student.backbone(images.tensor)``.
        images: the padded, normalised batch (its ``image_sizes`` clip proposals and anchors).
        gt_instances: one ``Instances`` per image with ``gt_boxes`` (resized-image pixels) and
            ``gt_classes``, on the student's device.
        suffix: appended to every key (LGD logs its instructive pass as ``loss_cls_tea`` ...).

    Returns:
        RetinaNet: ``loss_cls``, ``loss_box_reg``; GeneralizedRCNN: ``loss_rpn_cls``,
        ``loss_rpn_loc``, ``loss_cls``, ``loss_box_reg`` (+ mask / keypoint losses if it has them).

    Side effects are the student's own: RetinaNet updates its ``loss_normalizer`` moving average
    on every call, GeneralizedRCNN's ROI heads sample proposals with the global RNG.
    """
    if isinstance(student, RetinaNet):
        feats = [features[f] for f in student.head_in_features]
        predictions = student.head(feats)
        losses = student.forward_training(images, feats, predictions, gt_instances)
    elif isinstance(student, GeneralizedRCNN):
        if student.proposal_generator is None:
            raise ValueError("student_head_losses: a GeneralizedRCNN student needs a proposal generator "
                             "(MODEL.PROPOSAL_GENERATOR.NAME); precomputed proposals are not supported")
        proposals, proposal_losses = student.proposal_generator(images, features, gt_instances)
        _, detector_losses = student.roi_heads(images, features, proposals, gt_instances)
        losses = dict(detector_losses)
        losses.update(proposal_losses)
    else:
        raise TypeError(f"student_head_losses: the student must be a detectron2 RetinaNet or GeneralizedRCNN, "
                        f"got {type(student).__name__}")
    return {k + suffix: v for k, v in losses.items()} if suffix else dict(losses)
