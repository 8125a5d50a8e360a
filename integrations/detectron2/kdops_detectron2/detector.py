"""``KDDetector``: a detectron2 meta-architecture that trains a student detector with a KD method.

    MODEL:
      META_ARCHITECTURE: "KDDetector"
      KD: {STUDENT_META_ARCHITECTURE: "RetinaNet", METHOD: "pkd", TEACHER: {CONFIG_FILE: ..., WEIGHTS: ...}}

- ``student``: ``META_ARCH_REGISTRY.get(MODEL.KD.STUDENT_META_ARCHITECTURE)(cfg)`` on a clone of the
  config (what ``build_model`` builds for a plain run); its state dict keys are ``student.*``.
- ``teacher`` (methods that ``needs_teacher``): built from its own config file and opts, loaded from
  ``MODEL.KD.TEACHER.WEIGHTS`` with ``DetectionCheckpointer``, frozen (no gradients, eval mode always,
  whatever ``train()`` is called with); it sees the raw images normalised with its own pixel mean/std.
- ``method``: the registered :class:`~kdops_detectron2.KDMethod` (connectors, loss modules).

Training step: the student's backbone runs once; the student's own losses are computed on those
features (:func:`~kdops_detectron2.student_head_losses`, detectron2's forward after the backbone);
the teacher's backbone runs under ``no_grad``; the method adds its losses, scaled by the schedule
factor (:meth:`set_kd_scale`). Inference is ``self.student(batched_inputs)``.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List

import torch
import torch.nn as nn
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList

from .config import student_cfg, teacher_cfg, validate_kd_config
from .heads import student_head_losses
from .methods import METHODS, KDContext


def _is_local(path: str) -> bool:
    return "://" not in path


def load_teacher_strict(teacher: nn.Module, weights: str) -> None:
    """``DetectionCheckpointer`` loading (detectron2 and Detectron pkl formats, URLs), but a teacher
    whose checkpoint misses parameters or has them in other shapes is an error, not a log line: it would
    be distilled with part of its weights random."""
    ckpt = DetectionCheckpointer(teacher)
    path = weights if os.path.isfile(weights) else ckpt.path_manager.get_local_path(weights)
    incompatible = ckpt._load_model(ckpt._load_file(path))
    if incompatible is None:
        return
    missing = list(incompatible.missing_keys)
    shapes = [k for k, *_ in incompatible.incorrect_shapes]
    if missing or shapes:
        raise ValueError(f"MODEL.KD.TEACHER.WEIGHTS {weights!r} does not fit the teacher config: "
                         f"{len(missing)} missing ({missing[:5]}), {len(shapes)} of another shape ({shapes[:5]}). "
                         "Check MODEL.KD.TEACHER.CONFIG_FILE / OPTS against the checkpoint")


@META_ARCH_REGISTRY.register()
class KDDetector(nn.Module):
    """Student + frozen teacher + KD method (see the module docstring)."""

    @configurable
    def __init__(self, *, student: nn.Module, teacher: nn.Module = None, method: nn.Module,
                 teacher_swap_rgb: bool = False) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.method = method
        self.teacher_swap_rgb = teacher_swap_rgb
        self.kd_scale = 1.0
        self.iteration = 0
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)
            teacher.eval()

    @classmethod
    def from_config(cls, cfg):
        validate_kd_config(cfg)
        kd = cfg.MODEL.KD
        scfg = student_cfg(cfg)
        student = META_ARCH_REGISTRY.get(kd.STUDENT_META_ARCHITECTURE)(scfg)
        student.to(torch.device(cfg.MODEL.DEVICE))
        method_cls = METHODS[str(kd.METHOD).lower()]
        teacher, t_shapes, swap = None, None, False
        if method_cls.needs_teacher:
            tcfg = teacher_cfg(cfg)
            weights = kd.TEACHER.WEIGHTS
            if _is_local(weights) and not os.path.isfile(weights):
                raise FileNotFoundError(f"MODEL.KD.TEACHER.WEIGHTS: teacher checkpoint {weights!r} not found")
            teacher = META_ARCH_REGISTRY.get(tcfg.MODEL.META_ARCHITECTURE)(tcfg)
            teacher.to(torch.device(cfg.MODEL.DEVICE))
            load_teacher_strict(teacher, weights)
            t_shapes = teacher.backbone.output_shape()
            swap = tcfg.INPUT.FORMAT != cfg.INPUT.FORMAT
            if swap and {tcfg.INPUT.FORMAT, cfg.INPUT.FORMAT} != {"RGB", "BGR"}:
                raise ValueError(f"KDDetector: the teacher's INPUT.FORMAT {tcfg.INPUT.FORMAT!r} and the student's "
                                 f"{cfg.INPUT.FORMAT!r} must be RGB/BGR")
        method = method_cls(cfg, student, student.backbone.output_shape(), t_shapes)
        return {"student": student, "teacher": teacher, "method": method, "teacher_swap_rgb": swap}

    # ---------------------------------------------------------------------------------- schedule
    def set_kd_scale(self, scale: float) -> None:
        """The factor on the method's scheduled losses (KDTrainer's schedule hook sets it)."""
        self.kd_scale = float(scale)

    def set_iteration(self, iteration: int) -> None:
        """The current iteration, passed on to the method (schedules of its own)."""
        self.iteration = int(iteration)
        self.method.set_iteration(iteration)

    def train(self, mode: bool = True):
        """Sets the student and the method to ``mode``; the teacher stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.student.device

    # ---------------------------------------------------------------------------------- forward
    def _size_divisibility(self) -> int:
        d = int(self.student.backbone.size_divisibility) or 1
        if self.teacher is not None:
            d = math.lcm(d, int(self.teacher.backbone.size_divisibility) or 1)
        return d

    def preprocess_image(self, batched_inputs: List[dict]) -> ImageList:
        """The student's normalisation, padded to a size both backbones accept."""
        s = self.student
        images = [(x["image"].to(s.device) - s.pixel_mean) / s.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self._size_divisibility())

    def teacher_images(self, batched_inputs: List[dict], images: ImageList) -> ImageList:
        """The raw images with the teacher's pixel mean/std (channel order flipped if its
        INPUT.FORMAT differs), padded to the student batch's size."""
        t = self.teacher
        raw = [x["image"].to(t.pixel_mean.device) for x in batched_inputs]
        if self.teacher_swap_rgb:
            raw = [x.flip(0) for x in raw]
        timgs = ImageList.from_tensors([(x - t.pixel_mean) / t.pixel_std for x in raw], self._size_divisibility())
        assert timgs.tensor.shape == images.tensor.shape, (timgs.tensor.shape, images.tensor.shape)
        return timgs

    def forward(self, batched_inputs: List[dict]):
        """Training: the student's loss dict plus the method's losses. Inference: the student's
        outputs (``self.student(batched_inputs)``)."""
        if not self.training:
            return self.student(batched_inputs)
        if "instances" not in batched_inputs[0]:
            raise ValueError("KDDetector: training needs 'instances' (GT) in every input")
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.student.backbone(images.tensor)
        losses = student_head_losses(self.student, features, images, gt_instances)
        teacher_features = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_features = self.teacher.backbone(self.teacher_images(batched_inputs, images).tensor)
        boxes = [g.gt_boxes.tensor for g in gt_instances]
        ctx = KDContext(
            student=self.student, images=images, features=features, teacher_features=teacher_features,
            gt_instances=gt_instances, boxes=torch.cat(boxes).float() if boxes else images.tensor.new_zeros((0, 4)),
            labels=torch.cat([g.gt_classes for g in gt_instances]).long(),
            batch_index=torch.cat([torch.full((len(g),), i, dtype=torch.int64, device=self.device)
                                   for i, g in enumerate(gt_instances)]),
            image_sizes=[tuple(int(v) for v in s) for s in images.image_sizes],
            padded_size=tuple(int(v) for v in images.tensor.shape[-2:]), iteration=self.iteration)
        kd_losses: Dict[str, torch.Tensor] = self.method(ctx)
        for key, value in kd_losses.items():
            if key in losses:
                raise KeyError(f"KDDetector: method {self.method.method_name!r} returned {key!r}, which the student "
                               "already uses")
            losses[key] = value * self.kd_scale if self.method.scheduled(key) else value
        return losses
