"""HEAD (kdops.losses.head) against eager transcriptions of the authors' code.

Oracles (github.com/LutingWang/HEAD at 345fc77a, mmdet 2.20 as vendored in its 56589e73, and
github.com/LutingWang/todd at 532ddbc):

- proposals: ``RetinaRPNHead.forward_train`` (max over classes) + mmdet 2.20
  ``RPNHead._get_bboxes_single`` / ``_bbox_post_process`` with ``PosMixin`` priors, one image and
  one level at a time, mmdet's ``delta2bbox`` transcribed, torchvision's ``batched_nms`` per image
  as mmcv's peer;
- gathered rows, CKD, contrastive CKD: ``CustomAdapt``, ``ListTensor.index`` (per-level boolean
  masks), ``Decouple``, ``MSELoss``, ``MemoryPool`` + ``ckd_loss`` (ddp_head_probe.py, as plain loops);
- AKD / dense: ``Linear`` / ``Conv2d`` adapters and ``F.mse_loss`` as the configs combine them.
"""
import copy
import math
import os
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F
from ddp_head_probe import (
    C_S, C_T, NUM, authors_ignore, custom_adapt, expected_step, list_index, make_batch, rearranged, source_rows,
)
from helpers import close

import kdops
from kdops.losses import (
    HEADAKDLoss, HEADCKDLoss, HEADContrastiveCKDLoss, HEADDenseLoss, HEADMemoryPool, HEADProposals, head_gt_sources,
    head_proposals,
)
from kdops.losses import head as head_module

F64 = torch.float64
LOW = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _seeded():
    """Adapters are initialised from the global generator: the same init whatever ran before."""
    torch.manual_seed(0)


# =============================================================================== proposals

SIZES = [(8, 10), (4, 5), (2, 3)]
STRIDES = [8, 16, 32]
J, K = 3, 4


def anchors(sizes=SIZES, strides=STRIDES, dtype=torch.float32):
    """mmdet AnchorGenerator priors, (h, w, j) rows: centre (x*s, y*s), sides 4*s*2^(j/3)."""
    out = []
    for (h, w), s in zip(sizes, strides):
        side = torch.tensor([4 * s * 2 ** (j / 3) for j in range(J)], dtype=F64)
        yy, xx = torch.meshgrid(torch.arange(h, dtype=F64) * s, torch.arange(w, dtype=F64) * s, indexing="ij")
        c = torch.stack([xx, yy], -1).reshape(h * w, 1, 2)
        half = (side / 2).view(1, J, 1)
        out.append(torch.cat([c - half, c + half], -1).reshape(-1, 4).to(dtype))
    return out


def head_outputs(seed=0, N=2, sizes=SIZES, dtype=torch.float32, scale=0.2):
    """Class logits whose per-anchor max (the objectness) is distinct within each image, in every
    dtype (multiples of 1/32 in (-5, 5): exact in bf16), and box deltas."""
    g = torch.Generator().manual_seed(seed)
    A = [h * w * J for h, w in sizes]
    cls, reg = [], []
    vals = [(torch.randperm(320, generator=g)[: sum(A)] - 160).to(F64) / 32 for _ in range(N)]
    off = 0
    for (h, w), a in zip(sizes, A):
        v = torch.stack([x[off:off + a] for x in vals]).view(N, h, w, J)  # (n, h, w, j) objectness
        off += a
        logits = v.unsqueeze(-1) - 0.25 - torch.rand(N, h, w, J, K, generator=g, dtype=F64)
        kstar = torch.randint(0, K, (N, h, w, J, 1), generator=g)
        logits.scatter_(-1, kstar, v.unsqueeze(-1))
        cls.append(logits.reshape(N, h, w, J * K).permute(0, 3, 1, 2).contiguous().to(dtype))
        reg.append((torch.randn(N, J * 4, h, w, generator=g, dtype=F64) * scale).to(dtype))
    return cls, reg


def mmdet_delta2bbox(rois, deltas, means=(0.0,) * 4, stds=(1.0,) * 4, max_shape=None, wh_ratio_clip=16 / 1000):
    """mmdet 2.20 delta2bbox (add_ctr_clamp=False, clip_border=True), transcribed."""
    means = deltas.new_tensor(means).view(1, -1)
    stds = deltas.new_tensor(stds).view(1, -1)
    denorm = deltas * stds + means
    dxy, dwh = denorm[:, :2], denorm[:, 2:]
    pxy = (rois[:, :2] + rois[:, 2:]) * 0.5
    pwh = rois[:, 2:] - rois[:, :2]
    dxy_wh = pwh * dxy
    max_ratio = abs(math.log(wh_ratio_clip))
    dwh = dwh.clamp(min=-max_ratio, max=max_ratio)
    gxy = pxy + dxy_wh
    gwh = pwh * dwh.exp()
    bboxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
    if max_shape is not None:
        max_xy = bboxes.new_tensor([max_shape[1], max_shape[0]] * 2).unsqueeze(0)
        bboxes = torch.where(bboxes < 0, bboxes.new_zeros(()), bboxes)
        bboxes = torch.where(bboxes > max_xy, max_xy, bboxes)
    return bboxes


def pos_priors(priors, sizes):
    """PosMixin.single_level_grid_priors with with_pos: [level, y, x, anchor] appended per prior."""
    out = []
    for level_idx, ((h, w), p) in enumerate(zip(sizes, priors)):
        pos = torch.zeros((h, w, J, 4), dtype=p.dtype)
        pos[..., 0] = level_idx
        pos[..., 1] = torch.arange(h, dtype=p.dtype).view(h, 1, 1)
        pos[..., 2] = torch.arange(w, dtype=p.dtype).view(1, w, 1)
        pos[..., 3] = torch.arange(J, dtype=p.dtype).view(1, 1, J)
        out.append(torch.cat((p, pos.reshape(-1, 4)), dim=-1))
    return out


def authors_proposals(cls_scores, bbox_preds, priors, img_shapes, nms_pre=2000, iou=0.7, max_per_img=1000,
                      min_bbox_size=0, decode=None):
    """(P, 9) rows [x1, y1, x2, y2, score, level, y, x, j] per image, the authors' way."""
    from torchvision.ops import batched_nms

    decode = decode or (lambda a, d, shape: mmdet_delta2bbox(a, d, max_shape=shape))
    N = cls_scores[0].shape[0]
    sizes = [tuple(c.shape[2:]) for c in cls_scores]
    # RetinaRPNHead: 'bs (num_anchors num_classes) h w -> bs num_anchors h w', reduction='max'
    cls_scores = [c.reshape(N, J, K, *c.shape[2:]).max(2).values for c in cls_scores]
    mlvl_anchors = pos_priors(priors, sizes)
    results = []
    for i in range(N):
        level_ids, mlvl_scores, mlvl_bbox_preds, mlvl_valid_anchors = [], [], [], []
        for level_idx in range(len(cls_scores)):
            rpn_cls_score = cls_scores[level_idx][i].detach().permute(1, 2, 0).reshape(-1)
            scores = rpn_cls_score.sigmoid()
            rpn_bbox_pred = bbox_preds[level_idx][i].detach().permute(1, 2, 0).reshape(-1, 4)
            anchors_ = mlvl_anchors[level_idx]
            if 0 < nms_pre < scores.shape[0]:
                ranked_scores, rank_inds = scores.sort(descending=True)
                topk_inds = rank_inds[:nms_pre]
                scores = ranked_scores[:nms_pre]
                rpn_bbox_pred = rpn_bbox_pred[topk_inds, :]
                anchors_ = anchors_[topk_inds, :]
            mlvl_scores.append(scores)
            mlvl_bbox_preds.append(rpn_bbox_pred)
            mlvl_valid_anchors.append(anchors_)
            level_ids.append(scores.new_full((scores.size(0),), level_idx, dtype=torch.long))
        # _bbox_post_process with the positions carried by the anchors
        scores = torch.cat(mlvl_scores)
        bboxes = torch.cat(mlvl_bbox_preds)
        anchors_ = torch.cat(mlvl_valid_anchors)
        ids = torch.cat(level_ids)
        poses = anchors_[:, -4:]
        anchors_ = anchors_[:, :-4]
        proposals = decode(anchors_, bboxes, img_shapes[i])
        if min_bbox_size >= 0:
            w = proposals[:, 2] - proposals[:, 0]
            h = proposals[:, 3] - proposals[:, 1]
            valid_mask = torch.logical_and(w > min_bbox_size, h > min_bbox_size)
            if not valid_mask.all():
                proposals, scores, ids, poses = (proposals[valid_mask], scores[valid_mask], ids[valid_mask],
                                                 poses[valid_mask])
        if proposals.numel() == 0:
            results.append(proposals.new_zeros(0, 9))
            continue
        keep = batched_nms(proposals, scores, ids, iou)
        dets = torch.cat([proposals[keep], scores[keep, None]], -1)
        dets = dets[:max_per_img]
        keep = keep[:max_per_img]
        results.append(torch.cat([dets, poses[keep]], dim=-1))
    return results


def assert_same_proposals(ours: HEADProposals, theirs):
    assert len(ours.boxes) == len(theirs)
    for n, t in enumerate(theirs):
        b, s, src = ours.boxes[n], ours.scores[n], ours.sources[n]
        assert b.shape == (t.shape[0], 4) and s.shape == (t.shape[0],) and src.shape == (t.shape[0], 5)
        assert src.dtype == torch.int64 and b.dtype == s.dtype == torch.float32
        torch.testing.assert_close(b, t[:, :4].float(), rtol=0, atol=0)
        # the same fp32 sigmoid of the same logits; SIMD and scalar paths may differ by an ulp
        torch.testing.assert_close(s, t[:, 4].float(), rtol=3e-7, atol=0)
        want = torch.stack([t[:, 5].long(), torch.full_like(t[:, 5], n).long(), t[:, 6].long(), t[:, 7].long(),
                            t[:, 8].long()], 1)
        assert torch.equal(src, want)


def nms_removed_some(cls, reg, pri, shapes, nms_pre, iou):
    """The test problem must exercise NMS: fewer survivors than valid candidates."""
    none = authors_proposals(cls, reg, pri, shapes, nms_pre=nms_pre, iou=1.0)
    some = authors_proposals(cls, reg, pri, shapes, nms_pre=nms_pre, iou=iou)
    return all(a.shape[0] > b.shape[0] for a, b in zip(none, some))


@pytest.mark.parametrize("nms_pre,iou,max_per_img", [(50, 0.7, 1000), (2000, 0.5, 40), (0, 0.7, 25), (30, 0.3, 7)])
def test_proposals_match_the_authors_rpn_path(nms_pre, iou, max_per_img):
    pytest.importorskip("torchvision")
    cls, reg = head_outputs(seed=nms_pre)
    pri = anchors()
    shapes = [(60, 75), (64, 80)]
    assert nms_removed_some(cls, reg, pri, shapes, nms_pre, iou)
    ours = head_proposals(cls, reg, pri, nms_pre=nms_pre, iou_threshold=iou, max_per_img=max_per_img,
                          img_shape=shapes)
    theirs = authors_proposals(cls, reg, pri, shapes, nms_pre=nms_pre, iou=iou, max_per_img=max_per_img)
    assert_same_proposals(ours, theirs)
    assert any(s.shape[0] == max_per_img for s in ours.scores) or max_per_img == 1000


def test_each_proposal_decodes_from_its_source_anchor():
    """Independent of the authors' path: the source row [l, n, y, x, j] names the logits, deltas and
    prior the box and score came from."""
    cls, reg = head_outputs(seed=3)
    pri = anchors()
    out = head_proposals(cls, reg, pri, nms_pre=40, max_per_img=100, img_shape=(62.0, 77.0))
    for n, (b, s, src) in enumerate(zip(*out)):
        assert (src[:, 1] == n).all() and b.shape[0] > 0
        assert torch.all(s[:-1] >= s[1:]), "proposals come in decreasing score order"
        for (lvl, bi, y, x, j), box, score in zip(src.tolist(), b, s):
            W = SIZES[lvl][1]
            logit = cls[lvl][bi, j * K:(j + 1) * K, y, x].max()
            torch.testing.assert_close(score, torch.sigmoid(logit), rtol=3e-7, atol=0)
            prior = pri[lvl][(y * W + x) * J + j]
            delta = reg[lvl][bi, j * 4:(j + 1) * 4, y, x]
            want = mmdet_delta2bbox(prior[None], delta[None], max_shape=(62.0, 77.0))[0]
            assert torch.equal(box, want)


def test_sources_gather_the_rows_the_authors_index():
    """sources[:, :4] through kdops.gather_level_features == Rearrange + ListTensor.index of the
    authors (per-level boolean masks) on the student's head maps."""
    cls, reg = head_outputs(seed=5)
    out = head_proposals(cls, reg, anchors(), nms_pre=60)
    g = torch.Generator().manual_seed(1)
    maps = [torch.randn(2, 7, h, w, generator=g) for h, w in SIZES]
    src = torch.cat(out.sources)
    rows = kdops.gather_level_features(maps, src[:, :4].contiguous(), validate=True)
    bbox_ids = src[:, [1, 0, 2, 3, 4]]  # [bs, level, h, w, id], as the authors' sampler stores them
    _, pos, id_, kept = custom_adapt(torch.zeros(src.shape[0], 1), bbox_ids)
    assert kept.all() and torch.equal(id_, src[:, 4])
    assert torch.equal(rows, list_index(rearranged(maps), pos))


def test_callable_decoder_and_means_stds():
    pytest.importorskip("torchvision")
    cls, reg = head_outputs(seed=7)
    pri = anchors()
    means, stds = (0.1, -0.05, 0.0, 0.02), (0.5, 0.5, 1.5, 1.5)
    shapes = [(64, 80)] * 2

    def theirs_decode(a, d, shape):
        return mmdet_delta2bbox(a, d, means, stds, max_shape=shape)

    theirs = authors_proposals(cls, reg, pri, shapes, nms_pre=45, decode=theirs_decode)
    by_name = head_proposals(cls, reg, pri, nms_pre=45, img_shape=(64, 80), means=means, stds=stds)
    by_call = head_proposals(cls, reg, pri, lambda d, p: mmdet_delta2bbox(p, d, means, stds), nms_pre=45,
                             img_shape=(64, 80))
    assert_same_proposals(by_name, theirs)
    assert_same_proposals(by_call, theirs)


def fcos_points(sizes=SIZES, strides=STRIDES):
    """mmdet MlvlPointGenerator(offset=0.5).grid_priors(with_stride=True): (h*w, 4) [x, y, s, s]."""
    out = []
    for (h, w), s in zip(sizes, strides):
        yy, xx = torch.meshgrid((torch.arange(h) + 0.5) * s, (torch.arange(w) + 0.5) * s, indexing="ij")
        out.append(torch.stack([xx, yy, torch.full_like(xx, s), torch.full_like(xx, s)], -1).reshape(-1, 4))
    return out


def fcos_outputs(seed=0, N=2, sizes=SIZES):
    """FCOS head outputs: K class logits per point with a distinct per-point max, distances in pixels
    (already times the stride) and centerness logits."""
    g = torch.Generator().manual_seed(seed)
    cls, reg, ctr = [], [], []
    vals = [(torch.randperm(320, generator=g)[: sum(h * w for h, w in sizes)] - 160).to(F64) / 32 for _ in range(N)]
    off = 0
    for (h, w), s in zip(sizes, STRIDES):
        v = torch.stack([x[off:off + h * w] for x in vals]).view(N, h, w, 1)
        off += h * w
        logits = v - 0.25 - torch.rand(N, h, w, K, generator=g, dtype=F64)
        logits.scatter_(-1, torch.randint(0, K, (N, h, w, 1), generator=g), v)
        cls.append(logits.permute(0, 3, 1, 2).float().contiguous())
        reg.append((torch.rand(N, 4, h, w, generator=g) * 3 * s).float())
        ctr.append(torch.randn(N, 1, h, w, generator=g).float())
    return cls, reg, ctr


def authors_fcos_proposals(cls_scores, bbox_preds, centernesses, points, img_shapes, nms_pre=2000, iou=0.7,
                           max_per_img=1000, score_thr=0.0):
    """The authors' FCOSRPNHead.get_bboxes in training, transcribed: the class logits reduced by a max
    over classes, then mmdet 2.20 BaseDenseHead._get_bboxes_single (filter_scores_and_topk, the
    centerness as score factor, distance2bbox clipped to the image) and _bbox_post_process (scores times
    factors, batched_nms with every label 0, top max_per_img). (P, 9) rows as authors_proposals."""
    from torchvision.ops import batched_nms

    N = cls_scores[0].shape[0]
    cls_scores = [c.max(1, keepdim=True).values for c in cls_scores]  # 'bs num_classes h w -> bs 1 h w'
    results = []
    for i in range(N):
        mlvl_bboxes, mlvl_scores, mlvl_factors, mlvl_pos = [], [], [], []
        for lvl, (c, r, f, p) in enumerate(zip(cls_scores, bbox_preds, centernesses, points)):
            h, w = c.shape[2:]
            bbox_pred = r[i].permute(1, 2, 0).reshape(-1, 4)
            factor = f[i].permute(1, 2, 0).reshape(-1).sigmoid()
            scores = c[i].permute(1, 2, 0).reshape(-1, 1).sigmoid()
            # filter_scores_and_topk
            valid = scores > score_thr
            sc = scores[valid]
            valid_idxs = torch.nonzero(valid)
            num_topk = min(nms_pre, valid_idxs.size(0))
            sc, idxs = sc.sort(descending=True)
            sc = sc[:num_topk]
            keep_idxs = valid_idxs[idxs[:num_topk]][:, 0]
            pts = p[keep_idxs, :2]
            d = bbox_pred[keep_idxs]
            x1 = (pts[:, 0] - d[:, 0]).clamp(min=0, max=img_shapes[i][1])
            y1 = (pts[:, 1] - d[:, 1]).clamp(min=0, max=img_shapes[i][0])
            x2 = (pts[:, 0] + d[:, 2]).clamp(min=0, max=img_shapes[i][1])
            y2 = (pts[:, 1] + d[:, 3]).clamp(min=0, max=img_shapes[i][0])
            mlvl_bboxes.append(torch.stack([x1, y1, x2, y2], -1))
            mlvl_scores.append(sc)
            mlvl_factors.append(factor[keep_idxs])
            pos = torch.stack([torch.full_like(keep_idxs, lvl), keep_idxs // w, keep_idxs % w,
                               torch.zeros_like(keep_idxs)], 1).float()
            mlvl_pos.append(pos)
        bboxes = torch.cat(mlvl_bboxes)
        scores = torch.cat(mlvl_scores) * torch.cat(mlvl_factors)
        poses = torch.cat(mlvl_pos)
        keep = batched_nms(bboxes, scores, torch.zeros_like(scores, dtype=torch.long), iou)[:max_per_img]
        results.append(torch.cat([bboxes[keep], scores[keep, None], poses[keep]], -1))
    return results


@pytest.mark.parametrize("nms_pre,iou,max_per_img", [(30, 0.7, 1000), (2000, 0.5, 25), (12, 0.3, 9)])
def test_fcos_proposals_match_the_authors_fcos_rpn_path(nms_pre, iou, max_per_img):
    pytest.importorskip("torchvision")
    cls, reg, ctr = fcos_outputs(seed=nms_pre)
    pts = fcos_points()
    shapes = [(60, 75), (64, 80)]
    ours = head_proposals(cls, reg, pts, "distance", score_factors=ctr, nms_across_levels=True, nms_pre=nms_pre,
                          iou_threshold=iou, max_per_img=max_per_img, min_bbox_size=-1, img_shape=shapes)
    theirs = authors_fcos_proposals(cls, reg, ctr, pts, shapes, nms_pre=nms_pre, iou=iou, max_per_img=max_per_img)
    # NMS runs across levels here: a per-level NMS keeps more, so the test would see the difference
    per_level = head_proposals(cls, reg, pts, "distance", score_factors=ctr, nms_pre=nms_pre, iou_threshold=iou,
                               max_per_img=10_000, min_bbox_size=-1, img_shape=shapes)
    across = head_proposals(cls, reg, pts, "distance", score_factors=ctr, nms_across_levels=True,
                            nms_pre=nms_pre, iou_threshold=iou, max_per_img=10_000, min_bbox_size=-1,
                            img_shape=shapes)
    assert all(a.shape[0] > b.shape[0] for a, b in zip(per_level.scores, across.scores))
    for n, t in enumerate(theirs):
        torch.testing.assert_close(ours.boxes[n], t[:, :4], rtol=0, atol=0)
        torch.testing.assert_close(ours.scores[n], t[:, 4], rtol=1e-6, atol=0)
        want = torch.stack([t[:, 5], torch.full_like(t[:, 5], n), t[:, 6], t[:, 7], t[:, 8]], 1).long()
        assert torch.equal(ours.sources[n], want)
    # each source names the logits, distances and point its box and score came from
    for n, (b, s, src) in enumerate(zip(*ours)):
        for (lvl, bi, y, x, j), box, score in zip(src.tolist(), b, s):
            W = SIZES[lvl][1]
            want_s = torch.sigmoid(cls[lvl][bi, :, y, x].max()) * torch.sigmoid(ctr[lvl][bi, 0, y, x])
            torch.testing.assert_close(score, want_s, rtol=1e-6, atol=0)
            px, py = pts[lvl][y * W + x, :2].tolist()
            l_, t_, r_, b_ = reg[lvl][bi, :, y, x].tolist()
            h_, w_ = shapes[n]
            want_b = torch.tensor([min(max(px - l_, 0), w_), min(max(py - t_, 0), h_), min(max(px + r_, 0), w_),
                                   min(max(py + b_, 0), h_)])
            torch.testing.assert_close(box, want_b, rtol=1e-6, atol=1e-5)


def test_fcos_score_factors_are_checked():
    cls, reg, ctr = fcos_outputs(seed=1)
    pts = fcos_points()
    with pytest.raises(ValueError, match="score_factors"):
        head_proposals(cls, reg, pts, "distance", score_factors=ctr[:2])
    with pytest.raises(ValueError, match=r"score_factors\[1\]"):
        head_proposals(cls, reg, pts, "distance", score_factors=[ctr[0], ctr[1].expand(2, 2, -1, -1), ctr[2]])
    with pytest.raises(TypeError, match="nms_across_levels"):
        head_proposals(cls, reg, pts, "distance", nms_across_levels=1)


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_inputs_decode_in_float32(dtype):
    pytest.importorskip("torchvision")
    cls, reg = head_outputs(seed=11, dtype=dtype)
    pri = anchors()
    shapes = [(60, 75), (64, 80)]
    ours = head_proposals(cls, reg, pri, nms_pre=50, img_shape=shapes)
    theirs = authors_proposals([c.float() for c in cls], [r.float() for r in reg], pri, shapes, nms_pre=50)
    assert_same_proposals(ours, theirs)


def test_empty_images_give_empty_tensors():
    pytest.importorskip("torchvision")
    cls, reg = head_outputs(seed=13)
    pri = anchors()
    none = head_proposals(cls, reg, pri, min_bbox_size=1e9)
    assert [b.shape for b in none.boxes] == [(0, 4)] * 2 and [s.shape for s in none.sources] == [(0, 5)] * 2
    assert [s.shape for s in none.scores] == [(0,)] * 2 and none.sources[0].dtype == torch.int64
    # image 1 is 1x1 pixel: every box is clipped to w, h <= 1, and min_bbox_size=1 drops them all
    shapes = [(64, 80), (1, 1)]
    ours = head_proposals(cls, reg, pri, img_shape=shapes, min_bbox_size=1)
    theirs = authors_proposals(cls, reg, pri, shapes, min_bbox_size=1)
    assert ours.boxes[0].shape[0] > 0 and ours.boxes[1].shape == (0, 4)
    assert_same_proposals(ours, theirs)
    # no image at all; an empty level among others
    assert head_proposals([c[:0] for c in cls], [r[:0] for r in reg], pri, img_shape=(64, 80)) == ([], [], [])
    sizes = [(8, 10), (0, 5)]
    cls2, reg2 = head_outputs(seed=13, sizes=sizes)
    pri2 = anchors(sizes=sizes, strides=STRIDES[:2])
    ours = head_proposals(cls2, reg2, pri2, img_shape=shapes)
    assert_same_proposals(ours, authors_proposals(cls2, reg2, pri2, shapes))
    assert all((s[:, 0] == 0).all() for s in ours.sources)
    # a negative min_bbox_size keeps even zero-size boxes (mmdet); they survive NMS (IoU 0/0 is no overlap)
    keep_all = head_proposals(cls, reg, pri, img_shape=shapes, min_bbox_size=-1, nms_pre=10)
    assert keep_all.boxes[1].shape[0] > 0


@pytest.mark.parametrize("across", [False, True])
def test_padded_proposals_are_the_lists_with_a_validity_prefix(across):
    cls, reg = head_outputs(seed=17)
    pri = anchors()
    kw = dict(nms_pre=60, img_shape=(64, 80), max_per_img=500, nms_across_levels=across)
    lists = head_proposals(cls, reg, pri, **kw)
    padded = head_proposals(cls, reg, pri, padded=True, **kw)
    assert isinstance(padded, head_module.HEADPaddedProposals)
    N, P = padded.valid.shape
    assert P == 60 + 60 + 2 * 3 * J and padded.boxes.shape == (N, P, 4) and padded.sources.shape == (N, P, 5)
    for n in range(N):
        k = lists.boxes[n].shape[0]
        assert 0 < k < P and padded.valid[n, :k].all() and not padded.valid[n, k:].any()
        assert torch.equal(padded.boxes[n, :k], lists.boxes[n]) and torch.equal(padded.scores[n, :k], lists.scores[n])
        assert torch.equal(padded.sources[n, :k], lists.sources[n])


def test_proposals_without_torchvision_are_the_same(monkeypatch):
    """NMS is kdops.nms_mask: torchvision is not needed."""
    cls, reg = head_outputs(seed=17)
    pri = anchors()
    with_tv = head_proposals(cls, reg, pri, nms_pre=60, img_shape=(64, 80))
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.ops", None)
    without = head_proposals(cls, reg, pri, nms_pre=60, img_shape=(64, 80))
    for a, b in zip(with_tv, without):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("across", [False, True])
def test_padded_proposals_read_no_device_value(across):
    """The whole proposal path with padded=True, NMS included, on meta tensors: no host read."""
    cls = [torch.empty(2, J * K, h, w, device="meta") for h, w in SIZES]
    reg = [torch.empty(2, J * 4, h, w, device="meta") for h, w in SIZES]
    pri = [torch.empty(h * w * J, 4, device="meta") for h, w in SIZES]
    out = head_proposals(cls, reg, pri, nms_pre=50, max_per_img=100, img_shape=(64, 80), padded=True,
                         nms_across_levels=across)
    assert out.boxes.shape == (2, 100, 4) and out.valid.shape == (2, 100) and out.valid.device.type == "meta"


def test_proposal_candidates_read_no_device_value():
    """Everything before the size filter and NMS runs on meta tensors (no value read on the host)."""
    cls = [torch.empty(2, J * K, h, w, device="meta") for h, w in SIZES]
    reg = [torch.empty(2, J * 4, h, w, device="meta") for h, w in SIZES]
    pri = [torch.empty(h * w * J, 4, device="meta") for h, w in SIZES]
    boxes, scores, sources = head_module._candidates(cls, reg, pri, "delta_xywh", 50, (0.0,) * 4, (1.0,) * 4,
                                                     16 / 1000, [(64, 80)] * 2)
    A = 50 + 50 + 2 * 3 * J
    assert boxes.shape == (2, A, 4) and scores.shape == (2, A) and sources.shape == (2, A, 5)
    # the FCOS path: points, distances, centerness factors
    cls = [torch.empty(2, K, h, w, device="meta") for h, w in SIZES]
    reg = [torch.empty(2, 4, h, w, device="meta") for h, w in SIZES]
    pts = [torch.empty(h * w, 4, device="meta") for h, w in SIZES]
    ctr = [torch.empty(2, 1, h, w, device="meta") for h, w in SIZES]
    boxes, scores, sources = head_module._candidates(cls, reg, pts, "distance", 30, (0.0,) * 4, (1.0,) * 4,
                                                     16 / 1000, [(64, 80)] * 2, ctr)
    A = 30 + 20 + 6
    assert boxes.shape == (2, A, 4) and scores.shape == (2, A) and sources.shape == (2, A, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("across", [False, True])
def test_head_distillation_path_on_cuda_never_syncs(across):
    """HEAD's framework-free path on CUDA -- proposals with their NMS, the R-CNN sampling, RoIAlign, AKD and
    CKD, forward and backward -- under torch.cuda.set_sync_debug_mode("error"), where any host
    synchronisation raises; the proposals and samples equal the CPU's."""
    from kdops.losses import head_pad_gt, head_sample_rois

    def run(dev):
        torch.manual_seed(0)
        cls, reg = head_outputs(seed=3)
        pri = anchors()
        cls, reg, pri = ([x.to(dev) for x in v] for v in (cls, reg, pri))
        gts = [torch.tensor([[4.0, 4.0, 30.0, 28.0], [40.0, 10.0, 70.0, 50.0]], device=dev),
               torch.zeros(0, 4, device=dev)]
        labels = [torch.tensor([1, 2], device=dev), torch.zeros(0, dtype=torch.int64, device=dev)]
        feats = [torch.randn(2, 8, h, w, generator=torch.Generator().manual_seed(i)).to(dev).requires_grad_(True)
                 for i, (h, w) in enumerate(SIZES)]
        akd = HEADAKDLoss(in_channels=32, out_channels=32, num_layers=1).to(dev)
        ckd = HEADCKDLoss(in_channels=8, out_channels=32).to(dev)
        gen = torch.Generator(device=dev).manual_seed(0)
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            props = head_proposals(cls, reg, pri, nms_pre=50, max_per_img=100, img_shape=(64, 80), padded=True,
                                   nms_across_levels=across)
            gt_b, gt_l, gt_v = head_pad_gt(gts, labels)
            smp = head_sample_rois(props.boxes, props.valid, props.sources, gt_b, gt_l, gt_v, num_classes=K, num=256,
                                   generator=gen)
            pooled = kdops.roi_align(feats, smp.rois, STRIDES, output_size=2, validate=False).flatten(1)
            target = pooled.detach() * 0.5
            loss = akd([pooled], [target], smp.valid) + ckd(feats, smp.sources, target)
            loss.backward()
        finally:
            if dev == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        return props, smp, loss.detach(), [f.grad for f in feats]

    cpu, gpu = run("cpu"), run("cuda")
    for a, b in zip(cpu[0], gpu[0]):
        assert torch.equal(a, b.cpu())
    assert int(gpu[1].valid.sum()) > 0 and int(gpu[1].pos.sum()) > 0
    for a, b in zip(cpu[1], gpu[1]):  # room for every candidate: no random draw decides
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=0)
    torch.testing.assert_close(gpu[2].cpu(), cpu[2], rtol=1e-4, atol=1e-6)
    for a, b in zip(cpu[3], gpu[3]):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-6)


def _bad_proposal_calls():
    cls, reg = head_outputs(seed=0)
    pri = anchors()
    return [
        (lambda: head_proposals(cls, reg[:2], pri), ValueError, "same number of levels"),
        (lambda: head_proposals(cls, [r[:, :5] for r in reg], pri), ValueError, "bbox_preds"),
        (lambda: head_proposals([c[:, :10] for c in cls], reg, pri), ValueError, "cls_scores"),
        (lambda: head_proposals(cls, reg, [p[:-1] for p in pri]), ValueError, "priors"),
        (lambda: head_proposals(cls, reg, pri, "tblr"), ValueError, "decoder"),
        (lambda: head_proposals(cls, reg, pri, 3), TypeError, "decoder"),
        (lambda: head_proposals(cls, reg, pri, nms_pre=2.5), TypeError, "nms_pre"),
        (lambda: head_proposals(cls, reg, pri, iou_threshold=1.5), ValueError, "iou_threshold"),
        (lambda: head_proposals(cls, reg, pri, max_per_img=0), ValueError, "max_per_img"),
        (lambda: head_proposals(cls, reg, pri, min_bbox_size=math.nan), ValueError, "min_bbox_size"),
        (lambda: head_proposals(cls, reg, pri, img_shape=(64, 80, 3, 4, 5)), None, None),  # mmdet-style, fine
        (lambda: head_proposals(cls, reg, pri, img_shape=[(64, 80)] * 3), ValueError, "img_shape"),
        (lambda: head_proposals(cls, reg, pri, img_shape=(0, 80)), ValueError, "img_shape"),
        (lambda: head_proposals(cls, reg, pri, stds=(1.0, 1.0, 0.0, 1.0)), ValueError, "stds"),
        (lambda: head_proposals(cls, reg, [p.long() for p in pri]), TypeError, "priors"),
        (lambda: head_proposals(cls, reg, pri, lambda d, p: d[:, :2]), ValueError, "decoder"),
        (lambda: head_gt_sources([2, -1]), ValueError, "num_gts"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_proposal_calls())))
def test_proposal_arguments_are_checked(case):
    fn, exc, what = _bad_proposal_calls()[case]
    if exc is None:
        fn()
        return
    with pytest.raises(exc, match=what):
        fn()


def test_gt_sources_are_the_authors_sentinel_rows():
    rows = head_gt_sources([2, 0, 1])
    assert torch.equal(rows, torch.tensor([[-1, 0, -1, -1, 0], [-1, 0, -1, -1, 1], [-1, 2, -1, -1, 0]]))
    assert head_gt_sources([]).shape == (0, 5)


# =============================================================================== AKD

def akd_problem(R=7, cin=(5, 6), cout=(4, 3), seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(R, c, generator=g, dtype=F64).to(dtype) for c in cin]
    t = [torch.randn(R, c, generator=g, dtype=F64).to(dtype) for c in cout]
    return a, t


def akd_oracle(loss: HEADAKDLoss, a, t):
    """The released config: per layer weight * F.mse_loss(Linear(assistant), teacher), summed."""
    layers = [copy.deepcopy(m).double() for m in loss.adapters]
    a = [x.detach().double().requires_grad_(True) for x in a]
    value = sum(loss.loss_weight * F.mse_loss(m(x), y.double()) for m, x, y in zip(layers, a, t))
    params = [p for m in layers for p in m.parameters()]
    grads = torch.autograd.grad(value, a + params)
    return value.detach(), grads


@pytest.mark.parametrize("weight", [2.0, 5.0])
def test_akd_is_the_released_weighted_mse(weight):
    loss = HEADAKDLoss(in_channels=[5, 6], out_channels=[4, 3], loss_weight=weight).double()
    a, t = akd_problem()
    a = [x.requires_grad_(True) for x in a]
    value = loss(a, t)
    grads = torch.autograd.grad(value, a + list(loss.parameters()))
    want, want_grads = akd_oracle(loss, a, t)
    close(value, want, F64)
    for g, w in zip(grads, want_grads):
        close(g, w, F64)
    assert torch.autograd.gradcheck(lambda x0, x1: loss([x0, x1], t), tuple(a))


def test_akd_valid_rows_are_the_mse_over_those_rows_only():
    """The fixed-slot form (empty R-CNN slots masked): the released MSE over the valid rows, the
    other rows get zero gradients; no valid row gives an exact 0."""
    loss = HEADAKDLoss(in_channels=[5, 6], out_channels=[4, 3]).double()
    a, t = akd_problem(R=9)
    valid = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 0], dtype=torch.bool)
    a = [x.requires_grad_(True) for x in a]
    value = loss(a, t, valid)
    grads = torch.autograd.grad(value, a)
    want, want_grads = akd_oracle(loss, [x[valid] for x in a], [y[valid] for y in t])
    close(value, want, F64)
    for g, w in zip(grads, want_grads):
        close(g[valid], w, F64)
        assert (g[~valid] == 0).all()
    none = loss(a, t, torch.zeros(9, dtype=torch.bool))
    assert none.item() == 0.0
    with pytest.raises(ValueError, match="valid"):
        loss(a, t, valid[:4])


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_akd_low_precision_accumulates_in_float32(dtype):
    loss = HEADAKDLoss(in_channels=[5, 6], out_channels=[4, 3])
    a, t = akd_problem(dtype=dtype)
    value = loss(a, t)
    assert value.dtype == torch.float32
    close(value, akd_oracle(loss, a, t)[0], dtype, scale=4)


def test_akd_no_roi_is_an_exact_zero_with_zero_gradients():
    loss = HEADAKDLoss(in_channels=5, out_channels=4)
    a = [torch.empty(0, 5, requires_grad=True) for _ in range(2)]
    value = loss(a, [torch.empty(0, 4)] * 2)
    value.backward()
    assert value.item() == 0.0 and not math.isnan(value.item())
    assert all(p.grad is not None and not p.grad.any() for p in loss.parameters())
    assert all(x.grad is not None and x.grad.shape == (0, 5) for x in a)


# =============================================================================== CKD (MSE)

def ckd_oracle(loss: HEADCKDLoss, levels, sources, teacher):
    """CustomAdapt + Index + Linear / Decouple + weight * F.mse_loss, float64 copies."""
    layer = copy.deepcopy(loss.source.adapter).double()
    lv = [f.detach().double().requires_grad_(True) for f in levels]
    rows, kept = source_rows(lv, sources, layer, loss.source.num_anchors)
    value = loss.loss_weight * F.mse_loss(rows, teacher[kept].double())
    grads = torch.autograd.grad(value, lv + list(layer.parameters()))
    return value.detach(), grads


@pytest.mark.parametrize("num_anchors,bias", [(None, True), (NUM, False), (NUM, True)])
def test_ckd_is_the_authors_adapt_index_mse(num_anchors, bias):
    levels, sources, teacher, _ = make_batch(seed=3, R=12, n_gt=3)
    loss = HEADCKDLoss(C_S, C_T, num_anchors=num_anchors, bias=bias).double()
    lv = [f.clone().requires_grad_(True) for f in levels]
    value = loss(lv, sources, teacher, validate=True)
    grads = torch.autograd.grad(value, lv + list(loss.parameters()))
    want, want_grads = ckd_oracle(loss, levels, sources, teacher)
    close(value, want, F64)
    for g, w in zip(grads, want_grads):
        close(g, w, F64)
    assert torch.autograd.gradcheck(lambda a, b: loss([a, b], sources, teacher), tuple(lv))


def test_ckd_on_proposal_sources_with_gt_rows():
    """End to end: sources from head_proposals, GT rows prepended as the sampler does."""
    cls, reg = head_outputs(seed=19)
    out = head_proposals(cls, reg, anchors(), nms_pre=30, max_per_img=8)
    g = torch.Generator().manual_seed(2)
    maps = [torch.randn(2, 16, h, w, generator=g, dtype=F64) for h, w in SIZES]
    sources = torch.cat([head_gt_sources([2, 1]), *out.sources])
    teacher = torch.randn(sources.shape[0], 10, generator=g, dtype=F64)
    loss = HEADCKDLoss(16, 10, num_anchors=J).double()
    close(loss(maps, sources, teacher), ckd_oracle(loss, maps, sources, teacher)[0], F64)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_ckd_low_precision_accumulates_in_float32(dtype):
    levels, sources, teacher, _ = make_batch(seed=4, R=10)
    loss = HEADCKDLoss(C_S, C_T, num_anchors=NUM)
    value = loss([f.to(dtype) for f in levels], sources, teacher.to(dtype))
    assert value.dtype == torch.float32
    want = ckd_oracle(loss, [f.to(dtype) for f in levels], sources, teacher.to(dtype))[0]
    close(value, want, dtype, scale=4)


def test_ckd_without_kept_rows_is_an_exact_zero_with_zero_gradients():
    levels, _, _, _ = make_batch(seed=5, R=4)
    lv = [f.clone().requires_grad_(True) for f in levels]
    loss = HEADCKDLoss(C_S, C_T, num_anchors=NUM).double()
    for sources in (head_gt_sources([2, 2]), torch.empty(0, 5, dtype=torch.int64)):
        teacher = torch.full((sources.shape[0], C_T), math.nan, dtype=F64)  # never read for skipped rows
        value = loss(lv, sources, teacher)
        grads = torch.autograd.grad(value, lv + list(loss.parameters()))
        assert value.item() == 0.0
        assert all(g is not None and not g.any() for g in grads)


def test_ckd_out_of_range_rows_raise_with_validate_and_are_skipped_without():
    levels, sources, teacher, _ = make_batch(seed=6, R=9, n_gt=1)
    loss = HEADCKDLoss(C_S, C_T, num_anchors=NUM).double()
    bad = sources.clone()
    bad[4] = torch.tensor([1, 1, 3, 4, 0])  # outside level 1 (2x3), though inside level 0 (4x5)
    with pytest.raises(ValueError, match="row 4"):
        loss(levels, bad, teacher, validate=True)
    bad_j = sources.clone()
    bad_j[5, 4] = NUM
    with pytest.raises(ValueError, match="row 5"):
        loss(levels, bad_j, teacher, validate=True)
    keep = torch.ones(9, dtype=torch.bool)
    keep[4] = False
    close(loss(levels, bad, teacher), loss(levels, sources[keep], teacher[keep]), F64)


def _bad_ckd_calls():
    levels, sources, teacher, boxes = make_batch(seed=0, R=6)
    ckd = HEADCKDLoss(C_S, C_T)
    con = HEADContrastiveCKDLoss(C_S, C_T, num_anchors=NUM)
    akd = HEADAKDLoss(5, 4)
    a, t = akd_problem(R=3, cin=(5, 5), cout=(4, 4))
    return [
        (lambda: HEADCKDLoss(0, 4), ValueError, "in_channels"),
        (lambda: HEADCKDLoss(4, 4, loss_weight=-1.0), ValueError, "loss_weight"),
        (lambda: HEADCKDLoss(4, 4, num_anchors=0), ValueError, "num_anchors"),
        (lambda: HEADCKDLoss(4, 4, bias=1), TypeError, "bias"),
        (lambda: ckd(levels, sources.float(), teacher), TypeError, "sources"),
        (lambda: ckd(levels, sources[:, :4], teacher), ValueError, "sources"),
        (lambda: ckd(levels, sources, teacher[:-1]), ValueError, "teacher_feats"),
        (lambda: ckd(levels, sources, teacher[:, :-1]), ValueError, "teacher_feats"),
        (lambda: ckd([f[:, :2] for f in levels], sources, teacher), ValueError, "in_channels"),
        (lambda: ckd(levels, sources, teacher, validate=1), TypeError, "validate"),
        (lambda: HEADContrastiveCKDLoss(temperature=0.0), ValueError, "temperature"),
        (lambda: HEADContrastiveCKDLoss(pool_size=0), ValueError, "size"),
        (lambda: HEADContrastiveCKDLoss(pool_rows=2.0), TypeError, "rows"),
        (lambda: con(levels, sources, teacher, boxes[:, :3]), ValueError, "boxes"),
        (lambda: con(levels, sources, teacher, boxes[:-1]), ValueError, "boxes"),
        (lambda: HEADMemoryPool(2, rows=3).push(teacher), ValueError, "rows = 3"),
        (lambda: HEADMemoryPool().memory, RuntimeError, "empty"),
        (lambda: HEADMemoryPool().push(teacher, torch.ones(6)), TypeError, "valid"),
        (lambda: HEADAKDLoss(num_layers=0), ValueError, "num_layers"),
        (lambda: HEADAKDLoss(in_channels=[4, 4, 4]), ValueError, "in_channels"),
        (lambda: akd(a[0], t), TypeError, "assistant_feats"),
        (lambda: akd(a[:1], t), ValueError, "num_layers"),
        (lambda: akd(a, [x[:, :3] for x in t]), ValueError, "teacher_feats"),
        (lambda: akd([a[0], a[1][:2]], t), ValueError, "assistant_feats"),
        (lambda: HEADDenseLoss(4, 4)([torch.randn(1, 4, 2, 2)], [torch.randn(1, 4, 2, 3)]), ValueError,
         "teacher_feats"),
        (lambda: HEADDenseLoss(4, 4)([torch.randn(1, 3, 2, 2)], [torch.randn(1, 4, 2, 2)]), ValueError, "channels"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_ckd_calls())))
def test_loss_arguments_are_checked_before_any_work(case):
    fn, exc, what = _bad_ckd_calls()[case]
    with pytest.raises(exc, match=what):
        fn()


# =============================================================================== contrastive CKD

def run_steps(loss, steps, seed0=0, R=9, n_gt=2):
    """Runs `steps` forwards and checks each against the loop oracle (values and gradients)."""
    history = []
    for step in range(steps):
        batch = make_batch(seed0 + step, R + step, n_gt)
        levels, sources, teacher, boxes = batch
        lv = [f.clone().requires_grad_(True) for f in levels]
        value = loss(lv, sources, teacher, boxes)
        grads = torch.autograd.grad(value, lv)
        want, want_grads, kept_now = expected_step(loss, batch, [], history[:loss.pool.size - 1],
                                                   loss.temperature, loss.iou_threshold)
        close(value, torch.tensor(want, dtype=F64), F64)
        for g, w in zip(grads, want_grads):
            close(g, w, F64)
        history.insert(0, kept_now)
    return history


@pytest.mark.parametrize("num_anchors", [NUM, None])
def test_contrastive_matches_the_loop_over_a_small_pool(num_anchors):
    loss = HEADContrastiveCKDLoss(C_S, C_T, num_anchors=num_anchors, pool_size=2).double()
    history = run_steps(loss, 4)
    assert len(loss.pool) == 2
    stored = loss.pool.memory[loss.pool.valid]
    assert torch.allclose(stored, torch.cat([F.normalize(t, dim=1) for st in history[:2] for t in st]))


def test_contrastive_iou_exclusion_and_temperature_matter():
    """The oracle is sensitive to what the loss must get right (so the comparison can fail)."""
    # temperature 0.5: every negative weighs (at 0.07 one pair can weigh e^-20 of the sum)
    a = HEADContrastiveCKDLoss(C_S, C_T, num_anchors=NUM, pool_size=3, iou_threshold=0.5, temperature=0.5).double()
    b = copy.deepcopy(a)
    b.iou_threshold = 0.99  # nothing excluded but the positive (the near-duplicates have IoU < 0.99)
    c = copy.deepcopy(a)
    c.temperature = 0.2
    batch = make_batch(1, 12)
    kept = batch[1][:, 0] >= 0
    pairs = authors_ignore(batch[3][kept], batch[1][kept, 1])[0].numel()
    assert pairs > int(kept.sum()), "the problem must have same-image pairs with IoU > 0.5"
    va, vb, vc = (m(*batch) for m in (a, b, c))
    assert not torch.allclose(va, vb) and not torch.allclose(va, vc)
    for m, seed in ((b, 20), (c, 30)):  # and the other settings still match the oracle
        m.pool.reset()
        run_steps(m, 2, seed0=seed)


def test_contrastive_gradcheck():
    loss = HEADContrastiveCKDLoss(C_S, C_T, num_anchors=NUM, pool_size=3).double()
    for step in range(2):  # something in the pool from earlier batches
        loss(*make_batch(40 + step, 8))
    levels, sources, teacher, boxes = make_batch(50, 8)
    lv = tuple(f.clone().requires_grad_(True) for f in levels)
    # every call pushes into the pool: evaluate a fresh copy of the same state each time
    assert torch.autograd.gradcheck(lambda x, y: copy.deepcopy(loss)([x, y], sources, teacher, boxes), lv)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_contrastive_low_precision_accumulates_in_float32(dtype):
    loss = HEADContrastiveCKDLoss(C_S, C_T, num_anchors=NUM, pool_size=2)
    ref = copy.deepcopy(loss).double()  # the oracle's adapter: the same weights in float64
    history = []
    for step in range(2):
        levels, sources, teacher, boxes = make_batch(60 + step, 10)
        low = ([f.to(dtype) for f in levels], sources, teacher.to(dtype), boxes.to(dtype))
        value = loss(*low)
        batch64 = ([f.double() for f in low[0]], sources, low[2].double(), low[3].double())
        want, _, kept_now = expected_step(ref, batch64, [], history[:1], ref.temperature, ref.iou_threshold)
        history.insert(0, kept_now)
        assert value.dtype == torch.float32 and loss.pool.memory.dtype == torch.float32
        close(value, torch.tensor(want, dtype=F64), dtype, scale=10)


def test_contrastive_edge_cases_are_exact_zeros():
    levels, sources, teacher, boxes = make_batch(70, 6)
    lv = [f.clone().requires_grad_(True) for f in levels]
    loss = HEADContrastiveCKDLoss(C_S, C_T, num_anchors=NUM).double()
    # only GT rows: nothing kept, and nothing stored as a negative
    gt = head_gt_sources([3, 3])
    value = loss(lv, gt, teacher, boxes)
    grads = torch.autograd.grad(value, lv + list(loss.parameters()))
    assert value.item() == 0.0 and all(not g.any() for g in grads)
    assert not loss.pool.valid.any()
    # one kept row and no negative anywhere: left out of the mean (the authors' code gives -inf)
    one = gt.clone()
    one[0] = sources[2]
    value = loss(lv, one, teacher, boxes)
    assert value.item() == 0.0
    # the next batch (other teacher rows) has that row as a negative from the pool
    value = loss(lv, one, teacher.flip(0), boxes)
    assert math.isfinite(value.item()) and value.item() != 0.0


def test_memory_pool_fixed_rows_in_one_process():
    pool = HEADMemoryPool(size=2, rows=5)
    x = torch.randn(3, 4)
    pool.push(x, torch.tensor([True, False, True]))
    assert pool.memory.shape == (5, 4) and pool.valid.tolist() == [True, False, True, False, False]
    assert torch.equal(pool.memory[:3], x)
    pool.push(torch.randn(5, 4))
    pool.push(torch.randn(4, 4))
    assert len(pool) == 2 and pool.memory.shape == (10, 4) and int(pool.valid.sum()) == 9
    with pytest.raises(ValueError, match="channels"):
        pool.push(torch.randn(2, 3))
    pool.reset()
    assert len(pool) == 0


def test_contrastive_pads_its_pieces_to_pool_rows():
    a = HEADContrastiveCKDLoss(C_S, C_T, num_anchors=NUM, pool_size=2, pool_rows=20).double()
    b = copy.deepcopy(a)
    b.pool = HEADMemoryPool(2)
    for step in range(3):
        batch = make_batch(80 + step, 9 + step)
        close(a(*batch), b(*batch), F64)
    assert a.pool.memory.shape[0] == 40


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_contrastive_pool_under_ddp_holds_both_ranks():
    """2 CPU processes (gloo): each rank's pool holds both ranks' teacher rows (its own first) of the
    last pool_size steps, with different row counts per rank (padded pieces, negotiated and fixed),
    and each rank's loss and gradients equal the loop oracle on the concatenated data."""
    import torch.multiprocessing as mp

    import ddp_head_probe

    with tempfile.TemporaryDirectory() as d:
        result = os.path.join(d, "result")
        mp.spawn(ddp_head_probe._worker, args=(os.path.join(d, "init"), result, kdops.HAS_C), nprocs=2, join=True)
        with open(result) as f:
            assert f.read() == "ok"


# =============================================================================== dense (one-stage)

def test_dense_is_the_shared_conv_and_per_level_mse():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 5, h, w, generator=g, dtype=F64, requires_grad=True) for h, w in [(6, 7), (3, 4), (0, 2)]]
    t = [torch.randn(2, 3, h, w, generator=g, dtype=F64) for h, w in [(6, 7), (3, 4), (0, 2)]]
    loss = HEADDenseLoss(5, 3, loss_weight=1.5).double()
    value = loss(s, t)
    grads = torch.autograd.grad(value, s + list(loss.parameters()))
    conv = copy.deepcopy(loss.adapter)
    s2 = [x.detach().clone().requires_grad_(True) for x in s]
    want = sum(1.5 * F.mse_loss(conv(x), y) for x, y in zip(s2[:2], t[:2]))  # the empty level adds 0
    want_grads = torch.autograd.grad(want, s2[:2] + list(conv.parameters()))
    close(value, want, F64)
    for a, b in zip(grads[:2] + grads[3:], want_grads):
        close(a, b, F64)
    assert grads[2].shape == s[2].shape
    assert torch.autograd.gradcheck(lambda *x: loss(list(x), t[:2]), tuple(s2[:2]))


# =============================================================================== no host sync

@pytest.mark.skipif(not kdops.HAS_C, reason="the eager fallback of gather_level_features reads the rows")
def test_losses_read_no_device_value():
    """AKD, CKD, contrastive CKD and dense forward + backward on meta tensors: no `.item()`,
    `bool()` or `.tolist()` of a device value anywhere (on a GPU they never wait for it)."""
    def r(*shape, grad=True):
        return torch.empty(*shape, device="meta").requires_grad_(grad)

    levels = [r(2, C_S, 4, 5), r(2, C_S, 2, 3)]
    sources = torch.zeros(7, 5, dtype=torch.int64, device="meta")
    teacher, boxes = r(7, C_T, grad=False), r(7, 4, grad=False)
    outs = [
        HEADAKDLoss(5, 4).to("meta")([r(7, 5), r(7, 5)], [r(7, 4, grad=False)] * 2),
        HEADCKDLoss(C_S, C_T, num_anchors=NUM).to("meta")(levels, sources, teacher),
        HEADContrastiveCKDLoss(C_S, C_T, num_anchors=NUM).to("meta")(levels, sources, teacher, boxes),
        HEADDenseLoss(C_S, 3).to("meta")(levels, [r(2, 3, 4, 5, grad=False), r(2, 3, 2, 3, grad=False)]),
    ]
    for out in outs:
        assert out.device.type == "meta" and out.shape == ()
        out.backward()
