"""UniKD's losses and box tools (kdops.losses.unikd).

Oracles: scipy's linear_sum_assignment and brute force over permutations for the matching;
torchvision's box_iou / generalized_box_iou / sigmoid_focal_loss when installed (else explicit
formulas written here) for the sampled boxes and the set loss; eager per-query loops for the
decoupled MSE."""
import itertools
import math

import pytest
import torch

from kdops.losses import (
    UniKDLoss, UniKDMatchingLoss, content_positive_mask, hungarian_match, sample_positional_boxes,
    unikd_decoupled_mse, xyxy_to_normalized_cxcywh,
)

F64 = torch.float64

try:
    from torchvision.ops import box_iou, generalized_box_iou
except ImportError:  # explicit formulas
    def box_iou(a, b):
        out = torch.zeros(len(a), len(b), dtype=a.dtype)
        for i, p in enumerate(a.tolist()):
            for j, q in enumerate(b.tolist()):
                iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
                ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
                union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - iw * ih
                out[i, j] = iw * ih / union
        return out

    def generalized_box_iou(a, b):
        iou = box_iou(a, b)
        out = torch.zeros_like(iou)
        for i, p in enumerate(a.tolist()):
            for j, q in enumerate(b.tolist()):
                iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
                ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
                union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - iw * ih
                enc = (max(p[2], q[2]) - min(p[0], q[0])) * (max(p[3], q[3]) - min(p[1], q[1]))
                out[i, j] = iou[i, j] - (enc - union) / enc
        return out


# =============================================================================== matching
def brute_force(cost):
    """Minimum total cost over every matching of min(Q,G) pairs."""
    Q, G = cost.shape
    if Q <= G:
        return min(sum(cost[i, c].item() for i, c in enumerate(cols)) for cols in itertools.permutations(range(G), Q))
    return min(sum(cost[r, j].item() for j, r in enumerate(rows)) for rows in itertools.permutations(range(Q), G))


def check_matching(cost, rows, cols):
    Q, G = cost.shape
    assert rows.dtype == cols.dtype == torch.int64 and len(rows) == len(cols) == min(Q, G)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    assert rows.tolist() == sorted(rows.tolist())


@pytest.mark.parametrize("backend", ["auto", "python"])
@pytest.mark.parametrize("shape", [(1, 1), (4, 4), (3, 6), (6, 3), (5, 5), (2, 7)])
def test_hungarian_matches_brute_force(backend, shape):
    g = torch.Generator().manual_seed(sum(shape))
    for trial in range(5):
        cost = torch.rand(shape, generator=g, dtype=F64) * 10 - 3
        if trial == 4:  # ties
            cost = torch.randint(0, 3, shape, generator=g).to(F64)
        rows, cols = hungarian_match(cost, backend=backend)
        check_matching(cost, rows, cols)
        assert math.isclose(cost[rows, cols].sum().item(), brute_force(cost), rel_tol=0, abs_tol=1e-9)


@pytest.mark.parametrize("backend", ["scipy", "python"])
@pytest.mark.parametrize("shape", [(12, 12), (30, 30), (20, 45), (45, 20), (1, 9), (9, 1), (40, 40)])
def test_hungarian_matches_scipy(backend, shape):
    optimize = pytest.importorskip("scipy.optimize")
    g = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    for trial in range(3):
        cost = torch.randn(shape, generator=g, dtype=F64) * 5
        if trial == 2:  # integer costs: many optimal matchings, equal totals
            cost = torch.randint(0, 4, shape, generator=g).to(F64)
        rows, cols = hungarian_match(cost.float() if trial == 1 else cost, backend=backend)
        cost = cost.float().double() if trial == 1 else cost
        r, c = optimize.linear_sum_assignment(cost.numpy())
        check_matching(cost, rows, cols)
        assert math.isclose(cost[rows, cols].sum().item(), cost.numpy()[r, c].sum(), rel_tol=1e-12, abs_tol=1e-9)
        if trial < 2:  # distinct continuous costs: the optimum is unique
            assert rows.tolist() == r.tolist() and cols.tolist() == c.tolist()


def test_hungarian_empty_and_bad_inputs():
    for shape in [(0, 5), (5, 0), (0, 0)]:
        for backend in ("auto", "python"):
            rows, cols = hungarian_match(torch.zeros(shape), backend=backend)
            assert rows.shape == cols.shape == (0,) and rows.dtype == torch.int64
    with pytest.raises(ValueError, match="`cost`"):
        hungarian_match(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="`cost`"):
        hungarian_match(torch.zeros(3))
    with pytest.raises(TypeError, match="`cost`"):
        hungarian_match([[1.0]])
    with pytest.raises(ValueError, match="`backend`"):
        hungarian_match(torch.zeros(2, 2), backend="lapjv")


# =============================================================================== positional boxes
def random_gts(g, H, W, kind):
    if kind == "none":
        return torch.zeros(0, 4)
    G = int(torch.randint(1, 8, (1,), generator=g))
    cx, cy = torch.rand(G, generator=g) * W, torch.rand(G, generator=g) * H
    w = torch.exp(torch.rand(G, generator=g) * math.log(W / 4) + math.log(2))
    h = torch.exp(torch.rand(G, generator=g) * math.log(H / 4) + math.log(2))
    if kind == "tiny":
        w, h = w * 0.01, h * 0.005
    b = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    b = torch.stack([b[:, 0].clamp(0, W), b[:, 1].clamp(0, H), b[:, 2].clamp(0, W), b[:, 3].clamp(0, H)], 1)
    if kind == "border":  # touching the edges and corners
        b[0, :2] = 0
        b[-1, 2:] = torch.tensor([W, H], dtype=b.dtype)
        b[G // 2, 0] = 0
    if kind == "full":
        b[0] = torch.tensor([0, 0, W, H], dtype=b.dtype)
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return b[keep]


@pytest.mark.parametrize("kind", ["none", "plain", "border", "tiny", "full"])
def test_sampled_boxes_satisfy_the_iou_bounds(kind):
    g = torch.Generator().manual_seed(["none", "plain", "border", "tiny", "full"].index(kind))
    for trial in range(25):
        H, W = [float(v) for v in torch.randint(20, 900, (2,), generator=g)]
        gt = random_gts(g, H, W, kind)
        num = int(torch.randint(1, 60, (1,), generator=g))
        boxes, assigned = sample_positional_boxes(gt, (H, W), num=num, generator=torch.Generator().manual_seed(trial))
        assert boxes.shape == (num, 4) and assigned.shape == (num,) and boxes.dtype == gt.dtype
        assert assigned.dtype == torch.int64 and ((assigned >= -1) & (assigned < len(gt))).all()
        pos = assigned >= 0
        assert int(pos.sum()) == (round(num * 0.5) if len(gt) else 0)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= W).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 3] <= H).all() and (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        if pos.any():
            iou = box_iou(boxes[pos], gt)
            assert (iou[torch.arange(int(pos.sum())), assigned[pos]] > 0.6).all()
            assert len(set(assigned[pos].tolist())) == min(len(gt), int(pos.sum()))  # GTs taken in turn
        if len(gt) and (~pos).any():
            assert (box_iou(boxes[~pos], gt).amax(1) < 0.4).all()


def test_sampled_boxes_are_deterministic_given_the_generator_and_follow_the_settings():
    gt = torch.tensor([[10.0, 20.0, 60.0, 90.0], [100.0, 5.0, 180.0, 40.0]])
    a = sample_positional_boxes(gt, (120, 200), num=40, generator=torch.Generator().manual_seed(5))
    b = sample_positional_boxes(gt, (120, 200), num=40, generator=torch.Generator().manual_seed(5))
    c = sample_positional_boxes(gt, (120, 200), num=40, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    boxes, assigned = sample_positional_boxes(gt.double(), (120, 200), num=30, pos_fraction=0.8, pos_iou=0.75,
                                              neg_iou=0.1, generator=torch.Generator().manual_seed(1))
    assert boxes.dtype == F64 and int((assigned >= 0).sum()) == 24
    assert (box_iou(boxes[:24], gt.double())[torch.arange(24), assigned[:24]] > 0.75).all()
    assert (box_iou(boxes[24:], gt.double()).amax(1) < 0.1).all()


def test_negatives_keep_the_bound_when_random_boxes_cannot():
    """A GT covering the image and a bound below any random box's IoU with it: the fallback."""
    gt = torch.tensor([[0.0, 0.0, 640.0, 480.0], [100.0, 100.0, 101.0, 101.5]])
    boxes, assigned = sample_positional_boxes(gt, (480, 640), num=10, pos_fraction=0.2, neg_iou=3e-4,
                                              generator=torch.Generator().manual_seed(0))
    neg = boxes[assigned < 0]
    assert len(neg) == 8 and (box_iou(neg, gt).amax(1) < 3e-4).all()
    s = math.sqrt(3e-4 * 1.5 / 4)  # the documented (0, 0, s, s), s^2 = neg_iou * smallest GT area / 4
    torch.testing.assert_close(neg, torch.tensor([[0.0, 0.0, s, s]]).expand(8, 4))


def test_sample_positional_boxes_bad_inputs():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    with pytest.raises(ValueError, match="`gt_boxes`"):
        sample_positional_boxes(gt[:, :3], (20, 20))
    with pytest.raises(TypeError, match="`gt_boxes`"):
        sample_positional_boxes(gt.long(), (20, 20))
    with pytest.raises(ValueError, match="`image_size`"):
        sample_positional_boxes(gt, (20,))
    with pytest.raises(ValueError, match="`pos_iou`"):
        sample_positional_boxes(gt, (20, 20), pos_iou=1.0)
    with pytest.raises(ValueError, match="`neg_iou`"):
        sample_positional_boxes(gt, (20, 20), neg_iou=0.0)
    with pytest.raises(ValueError, match="`num`"):
        sample_positional_boxes(gt, (20, 20), num=0)
    with pytest.raises(TypeError, match="`generator`"):
        sample_positional_boxes(gt, (20, 20), generator=0)


def test_xyxy_to_normalized_cxcywh():
    b = torch.tensor([[10.0, 20.0, 50.0, 40.0]])
    torch.testing.assert_close(xyxy_to_normalized_cxcywh(b, (100, 200)), torch.tensor([[0.15, 0.3, 0.2, 0.2]]))


# =============================================================================== stage 2
def eager_decoupled(s, t, mask):
    pos, neg = [], []
    for n in range(s.shape[0]):
        for q in range(s.shape[1]):
            e = ((s[n, q] - t[n, q]) ** 2).mean()
            (pos if mask[n, q] else neg).append(e)
    term = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return term(pos) + term(neg)


def embeddings(N=2, Q=7, C=5, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, Q, C, generator=g, dtype=F64).to(dtype).requires_grad_()
    t = torch.randn(N, Q, C, generator=g, dtype=F64).to(dtype).requires_grad_()
    mask = torch.rand(N, Q, generator=g) < 0.3
    return s, t, mask


@pytest.mark.parametrize("case", ["random", "no_positive", "all_positive"])
def test_unikd_loss_against_eager_formula(case):
    s1, t1, m1 = embeddings(seed=1)
    s2, t2, m2 = embeddings(Q=9, seed=2)
    if case == "no_positive":
        m1[:] = False
    elif case == "all_positive":
        m2[:] = True
    out = UniKDLoss(content_weight=10.0, positional_weight=3.0)(s1, t1, m1, s2, t2, m2)
    assert set(out) == {"loss_content", "loss_positional"}
    torch.testing.assert_close(out["loss_content"], 10.0 * eager_decoupled(s1, t1, m1))
    torch.testing.assert_close(out["loss_positional"], 3.0 * eager_decoupled(s2, t2, m2))
    if case == "no_positive":  # the negative mean alone
        torch.testing.assert_close(out["loss_content"], 10.0 * ((s1 - t1) ** 2).mean())
    (out["loss_content"] + out["loss_positional"]).backward()
    assert t1.grad is None and t2.grad is None  # the teacher is detached
    s_ref = s1.detach().clone().requires_grad_()
    (10.0 * eager_decoupled(s_ref, t1.detach(), m1)).backward()
    torch.testing.assert_close(s1.grad, s_ref.grad)


def test_decoupled_mse_function_dtypes_and_one_kind():
    s, t, m = embeddings(dtype=torch.float32)
    got = unikd_decoupled_mse(s, t, m)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), eager_decoupled(s.double(), t.double(), m), rtol=1e-6, atol=1e-7)
    out = UniKDLoss()(None, None, None, s, t, m)
    assert list(out) == ["loss_positional"]
    torch.testing.assert_close(out["loss_positional"], 10 * got)
    empty = torch.zeros(2, 0, 5, requires_grad=True)
    z = unikd_decoupled_mse(empty, empty.detach(), torch.zeros(2, 0, dtype=torch.bool))
    assert z.item() == 0.0


def test_unikd_loss_bad_inputs_name_the_argument():
    s, t, m = embeddings()
    loss = UniKDLoss()
    with pytest.raises(TypeError, match="`content_pos_mask`"):
        loss(s, t, m.long())
    with pytest.raises(ValueError, match="`content_pos_mask`"):
        loss(s, t, m[:, :3])
    with pytest.raises(ValueError, match="`teacher_content`"):
        loss(s, t[:, :3], m)
    with pytest.raises(TypeError, match="`teacher_content`"):
        loss(s, t.float(), m)
    with pytest.raises(ValueError, match="`student_positional`"):
        loss(s, t, m, None, t, m)
    with pytest.raises(ValueError, match="none of them|are None"):
        loss(None, None, None)
    with pytest.raises(TypeError, match="`student_content`"):
        loss(s.tolist(), t, m)
    with pytest.raises(ValueError, match="`content_weight`"):
        UniKDLoss(content_weight=-1.0)
    with pytest.raises(TypeError, match="`pos_mask`"):
        unikd_decoupled_mse(s, t, m.float())


# =============================================================================== stage 1
IMG = [(100.0, 200.0), (80.0, 60.0)]
GT = [torch.tensor([[20.0, 10.0, 120.0, 60.0], [150.0, 40.0, 190.0, 95.0]], dtype=F64),
      torch.tensor([[5.0, 5.0, 30.0, 70.0]], dtype=F64)]
LABELS = [torch.tensor([2, 0]), torch.tensor([1])]


def normalised(b, size):
    H, W = size
    return torch.stack([(b[:, 0] + b[:, 2]) / 2 / W, (b[:, 1] + b[:, 3]) / 2 / H, (b[:, 2] - b[:, 0]) / W,
                        (b[:, 3] - b[:, 1]) / H], 1)


def corners(b):
    return torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)


def predictions(Q=5, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, Q, K, generator=g, dtype=F64)
    boxes = torch.rand(2, Q, 4, generator=g, dtype=F64) * 0.5 + 0.2
    return logits, boxes


def eager_set_loss(logits, boxes, matches, weights=(2.0, 5.0, 2.0), alpha=0.25, gamma=2.0):
    """DETR-style loss with a given matching [(rows, cols) per image]: per-element focal loss,
    L1 and 1 - GIoU of matched pairs, all over the GT count."""
    num_gt = max(sum(len(g) for g in GT), 1)
    cls = l1 = giou = 0.0
    for n in range(logits.shape[0]):
        target = torch.zeros_like(logits[n])
        gt = normalised(GT[n], IMG[n])
        for r, c in zip(*matches[n]):
            target[r, LABELS[n][c]] = 1.0
            l1 = l1 + (boxes[n, r] - gt[c]).abs().sum()
            giou = giou + 1 - generalized_box_iou(corners(boxes[n, r][None]), corners(gt[c][None]))[0, 0]
        p = logits[n].sigmoid()
        for q in range(logits.shape[1]):
            for k in range(logits.shape[2]):
                t = target[q, k]
                pt = p[q, k] if t == 1 else 1 - p[q, k]
                at = alpha if t == 1 else 1 - alpha
                cls = cls - at * (1 - pt) ** gamma * torch.log(pt)
    return {"loss_cls": weights[0] * cls / num_gt, "loss_bbox": weights[1] * l1 / num_gt,
            "loss_giou": weights[2] * giou / num_gt}


def eager_matching(logits, boxes, weights=(2.0, 5.0, 2.0), alpha=0.25, gamma=2.0):
    """Brute-force minimum of Deformable DETR's matching cost, per image."""
    out = []
    for n in range(logits.shape[0]):
        gt = normalised(GT[n], IMG[n])
        p = logits[n].sigmoid()[:, LABELS[n]]
        cls = alpha * (1 - p) ** gamma * -(p + 1e-8).log() - (1 - alpha) * p ** gamma * -(1 - p + 1e-8).log()
        l1 = (boxes[n][:, None] - gt[None]).abs().sum(-1)
        cost = weights[0] * cls + weights[1] * l1 - weights[2] * generalized_box_iou(corners(boxes[n]), corners(gt))
        best = min(itertools.permutations(range(logits.shape[1]), len(gt)),
                   key=lambda rows: sum(cost[r, c].item() for c, r in enumerate(rows)))
        pairs = sorted(zip(best, range(len(gt))))
        out.append(([r for r, _ in pairs], [c for _, c in pairs]))
    return out


def test_matching_loss_content_against_eager_matching_and_loss():
    logits, boxes = predictions()
    logits.requires_grad_()
    got = UniKDMatchingLoss(3)(logits, boxes, GT, LABELS, IMG)
    want = eager_set_loss(logits, boxes, eager_matching(logits, boxes))
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)
    got["loss_cls"].backward()
    assert logits.grad.abs().sum() > 0


def test_matching_loss_positional_with_given_assignment():
    logits, boxes = predictions(Q=6)
    assigned = [torch.tensor([0, 1, -1, 0, -1, -1]), torch.tensor([-1, 0, 0, -1, -1, 0])]
    matches = [(torch.nonzero(a >= 0).flatten().tolist(), a[a >= 0].tolist()) for a in assigned]
    loss = UniKDMatchingLoss(3, cls_weight=1.0, l1_weight=3.0, giou_weight=0.5, focal_alpha=0.3, focal_gamma=1.5)
    got = loss(logits, boxes, GT, LABELS, torch.tensor(IMG), assigned_gt=assigned)
    want = eager_set_loss(logits, boxes, matches, (1.0, 3.0, 0.5), 0.3, 1.5)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)


def test_perfect_predictions_give_zero_box_losses_and_the_positive_mask():
    Q, K = 6, 3
    logits = torch.full((2, Q, K), -30.0, dtype=F64)
    boxes = torch.rand(2, Q, 4, dtype=F64) * 0.2 + 0.05
    where = [[4, 1], [2]]
    for n in range(2):
        gt = normalised(GT[n], IMG[n])
        for q, c in zip(where[n], range(len(gt))):
            boxes[n, q] = gt[c]
            logits[n, q, LABELS[n][c]] = 30.0
    out = UniKDMatchingLoss(K)(logits, boxes, GT, LABELS, IMG)
    assert out["loss_bbox"].item() < 1e-12 and abs(out["loss_giou"].item()) < 1e-12
    assert out["loss_cls"].item() < 1e-20
    mask = content_positive_mask(logits, boxes, GT, LABELS, IMG)
    want = torch.zeros(2, Q, dtype=torch.bool)
    want[0, [1, 4]] = True
    want[1, 2] = True
    assert torch.equal(mask, want)


def test_positive_mask_edge_cases():
    logits, boxes = predictions(Q=2)
    many = [torch.tensor([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 90, 90]], dtype=F64), torch.zeros(0, 4, dtype=F64)]
    labels = [torch.tensor([0, 1, 2]), torch.zeros(0, dtype=torch.int64)]
    mask = content_positive_mask(logits, boxes, many, labels, IMG)
    assert mask[0].all() and not mask[1].any()  # G > Q: every query matched; G = 0: none
    out = UniKDMatchingLoss(3)(logits, boxes, many, labels, IMG)
    assert all(torch.isfinite(v) for v in out.values())


def test_matching_loss_bad_inputs_name_the_argument():
    logits, boxes = predictions()
    loss = UniKDMatchingLoss(3)
    with pytest.raises(ValueError, match="`cls_logits`"):
        UniKDMatchingLoss(4)(logits, boxes, GT, LABELS, IMG)
    with pytest.raises(ValueError, match="`pred_boxes`"):
        loss(logits, boxes[:, :3], GT, LABELS, IMG)
    with pytest.raises(ValueError, match=r"`gt_labels\[0\]`"):
        loss(logits, boxes, GT, [torch.tensor([2, 3]), LABELS[1]], IMG)
    with pytest.raises(TypeError, match=r"`gt_labels\[1\]`"):
        loss(logits, boxes, GT, [LABELS[0], LABELS[1].int()], IMG)
    with pytest.raises(ValueError, match="`gt_boxes`"):
        loss(logits, boxes, GT[:1], LABELS, IMG)
    with pytest.raises(ValueError, match="`image_sizes`"):
        loss(logits, boxes, GT, LABELS, IMG[:1])
    with pytest.raises(ValueError, match=r"`assigned_gt\[1\]`"):
        loss(logits, boxes, GT, LABELS, IMG, assigned_gt=[torch.zeros(5, dtype=torch.int64),
                                                          torch.full((5,), 1, dtype=torch.int64)])
    with pytest.raises(ValueError, match="`focal_alpha`"):
        UniKDMatchingLoss(3, focal_alpha=1.5)
    with pytest.raises(TypeError, match="`num_classes`"):
        UniKDMatchingLoss(3.0)
