"""FeatureMimicLoss against FGD's feature loss, FitNet and FGFI written from the papers' code."""
import torch
import torch.nn.functional as F
from helpers import close, leaf

from kdops.losses import FeatureMimicLoss, fgd_attention


def fgd_get_attention(preds, temp):
    # FGD's get_attention, re-written from the authors' code
    N, C, H, W = preds.shape
    value = torch.abs(preds)
    fea_map = value.mean(axis=1, keepdim=True)
    S = (H * W * F.softmax((fea_map / temp).view(N, -1), dim=1)).view(N, H, W)
    channel_map = value.mean(axis=2, keepdim=False).mean(axis=2, keepdim=False)
    Cc = C * F.softmax(channel_map / temp, dim=1)
    return S, Cc


def fgd_fea_loss(preds_S, preds_T, Mask_fg, Mask_bg, temp, alpha, beta):
    # FGD's get_fea_loss with the teacher's attention, as in the authors' forward
    S_t, C_t = fgd_get_attention(preds_T, temp)
    Mask_fg, Mask_bg = Mask_fg.unsqueeze(1), Mask_bg.unsqueeze(1)
    C_t = C_t.unsqueeze(-1).unsqueeze(-1)
    S_t = S_t.unsqueeze(1)
    fea_t = torch.mul(torch.mul(preds_T, torch.sqrt(S_t)), torch.sqrt(C_t))
    fg_fea_t, bg_fea_t = torch.mul(fea_t, torch.sqrt(Mask_fg)), torch.mul(fea_t, torch.sqrt(Mask_bg))
    fea_s = torch.mul(torch.mul(preds_S, torch.sqrt(S_t)), torch.sqrt(C_t))
    fg_fea_s, bg_fea_s = torch.mul(fea_s, torch.sqrt(Mask_fg)), torch.mul(fea_s, torch.sqrt(Mask_bg))
    fg_loss = F.mse_loss(fg_fea_s, fg_fea_t, reduction="sum") / len(Mask_fg)
    bg_loss = F.mse_loss(bg_fea_s, bg_fea_t, reduction="sum") / len(Mask_bg)
    return alpha * fg_loss + beta * bg_loss


def data(seed=0, N=2, C=6, H=12, W=16):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    t = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    fg = torch.zeros(N, H, W, dtype=torch.float64)
    fg[0, 2:6, 3:9] = 1.0 / 24
    fg[1, 5:11, 0:4] = 1.0 / 24
    fg[1, 6:8, 2:10] = torch.maximum(fg[1, 6:8, 2:10], torch.tensor(1.0 / 16))
    bg = (fg == 0).double()
    bg = bg / bg.sum(dim=(1, 2), keepdim=True)
    return s, t, fg, bg


def test_fgd_feature_loss():
    s, t, fg, bg = data()
    S1, S2 = leaf(s), leaf(s)
    a = FeatureMimicLoss(fg_weight=0.001, bg_weight=0.0005, attention=True, temperature=0.5)(S1, t, fg, bg)
    b = fgd_fea_loss(S2, t, fg, bg, 0.5, 0.001, 0.0005)
    close(a, b, torch.float64)
    a.backward()
    b.backward()
    close(S1.grad, S2.grad, torch.float64)


def test_fitnet_is_plain_mse_over_levels():
    s, t, _, _ = data(1)
    s2, t2, _, _ = data(2, H=6, W=8)
    loss = FeatureMimicLoss(normalize="numel")([s, s2], [t, t2])
    close(loss, F.mse_loss(s, t) + F.mse_loss(s2, t2), torch.float64)


def test_fgfi_imitation_mask():
    s, t, fg, _ = data(3)
    mask = (fg > 0).double()
    loss = FeatureMimicLoss(bg_weight=0.0, normalize="mask", loss_weight=0.5)(s, t, mask)
    # FGFI: sum(mask * (s-t)^2) / max(1, 2 * sum(mask))
    ref = (mask[:, None] * (s - t) ** 2).sum() / max(1.0, 2 * mask.sum().item())
    close(loss, ref, torch.float64)


def test_defeat_fg_bg_weights():
    s, t, fg, _ = data(4)
    mask = (fg > 0).double()
    loss = FeatureMimicLoss(fg_weight=2.0, bg_weight=0.25, normalize="none")(s, t, mask)
    ref = 2.0 * (mask[:, None] * (s - t) ** 2).sum() + 0.25 * ((1 - mask[:, None]) * (s - t) ** 2).sum()
    close(loss, ref, torch.float64)


def test_attention_shapes_and_normalisation():
    _, t, _, _ = data(5)
    sa, ca = fgd_attention(t, 0.5)
    assert sa.shape == (2, 12, 16) and ca.shape == (2, 6)
    close(sa.sum(dim=(1, 2)), torch.full((2,), 12.0 * 16), torch.float64)
    close(ca.sum(1), torch.full((2,), 6.0), torch.float64)


def test_fgd_loss_from_gt_boxes_matches_authors_masks():
    from kdops import reference

    g = torch.Generator().manual_seed(7)
    sizes, strides, image = [(2, 16, 24), (2, 8, 12)], [8, 16], (128, 192)
    S = [leaf(torch.randn(n, 5, h, w, generator=g, dtype=torch.float64)) for n, h, w in sizes]
    T = [torch.randn(n, 5, h, w, generator=g, dtype=torch.float64) for n, h, w in sizes]
    boxes = torch.tensor([[10.0, 12, 80, 60], [50, 40, 150, 120], [0, 0, 30, 20], [100, 30, 190, 126]],
                         dtype=torch.float64)
    bi = torch.tensor([0, 0, 1, 1])
    fgd = FeatureMimicLoss(fg_weight=1e-3, bg_weight=5e-4, attention=True, strides=strides)
    got = fgd(S, T, boxes=boxes, batch_index=bi, image_size=image)
    fr, br = reference.box_masks(boxes.float(), bi, sizes, strides, image_size=image)  # FGD's loop
    want = sum(fgd_fea_loss(s, t, f.double(), b.double(), 0.5, 1e-3, 5e-4) for s, t, f, b in zip(S, T, fr, br))
    close(got, want, torch.float32)


def test_boxes_need_strides():
    s, t, _, _ = data()
    import pytest

    with pytest.raises(ValueError, match="strides="):
        FeatureMimicLoss()(s, t, boxes=torch.zeros(1, 4, dtype=torch.float64), batch_index=torch.zeros(1).long())


def defeat_masks(shape, boxes_per_image, stride, neg_gain):
    """DeFeat's per-level mask as LutingWang/HEAD's DeFeatMask builds it (ceil_mode=True), written
    out: binary GT cover [int(x1/s), int(x2/s)+1] over its own sum per image, plus neg_gain times
    the uncovered pixels over theirs (each sum at least 1)."""
    import math

    h, w = math.ceil(shape[0] / stride), math.ceil(shape[1] / stride)
    out = []
    for boxes in boxes_per_image:
        m = torch.zeros(h, w, dtype=torch.float64)
        for x0, y0, x1, y1 in (boxes / stride).int().tolist():
            m[y0:y1 + 2, x0:x1 + 2] = 1
        neg = (m <= 0).double()
        out.append(m / m.sum().clamp(min=1) + neg_gain * neg / neg.sum().clamp(min=1))
    return torch.stack(out)


def test_defeat_masks_from_gt_boxes_match_heads_defeat():
    """mask_mode="defeat": HEAD's DeFeat loss, MSE(sum) weighted by its masks, weight 1/256, neg_gain 4
    (boxes with x2/s not a whole number: there HEAD's pixel range and rule "fgd" agree)."""
    g = torch.Generator().manual_seed(11)
    image, strides = (96, 128), [8, 16]
    sizes = [(2, 12, 16), (2, 6, 8)]
    S = [leaf(torch.randn(n, 4, h, w, generator=g, dtype=torch.float64)) for n, h, w in sizes]
    T = [torch.randn(n, 4, h, w, generator=g, dtype=torch.float64) for n, h, w in sizes]
    boxes = torch.tensor([[10.0, 12, 50, 61], [33, 20, 90, 70], [3, 5, 27, 44]], dtype=torch.float64)
    bi = torch.tensor([0, 0, 1])
    loss_fn = FeatureMimicLoss(fg_weight=1.0, bg_weight=4.0, normalize="none", loss_weight=1 / 256,
                               strides=strides, mask_mode="defeat")
    got = loss_fn(S, T, boxes=boxes, batch_index=bi)
    per_image = [boxes[bi == i] for i in range(2)]
    want = 0.0
    for s, t, st in zip(S, T, strides):
        m = defeat_masks(image, per_image, st, 4.0)
        want = want + (m[:, None] * (s - t) ** 2).sum() / 256
    close(got, want, torch.float32)
    # an image without boxes: foreground 0, the whole map is background over its pixel count
    empty = FeatureMimicLoss(bg_weight=4.0, normalize="none", strides=8, mask_mode="defeat")(
        S[0], T[0], boxes=torch.zeros(0, 4, dtype=torch.float64), batch_index=torch.zeros(0, dtype=torch.int64))
    close(empty, 4.0 * ((S[0] - T[0]) ** 2).sum(1).mean((1, 2)).sum(), torch.float64)
