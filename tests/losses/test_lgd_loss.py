"""kdops.losses.LGDLoss against the release's ``BaseDistillator.distill`` written out eagerly here:
``SequentialConvs`` adapter on the student, ``nn.InstanceNorm2d(affine=False)`` on both sides,
``view(bs, -1)`` per level, ``torch.cat`` over levels, ``F.mse_loss``, times lambda; the teacher side
detached, the student side detached in the ``DISTILL_OFF`` iterations."""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdops.losses import LGDLoss

F64 = torch.float64
SIZES = [(6, 9), (3, 5), (1, 2)]


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def fpn(N=2, C=4, sizes=SIZES, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, C, h, w, generator=g, dtype=dtype) for h, w in sizes]


def release_distill(adapter, stu, tea, coef, distill_flag=1):
    """The release's ``distill`` (its adapter passed in)."""
    bs = tea[0].size(0)
    norm = nn.InstanceNorm2d(stu[0].shape[1], affine=False)
    if distill_flag == 0:
        stu = [f.detach() for f in stu]
    tea = [f.detach() for f in tea]
    stu = [norm(adapter(f)) for f in stu]
    tea = [norm(f) for f in tea]
    return coef * F.mse_loss(torch.cat([t.view(bs, -1) for t in tea], 1), torch.cat([s.view(bs, -1) for s in stu], 1))


def loss_module(C=4, weight=1.0):
    return LGDLoss(channels=C, loss_weight=weight).double()


@pytest.mark.parametrize("detach", [False, True])
def test_matches_the_release_value_and_gradients(detach):
    loss = loss_module(weight=1.5)
    stu = [f.requires_grad_() for f in fpn()]
    stu2 = [f.detach().clone().requires_grad_() for f in stu]
    tea = [f.requires_grad_() for f in fpn(seed=1)]
    got = loss(stu, tea, detach_student=detach)
    assert got.dim() == 0 and got.dtype == F64
    params = list(loss.adapter.parameters())
    ga = torch.autograd.grad(got, params + ([] if detach else stu), retain_graph=True)
    want = release_distill(loss.adapter, stu2, tea, 1.5, distill_flag=0 if detach else 1)
    gb = torch.autograd.grad(want, params + ([] if detach else stu2))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    got.backward()
    assert all(t.grad is None for t in tea)  # the instructive side is detached
    assert all((s.grad is None) == detach for s in stu)


def test_single_tensor_and_float32():
    loss = LGDLoss(channels=4)
    s, t = fpn(dtype=torch.float32)[0], fpn(seed=1, dtype=torch.float32)[0]
    got = loss(s, t)
    want = release_distill(loss.adapter, [s], [t], 1.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_mixed_precision_sides_compare_in_the_promoted_dtype():
    """autocast: the adapter runs in a low precision, the instructive maps (ending in a GroupNorm)
    stay float32; the comparison is in float32."""
    loss = LGDLoss(channels=4)
    s, t = fpn(sizes=[(4, 4)], dtype=torch.float32)[0], fpn(sizes=[(4, 4)], seed=1, dtype=torch.float32)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss([s.bfloat16()], [t])
    want = release_distill(loss.adapter, [s.bfloat16().float()], [t], 1.0)
    assert torch.isfinite(got) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)  # the adapter ran in bfloat16


def test_gradcheck_float64():
    loss = LGDLoss(channels=2).double()
    stu = [torch.randn(2, 2, 3, 4, dtype=F64, requires_grad=True),
           torch.randn(2, 2, 2, 2, dtype=F64, requires_grad=True)]
    tea = [torch.randn(2, 2, 3, 4, dtype=F64), torch.randn(2, 2, 2, 2, dtype=F64)]
    w = loss.adapter[0].weight
    w = w.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, w_: _with_weight(loss, w_, [a, b], tea), (*stu, w), fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, b: loss([a, b], tea, detach_student=False), tuple(stu))


def _with_weight(loss, w, stu, tea):
    original = loss.adapter[0].weight
    try:
        del loss.adapter[0].weight
        loss.adapter[0].weight = w
        return loss(stu, tea)
    finally:
        loss.adapter[0].weight = original


def test_constant_instructive_maps_are_finite():
    loss = loss_module()
    tea = [torch.full_like(f, 3.0) for f in fpn(seed=1)]
    stu = [f.requires_grad_() for f in fpn()]
    got = loss(stu, tea)
    got.backward()
    assert torch.isfinite(got) and all(torch.isfinite(s.grad).all() for s in stu)
    torch.testing.assert_close(got, release_distill(loss.adapter, stu, tea, 1.0), rtol=1e-10, atol=1e-12)


def test_empty_levels_give_exact_zero_with_zero_gradients():
    loss = loss_module()
    empty = [torch.zeros(0, 4, 5, 5, dtype=F64, requires_grad=True), torch.zeros(2, 4, 0, 3, dtype=F64,
                                                                                 requires_grad=True)]
    got = loss(empty, [e.detach() for e in empty])
    assert got.item() == 0.0
    got.backward()
    assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p.grad)) for p in loss.parameters())
    # an empty level next to a full one adds nothing
    full_s, full_t = fpn(sizes=[(4, 4)]), fpn(sizes=[(4, 4)], seed=1)
    mixed = loss([full_s[0], empty[1].detach()[:, :, :, :]], [full_t[0], empty[1].detach()])
    torch.testing.assert_close(mixed, loss(full_s, full_t), rtol=0, atol=0)


@pytest.mark.parametrize("student,instructive,exc,name", [
    (fpn(), fpn()[:2], ValueError, "instructive"),
    ([], [], ValueError, "instructive"),
    (fpn(), [f[:, :, :-1] for f in fpn()], ValueError, "instructive[0]"),
    (fpn(C=3), fpn(C=3), ValueError, "student[0]"),
    (fpn(), [f.long() for f in fpn()], TypeError, "instructive[0]"),
    (fpn(), [f[0] for f in fpn()], ValueError, "instructive[0]"),
    ("x", fpn(), TypeError, "student"),
    (fpn()[0], fpn(), ValueError, "instructive"),
])
def test_bad_inputs_are_refused_naming_the_argument(student, instructive, exc, name):
    with pytest.raises(exc, match=re.escape(f"`{name}`")):
        loss_module()(student, instructive)


@pytest.mark.parametrize("kw,exc,name", [
    (dict(channels=0), ValueError, "channels"),
    (dict(channels=4.0), TypeError, "channels"),
    (dict(loss_weight=-1.0), ValueError, "loss_weight"),
])
def test_bad_constructor_arguments(kw, exc, name):
    with pytest.raises(exc, match=f"`{name}`"):
        LGDLoss(**kw)


def test_detach_student_must_be_a_flag():
    with pytest.raises(TypeError, match="`detach_student`"):
        loss_module()(fpn(), fpn(seed=1), detach_student=1)
