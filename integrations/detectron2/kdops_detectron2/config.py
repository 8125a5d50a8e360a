"""``cfg.MODEL.KD``: the config keys of kdops_detectron2, their checks, and the student's and
teacher's own configs derived from a KD config.

    cfg = get_cfg()
    add_kdops_config(cfg)            # before merge_from_file: MODEL.KD.* are then known keys
    cfg.merge_from_file("integrations/detectron2/configs/pkd/pkd_retinanet_toy.yaml")
    validate_kd_config(cfg)          # KDDetector and the train tool call it too

``MODEL.KD`` is a closed node (yacs ``new_allowed`` is off): an unknown key such as
``MODEL.KD.LOSS_WIEGHT`` fails in ``merge_from_file`` / ``merge_from_list`` with detectron2's
own ``KeyError: 'Non-existent config key: MODEL.KD.LOSS_WIEGHT'``.
"""
from __future__ import annotations

import os
from typing import List, Optional

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

#: student architectures whose training forward kdops_detectron2 replicates (features computed once)
STUDENT_ARCHITECTURES = ("RetinaNet", "GeneralizedRCNN")
#: the FPN levels distilled when ``MODEL.KD.TAPS`` is empty
DEFAULT_TAPS = {"RetinaNet": ["p3", "p4", "p5", "p6", "p7"], "GeneralizedRCNN": ["p2", "p3", "p4", "p5", "p6"]}
CONNECTORS = ("auto", "conv1x1", "none")
CONFIG_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "configs"))


def add_kdops_config(cfg: CN) -> CN:
    """Adds ``cfg.MODEL.KD`` (defaults below) to a detectron2 config, in place; returns it.

    Call it on ``get_cfg()`` before ``merge_from_file``. Calling it twice is harmless (the keys
    are only added when absent).
    """
    if "KD" in cfg.MODEL:
        return cfg
    kd = CN()
    # the detector the KDDetector trains and exports ("RetinaNet" or "GeneralizedRCNN"); the
    # student is built from the rest of the config with META_ARCHITECTURE set to this
    kd.STUDENT_META_ARCHITECTURE = "RetinaNet"
    # a name registered with kdops_detectron2.register_method: "pkd", "fgd", "fitnet", "defeat", "lgd"
    kd.METHOD = "pkd"
    kd.TEACHER = CN()
    kd.TEACHER.CONFIG_FILE = ""  # a detectron2 YAML (absolute, relative to the cwd, or to configs/)
    kd.TEACHER.OPTS = []  # "KEY VALUE" overrides applied to the teacher's config after the file
    kd.TEACHER.WEIGHTS = ""  # its checkpoint (a path, or a URL detectron2's PathManager resolves)
    # FPN level names tapped on both detectors; [] = p3..p7 (RetinaNet) or p2..p6 (GeneralizedRCNN)
    kd.TAPS = []
    kd.LOSS_WEIGHT = 1.0  # the overall weight of the method's loss (each method config sets its own)
    # 1x1 conv from the student's channels to the teacher's, per tap, trained with the student and
    # dropped at export: "auto" = the method's default (PKD: where channels differ; FitNet and
    # DeFeat: always, their regressor / adapter; FGD: its own `align`), "conv1x1" always, "none" never
    kd.CONNECTOR = "auto"
    kd.FGD = CN()  # FGD's weights; defaults: the authors' RetinaNet config
    kd.FGD.ALPHA = 1e-3
    kd.FGD.BETA = 5e-4
    kd.FGD.GAMMA = 5e-4
    kd.FGD.LAMBDA = 5e-6
    kd.FGD.TEMPERATURE = 0.5
    kd.DEFEAT = CN()  # DeFeat (LutingWang/HEAD's re-implementation): per-image normalised fg/bg
    kd.DEFEAT.FG_WEIGHT = 1.0
    kd.DEFEAT.BG_WEIGHT = 4.0
    kd.LGD = CN()  # LGD (teacher-free); defaults: the release's RetinaNet R50 2x config
    kd.LGD.ADD_CONTEXT_BOX = True  # a whole-image context object per image (release: off for Faster R-CNN)
    kd.LGD.DETACH_APPEARANCE = False  # DETACH_APPEARANCE_EMBED (release: on for Faster R-CNN)
    kd.LGD.NUM_HEADS = 8  # heads of the inter-object relation adapter
    kd.LGD.EMPTY_IMAGE_OBJECT = "dummy"  # an image without GT: the release's [0,0,1,1] stand-in, or "context"
    kd.LGD.DISTILL_START_ITER = 30000  # PRE_NONDISTILL_ITERS: loss_lgd reaches the student from here on
    kd.LGD.FREEZE_BACKBONE_ITERS = 20000  # PRE_FREEZE_STUDENT_BACKBONE_ITERS: no gradient into bottom_up before
    kd.LGD.TEA_LOSS_WEIGHT = 1.0  # factor on the *_tea losses (the student's head on the instructive maps)
    # schedule of the KD losses: factor (it + 1) / WARMUP_ITERS during warm-up, 1 after, 0 from the
    # first LR drop (min SOLVER.STEPS) when STOP_AT_FIRST_LR_DROP; terms stay in the graph at 0
    kd.WARMUP_ITERS = 0
    kd.STOP_AT_FIRST_LR_DROP = False
    # DistributedDataParallel(find_unused_parameters=...) for the model KDTrainer wraps
    kd.FIND_UNUSED_PARAMETERS = False
    cfg.MODEL.KD = kd
    return cfg


def get_kd_cfg(config_file: str = "", opts: Optional[List[str]] = None) -> CN:
    """``get_cfg()`` + :func:`add_kdops_config` + the file + ``opts`` (a flat KEY VALUE list)."""
    cfg = add_kdops_config(get_cfg())
    if config_file:
        cfg.merge_from_file(config_file)
    if opts:
        cfg.merge_from_list(list(opts))
    return cfg


def is_kd_config(cfg: CN) -> bool:
    """Whether the config trains a :class:`~kdops_detectron2.KDDetector`."""
    return cfg.MODEL.META_ARCHITECTURE == "KDDetector"


def resolve_taps(cfg: CN) -> List[str]:
    """``MODEL.KD.TAPS``, or the default levels of the student's architecture when empty."""
    taps = list(cfg.MODEL.KD.TAPS)
    return taps if taps else list(DEFAULT_TAPS[cfg.MODEL.KD.STUDENT_META_ARCHITECTURE])


def has_teacher_section(cfg: CN) -> bool:
    t = cfg.MODEL.KD.TEACHER
    return bool(t.CONFIG_FILE) or bool(t.WEIGHTS) or bool(list(t.OPTS))


def validate_kd_config(cfg: CN) -> None:
    """Checks ``MODEL.KD`` against the registered methods; ``ValueError`` naming the key otherwise.

    - ``STUDENT_META_ARCHITECTURE`` must be one of :data:`STUDENT_ARCHITECTURES`;
    - ``METHOD`` must be registered (:func:`kdops_detectron2.register_method`);
    - a method that ``needs_teacher`` needs ``TEACHER.CONFIG_FILE`` and ``TEACHER.WEIGHTS``;
      a teacher-free one refuses a teacher section (a teacher would be loaded and never used);
    - ``CONNECTOR`` in :data:`CONNECTORS`, ``WARMUP_ITERS`` >= 0, ``LOSS_WEIGHT`` >= 0.
    """
    from .methods import METHODS  # the registry (methods import this module)

    kd = cfg.MODEL.KD
    if kd.STUDENT_META_ARCHITECTURE not in STUDENT_ARCHITECTURES:
        raise ValueError(f"MODEL.KD.STUDENT_META_ARCHITECTURE must be one of {STUDENT_ARCHITECTURES}, "
                         f"got {kd.STUDENT_META_ARCHITECTURE!r}")
    method = str(kd.METHOD).lower()
    if method not in METHODS:
        raise ValueError(f"MODEL.KD.METHOD must be one of the registered methods {sorted(METHODS)}, got {kd.METHOD!r}")
    needs = METHODS[method].needs_teacher
    if needs:
        missing = [k for k in ("CONFIG_FILE", "WEIGHTS") if not kd.TEACHER[k]]
        if missing:
            raise ValueError(f"MODEL.KD.METHOD {method!r} distils a teacher: set "
                             + " and ".join(f"MODEL.KD.TEACHER.{k}" for k in missing))
    elif has_teacher_section(cfg):
        raise ValueError(f"MODEL.KD.METHOD {method!r} is teacher-free, but the config has a teacher section "
                         f"(MODEL.KD.TEACHER.CONFIG_FILE={kd.TEACHER.CONFIG_FILE!r}, "
                         f"MODEL.KD.TEACHER.WEIGHTS={kd.TEACHER.WEIGHTS!r}, MODEL.KD.TEACHER.OPTS="
                         f"{list(kd.TEACHER.OPTS)!r}); remove it")
    if kd.CONNECTOR not in CONNECTORS:
        raise ValueError(f"MODEL.KD.CONNECTOR must be one of {CONNECTORS}, got {kd.CONNECTOR!r}")
    if int(kd.WARMUP_ITERS) < 0:
        raise ValueError(f"MODEL.KD.WARMUP_ITERS must be >= 0, got {kd.WARMUP_ITERS}")
    if float(kd.LOSS_WEIGHT) < 0:
        raise ValueError(f"MODEL.KD.LOSS_WEIGHT must be >= 0, got {kd.LOSS_WEIGHT}")
    if len(list(kd.TEACHER.OPTS)) % 2:
        raise ValueError(f"MODEL.KD.TEACHER.OPTS must be KEY VALUE pairs, got {list(kd.TEACHER.OPTS)!r}")


def student_cfg(cfg: CN) -> CN:
    """A clone of the KD config that builds the plain student: ``META_ARCHITECTURE`` set to
    ``MODEL.KD.STUDENT_META_ARCHITECTURE`` (everything else, MODEL.KD included, unchanged)."""
    out = cfg.clone()
    out.defrost()
    if is_kd_config(cfg):
        out.MODEL.META_ARCHITECTURE = cfg.MODEL.KD.STUDENT_META_ARCHITECTURE
    return out


def plain_cfg(cfg: CN) -> CN:
    """The student's config as plain detectron2 reads it (``get_cfg().merge_from_file`` without
    kdops): :func:`student_cfg` with ``MODEL.KD`` removed. ``export_student`` dumps it."""
    out = student_cfg(cfg)
    if "KD" in out.MODEL:
        del out.MODEL["KD"]
    return out


def resolve_config_path(path: str, key: str = "MODEL.KD.TEACHER.CONFIG_FILE") -> str:
    """An absolute path, a path relative to the cwd, or one relative to
    ``integrations/detectron2/configs/``; ``FileNotFoundError`` naming ``key`` otherwise."""
    candidates = [path] if os.path.isabs(path) else [os.path.abspath(path), os.path.join(CONFIG_DIR, path)]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise FileNotFoundError(f"{key}: config file {path!r} not found (looked at {candidates})")


def teacher_cfg(cfg: CN) -> CN:
    """The teacher's own config: ``get_cfg()`` + :func:`add_kdops_config` + ``TEACHER.CONFIG_FILE``
    + ``TEACHER.OPTS``, on the student's ``MODEL.DEVICE``."""
    kd = cfg.MODEL.KD
    tcfg = get_kd_cfg(resolve_config_path(kd.TEACHER.CONFIG_FILE), list(kd.TEACHER.OPTS))
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    if tcfg.MODEL.META_ARCHITECTURE == "KDDetector":
        raise ValueError(f"MODEL.KD.TEACHER.CONFIG_FILE {kd.TEACHER.CONFIG_FILE!r} is itself a KDDetector config; "
                         "give the teacher's plain detector config")
    return tcfg
