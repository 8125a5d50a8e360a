"""kdops for detectron2 0.6: ``MODEL.KD`` config keys, the ``KDDetector`` meta-architecture, the
``KDTrainer``, and the train / export tools (``python -m kdops_detectron2.train``,
``python -m kdops_detectron2.export_student``). Importing it registers ``KDDetector`` in
detectron2's ``META_ARCH_REGISTRY`` and the methods pkd, fgd, fitnet, defeat, lgd."""
from .config import (
    DEFAULT_TAPS, STUDENT_ARCHITECTURES, add_kdops_config, get_kd_cfg, plain_cfg, student_cfg, teacher_cfg,
    validate_kd_config,
)
from .data import register_toy_datasets
from .detector import KDDetector
from .heads import student_head_losses
from .lgd import LGDMethod
from .methods import METHODS, KDContext, KDMethod, make_connectors, register_method
from .trainer import KDScheduleHook, KDTrainer, kd_scale_at, load_student_weights

__all__ = [
    "DEFAULT_TAPS", "KDContext", "LGDMethod", "KDDetector", "KDMethod", "KDScheduleHook", "KDTrainer", "METHODS",
    "STUDENT_ARCHITECTURES", "add_kdops_config", "get_kd_cfg", "kd_scale_at", "load_student_weights",
    "make_connectors", "plain_cfg", "register_method", "register_toy_datasets", "student_cfg", "student_head_losses",
    "teacher_cfg", "validate_kd_config",
]
