"""Every method's toy config trains 2 iterations with KDTrainer on kdops.toy_data: COCOEvaluator
(pycocotools) returns numbers, the teacher stays bitwise unchanged, the KD loss is logged, finite,
scaled by the schedule factor, and the factor is a logged scalar, not a loss."""
import math

import pytest

pytest.importorskip("detectron2")
import torch  # noqa: E402

from d2_testing import TINY, state_equal  # noqa: E402

METHODS = ["pkd", "fgd", "fitnet", "defeat"]


@pytest.mark.parametrize("method", METHODS)
def test_toy_config_trains_and_evaluates(method, d2_toy_data, d2_teacher_weights, tmp_path):
    from kdops_detectron2 import KDTrainer
    from kdops_detectron2.configs import toy_cfg
    from kdops_detectron2.trainer import unwrap

    torch.manual_seed(0)
    cfg = toy_cfg(method, d2_toy_data["root"], d2_teacher_weights,
                  TINY + ["OUTPUT_DIR", str(tmp_path), "MODEL.KD.WARMUP_ITERS", "4"])
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    model = unwrap(trainer.model)
    assert type(model).__name__ == "KDDetector" and model.teacher is not None
    assert not any(p.requires_grad for p in model.teacher.parameters())
    trainer.train()

    # the evaluator ran (pycocotools) and gave numbers
    res = trainer._last_eval_results["bbox"]
    assert {"AP", "AP50", "AP75"} <= set(res) and all(isinstance(res[k], float) for k in ("AP", "AP50"))
    assert math.isfinite(res["AP"]) and res["AP"] >= 0
    # the teacher: eval mode, bitwise its checkpoint (parameters and buffers)
    assert not model.teacher.training and model.student.training
    saved = torch.load(d2_teacher_weights, map_location="cpu", weights_only=False)["model"]
    assert not state_equal(saved, model.teacher.state_dict())
    # the KD loss: logged every iteration, finite, non-zero; the factor (warm-up 4: 1/4, 2/4) a scalar
    hist = trainer.storage.histories()
    key = f"loss_{method}"
    values = [v for v, _ in hist[key].values()]
    assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values)
    assert [v for v, _ in hist["kd_factor"].values()] == [0.25, 0.5]
    for it in range(2):  # total_loss = the sum of the loss dict, KD term already scaled, factor not in it
        total = hist["total_loss"].values()[it][0]
        parts = sum(hist[k].values()[it][0] for k in ("loss_cls", "loss_box_reg", key))
        assert total == pytest.approx(parts, rel=1e-5)
