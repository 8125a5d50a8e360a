"""kdops.losses.BCKDLoss against the authors' LDHead computation, written out per level."""
import torch
import torch.nn.functional as F
from helpers import close, leaf

from kdops.losses.bckd import BCKDLoss

F64 = torch.float64
EPS = torch.finfo(torch.float32).eps


def giou(b1, b2, eps=1e-6):
    """Aligned GIoU of (A,4) xyxy boxes from its definition, with mmdet's bbox_overlaps eps floor on the
    union and the enclosing area: IoU - (enclose - union) / enclose."""
    area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
    iw = (torch.minimum(b1[:, 2], b2[:, 2]) - torch.maximum(b1[:, 0], b2[:, 0])).clamp(min=0)
    ih = (torch.minimum(b1[:, 3], b2[:, 3]) - torch.maximum(b1[:, 1], b2[:, 1])).clamp(min=0)
    inter = iw * ih
    union = (area1 + area2 - inter).clamp(min=eps)
    ew = (torch.maximum(b1[:, 2], b2[:, 2]) - torch.minimum(b1[:, 0], b2[:, 0])).clamp(min=0)
    eh = (torch.maximum(b1[:, 3], b2[:, 3]) - torch.minimum(b1[:, 1], b2[:, 1])).clamp(min=0)
    enclose = (ew * eh).clamp(min=eps)
    return inter / union - (enclose - union) / enclose


def authors_chain(cls_s, cls_t, reg_s, reg_t, anchors, label_weights, strides, avg, reg_max=4):
    """LDHead.loss_single (BCKD): novel_kd_loss (weight=label_weights, avg_factor) + 4 * GIoULoss on
    boxes decoded at every anchor in stride units, weighted by the max score gap."""
    kd, loc = 0.0, 0.0
    for ls, lt, rs, rt, anc, lw, st in zip(cls_s, cls_t, reg_s, reg_t, anchors, label_weights, strides):
        K = ls.shape[1]
        ls = ls.permute(0, 2, 3, 1).reshape(-1, K)
        lt = lt.permute(0, 2, 3, 1).reshape(-1, K)
        rs = rs.permute(0, 2, 3, 1).reshape(-1, 4 * (reg_max + 1))
        rt = rt.permute(0, 2, 3, 1).reshape(-1, 4 * (reg_max + 1))
        lw = lw.reshape(-1)
        target, score = lt.sigmoid().detach(), ls.sigmoid()
        kd_a = (F.binary_cross_entropy_with_logits(ls, target, reduction="none") * (target - score).abs().pow(1.0)).sum(1)
        kd = kd + (kd_a * lw).sum() / (avg + EPS)
        anc = anc.reshape(-1, 4)
        centers = torch.stack([(anc[:, 2] + anc[:, 0]) / 2, (anc[:, 3] + anc[:, 1]) / 2], -1) / st
        proj = torch.linspace(0, reg_max, reg_max + 1, dtype=rs.dtype)

        def integral(r):
            return F.linear(F.softmax(r.reshape(-1, reg_max + 1), 1), proj).reshape(-1, 4)

        def dec(d):
            return torch.stack([centers[:, 0] - d[:, 0], centers[:, 1] - d[:, 1],
                                centers[:, 0] + d[:, 2], centers[:, 1] + d[:, 3]], -1)

        bs, bt = dec(integral(rs)), dec(integral(rt)).detach()
        w = (lt.detach().sigmoid() - ls.detach().sigmoid()).abs().pow(1.0).max(dim=1)[0] * lw
        loc = loc + ((1 - giou(bs, bt)) * w).sum() / (avg + EPS)
    return kd * 1.0, loc * 4.0


def test_bckd_loss_matches_authors_chain():
    g = torch.Generator().manual_seed(0)
    N, K, R = 2, 5, 4
    sizes, strides = [(6, 8), (3, 4)], [8, 16]
    cs = [leaf(torch.randn(N, K, h, w, generator=g, dtype=F64) * 2) for h, w in sizes]
    ct = [torch.randn(N, K, h, w, generator=g, dtype=F64) * 2 for h, w in sizes]
    rs = [leaf(torch.randn(N, 4 * (R + 1), h, w, generator=g, dtype=F64)) for h, w in sizes]
    rt = [torch.randn(N, 4 * (R + 1), h, w, generator=g, dtype=F64) for h, w in sizes]
    anchors = []
    for (h, w), s in zip(sizes, strides):
        yy, xx = torch.meshgrid(torch.arange(h, dtype=F64) * s, torch.arange(w, dtype=F64) * s, indexing="ij")
        c = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
        anchors.append(torch.cat([c - 4 * s, c + 4 * s], 1))
    lw = [torch.rand(N, h * w, generator=g, dtype=F64).round() for h, w in sizes]
    out = BCKDLoss(reg_max=R, strides=strides)(cs, ct, rs, rt, anchors, weight=lw, avg_factor=7.0)
    (out["loss_bckd_cls"] + out["loss_bckd_loc"]).backward()
    cs2, rs2 = [leaf(x) for x in cs], [leaf(x) for x in rs]
    kd, loc = authors_chain(cs2, ct, rs2, rt, [a.repeat(N, 1) for a in anchors], lw, strides, 7.0, R)
    (kd + loc).backward()
    close(out["loss_bckd_cls"], kd, F64)
    close(out["loss_bckd_loc"], loc, F64)
    for a, b in zip(cs + rs, cs2 + rs2):
        close(a.grad, b.grad, F64)
