"""LGD on the real mmdet stack (kdops_mmdet.LGDDetector): the toy RetinaNet and Faster R-CNN students,
mmengine's Runner and CocoMetric, no teacher.

Oracles: the distillation loss recomputed from the step's recorded instructive features with the
release's formula (adapter, F.instance_norm without affine on both sides, levels flattened and
concatenated per image, F.mse_loss); the ``*_tea`` losses recomputed by the student's own head on the
recorded instructive features; the schedule checked on the parameters' gradients."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mmdet_testing import CONFIGS, STUDENT_CFG, load_cfg, make_toy_data, require_mmdet, toy_batch

require_mmdet()

from mmengine.hooks import Hook  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

LGD = os.path.join(CONFIGS, "lgd")
RETINA_TOY = os.path.join(LGD, "lgd_retinanet_toy.py")
FRCNN_TOY = os.path.join(LGD, "lgd_faster_rcnn_toy.py")
FRCNN_CFG = os.path.join(CONFIGS, "_base_", "faster_rcnn_r18_toy_teacher.py")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_lgd")
    data = make_toy_data(str(root / "data"))
    return dict(root=str(root), data_root=data["root"])


class _Probe(Hook):
    def __init__(self):
        self.iters, self.metrics = [], None

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        m = runner.model
        self.iters.append(dict(outputs={k: float(v.detach()) for k, v in outputs.items()}, iteration=m.iteration,
                               distilling=m.distilling, frozen=m.backbone_frozen))

    def after_val_epoch(self, runner, metrics=None):
        self.metrics = dict(metrics)


@pytest.mark.parametrize("path,student_cfg,tea_keys", [
    (RETINA_TOY, STUDENT_CFG, {"loss_cls_tea", "loss_bbox_tea"}),
    (FRCNN_TOY, FRCNN_CFG, {"loss_rpn_cls_tea", "loss_rpn_bbox_tea", "loss_cls_tea", "loss_bbox_tea"}),
], ids=["retinanet", "faster_rcnn"])
def test_lgd_toy_configs_train_validate_schedule_and_export(path, student_cfg, tea_keys, toy, tmp_path):
    """Two Runner iterations of each toy config (schedule moved to iterations 1 and 1): every loss is
    logged and finite, the hook hands the model its iteration (backbone frozen and distillation off at
    iteration 0, both switched at 1), CocoMetric scores the student, and the exported checkpoint is
    the plain student that mmdet loads, without any LGD module."""
    cfg = load_cfg(path, toy["data_root"], str(tmp_path / "work"))
    if isinstance(cfg.model.student, str):  # lgd_faster_rcnn_toy.py names its student's config file
        from mmengine.config import Config

        cfg.model.student = Config.fromfile(cfg.model.student).model
    cfg.model.distill_start_iter = 1
    cfg.model.freeze_backbone_iters = 1
    cfg.model.student.test_cfg.get("rcnn", cfg.model.student.test_cfg).score_thr = 0.0
    runner = Runner.from_cfg(cfg)
    probe = _Probe()
    runner.register_hook(probe, priority="LOWEST")
    runner.train()
    keys = {"loss_lgd"} | tea_keys
    assert [it["iteration"] for it in probe.iters] == [0, 1]
    assert [(it["frozen"], it["distilling"]) for it in probe.iters] == [(True, False), (False, True)]
    for it in probe.iters:
        assert keys <= set(it["outputs"]), sorted(it["outputs"])
        assert all(math.isfinite(it["outputs"][k]) for k in keys)
        assert it["outputs"]["loss_lgd"] > 0
    assert isinstance(probe.metrics.get("coco/bbox_mAP"), float)

    ckpt = os.path.join(cfg.work_dir, "iter_2.pth")
    out = str(tmp_path / "student.pth")
    subprocess.run([sys.executable, "-m", "kdops_mmdet.export_student", ckpt, out], check=True)
    sd = torch.load(out, map_location="cpu", weights_only=False)["state_dict"]
    assert sd and not any(k.startswith(("lgd", "student.")) for k in sd)
    from mmdet.apis import init_detector

    plain = init_detector(student_cfg, out, device="cpu")
    ref = runner.model.student.state_dict()
    assert plain.state_dict().keys() == ref.keys()
    assert all(torch.equal(v, ref[k]) for k, v in plain.state_dict().items())


def _model(toy, path=RETINA_TOY, **overrides):
    from mmdet.utils import register_all_modules

    import kdops_mmdet  # noqa: F401
    from kdops_mmdet.registry import MODELS

    from mmengine.registry import init_default_scope

    register_all_modules(init_default_scope=False)
    init_default_scope("mmdet")
    cfg = load_cfg(path, toy["data_root"], os.path.join(toy["root"], "w"))
    for k, v in overrides.items():
        cfg.model[k] = v
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model, cfg


def _record(model):
    """Records the instructive features of the next step (the LGD module's output)."""
    rec = {}

    def hook(_m, _args, out):
        rec["instructive"] = [t.detach().clone() for t in out]
    return rec, model.lgd.register_forward_hook(hook)


def _eager_lgd(adapter, student_feats, instructive) -> torch.Tensor:
    """The release's BaseDistillator.distill: adapter on the student, InstanceNorm2d(affine=False) on both
    sides, each side's levels flattened per image and concatenated, F.mse_loss (mean), lambda 1."""
    n = student_feats[0].shape[0]

    def inorm(x):  # F.instance_norm, written out: it refuses 1x1 maps in training mode (the toy P7)
        x = x.double()
        mean = x.mean((2, 3), keepdim=True)
        var = x.var((2, 3), unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5)
    s = torch.cat([inorm(adapter(f)).reshape(n, -1) for f in student_feats], dim=1)
    t = torch.cat([inorm(f).reshape(n, -1) for f in instructive], dim=1)
    return F.mse_loss(s, t)


@pytest.mark.parametrize("path", [RETINA_TOY, FRCNN_TOY], ids=["retinanet", "faster_rcnn"])
def test_lgd_step_losses_match_the_releases_formulas(path, toy):
    """On one batch: loss_lgd equals the release's formula on the student's FPN features and the
    recorded instructive features; the *_tea losses equal the student's own head losses on the
    recorded instructive features; the student's own losses are those of mmdet's detector."""
    model, cfg = _model(toy, path)
    model.train()
    model.set_iteration(10 ** 6)  # past both thresholds
    data = toy_batch(model, cfg)
    rec, handle = _record(model)
    torch.manual_seed(5)
    losses = model.loss(data["inputs"], data["data_samples"])
    handle.remove()
    with torch.no_grad():
        feats = model.student.extract_feat(data["inputs"])
        want = _eager_lgd(model.lgd_loss.adapter, feats, rec["instructive"])
        assert float(losses["loss_lgd"]) == pytest.approx(float(want), rel=1e-5, abs=1e-7)
        if "rpn_head" not in dict(model.student.named_children()):  # one-stage: deterministic head losses
            tea = model.student.bbox_head.loss(tuple(rec["instructive"]), data["data_samples"])
            for k, v in tea.items():
                got = losses[f"{k}_tea"]
                got = sum(got) if isinstance(got, (list, tuple)) else got
                v = sum(v) if isinstance(v, (list, tuple)) else v
                assert float(got) == pytest.approx(float(v), rel=1e-5), k
            own = model.student.loss(data["inputs"], data["data_samples"])
            for k, v in own.items():
                a = sum(losses[k]) if isinstance(losses[k], (list, tuple)) else losses[k]
                b = sum(v) if isinstance(v, (list, tuple)) else v
                assert float(a) == pytest.approx(float(b), rel=1e-5), k


def _grads(module):
    return [p.grad for p in module.parameters() if p.requires_grad]


def test_lgd_schedule_detaches_the_student_and_freezes_the_backbone(toy):
    """Before distill_start_iter the distillation loss trains the adapter but sends nothing into the
    student; before freeze_backbone_iters the backbone gets no gradient from any loss while the FPN
    does; afterwards both reach the student."""
    model, cfg = _model(toy, distill_start_iter=100, freeze_backbone_iters=50)
    model.train()
    data = toy_batch(model, cfg)
    for it, frozen, distilling in ((0, True, False), (60, False, False), (100, False, True)):
        model.zero_grad(set_to_none=True)
        model.set_iteration(it)
        assert (model.backbone_frozen, model.distilling) == (frozen, distilling)
        losses = model.loss(data["inputs"], data["data_samples"])
        losses["loss_lgd"].backward(retain_graph=True)
        neck = [g for g in _grads(model.student.neck)]
        assert all(g is not None for g in _grads(model.lgd_loss))
        if distilling:
            assert any(g is not None and g.abs().sum() > 0 for g in neck)
        else:
            assert all(g is None for g in neck)
        model.zero_grad(set_to_none=True)
        total = sum(v if torch.is_tensor(v) else sum(v) for k, v in losses.items() if "loss" in k)
        total.backward()
        bb = _grads(model.student.backbone)
        if frozen:
            assert all(g is None for g in bb)
        else:
            assert any(g is not None and g.abs().sum() > 0 for g in bb)
        assert any(g is not None and g.abs().sum() > 0 for g in _grads(model.student.neck))
        assert any(g is not None and g.abs().sum() > 0 for g in _grads(model.lgd))


@pytest.mark.parametrize("empty", [(1,), (0, 1)], ids=["one-image-without-gt", "no-gt-at-all"])
def test_lgd_images_without_gt_keep_the_loss_defined(toy, empty):
    """Images without objects (only the context box, or nothing at all): every loss finite, backward runs."""
    model, cfg = _model(toy)
    model.train()
    model.set_iteration(10 ** 6)
    data = toy_batch(model, cfg, empty)
    losses = model.loss(data["inputs"], data["data_samples"])
    for k, v in losses.items():
        v = sum(v) if isinstance(v, (list, tuple)) else v
        assert torch.isfinite(v).all(), k
    total = sum(v if torch.is_tensor(v) else sum(v) for k, v in losses.items() if "loss" in k)
    total.backward()
    assert all(g is None or torch.isfinite(g).all() for g in _grads(model))


@pytest.mark.parametrize("overrides,exc,match", [
    (dict(distill_start_iter=-1), ValueError, "distill_start_iter must be an int >= 0"),
    (dict(loss_weight="1"), ValueError, "loss_weight must be a number >= 0"),
    (dict(lgd=[1]), TypeError, "lgd must be a dict"),
    (dict(student=dict(type="SingleStageDetector", backbone=dict(type="ResNet", depth=18, out_indices=(3,)),
                       bbox_head=dict(type="RetinaHead", num_classes=4, in_channels=512,
                                      anchor_generator=dict(type="AnchorGenerator", octave_base_scale=4,
                                                            scales_per_octave=3, ratios=[1.0], strides=[32]),
                                      bbox_coder=dict(type="DeltaXYWHBBoxCoder")))),
     ValueError, "needs an FPN neck"),
])
def test_lgd_bad_configs_fail_at_construction(toy, overrides, exc, match):
    with pytest.raises(exc, match=match):
        _model(toy, **overrides)
