"""kdops.bckd_cls_loss against a BCE written out with log-sigmoids and the eager reference, plus
the contract shared by both BCKD ops (errors, empty inputs, retain_graph). The localisation
op's tests are in test_bckd_loc.py."""
import re

import pytest
import torch
from bckd_helpers import logits, to_nchw
from helpers import close, leaf, triton_device

import kdops
from kdops import reference as R
from kdops.reference._dense_head import flatten_anchors
from kdops._dtype import acc_dtype
from kdops._layout import anchor_view

F64 = torch.float64


# ============================================================================ classification
def cls_oracle(s, t, w=None, beta=1.0, detach_gap=False):
    """Written out from the definition with log-sigmoids (not F.binary_cross_entropy_with_logits)."""
    p = torch.sigmoid(t.double()).detach()
    s = s.double()
    bce = -(p * torch.nn.functional.logsigmoid(s) + (1 - p) * torch.nn.functional.logsigmoid(-s))
    gap = (p - torch.sigmoid(s)).abs() ** beta
    if detach_gap:
        gap = gap.detach()
    per = (bce * gap).sum(-1)
    return (per * w.double()).sum() if w is not None else per.sum()


@pytest.mark.parametrize("beta", [1.0, 2.0, 1.5])
@pytest.mark.parametrize("layout", ["AK", "NCHW", "NCHW-J3"])
def test_cls_parity_float64_value_and_grads(beta, layout):
    N, H, W, J, K = 2, 5, 7, (3 if layout == "NCHW-J3" else 1), 6
    A = N * H * W * J
    s, t = logits((A, K), 0), logits((A, K), 1)
    w = torch.rand(A, dtype=F64, generator=torch.Generator().manual_seed(2))
    S, Wt = leaf(s), leaf(w)
    out = kdops.bckd_cls_loss(S if layout == "AK" else to_nchw(S, N, H, W),
                              t if layout == "AK" else to_nchw(t, N, H, W), weight=Wt, beta=beta)
    out.backward()
    S2, W2 = leaf(s), leaf(w)
    ref = cls_oracle(S2, t, W2, beta)
    ref.backward()
    close(out, ref, F64)
    close(S.grad, S2.grad, F64)
    close(Wt.grad, W2.grad, F64)


def test_cls_gap_weight_is_not_detached():
    s, t = logits((40, 5), 3), logits((40, 5), 4)
    S = leaf(s)
    kdops.bckd_cls_loss(S, t).backward()
    full, det = leaf(s), leaf(s)
    cls_oracle(full, t).backward()
    cls_oracle(det, t, detach_gap=True).backward()
    close(S.grad, full.grad, F64)
    assert (S.grad - det.grad).abs().max() > 1e-3  # the gap's own gradient is there


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_cls_reductions_and_avg_factor(reduction):
    s, t = logits((2, 12, 4, 5), 5), logits((2, 12, 4, 5), 6)
    w = torch.rand(2, 4 * 5 * 3, dtype=F64)  # J = 3 from the weight
    A = 2 * 4 * 5 * 3
    got = kdops.bckd_cls_loss(s, t, weight=w, reduction=reduction)
    ref = R.bckd_cls_loss(s, t, weight=w, reduction=reduction)
    close(got, ref, F64)
    base = cls_oracle(flatten_anchors(s, 4), flatten_anchors(t, 4), w.reshape(-1))
    close(got, base / (A if reduction == "mean" else 1), F64)
    eps = torch.finfo(torch.float32).eps
    for af in (7.0, torch.tensor(7.0, dtype=F64)):
        close(kdops.bckd_cls_loss(s, t, weight=w, avg_factor=af), base / (7.0 + eps), F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cls_low_precision(dtype):
    s, t = logits((2, 10, 9, 11), 7, dtype=dtype), logits((2, 10, 9, 11), 8, dtype=dtype)
    S = leaf(s)
    out = kdops.bckd_cls_loss(S, t, avg_factor=50.0)
    assert out.dtype == acc_dtype(dtype)
    out.backward()
    S64 = leaf(s.double())
    ref = R.bckd_cls_loss(S64, t.double(), avg_factor=50.0)
    ref.backward()
    close(out, ref, dtype, scale=10)
    assert S.grad.dtype == dtype
    close(S.grad, S64.grad, dtype, scale=S64.grad.abs().max().item())


def test_cls_sequence_levels_and_channels_last():
    shapes = [(2, 8, 6, 9), (2, 8, 3, 5), (2, 8, 1, 2)]
    S = [leaf(logits(sh, i)) for i, sh in enumerate(shapes)]
    T = [logits(sh, 10 + i) for i, sh in enumerate(shapes)]
    S[0] = leaf(S[0].detach().to(memory_format=torch.channels_last))
    out = kdops.bckd_cls_loss(S, T, avg_factor=3.0)
    assert out.shape == (3,)
    Sr = [leaf(x) for x in S]
    ref = R.bckd_cls_loss(Sr, T, avg_factor=3.0)
    close(out, ref, F64)
    (out * torch.arange(1.0, 4.0, dtype=F64)).sum().backward()
    (ref * torch.arange(1.0, 4.0, dtype=F64)).sum().backward()
    for a, b in zip(S, Sr):
        close(a.grad, b.grad, F64)


def test_cls_gradcheck():
    s, t = logits((2, 6, 3, 4), 11, scale=1.0), logits((2, 6, 3, 4), 12, scale=1.0)
    w = torch.rand(2 * 3 * 4 * 2, dtype=F64)
    for beta in (1.0, 2.0, 1.5):
        assert torch.autograd.gradcheck(
            lambda s, w: kdops.bckd_cls_loss(s, t, weight=w, beta=beta, reduction="mean"), (leaf(s), leaf(w)))





def test_empty_anchors():
    for K in (3,):
        s = leaf(torch.zeros(0, K, dtype=F64))
        out = kdops.bckd_cls_loss(s, torch.zeros(0, K, dtype=F64), reduction="mean")
        out.backward()
        assert out.item() == 0 and s.grad.shape == (0, K)
        r = leaf(torch.zeros(2, 4, 0, 5, dtype=F64))
        lo = kdops.bckd_loc_loss(r, r.detach(), torch.zeros(2, K, 0, 5, dtype=F64), torch.zeros(2, K, 0, 5, dtype=F64),
                                 torch.zeros(0, 2, dtype=F64), avg_factor=1.0)
        lo.backward()
        assert lo.item() == 0 and r.grad.shape == r.shape


@pytest.mark.parametrize(
    "fn, kwargs, exc, words",
    [
        ("cls", dict(teacher_logits=torch.zeros(10, 4)), ValueError, "`teacher_logits` must have the shape"),
        ("cls", dict(student_logits=torch.zeros(2, 3, 4)), ValueError, "`student_logits` must be (A,K)"),
        ("cls", dict(weight=torch.zeros(9)), ValueError, "`weight` must hold one value per anchor (10)"),
        ("cls", dict(beta=0.0), ValueError, "`beta` must be a finite number > 0"),
        ("cls", dict(reduction="none"), ValueError, "`reduction` must be"),
        ("cls", dict(teacher_logits=torch.zeros(10, 5, dtype=torch.float64)), TypeError, "`teacher_logits` is"),
        ("cls", dict(avg_factor="x"), TypeError, "`avg_factor` must be"),
        ("loc", dict(decoder="gfl"), ValueError, "needs `strides`"),
        ("loc", dict(decoder="gfl", strides=8), ValueError, "must have 68 values per anchor"),
        ("loc", dict(decoder="bad"), ValueError, "`decoder` must be one of"),
        ("loc", dict(priors=torch.zeros(3, 4)), ValueError, "`priors` must have A=10 rows or a divisor"),
        ("loc", dict(priors=torch.zeros(10, 3)), ValueError, "`priors` must be (M,4) anchors"),
        ("loc", dict(student_logits=torch.zeros(9, 5)), ValueError, "`teacher_logits` must have the shape"),
        ("loc", dict(teacher_reg=torch.zeros(10, 5)), ValueError, "of one shape and dtype"),
        ("loc", dict(strides=[8]), ValueError, "`strides` must be positive numbers"),
        ("loc", dict(weight=torch.zeros(11)), ValueError, "`weight` must hold one value per anchor (10)"),
    ],
)
def test_bad_inputs_raise_clear_errors(fn, kwargs, exc, words):
    if fn == "cls":
        a = dict(student_logits=torch.zeros(10, 5), teacher_logits=torch.zeros(10, 5))
        a.update(kwargs)
        call = lambda: kdops.bckd_cls_loss(a.pop("student_logits"), a.pop("teacher_logits"), **a)  # noqa: E731
    else:
        a = dict(student_reg=torch.zeros(10, 4), teacher_reg=torch.zeros(10, 4), student_logits=torch.zeros(10, 5),
                 teacher_logits=torch.zeros(10, 5), priors=torch.zeros(10, 4))
        a.update(kwargs)
        pos = [a.pop(k) for k in ("student_reg", "teacher_reg", "student_logits", "teacher_logits", "priors")]
        call = lambda: kdops.bckd_loc_loss(*pos, **a)  # noqa: E731
    with pytest.raises(exc, match=re.escape(words)):
        call()


# ============================================================================ Triton (interpreter)
@pytest.mark.triton
@pytest.mark.parametrize("beta, dtype", [(1.0, torch.float32), (1.5, torch.float32), (1.0, torch.float16),
                                         (2.0, torch.bfloat16)])
def test_triton_cls_matches_reference(beta, dtype):
    from kdops.triton.bckd_cls_loss import bckd_cls_loss_fwd

    dev = triton_device()
    N, H, W, J, K = 2, 3, 5, 3, 4
    s, t = logits((N, J * K, H, W), 20, dtype=dtype), logits((N, J * K, H, W), 21, dtype=dtype)
    w = torch.rand(N * H * W * J)
    loss, g, gw = bckd_cls_loss_fwd(anchor_view(s.to(dev), K), anchor_view(t.to(dev), K), w.to(dev), beta, 0.5, True, True)
    S, Wt = leaf(s.double()), leaf(w.double())
    ref = R.bckd_cls_loss(S, t.double(), weight=Wt, beta=beta) * 0.5
    ref.backward()
    close(loss.cpu(), ref, torch.float32, scale=10)
    g4 = g.cpu().permute(0, 3, 4, 1, 2).reshape(s.shape)
    assert g4.dtype == dtype
    close(g4, S.grad, dtype, scale=S.grad.abs().max().item())
    close(gw.cpu(), Wt.grad, torch.float32, scale=10)


@pytest.mark.triton
def test_triton_empty():
    from kdops.triton.bckd_cls_loss import bckd_cls_loss_fwd

    s = torch.zeros(0, 4, device=triton_device())
    loss, g, _ = bckd_cls_loss_fwd(anchor_view(s, 4), anchor_view(s, 4), None, 1.0, 1.0, True, False)
    assert loss.item() == 0 and g.shape == (1, 1, 0, 1, 4)





def test_retain_graph_second_backward():
    s, t = leaf(logits((8, 5), 40)), logits((8, 5), 41)
    loss = kdops.bckd_cls_loss(s, t)
    loss.backward(retain_graph=True)
    g1 = s.grad.clone()
    s.grad = None
    loss.backward(retain_graph=True)
    assert torch.equal(s.grad, g1)
    s.grad.zero_()  # the gradient handed out is the user's: editing it changes nothing saved
    loss.backward()
    assert torch.equal(s.grad, g1)

