"""LGD in detectron2 (MODEL.KD.METHOD "lgd", no teacher): the toy RetinaNet and Faster R-CNN configs
train 2 iterations with KDTrainer; the step's losses against detectron2's own heads and the release's
distillation formula; the release's schedule on the parameters' gradients; export to a plain model."""
import math

import pytest

pytest.importorskip("detectron2")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from d2_testing import TINY, train_batch  # noqa: E402


@pytest.mark.parametrize("name,tea_keys", [
    ("lgd", {"loss_cls_tea", "loss_box_reg_tea"}),
    ("lgd_faster_rcnn", {"loss_rpn_cls_tea", "loss_rpn_loc_tea", "loss_cls_tea", "loss_box_reg_tea"}),
], ids=["retinanet", "faster_rcnn"])
def test_lgd_toy_config_trains_evaluates_and_schedules(name, tea_keys, d2_toy_data, tmp_path):
    """No teacher is built; *_tea and loss_lgd logged and finite; only loss_lgd is scaled by the KD
    factor; the iteration reaches the method (schedule thresholds at 1: frozen / not distilling at
    iteration 0, both switched at 1); the evaluator returns numbers."""
    from kdops_detectron2 import KDTrainer
    from kdops_detectron2.configs import toy_cfg
    from kdops_detectron2.trainer import unwrap

    torch.manual_seed(0)
    cfg = toy_cfg(name, d2_toy_data["root"], opts=TINY + [
        "OUTPUT_DIR", str(tmp_path), "MODEL.KD.WARMUP_ITERS", "2", "MODEL.KD.LGD.DISTILL_START_ITER", "1",
        "MODEL.KD.LGD.FREEZE_BACKBONE_ITERS", "1"])
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    model = unwrap(trainer.model)
    assert model.teacher is None and type(model.method).__name__ == "LGDMethod"
    seen = []
    orig = model.method.forward

    def spy(ctx):
        seen.append((ctx.iteration, model.method.backbone_frozen, model.method.distilling))
        return orig(ctx)
    model.method.forward = spy
    trainer.train()
    assert seen == [(0, True, False), (1, False, True)]
    hist = trainer.storage.histories()
    for key in tea_keys | {"loss_lgd"}:
        vals = [v for v, _ in hist[key].values()]
        assert len(vals) == 2 and all(math.isfinite(v) for v in vals), key
    assert all(v > 0 for v, _ in hist["loss_lgd"].values())
    assert [v for v, _ in hist["kd_factor"].values()] == [0.5, 1.0]
    res = trainer._last_eval_results["bbox"]
    assert isinstance(res["AP"], float) and math.isfinite(res["AP"])


def _model(d2_toy_data, name="lgd", opts=()):
    from detectron2.modeling import build_model

    from kdops_detectron2.configs import toy_cfg

    cfg = toy_cfg(name, d2_toy_data["root"], opts=TINY + list(opts))
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    return model, cfg


def _inorm(x):
    x = x.double()
    return (x - x.mean((2, 3), keepdim=True)) / torch.sqrt(x.var((2, 3), unbiased=False, keepdim=True) + 1e-5)


def test_lgd_step_matches_the_students_heads_and_the_releases_formula(d2_toy_data):
    """loss_lgd = the release's BaseDistillator.distill (adapter, InstanceNorm without affine, levels
    flattened and concatenated per image, F.mse_loss) on the student's FPN levels and the recorded
    instructive maps; loss_*_tea = the student RetinaNet's own losses on those maps (its forward after
    the backbone, written out here from detectron2's RetinaNet.forward)."""
    model, cfg = _model(d2_toy_data, opts=["MODEL.KD.LGD.DISTILL_START_ITER", "0",
                                           "MODEL.KD.LGD.FREEZE_BACKBONE_ITERS", "0"])
    from detectron2.utils.events import EventStorage

    batch = train_batch(cfg)
    rec = {}
    h = model.method.lgd.register_forward_hook(lambda m, a, out: rec.__setitem__("inst", [t.detach() for t in out]))
    s = model.student
    storage = EventStorage(0)
    storage.__enter__()
    losses = model(batch)
    h.remove()
    taps = model.method.taps
    with torch.no_grad():
        images = model.preprocess_image(batch)
        feats = s.backbone(images.tensor)
        stu = [feats[t] for t in taps]
        n = stu[0].shape[0]
        a = torch.cat([_inorm(model.method.lgd_loss.adapter(f)).reshape(n, -1) for f in stu], 1)
        b = torch.cat([_inorm(f).reshape(n, -1) for f in rec["inst"]], 1)
        assert float(losses["loss_lgd"]) == pytest.approx(float(F.mse_loss(a, b)), rel=1e-5)
        # RetinaNet.forward (detectron2 0.6) after the backbone, on the instructive maps
        gt = [x["instances"].to(s.device) for x in batch]
        inst = dict(zip(taps, rec["inst"]))
        f = [inst[k] for k in s.head_in_features]
        anchors = s.anchor_generator(f)
        logits, deltas = s.head(f)
        from detectron2.modeling.meta_arch.retinanet import permute_to_N_HWA_K
        logits = [permute_to_N_HWA_K(x, s.num_classes) for x in logits]
        deltas = [permute_to_N_HWA_K(x, 4) for x in deltas]
        gt_labels, gt_boxes = s.label_anchors(anchors, gt)
        # the loss normaliser is an EMA (momentum 0.9) updated by each loss call; the step updated it
        # twice (own losses, then *_tea): step it back once so that this call uses the *_tea value
        num_pos = max(int(((torch.stack(gt_labels) >= 0) & (torch.stack(gt_labels) != s.num_classes)).sum()), 1)
        s.loss_normalizer = (s.loss_normalizer - 0.1 * num_pos) / 0.9
        want = s.losses(anchors, logits, gt_labels, deltas, gt_boxes)
    storage.__exit__(None, None, None)
    assert set(want) == {"loss_cls", "loss_box_reg"}
    for k, v in want.items():
        assert float(losses[f"{k}_tea"]) == pytest.approx(float(v), rel=1e-5), k


@pytest.fixture(autouse=True)
def _storage():
    from detectron2.utils.events import EventStorage

    with EventStorage(0):
        yield


def test_lgd_schedule_on_gradients(d2_toy_data):
    """Before DISTILL_START_ITER loss_lgd trains the adapter and sends nothing into the student; before
    FREEZE_BACKBONE_ITERS the bottom-up backbone gets no gradient from any loss, the FPN does."""
    model, cfg = _model(d2_toy_data, opts=["MODEL.KD.LGD.DISTILL_START_ITER", "100",
                                           "MODEL.KD.LGD.FREEZE_BACKBONE_ITERS", "50"])
    batch = train_batch(cfg)
    bottom_up = model.student.backbone.bottom_up
    fpn = [p for n, p in model.student.backbone.named_parameters() if not n.startswith("bottom_up.")]
    for it, frozen, distilling in ((0, True, False), (60, False, False), (100, False, True)):
        model.zero_grad(set_to_none=True)
        model.set_iteration(it)
        losses = model(batch)
        losses["loss_lgd"].backward(retain_graph=True)
        assert all(p.grad is not None for p in model.method.lgd_loss.parameters())
        if distilling:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fpn)
        else:
            assert all(p.grad is None for p in fpn)
        model.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        got = [p.grad for p in bottom_up.parameters()]
        if frozen:
            assert all(g is None for g in got)
        else:
            assert any(g is not None and g.abs().sum() > 0 for g in got)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fpn)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.method.lgd.parameters())


def test_lgd_image_without_gt_keeps_losses_finite(d2_toy_data):
    model, cfg = _model(d2_toy_data)
    model.set_iteration(10 ** 6)
    batch = train_batch(cfg)
    batch[1]["instances"] = batch[1]["instances"][:0]
    losses = model(batch)
    assert all(torch.isfinite(v).all() for v in losses.values()), losses
    sum(losses.values()).backward()


@pytest.mark.parametrize("opts,exc,match", [
    (["MODEL.KD.TEACHER.WEIGHTS", "t.pth"], ValueError, "teacher-free"),
    (["MODEL.KD.LGD.DISTILL_START_ITER", "-1"], ValueError, "DISTILL_START_ITER must be >= 0"),
    (["MODEL.KD.LGD.EMPTY_IMAGE_OBJECT", "nothing"], ValueError, "empty_image_object"),
])
def test_lgd_bad_configs(d2_toy_data, opts, exc, match):
    with pytest.raises(exc, match=match):
        _model(d2_toy_data, opts=opts)
