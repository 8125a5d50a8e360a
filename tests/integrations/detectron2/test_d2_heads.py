"""student_head_losses is detectron2's own training forward after the backbone: for RetinaNet and
GeneralizedRCNN it gives the student's forward losses exactly (same RNG); a GeneralizedRCNN student
distils from the RetinaNet teacher through KDDetector on the levels both have."""
import pytest

pytest.importorskip("detectron2")
import torch  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from d2_testing import train_batch  # noqa: E402


def _cfg(rel, root, opts=()):
    from kdops_detectron2 import get_kd_cfg, register_toy_datasets
    from kdops_detectron2.configs import config_path

    register_toy_datasets(root)
    return get_kd_cfg(config_path(rel), ["MODEL.DEVICE", "cpu"] + list(opts))


@pytest.mark.parametrize("rel", ["toy/retinanet_r18_toy_student.yaml", "toy/faster_rcnn_r18_toy_student.yaml"])
def test_student_head_losses_equal_the_students_forward(rel, d2_toy_data):
    from detectron2.modeling import build_model

    from kdops_detectron2 import student_head_losses

    cfg = _cfg(rel, d2_toy_data["root"])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    batch = train_batch(cfg)
    assert not hasattr(model, "loss_normalizer")
    with EventStorage(0):
        torch.manual_seed(1)
        expected = model(batch)
        if hasattr(model, "loss_normalizer"):  # RetinaNet's moving average, created / updated by every call
            del model.loss_normalizer
        torch.manual_seed(1)
        images = model.preprocess_image(batch)
        gt = [x["instances"] for x in batch]
        got = student_head_losses(model, model.backbone(images.tensor), images, gt)
    assert set(got) == set(expected) and len(got) >= 2
    for k in got:
        assert torch.equal(got[k], expected[k]), k


def test_generalized_rcnn_student_distils_from_retinanet_teacher(d2_toy_data, d2_teacher_weights):
    from detectron2.modeling import build_model

    from kdops_detectron2.configs import config_path

    cfg = _cfg("toy/faster_rcnn_r18_toy_student.yaml", d2_toy_data["root"], [
        "MODEL.META_ARCHITECTURE", "KDDetector", "MODEL.KD.STUDENT_META_ARCHITECTURE", "GeneralizedRCNN",
        "MODEL.KD.METHOD", "fgd", "MODEL.KD.TAPS", "['p3', 'p4', 'p5', 'p6']",
        "MODEL.KD.TEACHER.CONFIG_FILE", config_path("toy/retinanet_r18_toy_teacher.yaml"),
        "MODEL.KD.TEACHER.WEIGHTS", d2_teacher_weights])
    torch.manual_seed(0)
    model = build_model(cfg)
    assert type(model.student).__name__ == "GeneralizedRCNN" and type(model.teacher).__name__ == "RetinaNet"
    model.train()
    with EventStorage(0):
        losses = model(train_batch(cfg))
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_fgd"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.method.loss.align[0].weight.grad is not None
    assert all(p.grad is None for p in model.teacher.parameters())
