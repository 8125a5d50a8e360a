"""kdops_mmdet on the real stack: mmengine's Runner, mmdet's RetinaNet, kdops.toy_data, CocoMetric."""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
import torch

from mmdet_testing import (PKD_TOY_CFG, STUDENT_CFG, load_cfg, make_teacher_ckpt, make_toy_data, pkd_eager,
                           require_mmdet)

require_mmdet()

from kdops_mmdet import kd_scale_at  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

PKD_WEIGHT = 10.0
WARMUP = 2  # the run's KDScheduleHook: scale 0.5 at iteration 0, 1.0 at iteration 1


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    data = make_toy_data(str(root / "data"))
    ckpt = make_teacher_ckpt(str(root / "teacher.pth"))
    return dict(root=str(root), data_root=data["root"], teacher_ckpt=ckpt, val_images=data["val_images"])


class _Probe(Hook):
    """Records, per training iteration, the logged outputs, the student's connector outputs and the
    teacher's FPN levels (the tensors the PKD entry was given), the teacher's state, and the metrics."""

    def __init__(self):
        self.iters, self.metrics, self._cur, self._on = [], None, None, False
        self.teacher_before = self.teacher_after = None

    def attach(self, model):
        def grab(key, idx=None):
            def hook(module, inputs, output):
                if self._on:
                    self._cur.setdefault(key, {})[idx] = [o.detach().clone() for o in output] \
                        if isinstance(output, (tuple, list)) else output.detach().clone()
            return hook

        for i, conn in enumerate(model.connectors["pkd"]):
            conn.register_forward_hook(grab("student", i))
        model.teacher.neck.register_forward_hook(grab("teacher"))

    def before_train(self, runner):
        teacher = getattr(runner.model, "teacher", None)  # None for teacher-free models (TF-HEAD)
        self.teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()} if teacher else None

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self._on, self._cur = True, {"scale": dict(runner.model.kd_scale)}

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self._on = False
        self._cur["outputs"] = {k: float(v.detach()) for k, v in outputs.items()}
        self._cur["teacher_training"] = getattr(getattr(runner.model, "teacher", None), "training", None)
        self.iters.append(self._cur)

    def after_val_epoch(self, runner, metrics=None):
        self.metrics = dict(metrics)

    def after_run(self, runner):
        teacher = getattr(runner.model, "teacher", None)
        self.teacher_after = {k: v.clone() for k, v in teacher.state_dict().items()} if teacher else None


@pytest.fixture(scope="module")
def pkd_run(toy):
    work_dir = os.path.join(toy["root"], "work_pkd")
    cfg = load_cfg(PKD_TOY_CFG, toy["data_root"], work_dir, teacher_ckpt=toy["teacher_ckpt"])
    cfg.custom_hooks = [dict(type="kdops.KDScheduleHook", warmup_iters=WARMUP)]
    # a student two steps into training scores every box ~0.01 (focal-loss prior): keep them all,
    # so that CocoMetric has detections to score
    cfg.model.student.test_cfg.score_thr = 0.0
    runner = Runner.from_cfg(cfg)
    probe = _Probe()
    probe.attach(runner.model)
    runner.register_hook(probe, priority="LOWEST")
    runner.train()
    return dict(runner=runner, probe=probe, work_dir=work_dir, cfg=cfg)


def test_toy_config_trains_and_validates(pkd_run):
    probe = pkd_run["probe"]
    assert len(probe.iters) == 2
    for it in probe.iters:
        out = it["outputs"]
        assert {"loss", "loss_cls", "loss_bbox", "loss_pkd"} <= set(out)
        assert all(math.isfinite(v) for v in out.values())
    assert probe.metrics is not None and "coco/bbox_mAP" in probe.metrics
    for k, v in probe.metrics.items():
        if k.startswith("coco/bbox_mAP"):
            assert isinstance(v, float) and math.isfinite(v)


def test_teacher_frozen_bitwise(pkd_run, toy):
    probe, model = pkd_run["probe"], pkd_run["runner"].model
    ckpt = torch.load(toy["teacher_ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    assert set(probe.teacher_before) == set(ckpt)
    for k, v in ckpt.items():  # loaded, and not overwritten by the Runner's init_weights
        assert torch.equal(probe.teacher_before[k], v), k
        assert torch.equal(probe.teacher_after[k], v), k  # BN statistics included
    assert not any(it["teacher_training"] for it in probe.iters)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    model.train()
    assert model.student.training and not model.teacher.training
    tops = {k.split(".")[0] for k in model.state_dict()}
    assert tops == {"student", "teacher", "connectors"}


def test_logged_pkd_equals_eager_formula(pkd_run):
    for it, rec in enumerate(pkd_run["probe"].iters):
        student = [rec["student"][i] for i in range(4)]
        teacher = rec["teacher"][None][:4]
        scale = kd_scale_at(it, WARMUP)
        assert rec["scale"]["pkd"] == scale
        expected = float(pkd_eager(student, teacher, PKD_WEIGHT)) * scale
        assert rec["outputs"]["loss_pkd"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


_INFER = r"""
import json, sys
import numpy as np
from mmdet.apis import inference_detector, init_detector
cfg, ckpt, out = sys.argv[1], sys.argv[2], sys.argv[3]
imgs = sys.argv[4:]
import torch
sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
# the distiller's student keeps every box (score_thr 0.0, see pkd_run): same here
model = init_detector(cfg, ckpt, device="cpu", cfg_options=dict(model=dict(test_cfg=dict(score_thr=0.0))))
assert set(sd) == set(model.state_dict()), sorted(set(sd) ^ set(model.state_dict()))[:10]
res = inference_detector(model, imgs)
np.savez(out, **{f"{k}{i}": getattr(r.pred_instances, k).numpy() for i, r in enumerate(res)
                 for k in ("bboxes", "scores", "labels")})
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("kdops", "kdops_mmdet"))
assert not leaked, leaked
print("OK", model.dataset_meta.get("classes"))
"""


def test_export_then_init_detector_without_kdops(pkd_run, toy, tmp_path):
    import numpy as np
    from mmdet.apis import inference_detector
    from mmengine.config import Config

    from kdops_mmdet.export_student import main as export_main

    src = os.path.join(pkd_run["work_dir"], "iter_2.pth")
    dst = str(tmp_path / "student.pth")
    assert export_main([src, dst]) == 0
    exported = torch.load(dst, map_location="cpu", weights_only=True)
    assert not any(k.startswith(("student.", "teacher.", "connectors.")) for k in exported["state_dict"])
    assert exported["meta"]["dataset_meta"]["classes"] == ("circle", "square", "triangle", "cross")

    imgs = sorted(os.path.join(toy["val_images"], f) for f in os.listdir(toy["val_images"]))[:3]
    out = str(tmp_path / "pred.npz")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["KDOPS_TOY_DATA"] = toy["data_root"]
    proc = subprocess.run([sys.executable, "-c", _INFER, STUDENT_CFG, dst, out, *imgs], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    model = pkd_run["runner"].model
    model.cfg = Config.fromfile(STUDENT_CFG)
    model.eval()
    ours = inference_detector(model, imgs)
    theirs = np.load(out)
    for i, r in enumerate(ours):
        for k in ("bboxes", "scores", "labels"):
            np.testing.assert_allclose(getattr(r.pred_instances, k).numpy(), theirs[f"{k}{i}"], rtol=1e-5,
                                       atol=1e-4)


# ------------------------------------------------------------------------------------ bad input
def _model_cfg(toy):
    cfg = load_cfg(PKD_TOY_CFG, toy["data_root"], os.path.join(toy["root"], "unused"), teacher_ckpt=toy["teacher_ckpt"])
    return copy.deepcopy(cfg.model)


def _build(model_cfg):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    return MODELS.build(model_cfg)


@pytest.mark.parametrize("case", ["unknown_tap", "channel_mismatch", "missing_ckpt", "preprocess", "loss_type"])
def test_bad_input_fails_at_build(toy, case):
    cfg = _model_cfg(toy)
    entry = cfg.distill_losses[0]
    if case == "unknown_tap":
        entry.student = "backbone.layer9"
        err, words = ValueError, ["backbone.layer9", "layer9", "layer1", "layer4", "conv1"]
    elif case == "channel_mismatch":
        entry.pop("connector")
        err, words = ValueError, ["(2, 32, 16, 16)", "(2, 64, 16, 16)", "connector=dict(type='conv1x1'"]
    elif case == "missing_ckpt":
        cfg.teacher_ckpt = os.path.join(toy["root"], "nope.pth")
        err, words = FileNotFoundError, ["model.teacher_ckpt", "nope.pth"]
    elif case == "preprocess":
        teacher = _load_teacher_model(toy)
        teacher.data_preprocessor.mean = [0.0, 0.0, 0.0]
        cfg.teacher_cfg = teacher
        err, words = ValueError, ["data_preprocessor", "mean"]
    else:
        entry.type = "PDKLoss"
        err, words = ValueError, ["PDKLoss", "PKDLoss", "FeatureMimicLoss", "BCKDLoss"]
    with pytest.raises(err) as info:
        _build(cfg)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def _load_teacher_model(toy):
    from mmengine.config import Config

    from mmdet_testing import TEACHER_CFG

    return copy.deepcopy(Config.fromfile(TEACHER_CFG).model)


def test_head_tap_per_level_and_gt_box_loss_without_boxes(toy):
    """A shared head conv, tapped: one output per level. A GT-box loss (DeFeat-style masks) on a
    batch with an image without boxes, and on one with no boxes at all: finite, no crash."""
    from mmdet.testing import demo_mm_inputs

    cfg = _model_cfg(toy)
    cfg.distill_losses = [
        dict(name="defeat", type="FeatureMimicLoss", student="neck", teacher="neck", levels=[0, 1, 2],
             connector=dict(type="conv1x1", in_channels=32, out_channels=64), fg_weight=1.0, bg_weight=0.0,
             mask_mode="binary", mask_rule="center", normalize="mask", strides=[8, 16, 32], loss_weight=1.0),
        dict(name="head", type="FeatureMimicLoss", student="bbox_head.cls_convs.1", teacher="bbox_head.cls_convs.1",
             connector=dict(type="conv_norm_act", in_channels=32, out_channels=64, kernel_size=1), normalize="numel"),
    ]
    model = _build(cfg)
    assert len(model.connectors["head"]) == 5  # one per FPN level the shared conv ran on
    for num_items in ([0, 3], [0, 0]):
        packed = demo_mm_inputs(batch_size=2, image_shapes=[(3, 128, 128)] * 2, num_items=num_items, num_classes=4)
        data = model.data_preprocessor(packed, True)
        losses = model(**data, mode="loss")
        assert {"loss_defeat", "loss_head"} <= set(losses)
        assert all(torch.isfinite(v).all() for k, v in losses.items() if torch.is_tensor(v))
        if num_items == [0, 0]:
            assert float(losses["loss_defeat"]) == 0.0  # foreground-only loss, no boxes
        sum(v.sum() for k, v in losses.items() if "loss" in k and torch.is_tensor(v)).backward()
        assert all(p.grad is not None for p in model.connectors.parameters())
        model.zero_grad()


# --------------------------------------------------------------------------------------- schedule
def test_schedule_is_a_function_of_the_iteration():
    from mmengine.optim.scheduler import LinearLR, MultiStepLR

    from kdops_mmdet import first_lr_milestone_iter

    assert [kd_scale_at(i, 4) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [kd_scale_at(i, 2, stop_iter=3) for i in range(5)] == [0.5, 1.0, 1.0, 0.0, 0.0]
    assert [kd_scale_at(i) for i in (0, 10 ** 6)] == [1.0, 1.0]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    by_iter = [LinearLR(opt, by_epoch=False, begin=0, end=10), MultiStepLR(opt, milestones=[70, 90], by_epoch=False)]
    assert first_lr_milestone_iter(by_iter, iters_per_epoch=50) == 70
    by_epoch = [MultiStepLR(opt, milestones=[8, 11], by_epoch=True)]
    assert first_lr_milestone_iter(by_epoch, iters_per_epoch=50) == 400
    assert first_lr_milestone_iter({"a": by_iter, "b": by_epoch}, iters_per_epoch=50) == 70
    assert first_lr_milestone_iter(by_iter[:1], iters_per_epoch=50) is None


# --------------------------------------------------------------------------- train tool, resume
def test_train_tool_resumes_a_distillation_checkpoint(pkd_run, toy, tmp_path):
    """python -m kdops_mmdet.train ... --resume: the Runner's own checkpoint (message hub and all)
    loads on torch >= 2.6, training continues from iteration 2, the teacher is still the checkpoint's."""
    from kdops_mmdet.train import main as train_main

    os.environ["KDOPS_TOY_DATA"] = toy["data_root"]
    work = str(tmp_path / "resumed")
    opts = ["train_dataloader.batch_size=2", "train_dataloader.num_workers=0",
            "train_dataloader.persistent_workers=False", "val_dataloader.batch_size=4",
            "val_dataloader.num_workers=0", "val_dataloader.persistent_workers=False",
            "train_cfg.max_iters=3", "train_cfg.val_interval=3", "default_hooks.checkpoint.interval=3",
            f"model.teacher_ckpt={toy['teacher_ckpt']}", "model.student.test_cfg.score_thr=0.0"]
    runner = train_main([PKD_TOY_CFG, "--work-dir", work, "--resume", os.path.join(pkd_run["work_dir"], "iter_2.pth"),
                         "--cfg-options", *opts])
    assert runner.iter == 3
    assert math.isfinite(runner.message_hub.get_scalar("train/loss_pkd").current())
    ckpt = torch.load(toy["teacher_ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    for k, v in runner.model.teacher.state_dict().items():
        assert torch.equal(v, ckpt[k]), k


# ------------------------------------------------------------------------------------------ BCKD
def test_bckd_on_gfl_matches_eager_and_reference(toy):
    """BCKD on the toy GFL pair: the logged terms equal the formula recomputed here from the heads'
    raw outputs and targets that the test derives itself (get_anchors + get_targets, mmdet's path)."""
    import torch.nn.functional as F
    from mmengine.config import Config
    from mmdet.models.utils import unpack_gt_instances
    from mmdet.testing import demo_mm_inputs

    from kdops.reference import bckd_loc_loss
    from mmdet_testing import CONFIGS

    os.environ["KDOPS_TOY_DATA"] = toy["data_root"]
    cfg = Config.fromfile(os.path.join(CONFIGS, "bckd", "bckd_gfl_toy.py"))
    cfg.model.teacher_ckpt = None
    torch.manual_seed(0)
    model = _build(cfg.model)
    model.student.init_weights()
    seen = {}
    model.student.bbox_head.register_forward_hook(lambda m, i, o: seen.__setitem__("s", o))
    model.teacher.bbox_head.register_forward_hook(lambda m, i, o: seen.__setitem__("t", o))
    packed = demo_mm_inputs(batch_size=2, image_shapes=[(3, 128, 128)] * 2, num_items=[2, 3], num_classes=4)
    data = model.data_preprocessor(packed, True)
    losses = model(**data, mode="loss")

    head = model.student.bbox_head
    (s_cls, s_reg), (t_cls, t_reg) = seen["s"], seen["t"]
    gts, gts_ignore, metas = unpack_gt_instances(data["data_samples"])
    anchors, valid = head.get_anchors([c.shape[-2:] for c in s_cls], metas, device="cpu")
    anchors, _, label_w, _, _, avg = head.get_targets(anchors, valid, gts, metas, gts_ignore)
    z = max(float(avg), 1.0)
    eager_cls = 0.0
    for s, t, w in zip(s_cls, t_cls, label_w):  # BCKD's classification term, written out
        s = s.permute(0, 2, 3, 1).reshape(-1, s.shape[1]).double()
        p = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double().sigmoid()
        term = F.binary_cross_entropy_with_logits(s, p, reduction="none") * (p - s.sigmoid()).abs()
        eager_cls = eager_cls + (term.sum(dim=1) * w.reshape(-1).double()).sum() / (z + 1.19e-7)
    ref_loc = bckd_loc_loss([r.double() for r in s_reg], [r.double() for r in t_reg], [c.double() for c in s_cls],
                            [c.double() for c in t_cls], [a.reshape(-1, 4).double() for a in anchors], decoder="gfl",
                            weight=[w.reshape(-1).double() for w in label_w], avg_factor=z, reg_max=16,
                            strides=[8, 16, 32, 64, 128]).sum() * 4.0
    assert float(losses["loss_bckd_cls"]) == pytest.approx(float(eager_cls), rel=1e-4)
    assert float(losses["loss_bckd_loc"]) == pytest.approx(float(ref_loc), rel=1e-4)


# ---------------------------------------------------------------------------- every shipped config
def _configs(suffix):
    from mmdet_testing import CONFIGS

    return sorted(os.path.relpath(os.path.join(d, f), CONFIGS) for d, _, fs in os.walk(CONFIGS) for f in fs
                  if f.endswith(suffix) and "_base_" not in d)


@pytest.mark.parametrize("rel", [c for c in _configs("_toy.py") if c != "pkd/pkd_retinanet_toy.py"
                                 and not c.startswith(("unikd/", "lgd/")) and not c.endswith("_offline_toy.py")])
# unikd: test_unikd_mmdet.py chains its stages; lgd: test_lgd_mmdet.py trains both toy configs
def test_other_toy_configs_train_and_validate(rel, toy, tmp_path):
    """Every other *_toy.py: 2 iterations and a validation pass with the Runner (pkd: pkd_run)."""
    from mmdet_testing import CONFIGS

    path = os.path.join(CONFIGS, rel)
    ckpt = toy["teacher_ckpt"]  # the RetinaNet toy teacher's
    other_teacher = ("gfl_r18_toy_teacher.py" if "gfl" in rel else
                     "faster_rcnn_r18_toy_teacher.py" if rel.startswith("head/") else None)
    if other_teacher:
        ckpt = make_teacher_ckpt(str(tmp_path / "teacher.pth"), os.path.join(CONFIGS, "_base_", other_teacher))
    cfg = load_cfg(path, toy["data_root"], str(tmp_path / "work"), teacher_ckpt=ckpt)
    cfg.model.student.test_cfg.score_thr = 0.0
    runner = Runner.from_cfg(cfg)
    probe = _Probe()
    runner.register_hook(probe, priority="LOWEST")
    runner.train()
    names = ({f"loss_{e.name}" for e in getattr(runner.model, "entries", [])}
             | {f"loss_{k}" for k in runner.model.kd_scale})
    assert len(probe.iters) == 2
    for it in probe.iters:
        kd = {k for k in it["outputs"] if any(k.startswith(n) for n in names)}
        assert kd and all(math.isfinite(it["outputs"][k]) for k in kd)
    assert isinstance(probe.metrics.get("coco/bbox_mAP"), float)


def _mmdet_zoo() -> dict:
    """{'retinanet/retinanet_x101-64x4d_fpn_1x_coco.py': weights URL, ...} from mmdet's metafile.yml files."""
    import glob

    import mmdet
    import yaml

    zoo = {}
    for meta in glob.glob(os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "*", "metafile.yml")):
        with open(meta) as f:
            doc = yaml.safe_load(f) or {}
        for m in doc.get("Models", []) if isinstance(doc, dict) else []:
            if m.get("Config") and m.get("Weights"):
                zoo[m["Config"][len("configs/"):]] = m["Weights"]
    return zoo


@pytest.mark.parametrize("rel", _configs("_coco.py"))
def test_coco_configs_build(rel, toy):
    """The COCO configs parse (mmdet:: bases) and build -- taps, connectors and shapes checked on the
    probe input -- without their checkpoints (nothing is downloaded: no init_weights, no teacher_ckpt)."""
    from mmengine.config import Config

    from mmdet_testing import CONFIGS

    cfg = Config.fromfile(os.path.join(CONFIGS, rel))
    if cfg.model.type == "FCOS":  # a student the mmdet zoo lacks (HEAD's FCOS R18), a plain mmdet config
        from mmdet.registry import MODELS as MMDET_MODELS
        from mmdet.utils import register_all_modules

        register_all_modules(init_default_scope=False)
        model = MMDET_MODELS.build(cfg.model)  # no init_weights: nothing is downloaded
        feats = model.extract_feat(torch.zeros(1, 3, 64, 64))
        assert [f.shape[1] for f in feats] == [256] * 5 and type(model.bbox_head).__name__ == "FCOSHead"
        return
    assert cfg.model.type in ("kdops.DistillDetector", "kdops.HEADDistillDetector", "kdops.TFHEADDetector",
                              "kdops.UniKDAbsorbDetector", "kdops.UniKDDistillDetector", "kdops.LGDDetector")
    if cfg.model.type == "kdops.LGDDetector":  # teacher-free: LGD's modules sized from the student
        model = _build(cfg.model)
        assert model.lgd.channels == 256 and model.lgd.num_classes == 80
        assert (model.distill_start_iter, model.freeze_backbone_iters) == (30000, 20000)
        return
    if cfg.model.type == "kdops.TFHEADDetector":  # teacher-free: the assistants are built, nothing is loaded
        model = _build(cfg.model)
        assert model.assistant.bbox_roi_extractor.featmap_strides == [8, 16, 32, 64]
        return
    assert cfg.model.teacher_ckpt.startswith("https://")
    # the peer's own model zoo: the checkpoint is the one mmdet's metafile lists for the teacher's config
    teacher_cfg = cfg.model.teacher_cfg
    if isinstance(teacher_cfg, str) and teacher_cfg.startswith("mmdet::"):
        assert _mmdet_zoo().get(teacher_cfg[len("mmdet::"):]) == cfg.model.teacher_ckpt, (
            f"{rel}: teacher_ckpt is not the checkpoint mmdet's metafile gives for {teacher_cfg}")
    cfg.model.teacher_ckpt = None
    if cfg.model.type == "kdops.UniKDDistillDetector":
        cfg.model.ake_ckpt = None  # stage 1's checkpoint (a training output)
    model = _build(cfg.model)
    if cfg.model.type == "kdops.UniKDAbsorbDetector":  # no student: the AKEs read the teacher's levels
        assert model.content_ake.num_levels == len(cfg.model.levels) and model.content_ake.num_queries == 200
        return
    assert {e.name for e in model.entries} == {d["name"] for d in cfg.model.get("distill_losses", [])}
    if cfg.model.type == "kdops.HEADDistillDetector":  # the assistant is the teacher's R-CNN head, copied
        a, t = model.assistant.state_dict(), model.teacher.roi_head.state_dict()
        assert a.keys() == t.keys() and all(torch.equal(a[k], t[k]) for k in a)


# ----------------------------------------------------------------------- other detectors, connectors
def test_two_stage_student_and_predict_is_the_student_alone():
    """A Faster R-CNN student (mmdet's own loss path, hooks on its FPN) and a RetinaNet teacher (PKD's
    heterogeneous pair), mmdet:: configs; predict() equals the bare student's."""
    from mmengine.hub import get_config
    from mmdet.testing import demo_mm_inputs

    student = get_config("mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py").model
    student.backbone.update(depth=18, init_cfg=None)
    student.neck.in_channels = [64, 128, 256, 512]
    student.roi_head.bbox_head.num_classes = 4
    teacher = get_config("mmdet::retinanet/retinanet_r18_fpn_1x_coco.py").model
    teacher.backbone.init_cfg = None
    teacher.bbox_head.num_classes = 4
    model = _build(dict(type="kdops.DistillDetector", student=student, teacher_cfg=teacher, teacher_ckpt=None,
                        distill_losses=[dict(name="pkd", type="PKDLoss", student="neck", teacher="neck",
                                             loss_weight=6)]))
    packed = demo_mm_inputs(batch_size=2, image_shapes=[(3, 128, 128)] * 2, num_items=[1, 3], num_classes=4)
    losses = model(**model.data_preprocessor(packed, True), mode="loss")
    assert {"loss_rpn_cls", "loss_cls", "loss_bbox", "loss_pkd"} <= set(losses)
    assert torch.isfinite(losses["loss_pkd"])
    model.eval()
    data = model.data_preprocessor(packed, False)
    ours = model(**copy.deepcopy(data), mode="predict")
    bare = model.student(**copy.deepcopy(data), mode="predict")
    for a, b in zip(ours, bare):
        assert torch.equal(a.pred_instances.bboxes, b.pred_instances.bboxes)


def test_connectors_and_method_taps():
    from kdops_mmdet import build_connector

    lin = build_connector(dict(type="linear", in_features=8, out_features=5), "here")
    assert lin(torch.zeros(2, 8, 3, 4)).shape == (2, 5, 3, 4) and lin(torch.zeros(7, 8)).shape == (7, 5)
    cna = build_connector(dict(type="conv_norm_act", in_channels=8, out_channels=4, num_convs=2), "here")
    assert cna(torch.zeros(2, 8, 5, 5)).shape == (2, 4, 5, 5)
    with pytest.raises(ValueError, match="unknown connector type 'conv9'"):
        build_connector(dict(type="conv9"), "here")
    with pytest.raises(ValueError, match="bad arguments for connector 'conv1x1'"):
        build_connector(dict(type="conv1x1", in_chans=3, out_channels=4), "here")

    from kdops_mmdet.taps import TapSet

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match="has no method 'get_targetz'"):
        TapSet(net, ["0.get_targetz()"], "student")
    taps = TapSet(net, ["0", "0.forward()"], "student")
    net(torch.zeros(1, 3, 2, 2))  # outside a step: nothing recorded
    taps.start()
    net(torch.zeros(1, 3, 2, 2))
    assert taps.get("0").shape == (1, 4, 2, 2)
    taps.stop()
    with pytest.raises(RuntimeError, match="recorded nothing"):
        taps.get("0")


# --------------------------------------------------------------------- BCKD on DeltaXYWH anchor heads
def _bckd_oracle(head, s_out, t_out, data, alpha_cls=1.0, alpha_loc=4.0):
    """BCKD's two terms written out from the paper / the authors' LDHead, with mmdet's own box coder
    (DeltaXYWHBBoxCoder.decode) and GIoU (bbox_overlaps) as the peers: classification BCE against the
    teacher's sigmoid times the gap; localisation 1 - GIoU of the decoded boxes times the largest
    class gap; both weighted by the label weights and divided by the positives (at least 1)."""
    import torch.nn.functional as F
    from mmdet.models.utils import unpack_gt_instances
    from mmdet.structures.bbox import bbox_overlaps

    gts, gts_ignore, metas = unpack_gt_instances(data["data_samples"])
    sizes = [c.shape[-2:] for c in s_out[0]]
    anchors, valid = head.get_anchors(sizes, metas, device="cpu")
    targets = head.get_targets(anchors, valid, gts, metas, gts_ignore)
    if isinstance(targets[0][0], torch.Tensor) and targets[0][0].is_floating_point():  # ATSS: anchors first
        level_anchors, _, label_w, _, _, avg = targets[:6]
        level_anchors = [a.reshape(-1, 4) for a in level_anchors]
    else:  # AnchorHead: labels first; anchors per image and level
        _, label_w, _, _, avg = targets[:5]
        level_anchors = [torch.cat([img[lvl] for img in anchors]) for lvl in range(len(sizes))]
    z = max(float(avg), 1.0) + 1.19e-7
    K = head.cls_out_channels
    cls_term = loc_term = 0.0
    for sc, tc, sr, tr, a, w in zip(s_out[0], t_out[0], s_out[1], t_out[1], level_anchors, label_w):
        sc = sc.permute(0, 2, 3, 1).reshape(-1, K).double()
        p = tc.permute(0, 2, 3, 1).reshape(-1, K).double().sigmoid()
        w = w.reshape(-1).double()
        gap = (p - sc.sigmoid()).abs()
        cls_term = cls_term + ((F.binary_cross_entropy_with_logits(sc, p, reduction="none") * gap).sum(1) * w).sum()
        bs = head.bbox_coder.decode(a.double(), sr.permute(0, 2, 3, 1).reshape(-1, 4).double())
        bt = head.bbox_coder.decode(a.double(), tr.permute(0, 2, 3, 1).reshape(-1, 4).double())
        giou = bbox_overlaps(bs, bt, mode="giou", is_aligned=True, eps=1e-6)
        loc_term = loc_term + ((1 - giou) * gap.max(1)[0] * w).sum()
    return alpha_cls * cls_term / z, alpha_loc * loc_term / z


def _bckd_losses(model):
    from mmdet.testing import demo_mm_inputs

    seen = {}
    model.student.bbox_head.register_forward_hook(lambda m, i, o: seen.__setitem__("s", o))
    model.teacher.bbox_head.register_forward_hook(lambda m, i, o: seen.__setitem__("t", o))
    packed = demo_mm_inputs(batch_size=2, image_shapes=[(3, 128, 128)] * 2, num_items=[2, 3], num_classes=4)
    data = model.data_preprocessor(packed, True)
    losses = model(**data, mode="loss")
    return losses, seen["s"], seen["t"], data


def test_bckd_on_retinanet_matches_mmdet_decoding(toy):
    """BCKD on RetinaNet's anchor head (9 anchors per location): the logged terms equal the oracle above,
    which decodes with mmdet's DeltaXYWHBBoxCoder and measures GIoU with mmdet's bbox_overlaps."""
    from mmengine.config import Config

    from mmdet_testing import CONFIGS

    os.environ["KDOPS_TOY_DATA"] = toy["data_root"]
    cfg = Config.fromfile(os.path.join(CONFIGS, "bckd", "bckd_retinanet_toy.py"))
    cfg.model.teacher_ckpt = toy["teacher_ckpt"]
    torch.manual_seed(0)
    model = _build(cfg.model)
    model.student.init_weights()
    bckd = model.distill_losses["bckd"]
    assert bckd.decoder == "delta_xywh" and bckd.stds == (1.0, 1.0, 1.0, 1.0)  # read from the head
    losses, s_out, t_out, data = _bckd_losses(model)
    cls_ref, loc_ref = _bckd_oracle(model.student.bbox_head, s_out, t_out, data)
    assert float(losses["loss_bckd_cls"]) == pytest.approx(float(cls_ref), rel=1e-4)
    assert float(losses["loss_bckd_loc"]) == pytest.approx(float(loc_ref), rel=1e-4)
    assert float(losses["loss_bckd_loc"]) > 0


def _atss(depth, channels):
    from mmengine.hub import get_config

    m = get_config("mmdet::atss/atss_r50_fpn_1x_coco.py").model
    m.backbone.update(depth=depth, init_cfg=None)
    m.neck.update(in_channels=[64, 128, 256, 512] if depth < 50 else [256, 512, 1024, 2048], out_channels=channels)
    m.bbox_head.update(num_classes=4, in_channels=channels, feat_channels=channels, stacked_convs=1)
    return m


def test_bckd_on_atss_reads_its_coder_and_matches_mmdet_decoding():
    """ATSS (DeltaXYWH with stds 0.1/0.1/0.2/0.2, anchors first in get_targets): the decoding is read from
    the head, the logged terms equal the oracle; an entry whose stds disagree with the head is refused."""
    torch.manual_seed(0)
    entry = dict(name="bckd", type="BCKDLoss", student="bbox_head", teacher="bbox_head")
    model = _build(dict(type="kdops.DistillDetector", student=_atss(18, 32), teacher_cfg=_atss(18, 64),
                        teacher_ckpt=None, distill_losses=[entry]))
    assert model.distill_losses["bckd"].stds == (0.1, 0.1, 0.2, 0.2)
    losses, s_out, t_out, data = _bckd_losses(model)
    cls_ref, loc_ref = _bckd_oracle(model.student.bbox_head, s_out, t_out, data)
    assert float(losses["loss_bckd_cls"]) == pytest.approx(float(cls_ref), rel=1e-4)
    assert float(losses["loss_bckd_loc"]) == pytest.approx(float(loc_ref), rel=1e-4)
    with pytest.raises(ValueError, match=r"stds=\[1, 1, 1, 1\] but the student's head \(ATSSHead\) uses"):
        _build(dict(type="kdops.DistillDetector", student=_atss(18, 32), teacher_cfg=_atss(18, 64),
                    teacher_ckpt=None, distill_losses=[dict(entry, stds=[1, 1, 1, 1])]))
    with pytest.raises(ValueError, match="decode boxes differently"):
        gfl = __import__("mmengine.hub", fromlist=["get_config"]).get_config("mmdet::gfl/gfl_r50_fpn_1x_coco.py").model
        gfl.backbone.update(depth=18, init_cfg=None)
        gfl.neck.update(in_channels=[64, 128, 256, 512], out_channels=64)
        gfl.bbox_head.update(num_classes=4, in_channels=64, feat_channels=64, stacked_convs=1)
        _build(dict(type="kdops.DistillDetector", student=_atss(18, 32), teacher_cfg=gfl, teacher_ckpt=None,
                    distill_losses=[entry]))
