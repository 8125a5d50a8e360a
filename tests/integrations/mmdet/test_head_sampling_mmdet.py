"""HEAD's sync-free path against mmdet itself: kdops.losses.head_sample_rois against mmdet's MaxIoUAssigner +
RandomSampler, a HEADDistillDetector step with sync_free=True against the same model on mmdet's assigner,
sampler and bbox_loss (sync_free=False), and the distillation part under FakeTensorMode (a host read of a device
value raises there, as nonzero / .item() / .tolist() need the data)."""
from __future__ import annotations

import pytest
import torch

from mmdet_testing import require_mmdet

require_mmdet()

from mmengine.structures import InstanceData  # noqa: E402

from kdops.losses import head_pad_gt, head_sample_rois  # noqa: E402
from test_head_mmdet import _batch, _model, toy  # noqa: E402,F401  (the module's toy fixture)

C = 4


def _problem(seed, P=(60, 45, 30), G=(4, 0, 2)):
    g = torch.Generator().manual_seed(seed)

    def boxes(n):
        xy = torch.rand(n, 2, generator=g) * 80
        return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 40 + 2], 1)

    gts = [boxes(k) for k in G]
    labels = [torch.randint(0, C, (k,), generator=g) for k in G]
    props = []
    for p, gt in zip(P, gts):
        near = gt[torch.randint(0, len(gt), (p // 2,), generator=g)] + torch.randn(p // 2, 4, generator=g) * 4 \
            if len(gt) else boxes(p // 2)
        props.append(torch.cat([near, boxes(p - p // 2)]))
    return props, gts, labels


def _padded(props):
    N, P = len(props), max(len(p) for p in props)
    boxes = torch.zeros(N, P, 4)
    valid = torch.zeros(N, P, dtype=torch.bool)
    src = torch.full((N, P, 5), -1, dtype=torch.int64)
    for n, p in enumerate(props):
        boxes[n, :len(p)] = p
        valid[n, :len(p)] = True
        src[n, :len(p), 0] = 0
        src[n, :len(p), 1] = n
        src[n, :len(p), 2] = torch.arange(len(p))
    return boxes, valid, src


@pytest.mark.parametrize("assigner_kw", [
    dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=False),
    dict(pos_iou_thr=0.6, neg_iou_thr=(0.1, 0.4), min_pos_iou=0.3, match_low_quality=True),
], ids=["faster_rcnn_rcnn", "low_quality_neg_range"])
def test_sampling_is_mmdets_assigner_and_sampler_when_nothing_is_drawn(assigner_kw):
    """With room for every candidate, mmdet's RandomSampler draws nothing at random: the slots must be its
    SamplingResult's priors, positive flags, GT boxes and labels, in its order."""
    from mmdet.models.task_modules.assigners import MaxIoUAssigner
    from mmdet.models.task_modules.samplers import RandomSampler

    props, gts, labels = _problem(0)
    assigner = MaxIoUAssigner(**assigner_kw)
    sampler = RandomSampler(num=1000, pos_fraction=0.5, neg_pos_ub=-1, add_gt_as_proposals=True)
    boxes, valid, src = _padded(props)
    gt_b, gt_l, gt_v = head_pad_gt(gts, labels)
    out = head_sample_rois(boxes, valid, src, gt_b, gt_l, gt_v, num_classes=C, num=1000, pos_fraction=0.5,
                           **assigner_kw)
    S = boxes.shape[1] + gt_b.shape[1]
    for n in range(len(props)):
        gt = InstanceData(bboxes=gts[n], labels=labels[n])
        res = sampler.sample(assigner.assign(InstanceData(priors=props[n]), gt), InstanceData(priors=props[n]), gt)
        want = torch.cat([res.pos_priors, res.neg_priors])
        k, n_pos = len(want), len(res.pos_priors)
        rows = slice(n * S, (n + 1) * S)
        assert torch.equal(out.rois[rows][:k, 1:], want)
        assert out.valid[rows][:k].all() and not out.valid[rows][k:].any()
        assert out.pos[rows][:n_pos].all() and not out.pos[rows][n_pos:].any()
        assert torch.equal(out.gt_boxes[rows][:n_pos], res.pos_gt_bboxes)
        assert torch.equal(out.labels[rows][:n_pos], res.pos_gt_labels)
        assert (out.labels[rows][n_pos:] == C).all()
        gt_rows = out.sources[rows][:k, 0] < 0
        assert int(gt_rows.sum()) == int(res.pos_is_gt.sum())


def _deterministic(model):
    """Room for every candidate in both samplers: nothing is drawn at random."""
    model.assistant.bbox_sampler.num = 100000
    model.assistant.bbox_sampler.pos_fraction = 1.0
    if model._sampling_cfg is not None:
        model._sampling_cfg.update(num=100000, pos_fraction=1.0)


@pytest.mark.parametrize("empty", [(), (0,), (0, 1)], ids=["gt", "one_image_without_gt", "no_gt_at_all"])
def test_sync_free_step_gives_mmdets_losses_and_gradients(toy, empty):
    """A HEAD step on kdops's fixed-shape proposals, sampler and masked R-CNN loss equals the same model
    on mmdet's assigner, sampler and BBoxHead.loss (sync_free=False), losses and gradients -- also with
    images without GT boxes (only negatives there; no box loss when no image has GT)."""
    from mmdet_testing import toy_batch

    fixed, cfg = _model(toy)
    plain, _ = _model(toy, sync_free=False)
    assert fixed.sync_free and not plain.sync_free
    data = toy_batch(fixed, cfg, empty=empty)
    runs = []
    for model in (fixed, plain):
        _deterministic(model)
        model.train()
        losses = model.loss(data["inputs"], data["data_samples"])
        total, _ = model.parse_losses(losses)
        assert torch.isfinite(total)
        params = [p for p in model.student.parameters()] + [p for p in model.assistant.parameters()] + \
            [p for p in model.akd.parameters()] + [p for p in model.ckd.parameters()]
        runs.append((losses, torch.autograd.grad(total, params, allow_unused=True, materialize_grads=True)))
    (lf, gf), (lp, gp) = runs
    assert set(lf) == set(lp) and {"loss_akd", "loss_ckd", "loss_assist_cls", "loss_assist_bbox", "assist_acc"} <= \
        set(lf)
    if len(empty) < 2:
        assert float(lp["loss_assist_bbox"].detach()) > 0  # positives exist
    else:
        assert float(lf["loss_assist_bbox"].detach()) == 0.0
    for k in lf:
        a = lf[k] if isinstance(lf[k], list) else [lf[k]]
        b = lp[k] if isinstance(lp[k], list) else [lp[k]]
        for x, y in zip(a, b):
            torch.testing.assert_close(x.reshape(()), y.reshape(()), rtol=1e-5, atol=1e-6, msg=k)
    for a, b in zip(gf, gp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _fake_step_inputs(model, data):
    from mmdet.models.utils import unpack_gt_instances

    s, t = model.student, model.teacher
    gts, gts_ignore, metas = unpack_gt_instances(data["data_samples"])
    with torch.no_grad():
        t_feats = t.extract_feat(data["inputs"])
        s_feats = s.extract_feat(data["inputs"])
        with model._student_rec:
            outs = s.bbox_head(s_feats)
        cls_feats = model._student_rec.take()["cls"]
    return t_feats, s_feats, outs, cls_feats, gts, gts_ignore, metas


@pytest.mark.parametrize("config", ["retinanet", "fcos"])
def test_distill_part_reads_no_device_value(toy, config):
    """The whole distillation part (proposals, NMS, sampling, assistant R-CNN and GT loss, teacher R-CNN, AKD,
    CKD) runs under FakeTensorMode, where any host read of a device value raises; mmdet's sampler path
    (sync_free=False) does raise there."""
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode,
    )

    from test_head_mmdet import HEAD_FCOS_TOY, HEAD_TOY

    path = HEAD_TOY if config == "retinanet" else HEAD_FCOS_TOY
    for sync_free in (True, False):
        model, cfg = _model(toy, path, sync_free=sync_free)
        model.train()
        data = _batch(cfg, model)
        t_feats, s_feats, outs, cls_feats, gts, gts_ignore, metas = _fake_step_inputs(model, data)
        mode = FakeTensorMode(allow_non_fake_inputs=True)

        def fake(x):
            if isinstance(x, torch.Tensor):
                return mode.from_tensor(x)
            if isinstance(x, (list, tuple)):
                return type(x)(fake(v) for v in x)
            return x

        f_gts = [InstanceData(bboxes=fake(g.bboxes), labels=fake(g.labels)) for g in gts]
        args = (fake(list(t_feats)), fake(list(s_feats)), fake(list(outs)), fake(cls_feats), f_gts,
                [InstanceData(bboxes=fake(g.bboxes)) for g in gts_ignore], metas)
        if sync_free:
            with mode:
                losses = model.distill_part(*args)
            assert {"loss_akd", "loss_ckd", "loss_assist_cls", "loss_assist_bbox"} <= set(losses)
            assert all(type(v).__name__ == "FakeTensor" for v in losses.values())
        else:
            with pytest.raises((DataDependentOutputException, DynamicOutputShapeException)):
                with mode:
                    model.distill_part(*args)


@pytest.mark.parametrize("train_cfg,match", [
    (dict(sampler=dict(type="OHEMSampler", num=512, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True)),
     "OHEMSampler"),
    (dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                        match_low_quality=False, ignore_iof_thr=0.5)), "ignore_iof_thr"),
])
def test_sync_free_refuses_what_it_does_not_compute(toy, train_cfg, match):
    from mmengine.config import Config

    from test_head_mmdet import FRCNN_CFG

    teacher = Config.fromfile(FRCNN_CFG).model
    teacher.train_cfg.rcnn.update(train_cfg)
    with pytest.raises(ValueError, match=match + ".*sync_free=False"):
        _model(toy, teacher_cfg=teacher)
    _model(toy, teacher_cfg=teacher, sync_free=False)  # mmdet's path takes it
