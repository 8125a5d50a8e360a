"""``KDTrainer``: detectron2's ``DefaultTrainer`` for KDDetector (and plain) configs.

- ``build_evaluator``: ``COCOEvaluator(..., use_fast_impl=False)`` (pycocotools; detectron2's fast
  evaluator is C++);
- :class:`KDScheduleHook`: the KD factor ``(it + 1) / MODEL.KD.WARMUP_ITERS`` during the warm-up,
  1 after, 0 from the first LR drop (``min(SOLVER.STEPS)``) when ``MODEL.KD.STOP_AT_FIRST_LR_DROP``;
  hands the model the iteration (``set_iteration``) and logs the factor as the scalar ``kd_factor``
  (``put_scalar``: SimpleTrainer sums every value of the loss dict, so nothing else goes there);
- ``resume_or_load``: resuming restores the whole KDDetector (student, connectors, optimizer ...);
  otherwise ``MODEL.WEIGHTS`` is loaded into the *student* (a plain detectron2 checkpoint, or the
  ``student.*`` part of a KDDetector checkpoint);
- DDP: ``create_ddp_model(..., broadcast_buffers=False, find_unused_parameters=MODEL.KD.FIND_UNUSED_PARAMETERS)``
  with ``device_ids=None`` on CPU (gloo), ``[local_rank]`` on GPUs as detectron2 does.
"""
from __future__ import annotations

import logging
import os
import weakref
from typing import Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer, create_ddp_model
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from .config import is_kd_config

logger = logging.getLogger("kdops_detectron2")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a (Distributed)DataParallel wrapper."""
    return model.module if isinstance(model, (DistributedDataParallel, torch.nn.DataParallel)) else model


def kd_scale_at(iteration: int, warmup_iters: int = 0, stop_iter: Optional[int] = None) -> float:
    """The KD factor at a 0-based iteration: 0 from ``stop_iter`` on, ``(it + 1) / warmup_iters``
    during the warm-up, 1 otherwise."""
    if stop_iter is not None and iteration >= stop_iter:
        return 0.0
    if warmup_iters > 0 and iteration < warmup_iters:
        return (iteration + 1) / warmup_iters
    return 1.0


def first_lr_drop(cfg) -> Optional[int]:
    """The first iteration at the lowered LR of a step schedule (``min(SOLVER.STEPS)`` when it is
    inside the run and the scheduler is ``WarmupMultiStepLR``), else None."""
    if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupMultiStepLR":
        return None
    steps = [int(s) for s in cfg.SOLVER.STEPS if int(s) <= cfg.SOLVER.MAX_ITER]
    return min(steps) if steps else None


class KDScheduleHook(HookBase):
    """Sets the KD factor (and the iteration) on the model before every step; logs ``kd_factor``."""

    def __init__(self, warmup_iters: int = 0, stop_iter: Optional[int] = None) -> None:
        self.warmup_iters = int(warmup_iters)
        self.stop_iter = stop_iter

    @classmethod
    def from_cfg(cls, cfg) -> "KDScheduleHook":
        stop = None
        if cfg.MODEL.KD.STOP_AT_FIRST_LR_DROP:
            stop = first_lr_drop(cfg)
            if stop is None:
                logger.warning("MODEL.KD.STOP_AT_FIRST_LR_DROP is set but the run has no LR step (SOLVER.STEPS / "
                               "LR_SCHEDULER_NAME): KD stays on")
        return cls(int(cfg.MODEL.KD.WARMUP_ITERS), stop)

    def scale_at(self, iteration: int) -> float:
        return kd_scale_at(iteration, self.warmup_iters, self.stop_iter)

    def before_step(self) -> None:
        model = unwrap(self.trainer.model)
        it = self.trainer.iter
        if hasattr(model, "set_iteration"):
            model.set_iteration(it)
        if hasattr(model, "set_kd_scale"):
            scale = self.scale_at(it)
            model.set_kd_scale(scale)
            self.trainer.storage.put_scalar("kd_factor", scale, smoothing_hint=False)


class _StudentCheckpointer(DetectionCheckpointer):
    """Loads into a plain student: a detectron2 checkpoint as is, a KDDetector one by its ``student.*`` keys."""

    def _load_model(self, checkpoint):
        state = checkpoint.get("model", {})
        keys = [k[len("module."):] if k.startswith("module.") else k for k in state]
        if any(k.startswith("student.") for k in keys):
            checkpoint["model"] = {k[len("student."):]: v for k, v in zip(keys, state.values())
                                   if k.startswith("student.")}
        return super()._load_model(checkpoint)


def load_student_weights(model: torch.nn.Module, path: str) -> None:
    """``path`` into the student of a KDDetector (or into a plain model)."""
    model = unwrap(model)
    target = model.student if hasattr(model, "student") and hasattr(model, "method") else model
    _StudentCheckpointer(target).load(path)


class KDTrainer(DefaultTrainer):
    """DefaultTrainer with KD's hook, student weight loading, CPU-capable DDP and COCOEvaluator."""

    def __init__(self, cfg):  # DefaultTrainer.__init__ of detectron2 0.6, with the model wrapped by wrap_model
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = self.wrap_model(cfg, model)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def wrap_model(cls, cfg, model: torch.nn.Module) -> torch.nn.Module:
        """DDP when there are several processes: ``device_ids=None`` on CPU, detectron2's default on GPUs."""
        kwargs = dict(broadcast_buffers=False,
                      find_unused_parameters=bool(cfg.MODEL.KD.FIND_UNUSED_PARAMETERS) if "KD" in cfg.MODEL else False)
        if torch.device(cfg.MODEL.DEVICE).type == "cpu":
            kwargs["device_ids"] = None
        return create_ddp_model(model, **kwargs)

    def build_hooks(self):
        hooks = super().build_hooks()
        if is_kd_config(self.cfg):
            hooks.insert(0, KDScheduleHook.from_cfg(self.cfg))
        return hooks

    def resume_or_load(self, resume: bool = True) -> None:
        """Resume the whole run from OUTPUT_DIR's last checkpoint, or load ``MODEL.WEIGHTS`` into the student."""
        if resume and self.checkpointer.has_checkpoint():
            self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=True)
            self.start_iter = self.iter + 1
            return
        if self.cfg.MODEL.WEIGHTS:
            load_student_weights(self.model, self.cfg.MODEL.WEIGHTS)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO box AP with pycocotools (``use_fast_impl=False``)."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)
