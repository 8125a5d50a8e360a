"""Config builders over the YAML files of ``integrations/detectron2/configs/``.

    cfg = toy_cfg("pkd", data_root="data/kdops_toy", teacher_weights="teacher.pth")

The toy configs train in minutes on a CPU on ``kdops.toy_data`` (128 px, 4 classes).
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch

from .config import CONFIG_DIR, get_kd_cfg
from .data import register_toy_datasets

TOY_METHOD_CONFIGS = {
    "pkd": "pkd/pkd_retinanet_toy.yaml",
    "fgd": "fgd/fgd_retinanet_toy.yaml",
    "fitnet": "fitnet/fitnet_retinanet_toy.yaml",
    "defeat": "defeat/defeat_retinanet_toy.yaml",
    "lgd": "lgd/lgd_retinanet_toy.yaml",
    "lgd_faster_rcnn": "lgd/lgd_faster_rcnn_toy.yaml",
}
TOY_STUDENT = "toy/retinanet_r18_toy_student.yaml"
TOY_TEACHER = "toy/retinanet_r18_toy_teacher.yaml"


def config_path(rel: str) -> str:
    """The absolute path of a file under ``integrations/detectron2/configs/``."""
    return os.path.join(CONFIG_DIR, rel)


def toy_cfg(method: Optional[str] = None, data_root: Optional[str] = None, teacher_weights: str = "",
            opts: Optional[List[str]] = None):
    """The toy config of ``method`` (``None``: the plain student; ``"teacher"``: the plain teacher),
    datasets registered at ``data_root``, ``MODEL.DEVICE`` cpu without CUDA, then ``opts``."""
    if method is None:
        rel = TOY_STUDENT
    elif method == "teacher":
        rel = TOY_TEACHER
    elif method in TOY_METHOD_CONFIGS:
        rel = TOY_METHOD_CONFIGS[method]
    else:
        raise ValueError(f"toy_cfg: no toy config for {method!r}; one of {sorted(TOY_METHOD_CONFIGS)}, "
                         f"'teacher' or None")
    register_toy_datasets(data_root)
    extra = ["MODEL.DEVICE", "cuda" if torch.cuda.is_available() else "cpu"]
    if teacher_weights:
        extra += ["MODEL.KD.TEACHER.WEIGHTS", teacher_weights]
    return get_kd_cfg(config_path(rel), extra + list(opts or []))
