"""HEAD on the real mmdet stack (kdops_mmdet.HEADDistillDetector): a toy Faster R-CNN teacher, the toy
RetinaNet student, mmengine's Runner, mmdet's sampler, coder and RoIAlign.

Oracles: mmdet's own DeltaXYWHBBoxCoder for every proposal's box from its source anchor, the teacher's
roi_head weights for the assistant's start, and AKD / CKD recomputed from the step's recorded
features with eager formulas written from the release (todd MSELoss = weight * mean squared error)."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from mmdet_testing import CONFIGS, STUDENT_CFG, TEACHER_CFG, load_cfg, make_teacher_ckpt, make_toy_data, require_mmdet

require_mmdet()

from mmengine.hooks import Hook  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

FRCNN_CFG = os.path.join(CONFIGS, "_base_", "faster_rcnn_r18_toy_teacher.py")
HEAD_TOY = os.path.join(CONFIGS, "head", "head_faster_rcnn_retinanet_toy.py")
HEAD_FCOS_TOY = os.path.join(CONFIGS, "head", "head_faster_rcnn_fcos_toy.py")
FCOS_STUDENT_CFG = os.path.join(CONFIGS, "_base_", "fcos_r18_toy_student.py")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_head")
    data = make_toy_data(str(root / "data"))
    ckpt = make_teacher_ckpt(str(root / "frcnn.pth"), FRCNN_CFG)
    return dict(root=str(root), data_root=data["root"], teacher_ckpt=ckpt)


def _model(toy, config=HEAD_TOY, **overrides):
    from mmdet.utils import register_all_modules

    import kdops_mmdet  # noqa: F401
    from kdops_mmdet.registry import MODELS

    register_all_modules(init_default_scope=False)
    cfg = load_cfg(config, toy["data_root"], os.path.join(toy["root"], "w"), teacher_ckpt=toy["teacher_ckpt"])
    for k, v in overrides.items():
        cfg.model[k] = v  # replaces (ConfigDict.update would merge a new student into the old one)
    torch.manual_seed(0)
    return MODELS.build(cfg.model), cfg


def _batch(cfg, model, n=2):
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner as R

    init_default_scope("mmdet")
    loader_cfg = dict(cfg.train_dataloader)
    loader_cfg.update(batch_size=n, num_workers=0, persistent_workers=False)
    loader = R.build_dataloader(loader_cfg, seed=0)
    data = next(iter(loader))
    return model.data_preprocessor(data, training=True)


def _spy_samples(model, monkeypatch) -> dict:
    """Records a step's sampled RoIs on either path (sync_free or mmdet's sampler): ``rois`` (R,4), ``img``
    (R,), ``sources`` (R,5) of the sampled rows, and ``valid``: which rows of the R-CNN heads' input batch
    they are (every row on mmdet's path; the fixed-shape path also has empty slots)."""
    import kdops_mmdet.head as head_mod

    record = {}
    orig_sample, orig_fixed = model._sample, head_mod.head_sample_rois

    def spy(*args):
        sampling, sources = out = orig_sample(*args)
        record["rois"] = torch.cat([r.priors for r in sampling])
        record["img"] = torch.cat([torch.full((len(r.priors),), i) for i, r in enumerate(sampling)])
        record["sources"], record["valid"] = sources, torch.ones(len(sources), dtype=torch.bool)
        return out

    def spy_fixed(*args, **kw):
        out = orig_fixed(*args, **kw)
        record["rois"], record["img"] = out.rois[out.valid, 1:], out.rois[out.valid, 0].long()
        record["sources"], record["valid"] = out.sources[out.valid], out.valid
        return out

    monkeypatch.setattr(model, "_sample", spy)
    monkeypatch.setattr(head_mod, "head_sample_rois", spy_fixed)
    return record


class _Probe(Hook):
    def __init__(self):
        self.iters, self.metrics, self.start = [], None, None

    def before_train(self, runner):
        m = runner.model
        self.start = dict(assistant={k: v.clone() for k, v in m.assistant.state_dict().items()},
                          teacher_roi={k: v.clone() for k, v in m.teacher.roi_head.state_dict().items()},
                          teacher={k: v.clone() for k, v in m.teacher.state_dict().items()})

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.iters.append(dict(outputs={k: float(v.detach()) for k, v in outputs.items()},
                               scale=dict(runner.model.kd_scale),
                               teacher_training=getattr(getattr(runner.model, "teacher", None), "training", None)))

    def after_val_epoch(self, runner, metrics=None):
        self.metrics = dict(metrics)


@pytest.mark.parametrize("config,student_cfg", [(HEAD_TOY, STUDENT_CFG), (HEAD_FCOS_TOY, FCOS_STUDENT_CFG)],
                         ids=["retinanet", "fcos"])
def test_head_toy_config_trains_validates_schedules_and_exports(toy, tmp_path, config, student_cfg):
    """Two Runner iterations: the assistant starts as the teacher's R-CNN head, every HEAD loss is
    logged and finite, the teacher is bitwise unchanged, CKD is off from the first LR milestone
    (moved to iteration 1 here) while AKD goes on, CocoMetric scores the student, and the exported
    checkpoint is the plain student (no assistant, adapter or teacher weights) that mmdet loads."""
    cfg = load_cfg(config, toy["data_root"], str(tmp_path / "work"), teacher_ckpt=toy["teacher_ckpt"])
    cfg.param_scheduler = [dict(type="MultiStepLR", begin=0, end=2, by_epoch=False, milestones=[1], gamma=0.1)]
    cfg.model.student.test_cfg.score_thr = 0.0
    runner = Runner.from_cfg(cfg)
    probe = _Probe()
    runner.register_hook(probe, priority="LOWEST")
    runner.train()

    start = probe.start
    assert start["assistant"].keys() == start["teacher_roi"].keys()
    for k, v in start["assistant"].items():
        assert torch.equal(v, start["teacher_roi"][k]), k
    after = runner.model.teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in start["teacher"].items())
    assert len(probe.iters) == 2 and not any(it["teacher_training"] for it in probe.iters)
    keys = {"loss_akd", "loss_ckd", "loss_assist_cls", "loss_assist_bbox", "assist_acc"}
    for it in probe.iters:
        assert keys <= set(it["outputs"]) and all(math.isfinite(it["outputs"][k]) for k in keys)
    first, second = probe.iters
    assert first["scale"]["ckd"] > 0 and first["outputs"]["loss_ckd"] > 0
    assert second["scale"]["ckd"] == 0.0 and second["outputs"]["loss_ckd"] == 0.0
    assert second["scale"]["akd"] > 0 and second["outputs"]["loss_akd"] > 0
    assert isinstance(probe.metrics.get("coco/bbox_mAP"), float)

    import subprocess
    import sys

    ckpt = os.path.join(cfg.work_dir, "iter_2.pth")
    out = str(tmp_path / "student.pth")
    subprocess.run([sys.executable, "-m", "kdops_mmdet.export_student", ckpt, out], check=True)
    sd = torch.load(out, map_location="cpu", weights_only=False)["state_dict"]
    assert sd and not any(k.split(".")[0] in ("assistant", "akd", "ckd", "teacher", "student") for k in sd)
    from mmdet.apis import init_detector

    plain = init_detector(student_cfg, out, device="cpu")
    ref = runner.model.student.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in plain.state_dict().items())


@pytest.mark.parametrize("sync_free", [True, False], ids=["sync_free", "mmdet_sampler"])
def test_head_step_sources_rois_and_losses_match_mmdet_and_eager_formulas(toy, sync_free, monkeypatch):
    """One HEAD step outside the Runner: each sampled proposal RoI is mmdet's DeltaXYWHBBoxCoder decoding
    of the student's regression at its source (level, image, y, x, anchor) -- clipped to the image --
    GT RoIs are GT boxes with level -1, and loss_akd / loss_ckd equal the release's MSEs recomputed from
    the recorded assistant, teacher and student features (on the sampled rows: the fixed-shape path's
    empty slots count nowhere)."""
    model, cfg = _model(toy, sync_free=sync_free)
    model.train()
    data = _batch(cfg, model)
    record = _spy_samples(model, monkeypatch)

    feats = {}

    def grab(name):
        def hook(module, inputs, output):
            out = output.detach() if isinstance(output, torch.Tensor) else [[t.detach() for t in o] for o in output]
            feats.setdefault(name, []).append(out)
        return hook

    handles = [model.student.bbox_head.cls_convs[-1].register_forward_hook(grab("cls")),
               model.student.bbox_head.register_forward_hook(grab("head")),
               model.assistant.bbox_head.shared_fcs[0].register_forward_hook(grab("a0")),
               model.assistant.bbox_head.shared_fcs[-1].register_forward_hook(grab("a1")),
               model.teacher.roi_head.bbox_head.shared_fcs[0].register_forward_hook(grab("t0")),
               model.teacher.roi_head.bbox_head.shared_fcs[-1].register_forward_hook(grab("t1"))]
    try:
        losses = model.loss(data["inputs"], data["data_samples"])
    finally:
        for h in handles:
            h.remove()
    rois, sources, valid = record["rois"], record["sources"], record["valid"]
    assert sources.shape == (rois.shape[0], 5) and rois.shape[0] > 0

    # -- bookkeeping against mmdet's coder
    head = model.student.bbox_head
    cls_scores, bbox_preds = feats["head"][0]
    priors = head.prior_generator.grid_priors([c.shape[-2:] for c in cls_scores], device=cls_scores[0].device)
    J = head.num_base_priors
    gts = [s.gt_instances.bboxes for s in data["data_samples"]]
    n_gt_rows = 0
    for r in range(rois.shape[0]):
        lvl, b, y, x, j = sources[r].tolist()
        if lvl < 0:  # a GT box the sampler added
            n_gt_rows += 1
            assert (gts[b] == rois[r]).all(1).any() and (y, x) == (-1, -1)
            continue
        W = bbox_preds[lvl].shape[-1]
        anchor = priors[lvl][(y * W + x) * J + j]
        delta = bbox_preds[lvl][b, j * 4:(j + 1) * 4, y, x]
        shape = data["data_samples"][b].metainfo["img_shape"]
        want = head.bbox_coder.decode(anchor[None], delta[None].detach(), max_shape=shape)
        torch.testing.assert_close(rois[r], want[0], rtol=1e-5, atol=1e-4)
    assert 0 < n_gt_rows < rois.shape[0]
    assert torch.equal(sources[:, 1], record["img"])

    # -- AKD: 2.0 * mean squared error per layer after one Linear each (the release's MSELoss)
    akd = 0.0
    for a_key, t_key, lin in (("a0", "t0", model.akd.adapters[0]), ("a1", "t1", model.akd.adapters[1])):
        a, t = feats[a_key][-1][valid].double(), feats[t_key][-1][valid].double()
        akd = akd + F.mse_loss(F.linear(a, lin.weight.double(), lin.bias.double()), t)
    assert float(losses["loss_akd"].detach()) == pytest.approx(2.0 * float(akd.detach()), rel=1e-5)
    # the warm-up scale is the hook's business: outside the Runner it is 1

    # -- CKD: the student's cls feature at each non-GT source, one Linear, MSE against the teacher's last fc
    keep = sources[:, 0] >= 0
    rows = torch.stack([feats["cls"][lvl][b, :, y, x] for lvl, b, y, x, _ in sources[keep].tolist()]).double()
    lin = model.ckd.source.adapter
    pred = F.linear(rows, lin.weight.double(), lin.bias.double())
    ckd = F.mse_loss(pred, feats["t1"][-1][valid][keep].double())
    assert float(losses["loss_ckd"].detach()) == pytest.approx(2.0 * float(ckd.detach()), rel=1e-5)

    # the KD terms reach the student through CKD and the assistant through AKD
    losses["loss_ckd"].backward(retain_graph=True)
    assert model.student.bbox_head.cls_convs[-1].conv.weight.grad.abs().sum() > 0
    losses["loss_akd"].backward()
    assert model.assistant.bbox_head.shared_fcs[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())


def test_head_fused_roi_align_gives_mmdets_losses_and_gradients(toy):
    """By default the assistant's and the teacher's R-CNN heads pool with kdops.FusedRoIExtractor; a step
    gives the losses and gradients of the same model on mmdet's SingleRoIExtractor (fused_roi_align=False)."""
    from kdops_mmdet.roi_extractor import FusedRoIExtractor
    from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor

    fused, cfg = _model(toy)
    plain, _ = _model(toy, fused_roi_align=False)
    assert type(fused.assistant.bbox_roi_extractor) is FusedRoIExtractor
    assert type(fused.teacher.roi_head.bbox_roi_extractor) is FusedRoIExtractor
    assert type(plain.assistant.bbox_roi_extractor) is SingleRoIExtractor
    assert type(plain.teacher.roi_head.bbox_roi_extractor) is SingleRoIExtractor
    data = _batch(cfg, fused)
    runs = []
    for model in (fused, plain):
        model.train()
        torch.manual_seed(1)  # the R-CNN sampler draws at random
        losses = model.loss(data["inputs"], data["data_samples"])
        total, _ = model.parse_losses(losses)
        params = [p for p in model.student.parameters()] + [p for p in model.assistant.parameters()]
        runs.append((losses, torch.autograd.grad(total, params, allow_unused=True, materialize_grads=True)))
    (lf, gf), (lp, gp) = runs
    assert set(lf) == set(lp) and {"loss_akd", "loss_ckd", "loss_assist_cls"} <= set(lf)
    for k in lf:
        for a, b in zip(lf[k] if isinstance(lf[k], list) else [lf[k]], lp[k] if isinstance(lp[k], list) else [lp[k]]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    for a, b in zip(gf, gp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_head_fcos_student_proposals_are_mmdets_fcos_prediction_path_on_max_class_scores(toy, monkeypatch):
    """The FCOS student as the assistant's RPN, against mmdet's own FCOSHead.predict_by_feat (the path
    the release's FCOSRPNHead calls): class logits reduced by a max over classes, distances times the
    stride (FCOSHead leaves them normalised in training), centerness as score factor, score_thr 0, one
    class-wise NMS with every label 0, no size filter (min_bbox_size=-1). Then one HEAD step: each
    non-GT RoI is the distance decoding at its source point, and CKD equals the eager MSE."""
    from mmengine.config import ConfigDict

    model, cfg = _model(toy, HEAD_FCOS_TOY)
    model.train()
    data = _batch(cfg, model)
    head = model.student.bbox_head
    metas = [s.metainfo for s in data["data_samples"]]
    with torch.no_grad():
        outs = head(model.student.extract_feat(data["inputs"]))
    assert len(outs) == 3 and head.norm_on_bbox
    strides = [s[0] for s in head.prior_generator.strides]
    # boxes about 40 px wide on every level, so that neighbouring levels' boxes overlap: one NMS over
    # all levels then keeps fewer than NMS per level would (the release's grouping is tested)
    outs = (outs[0], [b + 20.0 / s for b, s in zip(outs[1], strides)], outs[2])
    step_cfg = model.proposal_cfg
    # no cap: every survivor of the NMS is compared
    model.proposal_cfg = pc = dict(step_cfg, max_per_img=100_000)
    ours = model.proposals(*outs[:2], metas, outs[2])
    model.proposal_cfg = step_cfg
    strides = [s[0] for s in head.prior_generator.strides]
    max_cls = [c.max(1, keepdim=True).values for c in outs[0]]
    pixels = [b * s for b, s in zip(outs[1], strides)]
    n_cls = head.cls_out_channels
    head.cls_out_channels = 1  # the release's 1-channel objectness through the same prediction code
    try:
        theirs = head.predict_by_feat(max_cls, pixels, outs[2], batch_img_metas=metas,
                                      cfg=ConfigDict(nms_pre=pc["nms_pre"], score_thr=0.0, max_per_img=pc["max_per_img"],
                                                     nms=dict(type="nms", iou_threshold=pc["iou_threshold"])),
                                      rescale=False, with_nms=True)
    finally:
        head.cls_out_channels = n_cls
    for n, t in enumerate(theirs):
        assert len(t) > 0
        torch.testing.assert_close(ours.boxes[n], t.bboxes, rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(ours.scores[n], t.scores, rtol=1e-6, atol=1e-7)
    levels = torch.cat(ours.sources)[:, 0]
    assert levels.unique().numel() > 1, "the test must see proposals from several levels"

    # one step: RoIs decode from their source points, CKD is the eager MSE on the cls tower's output
    feats = {}
    record = _spy_samples(model, monkeypatch)

    def grab(name):
        def hook(module, inputs, output):
            feats.setdefault(name, []).append(output.detach() if isinstance(output, torch.Tensor)
                                              else [[t.detach() for t in o] for o in output])
        return hook

    handles = [head.cls_convs[-1].register_forward_hook(grab("cls")), head.register_forward_hook(grab("head")),
               model.teacher.roi_head.bbox_head.shared_fcs[-1].register_forward_hook(grab("t1"))]
    try:
        losses = model.loss(data["inputs"], data["data_samples"])
    finally:
        for h in handles:
            h.remove()
    assert {"loss_cls", "loss_bbox", "loss_centerness", "loss_akd", "loss_ckd"} <= set(losses)
    rois, sources, valid = record["rois"], record["sources"], record["valid"]
    cls_scores, bbox_preds, _ = feats["head"][0]
    points = head.prior_generator.grid_priors([c.shape[-2:] for c in cls_scores], device=rois.device)
    for r in range(rois.shape[0]):
        lvl, b, y, x, j = sources[r].tolist()
        if lvl < 0:
            continue
        W = bbox_preds[lvl].shape[-1]
        d = bbox_preds[lvl][b, :, y, x] * strides[lvl]
        want = head.bbox_coder.decode(points[lvl][y * W + x][None], d[None], max_shape=metas[b]["img_shape"])
        assert j == 0
        torch.testing.assert_close(rois[r], want[0], rtol=1e-5, atol=1e-4)
    keep = sources[:, 0] >= 0
    rows = torch.stack([feats["cls"][lvl][b, :, y, x] for lvl, b, y, x, _ in sources[keep].tolist()]).double()
    lin = model.ckd.source.adapter
    ckd = F.mse_loss(F.linear(rows, lin.weight.double(), lin.bias.double()), feats["t1"][-1][valid][keep].double())
    assert float(losses["loss_ckd"].detach()) == pytest.approx(2.0 * float(ckd), rel=1e-5)


def test_head_ckd_defaults_to_the_release_and_can_be_switched_off(toy):
    model, _ = _model(toy, ckd=None)
    assert type(model.ckd).__name__ == "HEADCKDLoss" and model.ckd.loss_weight == 2.0
    model, cfg = _model(toy, ckd=False)
    assert model.ckd is None and model.kd_scale == {"akd": 1.0}
    model.train()
    data = _batch(cfg, model)
    losses = model.loss(data["inputs"], data["data_samples"])
    assert "loss_ckd" not in losses and float(losses["loss_akd"].detach()) > 0


def test_head_contrastive_ckd_and_paper_weight_build_and_step(toy):
    """The contrastive CKD option and the paper's lambda^A = 5 build from config keys and give finite losses."""
    model, cfg = _model(toy, akd=dict(loss_weight=5.0), ckd=dict(type="contrastive", loss_weight=0.5))
    model.train()
    data = _batch(cfg, model)
    losses = model.loss(data["inputs"], data["data_samples"])
    assert model.akd.loss_weight == 5.0
    ckd = float(losses["loss_ckd"].detach())
    assert math.isfinite(ckd) and ckd > 0


@pytest.mark.parametrize("case,overrides,match", [
    ("retinanet teacher", dict(teacher_cfg=TEACHER_CFG), "two-stage teacher's R-CNN head"),
    ("strides", dict(featmap_strides=[4, 8]), "first strides of the student's levels"),
    ("unknown proposal key", dict(proposals=dict(nms=0.5)), "proposals: unknown keys"),
    ("ckd type", dict(ckd=dict(type="cosine")), "ckd.type must be 'mse' or 'contrastive'"),
    ("extra loss named like HEAD's", dict(distill_losses=[dict(name="akd", type="PKDLoss", student="neck",
                                                               teacher="neck")]), "is HEAD's own loss"),
    ("teacher_levels without levels", dict(distill_losses=[dict(name="pkd", type="PKDLoss", student="neck",
                                                                teacher="neck", teacher_levels=[1, 2])]),
     "`teacher_levels` needs `levels`"),
    ("levels unpaired", dict(distill_losses=[dict(name="pkd", type="PKDLoss", student="neck", teacher="neck",
                                                  levels=[0, 1], teacher_levels=[1])]), "must pair one for one"),
])
def test_head_bad_configs_fail_at_construction(toy, case, overrides, match):
    with pytest.raises(ValueError, match=match):
        _model(toy, **overrides)


def test_head_combines_with_other_kdops_losses_on_matching_levels(toy):
    """HEAD + PKD on the necks: the student's P3-P5 (levels 0-2) against the Faster R-CNN teacher's P3-P5
    (its levels 1-3: its FPN starts at P2). loss_pkd is the eager PKD of exactly those maps, it has its
    own schedule factor, and its gradient reaches the student's neck."""
    import kdops

    entry = dict(name="pkd", type="PKDLoss", student="neck", teacher="neck", levels=[0, 1, 2],
                 teacher_levels=[1, 2, 3], loss_weight=1.5)
    model, cfg = _model(toy, distill_losses=[entry])
    assert set(model.kd_scale) == {"pkd", "akd", "ckd"}
    model.train()
    data = _batch(cfg, model)
    torch.manual_seed(1)
    losses = model.loss(data["inputs"], data["data_samples"])
    assert {"loss_pkd", "loss_akd", "loss_ckd"} <= set(losses)
    with torch.no_grad():
        s_feats = model.student.extract_feat(data["inputs"])
        t_feats = model.teacher.extract_feat(data["inputs"])
    want = sum(0.5 * kdops.reference.pcc_mse(s.double(), t.double(), norm="channel")
               for s, t in zip(s_feats[:3], t_feats[1:4])) * 1.5
    assert float(losses["loss_pkd"].detach()) == pytest.approx(float(want), rel=1e-4)
    model.set_kd_scale({"pkd": 0.0})
    losses = model.loss(data["inputs"], data["data_samples"])
    assert float(losses["loss_pkd"].detach()) == 0.0
    model.set_kd_scale({"pkd": 1.0})
    model.zero_grad()
    model.loss(data["inputs"], data["data_samples"])["loss_pkd"].backward()
    assert model.student.neck.fpn_convs[0].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())


def test_head_weight_transfer_needs_equal_fpn_channels_and_unknown_schedule_names_fail(toy):
    from mmengine.config import Config

    student = Config.fromfile(STUDENT_CFG).model
    student.neck.out_channels = 16
    student.bbox_head.update(in_channels=16, feat_channels=16)
    with pytest.raises(ValueError, match="weight_transfer needs the assistant to have the teacher's roi_head"):
        _model(toy, student=student)
    model, _ = _model(toy, student=student, weight_transfer=False)  # the assistant's own initialisation
    assert model.assistant.bbox_head.shared_fcs[0].in_features == 16 * 7 * 7
    with pytest.raises(ValueError, match="KDScheduleHook losses"):
        model.set_kd_scale({"pkd": 0.5})


def test_head_student_must_be_one_stage_with_a_cls_tower(toy):
    from mmengine.config import Config

    two_stage = Config.fromfile(FRCNN_CFG).model
    with pytest.raises(ValueError, match="one-stage detector"):
        _model(toy, student=two_stage)
    student = Config.fromfile(STUDENT_CFG).model
    student.bbox_head.stacked_convs = 0
    with pytest.raises(ValueError, match="no classification conv tower"):
        _model(toy, student=student)


# ------------------------------------------------------------------------------------------------ TF-HEAD
TF_HEAD_TOY = os.path.join(CONFIGS, "head", "tf_head_retinanet_toy.py")


def _tf_model(toy, **overrides):
    from mmdet.utils import register_all_modules

    import kdops_mmdet  # noqa: F401
    from kdops_mmdet.registry import MODELS

    register_all_modules(init_default_scope=False)
    cfg = load_cfg(TF_HEAD_TOY, toy["data_root"], os.path.join(toy["root"], "wtf"))
    for k, v in overrides.items():
        cfg.model[k] = v
    torch.manual_seed(0)
    return MODELS.build(cfg.model), cfg


def test_tf_head_toy_trains_with_assistants_and_stops_mimicking_at_the_milestone(toy, tmp_path):
    cfg = load_cfg(TF_HEAD_TOY, toy["data_root"], str(tmp_path / "work"))
    cfg.param_scheduler = [dict(type="MultiStepLR", begin=0, end=2, by_epoch=False, milestones=[1], gamma=0.1)]
    cfg.model.student.test_cfg.score_thr = 0.0
    runner = Runner.from_cfg(cfg)
    probe = _Probe()
    probe.before_train = lambda runner: None  # no teacher here
    runner.register_hook(probe, priority="LOWEST")
    runner.train()
    keys = {"loss_dense_cls", "loss_dense_bbox", "loss_dense_centerness", "loss_assist_cls", "loss_assist_bbox",
            "loss_dense_mimic", "loss_ckd"}
    first, second = probe.iters
    for it in (first, second):
        assert keys <= set(it["outputs"]) and all(math.isfinite(it["outputs"][k]) for k in keys)
    assert first["outputs"]["loss_dense_mimic"] > 0 and first["outputs"]["loss_ckd"] > 0
    assert second["outputs"]["loss_dense_mimic"] == 0.0 and second["outputs"]["loss_ckd"] == 0.0
    assert second["outputs"]["loss_dense_cls"] > 0 and second["outputs"]["loss_assist_cls"] > 0
    assert isinstance(probe.metrics.get("coco/bbox_mAP"), float)


def test_tf_head_mimic_losses_match_eager_formulas_and_do_not_train_the_assistants(toy, monkeypatch):
    model, cfg = _tf_model(toy)
    model.train()
    data = _batch(cfg, model)
    feats = {}
    record = _spy_samples(model, monkeypatch)

    def grab(name):
        def hook(module, inputs, output):
            feats.setdefault(name, []).append(output.detach())
        return hook

    handles = [model.student.bbox_head.cls_convs[-1].register_forward_hook(grab("cls")),
               model.dense_assistant.cls_convs[-1].register_forward_hook(grab("dense")),
               model.assistant.bbox_head.shared_fcs[-1].register_forward_hook(grab("fc"))]
    try:
        losses = model.loss(data["inputs"], data["data_samples"])
    finally:
        for h in handles:
            h.remove()
    # dense mimic: 1.0 * sum over levels of the mean squared error after the 1x1 conv
    conv = model.dense_mimic.adapter
    want = sum(F.mse_loss(F.conv2d(s.double(), conv.weight.double(), conv.bias.double()), t.double())
               for s, t in zip(feats["cls"], feats["dense"]))
    assert float(losses["loss_dense_mimic"].detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    # CKD: 1.3 * MSE of the Linear-mapped source pixels against the R-CNN assistant's last FC, GT rows out
    sources = record["sources"]
    keep = sources[:, 0] >= 0
    rows = torch.stack([feats["cls"][lvl][b, :, y, x] for lvl, b, y, x, _ in sources[keep].tolist()]).double()
    lin = model.ckd.source.adapter
    want = 1.3 * F.mse_loss(F.linear(rows, lin.weight.double(), lin.bias.double()),
                            feats["fc"][-1][record["valid"]][keep].double())
    assert float(losses["loss_ckd"].detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    # the assistants are targets of the mimic losses: no gradient reaches them from there
    (losses["loss_dense_mimic"] + losses["loss_ckd"]).backward()
    assert all(p.grad is None for p in model.dense_assistant.parameters())
    assert all(p.grad is None for p in model.assistant.parameters())
    assert model.student.bbox_head.cls_convs[-1].conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("case,overrides,match", [
    ("dense strides", dict(dense_assistant=dict(type="FCOSHead", num_classes=4, in_channels=32, feat_channels=32,
                                                strides=[8, 16, 32])), "dense_assistant.strides"),
    ("rcnn not a dict", dict(rcnn_assistant="StandardRoIHead"), "rcnn_assistant must be a head config dict"),
    ("unknown schedule name", None, "KDScheduleHook losses"),
])
def test_tf_head_bad_configs_fail_at_construction(toy, case, overrides, match):
    with pytest.raises((ValueError, TypeError), match=match):
        if overrides is None:
            model, _ = _tf_model(toy)
            model.set_kd_scale({"akd": 1.0})
        else:
            _tf_model(toy, **overrides)


def test_tf_head_takes_an_fcos_student(toy):
    """TF-HEAD shares HEAD's student-as-RPN path: with an FCOS student its step has the student's own
    FCOS losses, the assistants' losses and finite, non-zero mimic losses that reach the student."""
    from mmengine.config import Config

    student = Config.fromfile(FCOS_STUDENT_CFG).model
    model, cfg = _tf_model(toy, student=student)
    model.train()
    data = _batch(cfg, model)
    losses = model.loss(data["inputs"], data["data_samples"])
    assert {"loss_cls", "loss_bbox", "loss_centerness", "loss_ckd", "loss_dense_mimic"} <= set(losses)
    assert any(k.startswith("loss_assist_") for k in losses)
    for k, v in losses.items():
        if k.startswith("loss_"):
            total = sum(v) if isinstance(v, (list, tuple)) else v
            assert torch.isfinite(total).all(), k
    assert float(losses["loss_ckd"]) > 0
    losses["loss_ckd"].backward()
    assert model.student.bbox_head.cls_convs[-1].conv.weight.grad.abs().sum() > 0
