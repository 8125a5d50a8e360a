"""Fixtures of the detectron2 plug-in tests: kdops_detectron2 from the source tree (until
`pip install -e .` has installed it), one toy data set and one teacher checkpoint per session."""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
PLUGIN = os.path.join(ROOT, "integrations", "detectron2")
for p in (HERE, PLUGIN):
    if p not in sys.path:
        sys.path.insert(0, p)


@pytest.fixture(scope="session")
def d2_toy_data(tmp_path_factory):
    """``kdops.toy_data`` with 16 training and 8 validation images of 128 px."""
    from kdops.toy_data import generate

    return generate(str(tmp_path_factory.mktemp("d2_toy") / "kdops_toy"), num_train=16, num_val=8, image_size=128,
                    seed=0)


@pytest.fixture(scope="session")
def d2_teacher_weights(tmp_path_factory, d2_toy_data):
    """A checkpoint of the toy teacher (random init, seed 0), saved with DetectionCheckpointer."""
    pytest.importorskip("detectron2")
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from kdops_detectron2.configs import toy_cfg

    torch.manual_seed(0)
    teacher = build_model(toy_cfg("teacher", d2_toy_data["root"]))
    out = tmp_path_factory.mktemp("d2_teacher")
    DetectionCheckpointer(teacher, str(out)).save("teacher")
    return str(out / "teacher.pth")
