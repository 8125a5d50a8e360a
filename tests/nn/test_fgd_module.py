"""kdops.nn.GcBlock / FGDGlobal against FGD's global-relation code, re-written from the authors' repo."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdops.nn import FGDGlobal, GcBlock


class AuthorsRelation(nn.Module):
    """The global-relation part of FGD's FeatureLoss (conv_mask_{s,t}, channel_add_conv_{s,t},
    spatial_pool, get_rela_loss), transcribed."""

    def __init__(self, C):
        super().__init__()
        self.conv_mask_s = nn.Conv2d(C, 1, kernel_size=1)
        self.conv_mask_t = nn.Conv2d(C, 1, kernel_size=1)

        def add():
            return nn.Sequential(nn.Conv2d(C, C // 2, kernel_size=1), nn.LayerNorm([C // 2, 1, 1]),
                                 nn.ReLU(inplace=True), nn.Conv2d(C // 2, C, kernel_size=1))

        self.channel_add_conv_s, self.channel_add_conv_t = add(), add()

    def spatial_pool(self, x, in_type):
        batch, channel, width, height = x.size()  # (their names; only the product is used)
        input_x = x.view(batch, channel, height * width).unsqueeze(1)
        mask = (self.conv_mask_s if in_type == 0 else self.conv_mask_t)(x)
        mask = F.softmax(mask.view(batch, 1, height * width), dim=2).unsqueeze(-1)
        return torch.matmul(input_x, mask).view(batch, channel, 1, 1)

    def rela_loss(self, S, T):
        out_s = S + self.channel_add_conv_s(self.spatial_pool(S, 0))
        out_t = T + self.channel_add_conv_t(self.spatial_pool(T, 1))
        return F.mse_loss(out_s, out_t, reduction="sum") / len(out_s)


def copy_to_authors(glob: FGDGlobal, ref: AuthorsRelation):
    sd = {}
    for side, block in (("s", glob.student), ("t", glob.teacher_block)):
        for k, v in block.state_dict().items():
            head, rest = k.split(".", 1)
            sd[f"{head}_{side}.{rest}"] = v.clone()
    ref.load_state_dict(sd)


def randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        for m in module.modules():  # keep some ReLUs open: positive LayerNorm shifts
            if isinstance(m, nn.LayerNorm):
                m.bias.abs_().add_(0.2)
    return module


def test_state_dict_names_follow_authors():
    keys = set(GcBlock(8).state_dict())
    assert keys == {"conv_mask.weight", "conv_mask.bias", "channel_add_conv.0.weight", "channel_add_conv.0.bias",
                    "channel_add_conv.1.weight", "channel_add_conv.1.bias", "channel_add_conv.3.weight",
                    "channel_add_conv.3.bias"}
    g = FGDGlobal(8)
    assert {k.split(".")[0] for k in g.state_dict()} == {"student", "teacher"}
    assert {k.split(".")[0] for k in FGDGlobal(8, shared=True).state_dict()} == {"student"}


def test_initialisation_matches_authors():
    torch.manual_seed(0)
    b = GcBlock(256)
    w = b.conv_mask.weight
    assert torch.all(b.conv_mask.bias == 0)
    # kaiming normal, fan_in = 256, ReLU gain: std sqrt(2/256)
    assert abs(w.std().item() - math.sqrt(2 / 256)) < 0.2 * math.sqrt(2 / 256)
    assert torch.all(b.channel_add_conv[3].weight == 0) and torch.all(b.channel_add_conv[3].bias == 0)
    assert b.channel_add_conv[0].out_channels == 128 and b.channel_add_conv[1].normalized_shape == (128, 1, 1)
    x = torch.randn(2, 256, 5, 7)
    torch.testing.assert_close(b(x), x)  # identity at init
    g = FGDGlobal(256)
    assert not torch.equal(g.student.conv_mask.weight, g.teacher.conv_mask.weight)  # independent blocks


@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (1, 4, 1, 1), (3, 8, 4, 4)])
def test_parity_with_authors(shape):
    N, C, H, W = shape
    g = torch.Generator().manual_seed(1)
    glob = randomise(FGDGlobal(C), 2).double()
    ref = AuthorsRelation(C).double()
    copy_to_authors(glob, ref)
    s = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    s2 = s.detach().clone().requires_grad_(True)
    # contexts and the full R(F)
    torch.testing.assert_close(glob.student.context(s), ref.spatial_pool(s, 0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(glob.student(s), s + ref.channel_add_conv_s(ref.spatial_pool(s, 0)),
                               rtol=1e-12, atol=1e-12)
    add_s, add_t = glob(s, t)
    mine = F.mse_loss(s + add_s, t + add_t, reduction="sum") / N
    theirs = ref.rela_loss(s2, t)
    torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    gm = torch.autograd.grad(mine, [s] + list(glob.parameters()))
    gr = torch.autograd.grad(theirs, [s2] + [ref.get_parameter(n) for n in _authors_names(glob)])
    for a, b in zip(gm, gr):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _authors_names(glob):
    names = []
    for k, _ in glob.named_parameters():
        side, head, rest = k.split(".", 2)
        names.append(f"{head}_{'s' if side == 'student' else 't'}.{rest}")
    return names


def test_shared_uses_one_block():
    glob = FGDGlobal(4, shared=True)
    assert glob.shared and glob.teacher is None and glob.teacher_block is glob.student
    x = torch.randn(2, 4, 3, 3)
    a, b = glob(x, x)
    torch.testing.assert_close(a, b)


def test_gradcheck():
    torch.manual_seed(0)
    b = randomise(GcBlock(4), 3).double()
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(b, (x,))
    assert torch.autograd.gradcheck(lambda w: torch.func.functional_call(b, {"conv_mask.weight": w}, (x,)),
                                    (b.conv_mask.weight.detach().clone().requires_grad_(True),))


def test_errors():
    with pytest.raises(ValueError, match=r"GcBlock: `channels` must be an integer >= 2, got 1"):
        GcBlock(1)
    with pytest.raises(ValueError, match="hidden_channels"):
        GcBlock(4, hidden_channels=0)
    with pytest.raises(ValueError, match=r"must have shape \(N,4,H,W\), got \(2, 3, 5, 5\)"):
        GcBlock(4)(torch.zeros(2, 3, 5, 5))
    with pytest.raises(TypeError, match="torch.Tensor"):
        GcBlock(4).context([1, 2])
    with pytest.raises(TypeError, match="shared"):
        FGDGlobal(4, shared=1)


def test_empty_batch():
    b = GcBlock(4)
    x = torch.zeros(0, 4, 3, 3)
    assert b(x).shape == (0, 4, 3, 3)
