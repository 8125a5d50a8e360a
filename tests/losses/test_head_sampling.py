"""kdops.losses.head_sample_rois: MaxIoUAssigner + RandomSampler in fixed shapes (HEAD's assistant RoIs).

The oracle is an eager per-image transcription of mmdet's ``MaxIoUAssigner.assign_wrt_overlaps`` and
``RandomSampler.sample`` (nonzero, boolean masks, Python loops); the mmdet peer itself is checked in
tests/integrations/mmdet/test_head_sampling_mmdet.py."""
from __future__ import annotations

import pytest
import torch

from kdops.losses import HEADRoISamples, head_box_iou, head_pad_gt, head_sample_rois

F32 = torch.float32
C = 5


def _boxes(g, n, scale=64.0):
    xy = torch.rand(n, 2, generator=g) * scale
    wh = torch.rand(n, 2, generator=g) * scale / 2 + 2
    return torch.cat([xy, xy + wh], 1)


def _problem(seed=0, P=(40, 25, 0), G=(3, 0, 2)):
    """Proposals near the GT boxes (so some IoUs exceed 0.5) and elsewhere, padded per image."""
    g = torch.Generator().manual_seed(seed)
    gts = [_boxes(g, k) for k in G]
    labels = [torch.randint(0, C, (k,), generator=g) for k in G]
    props = []
    for p, gt in zip(P, gts):
        near = gt[torch.randint(0, max(len(gt), 1), (p // 2,), generator=g)] if len(gt) else _boxes(g, p // 2)
        near = near + torch.randn(near.shape, generator=g) * 3
        props.append(torch.cat([near, _boxes(g, p - p // 2)]))
    N, Pm = len(P), max(P)
    boxes = torch.zeros(N, Pm, 4)
    valid = torch.zeros(N, Pm, dtype=torch.bool)
    sources = torch.full((N, Pm, 5), -7, dtype=torch.int64)
    for n, b in enumerate(props):
        boxes[n, :len(b)] = b
        boxes[n, len(b):] = 5.0  # padding boxes overlapping nothing in particular
        valid[n, :len(b)] = True
        sources[n, :len(b)] = torch.stack([torch.randint(0, 4, (len(b),), generator=g), torch.full((len(b),), n),
                                           torch.arange(len(b)), torch.arange(len(b)) % 7, torch.zeros(len(b),
                                                                                                   dtype=torch.int64)],
                                          1)
    return props, gts, labels, boxes, valid, sources


def _eager(prop, gt, lab, src, n, *, num, pos_fraction, pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
           match_low_quality=False):
    """mmdet's assigner and sampler for one image when nothing has to be drawn at random."""
    P, G = len(prop), len(gt)
    assigned = torch.full((P,), -1, dtype=torch.int64)
    if G == 0:
        assigned[:] = 0
    elif P:
        ov = head_box_iou(gt, prop)
        best, arg = ov.max(0)
        lo, hi = neg_iou_thr if isinstance(neg_iou_thr, tuple) else (0.0, neg_iou_thr)
        assigned[(best >= lo) & (best < hi)] = 0
        pos = best >= pos_iou_thr
        assigned[pos] = arg[pos] + 1
        if match_low_quality:
            gt_best = ov.max(1).values
            for i in range(G):
                if gt_best[i] >= min_pos_iou:
                    assigned[ov[i] == gt_best[i]] = i + 1
    cand = torch.cat([gt, prop])
    cand_gt = torch.cat([torch.arange(1, G + 1), assigned])
    cand_src = torch.cat([torch.tensor([[-1, n, -1, -1, i] for i in range(G)], dtype=torch.int64).reshape(-1, 5), src])
    pos_inds = torch.nonzero(cand_gt > 0).squeeze(1)
    assert pos_inds.numel() <= int(num * pos_fraction)
    neg_inds = torch.nonzero(cand_gt == 0).squeeze(1)
    assert neg_inds.numel() <= num - pos_inds.numel()
    idx = torch.cat([pos_inds, neg_inds])
    labels = torch.cat([lab[cand_gt[pos_inds] - 1], torch.full((len(neg_inds),), C)])
    gtb = torch.cat([gt[cand_gt[pos_inds] - 1], cand[neg_inds]])
    return cand[idx], cand_src[idx], labels, gtb, pos_inds


@pytest.mark.parametrize("kw", [dict(), dict(neg_iou_thr=(0.1, 0.5)), dict(pos_iou_thr=0.4, neg_iou_thr=0.3),
                                dict(match_low_quality=True, min_pos_iou=0.3)])
def test_everything_fits_is_mmdets_assignment_and_sampling_result(kw):
    props, gts, labels, boxes, valid, sources = _problem()
    gt_b, gt_l, gt_v = head_pad_gt(gts, labels)
    out = head_sample_rois(boxes, valid, sources, gt_b, gt_l, gt_v, num_classes=C, num=200, pos_fraction=0.5, **kw)
    assert isinstance(out, HEADRoISamples)
    N, S = len(props), min(200, boxes.shape[1] + gt_b.shape[1])
    assert out.rois.shape == (N * S, 5) and out.valid.shape == (N * S,)
    n_pos_total = 0
    for n in range(N):
        rows = slice(n * S, (n + 1) * S)
        want_b, want_s, want_l, want_g, pos_inds = _eager(props[n], gts[n], labels[n], sources[n, :len(props[n])], n,
                                                       num=200, pos_fraction=0.5, **kw)
        k, n_pos = len(want_b), len(pos_inds)
        v = out.valid[rows]
        assert v[:k].all() and not v[k:].any()
        assert torch.equal(out.rois[rows][:k, 1:], want_b) and (out.rois[rows][:, 0] == n).all()
        assert torch.equal(out.sources[rows][:k], want_s)
        assert (out.sources[rows][k:] == torch.tensor([-1, n, -1, -1, -1])).all()
        assert torch.equal(out.labels[rows][:k], want_l) and (out.labels[rows][k:] == C).all()
        assert torch.equal(out.gt_boxes[rows][:k], want_g)
        assert out.pos[rows][:n_pos].all() and not out.pos[rows][n_pos:].any()
        n_pos_total += n_pos
    assert n_pos_total > len(sum(([0] * len(g) for g in gts), []))  # some proposals matched, not only the GT


def test_sampling_draws_the_counts_and_uniform_subsets_of_the_random_sampler():
    """num 32, a quarter positive: 8 positives and 24 negatives, each positive candidate drawn with
    probability 8 / #positives (mmdet's randperm choice has this law)."""
    props, gts, labels, boxes, valid, sources = _problem(seed=3, P=(120,), G=(4,))
    gt_b, gt_l, gt_v = head_pad_gt(gts, labels)
    pos_inds = _eager(props[0], gts[0], labels[0], sources[0], 0, num=4096, pos_fraction=0.5)[-1]
    assert len(pos_inds) > 8
    gen = torch.Generator().manual_seed(0)
    hits = torch.zeros(4 + 120)
    trials = 300
    for _ in range(trials):
        out = head_sample_rois(boxes, valid, sources, gt_b, gt_l, gt_v, num_classes=C, num=32, pos_fraction=0.25,
                               generator=gen)
        assert int(out.pos.sum()) == 8 and out.pos[:8].all() and out.valid.all()
        s = out.sources  # the candidate index: g for a GT row, 4 + the proposal's y (its index in _problem)
        idx = torch.where(s[:, 0] < 0, s[:, 4], 4 + s[:, 2])
        assert idx.unique().numel() == 32
        hits[idx[:8]] += 1
    p = 8 / len(pos_inds)
    others = torch.ones(4 + 120, dtype=torch.bool)
    others[pos_inds] = False
    assert hits[others].sum() == 0
    torch.testing.assert_close(hits[pos_inds] / trials, torch.full((len(pos_inds),), p), rtol=0,
                               atol=5 * (p * (1 - p) / trials) ** 0.5)


def test_neg_pos_ub_caps_the_negatives():
    props, gts, labels, boxes, valid, sources = _problem(seed=5, P=(60,), G=(2,))
    gt_b, gt_l, gt_v = head_pad_gt(gts, labels)
    out = head_sample_rois(boxes, valid, sources, gt_b, gt_l, gt_v, num_classes=C, num=64, pos_fraction=0.25,
                           neg_pos_ub=1.5)
    n_pos = int(out.pos.sum())
    assert 0 < n_pos <= 16 and int((out.valid & ~out.pos).sum()) == min(int(1.5 * n_pos), 64 - n_pos)


def test_no_gt_no_proposals_and_no_image():
    props, gts, labels, boxes, valid, sources = _problem(P=(10, 0), G=(0, 0))
    gt_b, gt_l, gt_v = head_pad_gt(gts, labels)
    assert gt_b.shape == (2, 0, 4)
    out = head_sample_rois(boxes, valid, sources, gt_b, gt_l, gt_v, num_classes=C, num=8)
    assert out.rois.shape == (16, 5)
    assert out.valid[:8].all() and not out.valid[8:].any() and not out.pos.any() and (out.labels == C).all()
    empty = head_sample_rois(boxes[:, :0], valid[:, :0], sources[:, :0], gt_b, gt_l, gt_v, num_classes=C)
    assert empty.rois.shape == (0, 5) and empty.valid.shape == (0,)
    none = head_sample_rois(boxes[:0], valid[:0], sources[:0], gt_b[:0], gt_l[:0], gt_v[:0], num_classes=C)
    assert none.rois.shape == (0, 5)


def test_padded_gt_and_padded_proposals_never_match():
    """A padding proposal lying exactly on a GT box must not count (nor raise the GT's best IoU)."""
    gt = torch.tensor([[[10.0, 10.0, 30.0, 30.0]]])
    boxes = torch.tensor([[[11.0, 11.0, 29.0, 31.0], [10.0, 10.0, 30.0, 30.0]]])
    valid = torch.tensor([[True, False]])
    sources = torch.zeros(1, 2, 5, dtype=torch.int64)
    out = head_sample_rois(boxes, valid, sources, gt, torch.tensor([[2]]), torch.tensor([[True]]), num_classes=C,
                           num=8, match_low_quality=True, min_pos_iou=0.3)
    assert out.valid.tolist() == [True, True, False] and out.pos.tolist() == [True, True, False]
    assert out.labels.tolist() == [2, 2, C]


def test_runs_on_meta_tensors_without_reading_the_device():
    N, P, G = 2, 300, 7
    out = head_sample_rois(torch.empty(N, P, 4, device="meta"), torch.empty(N, P, dtype=torch.bool, device="meta"),
                           torch.empty(N, P, 5, dtype=torch.int64, device="meta"),
                           torch.empty(N, G, 4, device="meta"), torch.empty(N, G, dtype=torch.int64, device="meta"),
                           torch.empty(N, G, dtype=torch.bool, device="meta"), num_classes=C, num=128,
                           neg_pos_ub=3.0, match_low_quality=True)
    assert out.rois.shape == (N * 128, 5) and out.rois.device.type == "meta"
    gt_b, gt_l, gt_v = head_pad_gt([torch.empty(3, 4, device="meta"), torch.empty(0, 4, device="meta")],
                                   [torch.empty(3, dtype=torch.int64, device="meta"),
                                    torch.empty(0, dtype=torch.int64, device="meta")])
    assert gt_b.shape == (2, 3, 4) and gt_v.device.type == "meta"


def test_iou_is_mmdets_formula_with_its_epsilon():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 5.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [5.0, 5.0, 5.0, 5.0], [20.0, 20.0, 30.0, 30.0]])
    want = torch.tensor([[50 / 150, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(head_box_iou(a, b), want)


def _bad():
    props, gts, labels, boxes, valid, sources = _problem()
    gt_b, gt_l, gt_v = head_pad_gt(gts, labels)
    call = dict(num_classes=C)
    return [
        (lambda: head_sample_rois(boxes[0], valid, sources, gt_b, gt_l, gt_v, **call), ValueError, "boxes"),
        (lambda: head_sample_rois(boxes, valid.float(), sources, gt_b, gt_l, gt_v, **call), TypeError, "valid"),
        (lambda: head_sample_rois(boxes, valid, sources.int(), gt_b, gt_l, gt_v, **call), TypeError, "sources"),
        (lambda: head_sample_rois(boxes, valid, sources, gt_b.double(), gt_l, gt_v, **call), (TypeError, ValueError),
         "gt_boxes"),
        (lambda: head_sample_rois(boxes, valid, sources, gt_b, gt_l[:, :1], gt_v, **call), ValueError, "gt_labels"),
        (lambda: head_sample_rois(boxes, valid, sources, gt_b, gt_l, gt_v, num_classes=0), ValueError,
         "num_classes"),
        (lambda: head_sample_rois(boxes, valid, sources, gt_b, gt_l, gt_v, num=0, **call), ValueError, "num"),
        (lambda: head_sample_rois(boxes, valid, sources, gt_b, gt_l, gt_v, pos_fraction=1.5, **call), ValueError,
         "pos_fraction"),
        (lambda: head_sample_rois(boxes, valid, sources, gt_b, gt_l, gt_v, neg_iou_thr=(0.5, 0.1), **call),
         ValueError, "neg_iou_thr"),
        (lambda: head_sample_rois(boxes, valid, sources, gt_b, gt_l, gt_v, generator=3, **call), TypeError,
         "generator"),
        (lambda: head_pad_gt(gts, labels[:1]), TypeError, "labels"),
        (lambda: head_pad_gt([g.double() if i else g for i, g in enumerate(gts)], labels), (TypeError, ValueError),
         "boxes"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_bad_arguments_name_the_argument(case):
    fn, exc, match = _bad()[case]
    with pytest.raises(exc, match=match):
        fn()


def _l1(pred, target, avg_factor):
    return (pred - target).abs().sum() / (avg_factor + torch.finfo(torch.float32).eps)


def _ce(score, labels, weight, avg_factor):
    loss = torch.nn.functional.cross_entropy(score, labels, reduction="none") * weight
    return loss.sum() / (avg_factor + torch.finfo(torch.float32).eps)


def _encode(rois, gt):  # DeltaXYWH with stds (0.1, 0.1, 0.2, 0.2), as Faster R-CNN's R-CNN head
    pw, ph = rois[:, 2] - rois[:, 0], rois[:, 3] - rois[:, 1]
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    d = torch.stack([((gt[:, 0] + gt[:, 2]) - (rois[:, 0] + rois[:, 2])) / 2 / pw,
                     ((gt[:, 1] + gt[:, 3]) - (rois[:, 1] + rois[:, 3])) / 2 / ph,
                     torch.log(gw / pw), torch.log(gh / ph)], 1)
    return d / torch.tensor([0.1, 0.1, 0.2, 0.2])


@pytest.mark.parametrize("agnostic", [False, True])
def test_rcnn_loss_is_mmdets_bbox_head_loss_on_the_sampled_rows(agnostic):
    """mmdet's BBoxHead.loss on the sampled rows only (CE over them / n, the positives' class-specific
    deltas' L1 / n, n = #sampled; top-1 accuracy in percent), from the fixed slots with empty ones."""
    from kdops.losses import head_rcnn_loss

    props, gts, labels, boxes, valid, sources = _problem(seed=2, P=(30, 12), G=(3, 1))
    gt_b, gt_l, gt_v = head_pad_gt(gts, labels)
    s = head_sample_rois(boxes, valid, sources, gt_b, gt_l, gt_v, num_classes=C, num=64)
    R = s.valid.shape[0]
    g = torch.Generator().manual_seed(0)
    score = torch.randn(R, C + 1, generator=g, dtype=torch.float64, requires_grad=True)
    deltas = torch.randn(R, 4 if agnostic else 4 * C, generator=g, dtype=torch.float64, requires_grad=True)
    out = head_rcnn_loss(score, deltas, s, loss_cls=_ce, loss_bbox=_l1, encode=_encode, class_agnostic=agnostic)
    v, p = s.valid, s.pos
    n = int(v.sum())
    assert 0 < int(p.sum()) < n < R  # positives, negatives and empty slots
    want_cls = torch.nn.functional.cross_entropy(score[v], s.labels[v], reduction="sum") / n
    sel = deltas[p] if agnostic else deltas[p].view(-1, C, 4)[torch.arange(int(p.sum())), s.labels[p]]
    want_box = (sel - _encode(s.rois[p, 1:], s.gt_boxes[p]).double()).abs().sum() / n
    want_acc = (score[v].argmax(1) == s.labels[v]).double().mean() * 100
    torch.testing.assert_close(out["loss_cls"], want_cls)
    torch.testing.assert_close(out["loss_bbox"], want_box)
    torch.testing.assert_close(out["acc"], want_acc)
    got = torch.autograd.grad(out["loss_cls"] + out["loss_bbox"], [score, deltas])
    want = torch.autograd.grad(want_cls + want_box, [score, deltas])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="bbox_pred"):
        head_rcnn_loss(score, deltas[:, :3], s, loss_cls=_ce, loss_bbox=_l1, encode=_encode, class_agnostic=agnostic)
    with pytest.raises(TypeError, match="encode"):
        head_rcnn_loss(score, deltas, s, loss_cls=_ce, loss_bbox=_l1, encode=None, class_agnostic=agnostic)
