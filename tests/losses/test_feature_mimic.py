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
