"""kdops_mmdet: distill any mmdetection 3.x detector with kdops losses, by config.

Load it from a config with ``custom_imports=dict(imports=['kdops_mmdet'], allow_failed_imports=False)``;
it registers, in child registries of mmdet's (scope ``kdops``):

- ``kdops.DistillDetector`` (MODELS): student + frozen teacher + connectors + kdops losses;
- ``kdops.HEADDistillDetector`` (MODELS): HEAD, a two-stage teacher into a one-stage student via an
  assistant R-CNN head;
- ``kdops.TFHEADDetector`` (MODELS): TF-HEAD, teacher-free, with a dense and an R-CNN assistant;
- ``kdops.UniKDAbsorbDetector`` / ``kdops.UniKDDistillDetector`` (MODELS): UniKD's two stages
  (train the knowledge extractors on the teacher, then distil through them);
- ``kdops.LGDDetector`` (MODELS): LGD, label-guided self-distillation, no teacher;
- ``kdops.FusedRoIExtractor`` (MODELS): mmdet's SingleRoIExtractor + mmcv's RoIAlign in one
  ``kdops.roi_align`` call (same config keys, same values; HEAD's assistant and teacher use it);
- ``kdops.KDScheduleHook`` (HOOKS): KD warm-up and stop, a pure function of the iteration.

Tools: ``python -m kdops_mmdet.train CONFIG`` (mmdet's tools/train.py, plus gloo on CPU) and
``python -m kdops_mmdet.export_student IN.pth OUT.pth`` (a plain mmdet checkpoint of the student).
``kdops`` itself never imports this package or mmdet.
"""
from .connectors import LinearConnector, build_connector
from .distiller import DistillDetector
from .head import HEADDistillDetector, TFHEADDetector
from .lgd import LGDDetector
from .roi_extractor import FusedRoIExtractor
from .hooks import KDScheduleHook, first_lr_milestone_iter, kd_scale_at
from .registry import HOOKS, MODELS
from .unikd import UniKDAbsorbDetector, UniKDDistillDetector

__all__ = ["DistillDetector", "FusedRoIExtractor", "HEADDistillDetector", "HOOKS", "KDScheduleHook", "LGDDetector", "LinearConnector", "MODELS",
           "TFHEADDetector", "UniKDAbsorbDetector", "UniKDDistillDetector", "build_connector",
           "first_lr_milestone_iter", "kd_scale_at"]
