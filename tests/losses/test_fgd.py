"""FGDLoss, fgd_attention_loss, fgd_global_loss against an eager transcription of the authors'
FeatureLoss (github.com/yzd-v/FGD, mmdet/distillation/losses/fgd.py, master)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kdops
from kdops.losses import (
    FGD_PRESETS, FeatureMimicLoss, FGDLoss, fgd_attention, fgd_attention_loss, fgd_attention_maps, fgd_global_loss,
)
from kdops.nn import FGDGlobal, GcBlock


# ------------------------------------------------------------------ the authors' forward, transcribed

class AuthorsFGD(nn.Module):
    """One level of FGD's FeatureLoss: the same operations in the same order and dtypes (per-image
    loop over boxes for the masks, get_attention, get_fea_loss, get_mask_loss, get_rela_loss)."""

    def __init__(self, cs, ct, temp, alpha, beta, gamma, lam):
        super().__init__()
        self.temp, self.alpha, self.beta, self.gamma, self.lam = temp, alpha, beta, gamma, lam
        self.align = nn.Conv2d(cs, ct, kernel_size=1) if cs != ct else None
        self.conv_mask_s = nn.Conv2d(ct, 1, kernel_size=1)
        self.conv_mask_t = nn.Conv2d(ct, 1, kernel_size=1)

        def add():
            return nn.Sequential(nn.Conv2d(ct, ct // 2, kernel_size=1), nn.LayerNorm([ct // 2, 1, 1]),
                                 nn.ReLU(inplace=True), nn.Conv2d(ct // 2, ct, kernel_size=1))

        self.channel_add_conv_s, self.channel_add_conv_t = add(), add()

    @staticmethod
    def masks(like, gt_bboxes, img_metas):
        """Mask_fg, Mask_bg (N,H,W) exactly as the authors' loop builds them."""
        N, H, W = like.shape
        Mask_fg = torch.zeros_like(like)
        Mask_bg = torch.ones_like(like)
        for i in range(N):
            b = gt_bboxes[i]
            img_h, img_w = img_metas[i]["img_shape"][:2]
            scaled = torch.ones_like(b)
            scaled[:, 0] = b[:, 0] / img_w * W
            scaled[:, 2] = b[:, 2] / img_w * W
            scaled[:, 1] = b[:, 1] / img_h * H
            scaled[:, 3] = b[:, 3] / img_h * H
            wmin, wmax = torch.floor(scaled[:, 0]).int(), torch.ceil(scaled[:, 2]).int()
            hmin, hmax = torch.floor(scaled[:, 1]).int(), torch.ceil(scaled[:, 3]).int()
            area = 1.0 / (hmax.view(1, -1) + 1 - hmin.view(1, -1)) / (wmax.view(1, -1) + 1 - wmin.view(1, -1))
            for j in range(len(b)):
                window = Mask_fg[i][hmin[j]:hmax[j] + 1, wmin[j]:wmax[j] + 1]
                Mask_fg[i][hmin[j]:hmax[j] + 1, wmin[j]:wmax[j] + 1] = torch.maximum(window, area[0][j])
            Mask_bg[i] = torch.where(Mask_fg[i] > 0, 0, 1)
            if torch.sum(Mask_bg[i]):
                Mask_bg[i] /= torch.sum(Mask_bg[i])
        return Mask_fg, Mask_bg

    @staticmethod
    def attention(preds, temp):
        N, C, H, W = preds.shape
        value = torch.abs(preds)
        fea_map = value.mean(axis=1, keepdim=True)
        S = (H * W * F.softmax((fea_map / temp).view(N, -1), dim=1)).view(N, H, W)
        channel_map = value.mean(axis=2, keepdim=False).mean(axis=2, keepdim=False)
        return S, C * F.softmax(channel_map / temp, dim=1)

    def spatial_pool(self, x, in_type):
        batch, channel, width, height = x.size()
        input_x = x.view(batch, channel, height * width).unsqueeze(1)
        m = (self.conv_mask_s if in_type == 0 else self.conv_mask_t)(x)
        m = F.softmax(m.view(batch, 1, height * width), dim=2).unsqueeze(-1)
        return torch.matmul(input_x, m).view(batch, channel, 1, 1)

    def forward(self, preds_S, preds_T, gt_bboxes, img_metas):
        if self.align is not None:
            preds_S = self.align(preds_S)
        S_t, C_t = self.attention(preds_T, self.temp)
        S_s, C_s = self.attention(preds_S, self.temp)
        Mask_fg, Mask_bg = self.masks(S_t, gt_bboxes, img_metas)
        # get_fea_loss
        mfg, mbg = Mask_fg.unsqueeze(1), Mask_bg.unsqueeze(1)
        ct, st = C_t.unsqueeze(-1).unsqueeze(-1), S_t.unsqueeze(1)
        fea_t = torch.mul(torch.mul(preds_T, torch.sqrt(st)), torch.sqrt(ct))
        fea_s = torch.mul(torch.mul(preds_S, torch.sqrt(st)), torch.sqrt(ct))
        fg = F.mse_loss(fea_s * torch.sqrt(mfg), fea_t * torch.sqrt(mfg), reduction="sum") / len(mfg)
        bg = F.mse_loss(fea_s * torch.sqrt(mbg), fea_t * torch.sqrt(mbg), reduction="sum") / len(mbg)
        # get_mask_loss
        mask = torch.sum(torch.abs(C_s - C_t)) / len(C_s) + torch.sum(torch.abs(S_s - S_t)) / len(S_s)
        # get_rela_loss
        out_s = preds_S + self.channel_add_conv_s(self.spatial_pool(preds_S, 0))
        out_t = preds_T + self.channel_add_conv_t(self.spatial_pool(preds_T, 1))
        rela = F.mse_loss(out_s, out_t, reduction="sum") / len(out_s)
        return {"loss_fg": self.alpha * fg, "loss_bg": self.beta * bg, "loss_attention": self.gamma * mask,
                "loss_global": self.lam * rela}


def authors_state(loss: FGDLoss, level: int) -> dict:
    """kdops FGDLoss level -> the authors' FeatureLoss state_dict keys."""
    sd = {}
    glob = loss.global_blocks[level]
    for side, block in (("s", glob.student), ("t", glob.teacher_block)):
        for k, v in block.state_dict().items():
            head, rest = k.split(".", 1)
            sd[f"{head}_{side}.{rest}"] = v.clone()
    if loss.align is not None:
        for k, v in loss.align[level].state_dict().items():
            sd[f"align.{k}"] = v.clone()
    return sd


def authors_param_names(loss: FGDLoss):
    """Names in AuthorsFGD of loss.parameters(), in the same order, as (level, name)."""
    out = []
    for k, _ in loss.named_parameters():
        parts = k.split(".")
        if parts[0] == "align":
            out.append((int(parts[1]), "align." + parts[2]))
        else:
            level, side, head, rest = int(parts[1]), parts[2], parts[3], ".".join(parts[4:])
            out.append((level, f"{head}_{'s' if side == 'student' else 't'}.{rest}"))
    return out


def randomise(module, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
        for m in module.modules():  # keep some ReLUs open: positive LayerNorm shifts
            if isinstance(m, nn.LayerNorm):
                m.bias.abs_().add_(0.2)
    return module


# ------------------------------------------------------------------------------------ problems

def problem(seed=0, N=3, cs=6, ct=6, pad=(64, 96), strides=(8, 16, 32), img_shapes=((60, 90), (64, 81), (50, 96)),
            boxes_per_image=(4, 0, 5), dtype=torch.float64):
    """FPN levels of a padded batch, per-image unpadded sizes, float32 GT boxes with edge cases."""
    g = torch.Generator().manual_seed(seed)
    S = [torch.randn(N, cs, pad[0] // s, pad[1] // s, generator=g, dtype=dtype) for s in strides]
    T = [torch.randn(N, ct, pad[0] // s, pad[1] // s, generator=g, dtype=dtype) for s in strides]
    per_image = []
    for i in range(N):
        h, w = img_shapes[i]
        k = boxes_per_image[i]
        x1 = torch.rand(k, generator=g) * (w - 2)
        y1 = torch.rand(k, generator=g) * (h - 2)
        x2 = x1 + 1 + torch.rand(k, generator=g) * (w - 1 - x1)
        y2 = y1 + 1 + torch.rand(k, generator=g) * (h - 1 - y1)
        b = torch.stack([x1, y1, x2, y2], 1).float()
        if k >= 4:
            b[0] = torch.tensor([0.0, 0.0, w, h])                   # the whole image (touches every border)
            b[1] = torch.tensor([w - 3.0, h - 2.5, w, h])            # tiny, bottom-right corner
            b[2] = torch.tensor([w / 4.0, h / 4.0, w / 2.0, h / 2.0])  # edges on exact multiples
        per_image.append(b)
    boxes = torch.cat(per_image) if per_image else torch.zeros(0, 4)
    batch_index = torch.cat([torch.full((len(b),), i, dtype=torch.int64) for i, b in enumerate(per_image)])
    return S, T, per_image, boxes, batch_index, [{"img_shape": (h, w, 3)} for h, w in img_shapes[:N]]


def make_pair(cs, ct, L, seed=1, **weights):
    kw = dict(alpha_fgd=1.0, beta_fgd=0.5, gamma_fgd=0.7, lambda_fgd=0.3, temperature=0.5)
    kw.update(weights)
    loss = randomise(FGDLoss(ct, cs, num_levels=L, **kw), seed).double()
    refs = []
    for l in range(L):
        ref = AuthorsFGD(cs, ct, kw["temperature"], kw["alpha_fgd"], kw["beta_fgd"], kw["gamma_fgd"],
                         kw["lambda_fgd"]).double()
        ref.load_state_dict(authors_state(loss, l))
        refs.append(ref)
    return loss, refs


def run_authors(refs, S, T, per_image, metas):
    parts = {"loss_fg": 0.0, "loss_bg": 0.0, "loss_attention": 0.0, "loss_global": 0.0}
    for ref, s, t in zip(refs, S, T):
        for k, v in ref(s, t, per_image, metas).items():
            parts[k] = parts[k] + v
    return parts


# ------------------------------------------------------------------------------------- tests

def test_masks_match_authors_loop():
    """kdops.box_masks(rule="fgd", mode="fgd") against the authors' loop: same support, the same
    background exactly, foreground up to the float32 rounding of the authors' 1/h/w."""
    for seed in range(6):
        S, T, per_image, boxes, bidx, metas = problem(seed, boxes_per_image=(7, 0, 9))
        img = torch.tensor([m["img_shape"][:2] for m in metas], dtype=torch.float64)[bidx]
        for s in S:
            N, _, H, W = s.shape
            fg_ref, bg_ref = AuthorsFGD.masks(s[:, 0], per_image, metas)
            fg, bg = kdops.box_masks(boxes, bidx, (N, H, W), 8.0, rule="fgd", image_size=img, mode="fgd",
                                     dtype=torch.float64)
            assert torch.equal(fg > 0, fg_ref > 0), (seed, H, W)
            torch.testing.assert_close(fg, fg_ref, rtol=2.5e-7, atol=0)
            assert torch.equal(bg, bg_ref)


def test_masks_boxes_past_the_image_match():
    """Boxes reaching past the unpadded image and the padded map: both clip the painted range
    (Python slicing / kdops) and count the area of the unclipped range."""
    metas = [{"img_shape": (60, 90, 3)}, {"img_shape": (64, 81, 3)}]
    per_image = [torch.tensor([[50.0, 40.0, 120.0, 70.0], [0.0, 0.0, 95.0, 10.0]]),
                 torch.tensor([[70.0, 3.0, 81.0, 64.0], [10.0, 10.0, 10.0, 10.0]])]  # incl. a zero-size box
    boxes, bidx = torch.cat(per_image), torch.tensor([0, 0, 1, 1])
    img = torch.tensor([m["img_shape"][:2] for m in metas], dtype=torch.float64)[bidx]
    for H, W in ((8, 12), (4, 6), (2, 3)):
        fg_ref, bg_ref = AuthorsFGD.masks(torch.zeros(2, H, W, dtype=torch.float64), per_image, metas)
        fg, bg = kdops.box_masks(boxes, bidx, (2, H, W), 8.0, image_size=img, dtype=torch.float64)
        assert torch.equal(fg > 0, fg_ref > 0)
        torch.testing.assert_close(fg, fg_ref, rtol=2.5e-7, atol=0)
        assert torch.equal(bg, bg_ref)


def test_masks_negative_start_differs_from_authors():
    """The one difference: a box starting left of / above the image. FGD's negative slice start
    counts from the end of the row (here an empty slice: nothing painted); kdops clips to 0."""
    metas = [{"img_shape": (64, 96, 3)}]
    per_image = [torch.tensor([[-10.0, 8.0, 20.0, 30.0]])]
    fg_ref, _ = AuthorsFGD.masks(torch.zeros(1, 8, 12, dtype=torch.float64), per_image, metas)
    fg, _ = kdops.box_masks(per_image[0], torch.tensor([0]), (1, 8, 12), 8.0, image_size=(64, 96),
                            dtype=torch.float64)
    assert not fg_ref.any()  # slice [-2:3] of a 12-wide row is empty
    # kdops: columns 0..3 (floor(-1.25) = -2 clipped to 0, ceil(2.5) = 3), rows 1..4, weight 1 / (4 * 6)
    assert torch.equal(fg[0].nonzero()[:, 1].unique(), torch.arange(4))
    assert torch.allclose(fg[fg > 0], torch.tensor(1 / 24, dtype=torch.float64))


def test_masks_non_square_not_transposed():
    # the first release indexed Mask_fg[i][w-range, h-range] (fixed in c22b81d); kdops follows the fix
    boxes = torch.tensor([[0.0, 0.0, 16.0, 64.0]])
    fg, _ = kdops.box_masks(boxes, torch.zeros(1, dtype=torch.int64), (1, 8, 12), 8.0, rule="fgd",
                            image_size=(64, 96), mode="fgd")
    assert fg[0, :, :3].gt(0).all() and not fg[0, :, 3:].gt(0).any()


@pytest.mark.parametrize("cs,ct", [(6, 6), (4, 6)])
def test_parity_with_authors(cs, ct):
    S, T, per_image, boxes, bidx, metas = problem(0, cs=cs, ct=ct)
    loss, refs = make_pair(cs, ct, len(S))
    Sk = [s.clone().requires_grad_(True) for s in S]
    Sa = [s.clone().requires_grad_(True) for s in S]
    img = [m["img_shape"][:2] for m in metas]
    mine = loss(Sk, T, boxes, bidx, image_size=img, return_components=True)
    theirs = run_authors(refs, Sa, T, per_image, metas)
    # the foreground mask differs by the float32 rounding of the authors' 1/(h w): ~1e-7 relative
    torch.testing.assert_close(mine["loss_fg"], theirs["loss_fg"], rtol=3e-7, atol=0)
    for k in ("loss_bg", "loss_attention", "loss_global"):
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-11, atol=1e-13, msg=k)
    total = loss(Sk, T, boxes, bidx, image_size=img)
    torch.testing.assert_close(total, sum(mine.values()), rtol=1e-12, atol=1e-14)
    ref_total = sum(theirs.values())
    torch.testing.assert_close(total, ref_total, rtol=3e-7, atol=0)

    params = list(loss.parameters())
    names = authors_param_names(loss)
    gm = torch.autograd.grad(total, Sk + params)
    gr = torch.autograd.grad(ref_total, Sa + [refs[l].get_parameter(n) for l, n in names])
    for i, (a, b) in enumerate(zip(gm, gr)):
        # (the fg mask's float32 rounding again: relative to the gradient's scale, not elementwise;
        # conv_mask's bias has a zero gradient, softmax being shift-invariant: rounding noise only)
        torch.testing.assert_close(a, b, rtol=3e-7, atol=1e-12 + 3e-7 * b.abs().max().item(), msg=f"grad {i}")


def test_parity_exact_area_and_single_level():
    """With boxes whose 1/(h w) is exact in float32 (powers of two), the match is tight everywhere."""
    S, T, _, _, _, metas = problem(3, N=2, strides=(8,), img_shapes=((64, 96), (64, 96)), boxes_per_image=(0, 0))
    # on the 8x12 map (r = 1/8): 4x2 pixels -> 1/8, 4x4 -> 1/16 (overlapping), 2x2 -> 1/4
    per_image = [torch.tensor([[0.0, 0.0, 24.0, 8.0], [8.0, 8.0, 32.0, 32.0]]),
                 torch.tensor([[40.0, 16.0, 48.0, 24.0]])]
    boxes = torch.cat(per_image)
    bidx = torch.tensor([0, 0, 1])
    loss, refs = make_pair(6, 6, 1, seed=4)
    s1, s2 = S[0].clone().requires_grad_(True), S[0].clone().requires_grad_(True)
    mine = loss(s1, T[0], boxes, bidx, image_size=(64, 96), return_components=True)
    theirs = refs[0](s2, T[0], per_image, metas)
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-11, atol=1e-13, msg=k)
    ga = torch.autograd.grad(sum(mine.values()), s1)[0]
    gb = torch.autograd.grad(sum(theirs.values()), s2)[0]
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-13)


def test_strides_without_image_size():
    # no padding, sizes divisible by the strides: r = 1/stride, the same as FGD's size / image
    S, T, per_image, boxes, bidx, _ = problem(5, img_shapes=((64, 96),) * 3)
    loss = FGDLoss(6, num_levels=3, strides=(8, 16, 32)).double()
    a = loss(S, T, boxes, bidx)
    b = loss(S, T, boxes, bidx, image_size=(64, 96))
    c = loss(S, T, boxes, bidx, image_size=torch.tensor([[64, 96]] * 3))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    torch.testing.assert_close(a, c, rtol=1e-12, atol=0)


def test_focal_term_equals_feature_mimic():
    S, T, _, boxes, bidx, _ = problem(2, img_shapes=((64, 96),) * 3)
    loss = FGDLoss(6, num_levels=3, strides=(8, 16, 32), alpha_fgd=2e-3, beta_fgd=1e-3).double()
    parts = loss(S, T, boxes, bidx, image_size=(64, 96), return_components=True)
    fm = FeatureMimicLoss(fg_weight=2e-3, bg_weight=1e-3, attention=True, normalize="batch", strides=[8, 16, 32])
    torch.testing.assert_close(parts["loss_fg"] + parts["loss_bg"], fm(S, T, boxes=boxes, batch_index=bidx,
                                                                       image_size=(64, 96)), rtol=1e-12, atol=0)


def test_attention_maps_match():
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    a, b = fgd_attention_maps(x, 0.7)
    c, d = fgd_attention(x, 0.7)
    ra, rb = AuthorsFGD.attention(x, 0.7)
    for u, v in ((a, c), (b, d), (a, ra), (b, rb)):
        torch.testing.assert_close(u, v, rtol=1e-13, atol=1e-14)


def test_functional_terms():
    S, T, per_image, boxes, bidx, metas = problem(4)
    _, refs = make_pair(6, 6, 3)
    theirs = run_authors(refs, S, T, per_image, metas)
    att = fgd_attention_loss(S, T, temperature=0.5, loss_weight=0.7)
    torch.testing.assert_close(att, theirs["loss_attention"], rtol=1e-12, atol=0)
    blocks = [FGDGlobal(6) for _ in range(3)]
    for l, b in enumerate(blocks):
        b.double()
        b.load_state_dict(_to_kdops(refs[l]))
    glob = fgd_global_loss(S, T, blocks, loss_weight=0.3)
    torch.testing.assert_close(glob, theirs["loss_global"], rtol=1e-12, atol=0)
    glob2 = fgd_global_loss(S, T, [b.student for b in blocks], [b.teacher for b in blocks], loss_weight=0.3)
    torch.testing.assert_close(glob2, glob, rtol=0, atol=0)
    # one level, one block
    one = fgd_global_loss(S[0], T[0], blocks[0].student, blocks[0].teacher, loss_weight=0.3)
    torch.testing.assert_close(one, refs[0](S[0], T[0], per_image, metas)["loss_global"], rtol=1e-12, atol=0)


def _to_kdops(ref):
    sd = {}
    for k, v in ref.state_dict().items():
        head, rest = k.split(".", 1)
        if head.endswith("_s"):
            sd[f"student.{head[:-2]}.{rest}"] = v
        elif head.endswith("_t"):
            sd[f"teacher.{head[:-2]}.{rest}"] = v
    return sd


def test_global_decomposition_float32_large_values():
    torch.manual_seed(0)
    s = torch.randn(2, 8, 40, 50) * 30 + 5
    t = s + torch.randn_like(s) * 0.1
    b = randomise(FGDGlobal(8), 2, scale=0.5)
    mine = fgd_global_loss(s, t, b)
    add_s, add_t = b(s, t)
    ref = ((s.double() + add_s.double()) - (t.double() + add_t.double())).pow(2).sum() / 2
    torch.testing.assert_close(mine.double(), ref, rtol=2e-5, atol=0)


def test_shared_global_option():
    S, T, _, boxes, bidx, _ = problem(1)
    loss = FGDLoss(6, num_levels=3, strides=(8, 16, 32), shared_global=True).double()
    assert all(g.shared for g in loss.global_blocks)
    assert not any(".teacher." in k for k in loss.state_dict())
    out = loss(S, T, boxes, bidx, image_size=(64, 96))
    assert torch.isfinite(out)


def test_gradcheck():
    S, T, _, boxes, bidx, _ = problem(6, N=2, cs=3, ct=4, pad=(16, 24), strides=(8, 16),
                                      img_shapes=((16, 20), (12, 24)), boxes_per_image=(2, 3))
    loss = randomise(FGDLoss(4, 3, num_levels=2, alpha_fgd=1.0, beta_fgd=1.0, gamma_fgd=1.0, lambda_fgd=1.0),
                     7).double()
    names = ["align.0.weight", "global_blocks.1.student.conv_mask.weight",
             "global_blocks.0.teacher.channel_add_conv.3.weight", "global_blocks.1.student.channel_add_conv.0.weight"]
    params = [loss.get_parameter(n).detach().clone().requires_grad_(True) for n in names]
    s0, s1 = (s.clone().requires_grad_(True) for s in S)

    def f(a, b, *ps):
        return torch.func.functional_call(loss, dict(zip(names, ps)), ([a, b], T, boxes, bidx),
                                          {"image_size": [(16, 20), (12, 24)]})

    assert torch.autograd.gradcheck(f, (s0, s1, *params))


def test_exact_zeros_empty():
    loss = FGDLoss(4, num_levels=2, strides=(8, 16))
    # an empty batch
    S = [torch.zeros(0, 4, 4, 6, requires_grad=True), torch.zeros(0, 4, 2, 3, requires_grad=True)]
    T = [torch.zeros(0, 4, 4, 6), torch.zeros(0, 4, 2, 3)]
    none = torch.zeros(0, 4)
    nidx = torch.zeros(0, dtype=torch.int64)
    out = loss(S, T, none, nidx)
    assert out.item() == 0.0 and out.dtype == torch.float32
    out.backward()
    assert all(p.grad is not None and torch.all(p.grad == 0) for p in loss.parameters())
    parts = loss(S, T, none, nidx, image_size=torch.zeros(0, 2), return_components=True)
    assert all(v.item() == 0.0 for v in parts.values())
    # an empty level among full ones: it adds exactly nothing
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(2, 4, 4, 6, generator=g), torch.randn(2, 4, 0, 3, generator=g)]
    b = [torch.randn(2, 4, 4, 6, generator=g), torch.randn(2, 4, 0, 3, generator=g)]
    boxes = torch.tensor([[1.0, 2.0, 20.0, 30.0]])
    bidx = torch.tensor([1])
    two = loss(a, b, boxes, bidx, return_components=True)
    one = FGDLoss(4, num_levels=1, strides=(8,))
    one.global_blocks[0].load_state_dict(loss.global_blocks[0].state_dict())
    ref = one(a[0], b[0], boxes, bidx, return_components=True)
    for k in two:
        assert torch.equal(two[k], ref[k]), k
    # no boxes: the foreground term is exactly 0, the rest finite
    parts = loss.double()([x.double() for x in a[:1]] * 2, [x.double() for x in b[:1]] * 2, none.double(), nidx,
                          return_components=True)
    assert parts["loss_fg"].item() == 0.0 and parts["loss_fg"].dtype == torch.float64
    assert all(torch.isfinite(v) for v in parts.values()) and parts["loss_bg"] > 0
    # zero features (attention at a kink of |x|): finite, zero loss
    z = FGDLoss(4, num_levels=2, strides=(8, 16))([torch.zeros(1, 4, 4, 6)] * 2, [torch.zeros(1, 4, 4, 6)] * 2,
                                                  boxes, torch.tensor([0]))
    assert z.item() == 0.0


def test_dtypes_float32():
    S, T, _, boxes, bidx, _ = problem(8, dtype=torch.float32)
    loss = FGDLoss.from_preset("retinanet", teacher_channels=6, num_levels=3, strides=(8, 16, 32))
    out32 = loss(S, T, boxes, bidx, image_size=(64, 96))
    assert out32.dtype == torch.float32
    out64 = loss.double()([s.double() for s in S], [t.double() for t in T], boxes, bidx, image_size=(64, 96))
    torch.testing.assert_close(out32.double(), out64, rtol=1e-5, atol=0)


def test_presets():
    assert FGD_PRESETS["retinanet"]["gamma_fgd"] == 5e-4 and FGD_PRESETS["fcos"]["temperature"] == 0.8
    loss = FGDLoss.from_preset("faster_rcnn")
    assert loss.num_levels == 4 and loss.strides == (4.0, 8.0, 16.0, 32.0) and loss.alpha_fgd == 5e-5
    y = FGDLoss.from_preset("yolox", teacher_channels=256, student_channels=192)
    assert len(y.align) == 3 and y.align[0].in_channels == 192 and y.lambda_fgd == 1e-5
    d = FGDLoss()
    assert (d.alpha_fgd, d.beta_fgd, d.gamma_fgd, d.lambda_fgd, d.temperature) == (1e-3, 5e-4, 5e-4, 5e-6, 0.5)
    with pytest.raises(ValueError, match="from_preset: `name` must be one of"):
        FGDLoss.from_preset("detr")


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"^FGDLoss: `temperature` must be a positive finite number, got 0$"):
        FGDLoss(temperature=0)
    with pytest.raises(ValueError, match=r"`alpha_fgd` must be a finite number >= 0, got -1"):
        FGDLoss(alpha_fgd=-1)
    with pytest.raises(ValueError, match=r"`lambda_fgd` must be a finite number >= 0, got nan"):
        FGDLoss(lambda_fgd=float("nan"))
    with pytest.raises(ValueError, match="`teacher_channels` must be an integer >= 2, got 1"):
        FGDLoss(1)
    with pytest.raises(ValueError, match="`student_channels`"):
        FGDLoss(4, 0)
    with pytest.raises(ValueError, match="`num_levels`"):
        FGDLoss(4, num_levels=0)
    with pytest.raises(ValueError, match=r"`strides` must be None or a sequence of 2"):
        FGDLoss(4, num_levels=2, strides=(8,))
    with pytest.raises(ValueError, match=r"`strides\[1\]` must be a positive finite number"):
        FGDLoss(4, num_levels=2, strides=(8, 0))
    with pytest.raises(ValueError, match="`mask_rule`"):
        FGDLoss(4, mask_rule="centre")
    loss = FGDLoss(4, num_levels=2, strides=(8, 16))
    s = [torch.randn(1, 4, 4, 4), torch.randn(1, 4, 2, 2)]
    boxes, bidx = torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.tensor([0])
    with pytest.raises(ValueError, match=r"`student` must have 2 level\(s\), got 1"):
        loss(s[:1], s[:1], boxes, bidx)
    with pytest.raises(TypeError, match="`student` must be a"):
        loss("x", s, boxes, bidx)
    with pytest.raises(ValueError, match=r"`teacher` level 0 must have 4 channels"):
        loss(s, [torch.randn(1, 3, 4, 4), s[1]], boxes, bidx)
    with pytest.raises(ValueError, match="must have the same N, H and W"):
        loss(s, [torch.randn(1, 4, 4, 5), s[1]], boxes, bidx)
    with pytest.raises(TypeError, match=r"`student\[0\]` must be a floating tensor"):
        loss([torch.ones(1, 4, 4, 4, dtype=torch.int64), s[1]], s, boxes, bidx)
    with pytest.raises(ValueError, match=r"`boxes` must be a floating \(K,4\)"):
        loss(s, s, torch.zeros(1, 5), bidx)
    with pytest.raises(TypeError, match="`boxes` must be a torch.Tensor"):
        loss(s, s, [[0, 0, 1, 1]], bidx)
    with pytest.raises(ValueError, match="`batch_index` must be an int64"):
        loss(s, s, boxes, bidx.int())
    with pytest.raises(ValueError, match=r"per-image `image_size` must be \(N,2\) = \(1, 2\)"):
        loss(s, s, boxes, bidx, image_size=torch.ones(2, 2))
    with pytest.raises(TypeError, match="`image_size` must be None"):
        loss(s, s, boxes, bidx, image_size="800x1333")
    with pytest.raises(ValueError, match="`image_size` .* must be positive"):
        loss(s, s, boxes, bidx, image_size=(0, 10))
    with pytest.raises(ValueError, match="give `image_size` to forward or `strides`"):
        FGDLoss(4)(s[0], s[0], boxes, bidx)
    with pytest.raises(ValueError, match=r"fgd_attention_loss: `temperature` must be a positive finite number"):
        fgd_attention_loss(s, s, temperature=-1.0)
    with pytest.raises(ValueError, match=r"fgd_global_loss: `gc_student` must have 2 block\(s\)"):
        fgd_global_loss(s, s, GcBlock(4))
    with pytest.raises(TypeError, match="fgd_global_loss: `gc_student` must be"):
        fgd_global_loss(s[0], s[0], nn.Conv2d(4, 4, 1))
    with pytest.raises(ValueError, match="the GcBlocks have 6 channels, the features 4"):
        fgd_global_loss(s[0], s[0], GcBlock(6))
