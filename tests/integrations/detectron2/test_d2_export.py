"""Student-only export: a KDDetector checkpoint becomes a plain detectron2 checkpoint (+ config
without MODEL.KD) that loads into a plain model built with detectron2 alone, with the same
predictions; KDTrainer's weight loading puts a plain detectron2 checkpoint into the student."""
import pytest

pytest.importorskip("detectron2")
import torch  # noqa: E402

from d2_testing import state_equal, val_batch  # noqa: E402


def _predictions(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(batch)
    return [(o["instances"].pred_boxes.tensor, o["instances"].scores, o["instances"].pred_classes) for o in out]


def test_export_loads_into_plain_detectron2_with_same_predictions(d2_toy_data, d2_teacher_weights, tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from kdops_detectron2.configs import config_path, toy_cfg
    from kdops_detectron2.export_student import main as export_main

    torch.manual_seed(0)
    cfg = toy_cfg("pkd", d2_toy_data["root"], d2_teacher_weights)
    model = build_model(cfg)
    with torch.no_grad():  # non-trivial biases so the random student predicts boxes
        model.student.head.cls_score.bias.fill_(-1.0)
    DetectionCheckpointer(model, str(tmp_path)).save("model_final")
    out = tmp_path / "student.pth"
    assert export_main(["--config-file", config_path("pkd/pkd_retinanet_toy.yaml"), "--weights",
                        str(tmp_path / "model_final.pth"), "--out", str(out),
                        "MODEL.KD.TEACHER.WEIGHTS", d2_teacher_weights, "MODEL.DEVICE", "cpu"]) == 0
    saved = torch.load(out, map_location="cpu", weights_only=False)
    assert set(saved) >= {"model"} and not any(k.startswith(("student.", "teacher.", "method.")) for k in saved["model"])

    plain_cfg = get_cfg()  # detectron2 alone: MODEL.KD would be an unknown key
    plain_cfg.merge_from_file(str(tmp_path / "student.yaml"))
    assert plain_cfg.MODEL.META_ARCHITECTURE == "RetinaNet" and "KD" not in plain_cfg.MODEL
    plain = build_model(plain_cfg)
    DetectionCheckpointer(plain).load(str(out))
    assert not state_equal(plain.state_dict(), model.student.state_dict())

    batch = val_batch(cfg)
    ours, theirs = _predictions(model, batch), _predictions(plain, batch)
    assert sum(len(s) for _, s, _ in ours) > 0
    for (b1, s1, c1), (b2, s2, c2) in zip(ours, theirs):
        assert torch.equal(b1, b2) and torch.equal(s1, s2) and torch.equal(c1, c2)


def test_student_weights_from_plain_and_kd_checkpoints(d2_toy_data, d2_teacher_weights, tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from kdops_detectron2 import load_student_weights, student_cfg
    from kdops_detectron2.configs import toy_cfg

    cfg = toy_cfg("pkd", d2_toy_data["root"], d2_teacher_weights)
    torch.manual_seed(1)
    plain = build_model(student_cfg(cfg))
    DetectionCheckpointer(plain, str(tmp_path)).save("plain")
    torch.manual_seed(2)
    kd = build_model(cfg)
    teacher_before = {k: v.clone() for k, v in kd.teacher.state_dict().items()}
    load_student_weights(kd, str(tmp_path / "plain.pth"))  # KDTrainer.resume_or_load(resume=False) with MODEL.WEIGHTS
    assert not state_equal(kd.student.state_dict(), plain.state_dict())
    assert not state_equal(kd.teacher.state_dict(), teacher_before)
    # and the other way: a KDDetector checkpoint's student.* into a plain model (--eval-only)
    DetectionCheckpointer(kd, str(tmp_path)).save("kd")
    torch.manual_seed(3)
    fresh = build_model(student_cfg(cfg))
    load_student_weights(fresh, str(tmp_path / "kd.pth"))
    assert not state_equal(fresh.state_dict(), plain.state_dict())


def test_kdtrainer_loads_model_weights_into_the_student_and_resumes(d2_toy_data, d2_teacher_weights, tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from d2_testing import TINY
    from kdops_detectron2 import KDTrainer, student_cfg
    from kdops_detectron2.configs import toy_cfg

    cfg = toy_cfg("pkd", d2_toy_data["root"], d2_teacher_weights)
    torch.manual_seed(5)
    plain = build_model(student_cfg(cfg))
    DetectionCheckpointer(plain, str(tmp_path)).save("plain")  # a plain detectron2 checkpoint
    out = tmp_path / "out"
    cfg = toy_cfg("pkd", d2_toy_data["root"], d2_teacher_weights,
                  TINY + ["OUTPUT_DIR", str(out), "MODEL.WEIGHTS", str(tmp_path / "plain.pth")])
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=True)  # nothing to resume in OUTPUT_DIR: MODEL.WEIGHTS -> student
    assert trainer.start_iter == 0
    assert not state_equal(trainer.model.student.state_dict(), plain.state_dict())
    trainer.iter = 6
    trainer.checkpointer.save("model_0000006", iteration=6)
    again = KDTrainer(cfg)
    again.resume_or_load(resume=True)
    assert again.start_iter == 7
    assert not state_equal(again.model.state_dict(), trainer.model.state_dict())
