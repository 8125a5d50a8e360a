"""Oracles of HEAD's contrastive CKD (shared by test_head.py) and the 2-process DDP probe.

The oracles are eager transcriptions of the authors' code path (github.com/LutingWang/HEAD
``head/adapts.py`` ``CustomAdapt``; github.com/LutingWang/todd at 532ddbc: ``ListTensor.index``,
``Decouple``, ``MemoryPool``, ``ckd_loss``), written as plain Python loops over rows.
"""
from __future__ import annotations

import math
import os
import sys

import torch

import kdops
from kdops.losses import HEADContrastiveCKDLoss

F64 = torch.float64


# --------------------------------------------------------------- the authors' adapts, transcribed

def custom_adapt(feat, bbox_ids):
    """CustomAdapt: keep rows whose level (column 1 of [bs, level, h, w, id]) is >= 0; positions
    reordered to [level, bs, h, w]; returns (feat, pos, id_, kept boolean mask)."""
    valid_idx = bbox_ids[:, 1] >= 0
    feat = feat[valid_idx]
    pos = bbox_ids[valid_idx]
    bs, level, h, w, id_ = pos.split(1, 1)
    return feat, torch.cat((level, bs, h, w), dim=-1), id_.reshape(-1), valid_idx


def list_index(levels_bhwc, pos):
    """todd ListTensor.index on a list of (bs, h, w, dim) maps: one pass per level with a
    boolean mask, rows put back in their original order."""
    indices, feats = [], []
    for i, f in enumerate(levels_bhwc):
        index = pos[:, 0] == i
        if not index.any():
            continue
        (index,) = torch.where(index)
        p = pos[index, 1:].long()
        feats.append(f[p.split(1, 1)].squeeze(1))
        indices.append(index)
    if not feats:
        return levels_bhwc[0].new_zeros((0, levels_bhwc[0].shape[-1]))
    out = torch.cat(feats)
    index = torch.cat(indices)
    out[index] = out.clone()
    return out


def rearranged(levels):
    """todd Rearrange 'bs dim h w -> bs h w dim'."""
    return [f.permute(0, 2, 3, 1) for f in levels]


def decouple(layer, feat, id_, num):
    """todd Decouple: Linear(in, out * num), rearranged 'n (num dim) -> n num dim', row n takes id_[n]."""
    out = layer(feat)
    out = out.reshape(out.shape[0], num, -1)
    return out[torch.arange(id_.shape[0]), id_.long()]


def source_rows(levels, sources, layer, num):
    """The authors' student side: bbox_ids are [bs, level, h, w, id]; sources are [level, bs, y, x, j]."""
    bbox_ids = sources[:, [1, 0, 2, 3, 4]]
    _, pos, id_, kept = custom_adapt(torch.zeros(sources.shape[0], 1, dtype=F64), bbox_ids)
    rows = list_index(rearranged(levels), pos)
    rows = layer(rows) if num is None else decouple(layer, rows, id_, num)
    return rows, kept


# --------------------------------------------------------------- the contrastive loss as a loop

def todd_iou(a, b):
    """todd.utils.iou (532ddbc) for one pair: a plain division (0.2.3a4 clamps the union at 1e-6,
    the same for the boxes here)."""
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def normalize_rows(x):
    out = []
    for v in x.tolist():
        norm = max(math.sqrt(sum(e * e for e in v)), 1e-12)
        out.append([e / norm for e in v])
    return out


def loop_ckd(preds, now, history, boxes, batch, temperature=0.07, iou_threshold=0.5):
    """Mean over own rows n of -log(exp(t_n.p_n/T) / sum_m exp(t_m.p_n/T)), the sum over every
    memory row m except this batch's own rows k with k == n or (same image and IoU > threshold).

    preds (n,C) adapted student rows (kept rows only), ``now`` this step's kept teacher rows of
    every rank (a list, this rank's first), ``history`` the previous steps' lists (newest first),
    boxes (n,4), batch (n,) of this rank's kept rows. Plain Python floats, row by row."""
    p = normalize_rows(preds.detach())
    own = normalize_rows(now[0])
    others = [row for piece in now[1:] for row in normalize_rows(piece)]
    old = [row for step in history for piece in step for row in normalize_rows(piece)]
    bx, bt = boxes.tolist(), batch.tolist()
    total_loss = 0.0
    for n, pn in enumerate(p):
        def s(t):
            return sum(a * b for a, b in zip(t, pn)) / temperature

        denominator = 0.0
        for k, t in enumerate(own):
            if k == n or (bt[k] == bt[n] and todd_iou(bx[k], bx[n]) > iou_threshold):
                continue
            denominator += math.exp(s(t))
        for t in others + old:
            denominator += math.exp(s(t))
        total_loss += -math.log(math.exp(s(own[n])) / denominator)
    return total_loss / len(p)


def ckd_loss_authors(pred, target, ignore, gamma=0.07):
    """todd ckd_loss (vectorised, autograd): -log(diag / column sums with `ignore` zeroed).mean()."""
    similarity = (target.mm(pred.t()) / gamma).exp()
    pos = torch.diag(similarity)
    similarity = similarity.index_put(ignore, similarity.new_zeros(()))
    return -(pos / similarity.sum(0)).log().mean()


def authors_ignore(boxes, batch, thr=0.5):
    """The (x, y) pairs CKDLoss ignores: per image, IoU > thr (rows ordered by image)."""
    xs, ys = [], []
    for i in range(len(boxes)):
        for j in range(len(boxes)):
            if batch[i] == batch[j] and todd_iou(boxes[i].tolist(), boxes[j].tolist()) > thr:
                xs.append(i)
                ys.append(j)
    return torch.tensor(xs, dtype=torch.int64), torch.tensor(ys, dtype=torch.int64)


# --------------------------------------------------------------- problems

C_S, C_T, NUM = 4, 6, 3
SIZES = [(4, 5), (2, 3)]
N_IMG = 2


def make_batch(seed, R, n_gt=2):
    """Student maps, sources (with n_gt GT rows of level -1), teacher rows, boxes; float64."""
    g = torch.Generator().manual_seed(seed)
    levels = [torch.randn(N_IMG, C_S, h, w, generator=g, dtype=F64) for h, w in SIZES]
    lvl = torch.randint(0, len(SIZES), (R,), generator=g)
    hs = torch.tensor([h for h, _ in SIZES])[lvl]
    ws = torch.tensor([w for _, w in SIZES])[lvl]
    b = torch.randint(0, N_IMG, (R,), generator=g)
    y = (torch.rand(R, generator=g, dtype=F64) * hs).long()
    x = (torch.rand(R, generator=g, dtype=F64) * ws).long()
    j = torch.randint(0, NUM, (R,), generator=g)
    sources = torch.stack([lvl, b, y, x, j], 1)
    gt = torch.arange(n_gt)
    sources[gt] = torch.stack([torch.full_like(gt, -1), gt % N_IMG, -torch.ones_like(gt), -torch.ones_like(gt), gt], 1)
    order = torch.sort(sources[:, 1], stable=True)[1]  # rows by image, as the authors' sampler gives them
    sources = sources[order]
    teacher = torch.randn(R, C_T, generator=g, dtype=F64)
    # boxes: a few near-duplicates so that same-image IoU > 0.5 pairs exist
    c = torch.rand(R, 2, generator=g, dtype=F64) * 40
    c[1::3] = c[0::3][: len(c[1::3])] + 1.0
    wh = torch.rand(R, 2, generator=g, dtype=F64) * 10 + 10
    boxes = torch.cat([c - wh / 2, c + wh / 2], 1)
    return levels, sources, teacher, boxes


def expected_step(loss, batch_now, batches_now_others, history, temperature, iou_threshold):
    """(expected loss, expected grads of the student levels) from the transcribed adapts + loop_ckd,
    with an autograd copy of the adapter for the gradient (the loop value is checked against it)."""
    levels, sources, teacher, boxes = batch_now
    lv = [f.detach().clone().requires_grad_(True) for f in levels]
    rows, kept = source_rows(lv, sources, loss.source.adapter, loss.source.num_anchors)
    kept_now = [teacher[kept]] + [t[s[:, 0] >= 0] for _, s, t, _ in batches_now_others]
    value = loop_ckd(rows, kept_now, history, boxes[kept], sources[kept, 1], temperature, iou_threshold)
    # the same value with autograd, for the gradient: the authors' vectorised ckd_loss
    mem = torch.cat([torch.nn.functional.normalize(t, dim=1) for t in kept_now]
                    + [torch.nn.functional.normalize(t, dim=1) for step in history for t in step])
    ignore = authors_ignore(boxes[kept], sources[kept, 1], iou_threshold)
    vec = ckd_loss_authors(torch.nn.functional.normalize(rows, dim=1), mem, ignore, temperature)
    assert abs(vec.item() - value) <= 1e-9 * max(1.0, abs(value)), (vec.item(), value)
    grads = torch.autograd.grad(vec * loss.loss_weight, lv)
    return value * loss.loss_weight, grads, [t for t in kept_now]


# --------------------------------------------------------------- the DDP probe

WORLD = 2


def rank_rows(rank, step):
    return 6 + 2 * rank + step


def _check(rank, pool_rows):
    torch.manual_seed(0)  # the same adapter on both ranks
    loss = HEADContrastiveCKDLoss(C_S, C_T, num_anchors=NUM, pool_size=2, pool_rows=pool_rows).double()
    history = []
    for step in range(3):
        data = [make_batch(1000 * step + r, rank_rows(r, step)) for r in range(WORLD)]
        mine = data[rank]
        lv = [f.clone().requires_grad_(True) for f in mine[0]]
        out = loss(lv, mine[1], mine[2], mine[3])
        grads = torch.autograd.grad(out, lv)
        others = [d for r, d in enumerate(data) if r != rank]
        want, want_grads, kept_now = expected_step(loss, mine, others, history[:1], loss.temperature,
                                                   loss.iou_threshold)
        assert abs(out.item() - want) <= 1e-9 * max(1.0, abs(want)), (rank, step, out.item(), want)
        for a, b in zip(grads, want_grads):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), (rank, step, (a - b).abs().max().item())
        # the pool holds both ranks' rows of the last two steps (pool_size 2), this rank's first
        history = [kept_now] + history
        stored = loss.pool.memory[loss.pool.valid]
        flat = torch.cat([torch.nn.functional.normalize(t, dim=1) for st in history[:2] for t in st])
        assert stored.shape == flat.shape and torch.allclose(stored, flat, rtol=0, atol=1e-12), (rank, step)
        pieces = [pool_rows or max(rank_rows(r, s) for r in range(WORLD)) for s in range(step, max(step - 2, -1), -1)]
        assert loss.pool.memory.shape[0] == WORLD * sum(pieces), (loss.pool.memory.shape, pieces)
        assert int(loss.pool.valid[:pieces[0]].sum()) == int((mine[1][:, 0] >= 0).sum())
    return True


def _worker(rank, init_file, result_file, has_c):
    import datetime
    import faulthandler

    import torch.distributed as dist

    faulthandler.enable()
    torch.set_num_threads(1)
    assert kdops.HAS_C == has_c
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        _check(rank, None)  # pieces padded to the largest rank's rows (negotiated)
        _check(rank, 16)  # fixed-size pieces
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(result_file, "w") as f:
            f.write("ok")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip gloo's teardown at interpreter exit (see tests/test_ddp.py)
