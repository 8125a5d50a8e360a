"""kdops.losses.PKDLoss against mmrazor's PKDLoss, re-written here from its source."""
import pytest
import torch
import torch.nn.functional as F
from helpers import close, leaf

from kdops.losses import PKDLoss


def mmrazor_pkd(preds_S, preds_T, loss_weight=1.0, resize_stu=True):
    def norm(feat):
        N, C, H, W = feat.shape
        feat = feat.permute(1, 0, 2, 3).reshape(C, -1)
        mean = feat.mean(dim=-1, keepdim=True)
        std = feat.std(dim=-1, keepdim=True)
        return ((feat - mean) / (std + 1e-6)).reshape(C, N, H, W).permute(1, 0, 2, 3)

    if isinstance(preds_S, torch.Tensor):
        preds_S, preds_T = (preds_S,), (preds_T,)
    loss = 0.0
    for s, t in zip(preds_S, preds_T):
        if s.shape[2] != t.shape[2]:
            if resize_stu:
                s = F.interpolate(s, t.shape[2:], mode="bilinear")
            else:
                t = F.interpolate(t, s.shape[2:], mode="bilinear")
        loss += F.mse_loss(norm(s), norm(t)) / 2
    return loss * loss_weight


def fpn(seed, sizes, C=8, N=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, C, h, w, generator=g, dtype=torch.float64) for h, w in sizes]


@pytest.mark.parametrize("resize_stu", [True, False])
def test_matches_mmrazor_with_resize(resize_stu):
    S = [leaf(x) for x in fpn(0, [(20, 30), (10, 15), (5, 8)])]
    T = fpn(1, [(20, 30), (12, 18), (5, 8)])  # level 1 differs: resized like mmrazor
    S2 = [leaf(x) for x in S]
    a = PKDLoss(loss_weight=6.0, resize_stu=resize_stu)(S, T)
    b = mmrazor_pkd(S2, T, 6.0, resize_stu)
    close(a, b, torch.float64)
    a.backward()
    b.backward()
    for x, y in zip(S, S2):
        close(x.grad, y.grad, torch.float64, scale=y.grad.abs().max().item())


def test_single_tensor_float32():
    s, t = fpn(2, [(17, 23)] * 2)
    s, t = s.float(), t.float()
    close(PKDLoss()(s, t), mmrazor_pkd(s.double(), t.double()), torch.float32)


def test_level_count_mismatch():
    with pytest.raises(ValueError, match="levels"):
        PKDLoss()(fpn(0, [(4, 4)] * 2), fpn(0, [(4, 4)]))
