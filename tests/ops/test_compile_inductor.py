"""The loss ops inside a graph compiled by inductor (the default torch.compile backend)."""
import torch
from helpers import leaf

import kdops
from kdops.losses import PKDLoss


def test_inductor_fullgraph_training_step():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 4, h, w, generator=g) for h, w in [(12, 16), (6, 8)]]
    t = [torch.randn(2, 4, h, w, generator=g) for h, w in [(12, 16), (6, 8)]]
    pw = [torch.rand(2, h, w, generator=g) for h, w in [(12, 16), (6, 8)]]
    conv = torch.nn.Conv2d(4, 4, 1)
    pkd = PKDLoss(loss_weight=2.0)

    def step(xs):
        ys = [conv(x) for x in xs]
        return pkd(ys, t) + kdops.masked_mse(ys, t, pixel_weight=pw, reduction="mean").sum()

    xs1, xs2 = [leaf(x) for x in s], [leaf(x) for x in s]
    compiled = torch.compile(step, fullgraph=True)
    a, b = compiled(xs1), step(xs2)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    for x1, x2 in zip(xs1, xs2):
        torch.testing.assert_close(x1.grad, x2.grad)
