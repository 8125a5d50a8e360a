"""kdops.bckd_loc_loss against the eager reference and independent per-anchor oracles for the
decoders (distances, GFL integral, DeltaXYWH) and the (G)IoU."""
import math

import pytest
import torch
from bckd_helpers import to_nchw
from helpers import close, leaf, triton_device

import kdops
from kdops import reference as R
from kdops.reference.box_coders import decode
from kdops._layout import anchor_view

F64 = torch.float64


def make_loc(decoder, N=2, H=3, W=5, J=1, K=6, reg_max=4, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    D = 4 * (reg_max + 1) if decoder == "gfl" else 4
    A, M = N * H * W * J, H * W * J
    if decoder == "delta_xywh":
        c, wh = torch.rand(M, 2, generator=g, dtype=F64) * 60, torch.rand(M, 2, generator=g, dtype=F64) * 20 + 2
        pri = torch.cat([c - wh / 2, c + wh / 2], 1)
        sr = torch.randn(A, D, generator=g, dtype=F64) * 0.5
        tr = sr + torch.randn(A, D, generator=g, dtype=F64) * 0.3
    elif decoder == "gfl":
        c = torch.rand(M, 2, generator=g, dtype=F64) * 80
        pri = torch.cat([c - 4, c + 4], 1)
        sr, tr = (torch.randn(A, D, generator=g, dtype=F64) * 2 for _ in range(2))
    else:
        pri = torch.rand(M, 2, generator=g, dtype=F64) * 50
        sr, tr = (torch.rand(A, D, generator=g, dtype=F64) * 10 for _ in range(2))
    sl, tl = (torch.randn(A, K, generator=g, dtype=F64) * 2 for _ in range(2))
    w = torch.rand(A, generator=g, dtype=F64)
    return [x.to(dtype) for x in (sr, tr, sl, tl, pri, w)]


KW = {"distance": {}, "gfl": dict(strides=8.0, reg_max=4),
      "delta_xywh": dict(means=(0.1, 0.0, 0.0, 0.2), stds=(0.1, 0.1, 0.2, 0.2))}


@pytest.mark.parametrize("decoder", ["distance", "gfl", "delta_xywh"])
@pytest.mark.parametrize("loss", ["giou", "iou"])
@pytest.mark.parametrize("layout", ["AK", "NCHW"])
def test_loc_parity_float64(decoder, loss, layout):
    N, H, W, J = 2, 3, 5, (1 if decoder == "gfl" else 3)
    sr, tr, sl, tl, pri, w = make_loc(decoder, N, H, W, J, reg_max=4, seed=1)
    conv = (lambda x: x) if layout == "AK" else (lambda x: to_nchw(x, N, H, W))
    S, Wt = leaf(sr), leaf(w)
    kw = dict(decoder=decoder, loss=loss, avg_factor=5.0, **KW[decoder])
    out = kdops.bckd_loc_loss(conv(S), conv(tr), conv(sl), conv(tl), pri, weight=Wt, **kw)
    out.backward()
    S2, W2 = leaf(sr), leaf(w)
    ref = R.bckd_loc_loss(S2, tr, sl, tl, pri, weight=W2, **kw)
    ref.backward()
    close(out, ref, F64)
    close(S.grad, S2.grad, F64)
    close(Wt.grad, W2.grad, F64)


def giou_oracle(b, B, mode="giou"):
    """Plain-Python aligned (G)IoU from the definition, with mmdet's eps=1e-6 floor."""
    out = []
    for (x1, y1, x2, y2), (X1, Y1, X2, Y2) in zip(b.tolist(), B.tolist()):
        inter = max(min(x2, X2) - max(x1, X1), 0) * max(min(y2, Y2) - max(y1, Y1), 0)
        union = max((x2 - x1) * (y2 - y1) + (X2 - X1) * (Y2 - Y1) - inter, 1e-6)
        enc = max(max(max(x2, X2) - min(x1, X1), 0) * max(max(y2, Y2) - min(y1, Y1), 0), 1e-6)
        out.append(inter / union - ((enc - union) / enc if mode == "giou" else 0.0))
    return torch.tensor(out, dtype=F64)


def decode_oracle(decoder, reg, pri, stride=None, reg_max=4, means=(0,) * 4, stds=(1,) * 4, clip=16 / 1000):
    """Per-anchor Python decoders: distances, GFL softmax expectation, DeltaXYWH."""
    boxes = []
    for r, p in zip(reg.tolist(), pri.tolist()):
        if decoder == "delta_xywh":
            d = [r[i] * stds[i] + means[i] for i in range(4)]
            m = abs(math.log(clip))
            dw, dh = min(max(d[2], -m), m), min(max(d[3], -m), m)
            pw, ph = p[2] - p[0], p[3] - p[1]
            cx, cy = (p[0] + p[2]) / 2 + pw * d[0], (p[1] + p[3]) / 2 + ph * d[1]
            w, h = pw * math.exp(dw), ph * math.exp(dh)
            boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
            continue
        px, py = (p[0], p[1]) if len(p) == 2 else ((p[0] + p[2]) / 2, (p[1] + p[3]) / 2)
        if stride:
            px, py = px / stride, py / stride
        if decoder == "gfl":
            n = reg_max + 1
            d = []
            for s in range(4):
                z = r[s * n:(s + 1) * n]
                e = [math.exp(v - max(z)) for v in z]
                d.append(sum(i * v for i, v in enumerate(e)) / sum(e))
        else:
            d = r
        boxes.append([px - d[0], py - d[1], px + d[2], py + d[3]])
    return torch.tensor(boxes, dtype=F64)


@pytest.mark.parametrize("decoder", ["distance", "gfl", "delta_xywh"])
@pytest.mark.parametrize("loss", ["giou", "iou"])
def test_loc_against_independent_decoder_and_giou(decoder, loss):
    sr, tr, sl, tl, pri, w = make_loc(decoder, 1, 3, 4, 1, seed=2)
    kw = KW[decoder]
    st = kw.get("strides")
    ps = {k: v for k, v in kw.items() if k in ("means", "stds")}
    bs, bt = decode_oracle(decoder, sr, pri, st, **ps), decode_oracle(decoder, tr, pri, st, **ps)
    ref_boxes = decode(decoder, sr, pri, st, 4, kw.get("means", (0,) * 4), kw.get("stds", (1,) * 4), 16 / 1000)
    close(ref_boxes, bs, F64)  # the reference decoder is the oracle's decoder
    g = giou_oracle(bs, bt, loss)
    per = 1 - (g if loss == "giou" else g.clamp(min=1e-6))
    gap = (torch.sigmoid(tl) - torch.sigmoid(sl)).abs().max(1)[0]
    Wt = leaf(torch.ones(sr.shape[0], dtype=F64))
    out = kdops.bckd_loc_loss(sr, tr, sl, tl, pri, decoder=decoder, loss=loss, weight=Wt, **kw)
    out.backward()
    close(out, (gap * per).sum(), F64)
    close(Wt.grad, gap * per, F64)  # d loss / d weight_a = gap_a * (1 - GIoU_a)


def test_loc_zero_area_boxes_ties_and_disjoint():
    # distance decoder: zero-width / zero-height student boxes, boxes equal to the teacher's
    # (every max/min ties), touching and disjoint boxes.
    pri = torch.tensor([[10.0, 10.0], [10.0, 10.0], [10.0, 10.0], [10.0, 10.0], [50.0, 50.0], [0.0, 0.0]], dtype=F64)
    sr = torch.tensor([[0, 1, 0, 2], [1, 1, 1, 1], [0, 0, 0, 0], [2, 2, 3, 3], [1, 1, 1, 1], [1, 1, 1, 1.0]], dtype=F64)
    tr = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 2, 2.0]], dtype=F64)
    sl, tl = torch.zeros(6, 3, dtype=F64), torch.full((6, 3), 2.0, dtype=F64)
    for loss in ("giou", "iou"):
        S, S2 = leaf(sr), leaf(sr)
        out = kdops.bckd_loc_loss(S, tr, sl, tl, pri, loss=loss)
        ref = R.bckd_loc_loss(S2, tr, sl, tl, pri, loss=loss)
        out.backward()
        ref.backward()
        assert torch.isfinite(out) and torch.isfinite(S.grad).all()
        close(out, ref, F64)
        close(S.grad, S2.grad, F64)  # incl. PyTorch's even split of max/min ties


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_loc_low_precision_gfl(dtype):
    sr, tr, sl, tl, pri, w = make_loc("gfl", 2, 4, 6, 1, K=8, seed=3)
    cast = [x.to(dtype) for x in (sr, tr, sl, tl)]
    S = leaf(cast[0])
    out = kdops.bckd_loc_loss(S, *cast[1:], pri, decoder="gfl", weight=w, strides=8.0, reg_max=4)
    out.backward()
    S64 = leaf(cast[0].double())
    ref = R.bckd_loc_loss(S64, *[x.double() for x in cast[1:]], pri, decoder="gfl", weight=w, strides=8.0, reg_max=4)
    ref.backward()
    close(out, ref, dtype, scale=10)
    close(S.grad, S64.grad, dtype, scale=S64.grad.abs().max().item())


def test_loc_gradcheck_all_decoders():
    for decoder in ("distance", "gfl", "delta_xywh"):
        sr, tr, sl, tl, pri, w = make_loc(decoder, 1, 2, 3, 2 if decoder != "gfl" else 1, K=3, reg_max=3, seed=4)
        kw = dict(KW[decoder], reg_max=3) if decoder == "gfl" else KW[decoder]
        for loss in ("giou", "iou"):
            f = lambda r, w: kdops.bckd_loc_loss(r, tr, sl, tl, pri, decoder=decoder, loss=loss, weight=w, **kw)  # noqa: E731
            assert torch.autograd.gradcheck(f, (leaf(sr), leaf(w)))


def test_sequences_flattened_strides_tensor_and_shared_priors():
    lv = [make_loc("gfl", 2, h, w, 1, seed=10 + h) for h, w in [(4, 6), (2, 3)]]
    S = [leaf(x[0]) for x in lv]
    args = [[x[i] for x in lv] for i in (1, 2, 3, 4, 5)]
    per_level = kdops.bckd_loc_loss(S, *args[:4], decoder="gfl", weight=args[4], strides=[8, 16], reg_max=4)
    assert per_level.shape == (2,)
    per_level.sum().backward()
    # the same anchors flattened over levels: per-anchor priors and strides
    Sf = leaf(torch.cat([x[0] for x in lv]))
    cat = [torch.cat(a) for a in args[:3]]
    pri = torch.cat([x[4].repeat(2, 1) for x in lv])
    st = torch.cat([torch.full((x[0].shape[0],), s, dtype=F64) for x, s in zip(lv, (8, 16))])
    flat = kdops.bckd_loc_loss(Sf, *cat, pri, decoder="gfl", weight=torch.cat(args[4]), strides=st, reg_max=4)
    flat.backward()
    close(flat, per_level.sum(), F64)
    close(Sf.grad, torch.cat([s.grad for s in S]), F64)


def test_deterministic_across_thread_counts():
    sr, tr, sl, tl, pri, w = make_loc("gfl", 2, 20, 30, 1, K=20, seed=5, dtype=torch.float32)
    threads, outs = torch.get_num_threads(), []
    try:
        for n in (1, max(threads, 2), 1):
            torch.set_num_threads(n)
            S, L = leaf(sr), leaf(sl)
            a = kdops.bckd_loc_loss(S, tr, sl, tl, pri.float(), decoder="gfl", weight=w, strides=8.0, reg_max=4)
            b = kdops.bckd_cls_loss(L, tl, weight=w)
            (a + b).backward()
            outs.append((a, b, S.grad, L.grad))
    finally:
        torch.set_num_threads(threads)
    for o in outs[1:]:
        for x, y in zip(o, outs[0]):
            assert torch.equal(x, y)


def test_torch_compile_fullgraph_and_fake_tensors():
    sr, tr, sl, tl, pri, w = [x.float() for x in make_loc("gfl", 2, 3, 4, 1, seed=6)]

    def f(sr, sl):
        return (kdops.bckd_cls_loss(sl, tl, weight=w, avg_factor=torch.tensor(3.0))
                + 4 * kdops.bckd_loc_loss(sr, tr, sl, tl, pri, decoder="gfl", weight=w, strides=8.0, reg_max=4,
                                          avg_factor=3.0))

    a1, a2, b1, b2 = leaf(sr), leaf(sl), leaf(sr), leaf(sl)
    x = torch.compile(f, fullgraph=True, backend="aot_eager")(a1, a2)
    y = f(b1, b2)
    x.backward()
    y.backward()
    torch.testing.assert_close(x, y)
    torch.testing.assert_close(a1.grad, b1.grad)
    torch.testing.assert_close(a2.grad, b2.grad)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        s = torch.empty(2, 9 * 80, 10, 12, dtype=torch.bfloat16, requires_grad=True)
        out = kdops.bckd_cls_loss([s, s], [s.detach(), s.detach()], weight=[torch.empty(2, 1080)] * 2)
        assert out.shape == (2,) and out.dtype == torch.float32
        r = torch.empty(2, 68, 10, 12, dtype=torch.bfloat16, requires_grad=True)
        lo = kdops.bckd_loc_loss(r, r, s[:, :80], s[:, :80], torch.empty(120, 4), decoder="gfl", strides=8)
        assert lo.shape == () and lo.dtype == torch.float32


@pytest.mark.triton
@pytest.mark.parametrize("decoder", ["distance", "gfl", "delta_xywh"])
def test_triton_loc_matches_reference(decoder):
    from kdops.triton.bckd_loc_loss import bckd_loc_level_fwd

    dev = triton_device()
    sr, tr, sl, tl, pri, w = [x.float() for x in make_loc(decoder, 2, 3, 4, 1, K=5, seed=22)]
    D, K = sr.shape[1], sl.shape[1]
    kw = KW[decoder]
    for loss, mode in (("giou", 0), ("iou", 1)):
        out, g, gw = bckd_loc_level_fwd(
            anchor_view(sr, D).to(dev), anchor_view(tr, D).to(dev), anchor_view(sl, K).to(dev),
            anchor_view(tl, K).to(dev), pri.to(dev), w.to(dev), None, float(kw.get("strides", 0.0)),
            {"distance": 0, "gfl": 1, "delta_xywh": 2}[decoder], mode, 4, list(kw.get("means", (0.0,) * 4)),
            list(kw.get("stds", (1.0,) * 4)), abs(math.log(16 / 1000)), 1.0, True, True)
        S, Wt = leaf(sr.double()), leaf(w.double())
        ref = R.bckd_loc_loss(S, tr.double(), sl.double(), tl.double(), pri.double(), decoder=decoder, loss=loss,
                              weight=Wt, **kw)
        ref.backward()
        close(out.cpu(), ref, torch.float32, scale=10)
        close(g.cpu().reshape(S.shape), S.grad, torch.float32, scale=S.grad.abs().max().item())
        close(gw.cpu(), Wt.grad, torch.float32, scale=10)


def test_loc_reductions_avg_factor_tensor_and_points_with_strides():
    sr, tr, sl, tl, pri, w = make_loc("distance", 2, 3, 4, 2, seed=31)
    A = sr.shape[0]
    base = R.bckd_loc_loss(sr, tr, sl, tl, pri, weight=w)
    close(kdops.bckd_loc_loss(sr, tr, sl, tl, pri, weight=w, reduction="mean"), base / A, F64)
    eps = torch.finfo(torch.float32).eps
    af = torch.tensor(6.0, dtype=F64, requires_grad=True)
    out = kdops.bckd_loc_loss(sr, tr, sl, tl, pri, weight=w, avg_factor=af)
    close(out, base / (6.0 + eps), F64)
    out.backward()
    close(af.grad, -base / (6.0 + eps) ** 2, F64)  # a tensor avg_factor stays differentiable
    st = torch.rand(A, dtype=F64) * 8 + 1  # per-anchor strides divide the points
    S, S2 = leaf(sr), leaf(sr)
    a = kdops.bckd_loc_loss(S, tr, sl, tl, pri, strides=st)
    b = R.bckd_loc_loss(S2, tr, sl, tl, pri, strides=st)
    a.backward()
    b.backward()
    close(a, b, F64)
    close(S.grad, S2.grad, F64)


@pytest.mark.triton
def test_triton_loc_points_and_stride_tensor():
    from kdops.triton.bckd_loc_loss import bckd_loc_level_fwd

    dev = triton_device()
    sr, tr, sl, tl, pri, w = [x.float() for x in make_loc("distance", 1, 3, 4, 1, K=5, seed=32)]
    st = torch.rand(sr.shape[0]) * 8 + 1
    out, g, _ = bckd_loc_level_fwd(anchor_view(sr, 4).to(dev), anchor_view(tr, 4).to(dev), anchor_view(sl, 5).to(dev),
                             anchor_view(tl, 5).to(dev), pri.to(dev), None, st.to(dev), 0.0, 0, 0, 4, [0.0] * 4,
                             [1.0] * 4, 4.1, 1.0, True, False)
    S = leaf(sr.double())
    ref = R.bckd_loc_loss(S, tr.double(), sl.double(), tl.double(), pri.double(), strides=st.double())
    ref.backward()
    close(out.cpu(), ref, torch.float32, scale=10)
    close(g.cpu().reshape(S.shape), S.grad, torch.float32, scale=S.grad.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_general_strided_layouts_read_in_place(dtype):
    # (A,K) views with neither anchors nor classes contiguous, and a transposed (K,A) buffer
    # (anchors contiguous): every kernel path; the results must not depend on the layout.
    sr, tr, sl, tl, pri, w = make_loc("gfl", 1, 3, 7, 1, K=6, seed=30)
    wide = lambda x: torch.stack([x, torch.zeros_like(x)], -1).reshape(x.shape[0], -1)[:, ::2]  # noqa: E731
    trans = lambda x: x.t().contiguous().t()  # noqa: E731
    tol = F64 if dtype == F64 else torch.float16
    for conv in (wide, trans):
        a, b = conv(sl.to(dtype)), conv(tl.to(dtype))
        assert not a.is_contiguous()
        A1, A2 = leaf(a), leaf(sl.to(dtype))
        kdops.bckd_cls_loss(A1, b, weight=w, beta=2.0).backward()
        ref = kdops.bckd_cls_loss(A2, tl.to(dtype), weight=w, beta=2.0)
        ref.backward()
        close(A1.grad, A2.grad, tol, scale=A2.grad.abs().max().item())
        R1, R2 = leaf(conv(sr.to(dtype))), leaf(sr.to(dtype))
        x = kdops.bckd_loc_loss(R1, conv(tr.to(dtype)), a, b, pri, decoder="gfl", strides=8.0, reg_max=4)
        y = kdops.bckd_loc_loss(R2, tr.to(dtype), sl.to(dtype), tl.to(dtype), pri, decoder="gfl", strides=8.0,
                                reg_max=4)
        x.backward()
        y.backward()
        close(x, y, tol, scale=10)
        close(R1.grad, R2.grad, tol, scale=R2.grad.abs().max().item())


def _levels_gfl(seed, dtype=F64):
    """Two FPN levels in mmdet's (N,C,H,W) layout (the CPU kernel's in-place path for floats)."""
    lv = [make_loc("gfl", 2, h, w, 1, K=6, seed=seed + h, dtype=dtype) for h, w in [(4, 6), (2, 3)]]
    nchw = [[to_nchw(x[i], 2, h, w) for x, (h, w) in zip(lv, [(4, 6), (2, 3)])] for i in range(4)]
    return nchw, [x[4] for x in lv], [x[5].reshape(2, -1) for x in lv]


def test_levels_weighted_backward_in_place_and_retain_graph():
    # per-level incoming gradients != 1: the saved gradients are scaled in place when autograd
    # frees the graph, out of place while it is retained; every pass gives the reference's
    (sr, tr, sl, tl), pri, w = _levels_gfl(40)
    kw = dict(decoder="gfl", strides=[8, 16], reg_max=4, avg_factor=3.0)
    gl = torch.tensor([0.7, 1.9], dtype=F64)
    S2, W2 = [leaf(x) for x in sr], [leaf(x) for x in w]
    (R.bckd_loc_loss(S2, tr, sl, tl, pri, weight=W2, **kw) * gl).sum().backward()
    S, W = [leaf(x) for x in sr], [leaf(x) for x in w]
    out = (kdops.bckd_loc_loss(S, tr, sl, tl, pri, weight=W, **kw) * gl).sum()
    for retain in (True, True, False):
        for x in S + W:
            x.grad = None
        out.backward(retain_graph=retain)
        for a, b in zip(S + W, S2 + W2):
            close(a.grad, b.grad, F64)


def test_weight_list_holding_none():
    (sr, tr, sl, tl), pri, w = _levels_gfl(41)
    kw = dict(decoder="gfl", strides=[8, 16], reg_max=4)
    W0, W0r = leaf(w[0]), leaf(w[0])
    S, S2 = leaf(sr[1]), leaf(sr[1])
    a = kdops.bckd_loc_loss([sr[0], S], tr, sl, tl, pri, weight=[W0, None], **kw)
    b = R.bckd_loc_loss([sr[0], S2], tr, sl, tl, pri, weight=[W0r, torch.ones_like(w[1])], **kw)
    (a * torch.tensor([2.0, 3.0], dtype=F64)).sum().backward()
    (b * torch.tensor([2.0, 3.0], dtype=F64)).sum().backward()
    close(a, b, F64)
    close(W0.grad, W0r.grad, F64)
    close(S.grad, S2.grad, F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scale_grads_op(dtype):
    g = torch.randn(2, 6, 5, 7).to(dtype)
    cl = torch.randn(2, 6, 5, 7).to(dtype).to(memory_format=torch.channels_last)  # dense, not contiguous
    sliced = torch.randn(4, 9).to(dtype)[:, ::2]  # not dense: the aten fallback
    big = torch.randn(70000 * 3 + 5).to(dtype)  # several tasks, a partial last one
    ones = torch.randn(3, 3).to(dtype)
    xs = [g, cl, sliced, big, ones]
    want = [x.float() * f for x, f in zip(xs, (0.5, -2.0, 3.0, 0.25, 1.0))]
    torch.ops.kdops.scale_grads_(xs, [0.5, -2.0, 3.0, 0.25, 1.0])
    assert cl.is_contiguous(memory_format=torch.channels_last)
    for x, y in zip(xs, want):
        torch.testing.assert_close(x.float(), y.to(dtype).float(), atol=0, rtol=0)


@pytest.mark.triton
def test_triton_levels_contract():
    # kdops::bckd_loc_loss_fwd's CUDA kernel (one launch per level) on head tensors as given:
    # (L,) losses, gradients in the inputs' shapes, weight gradients in the weights'
    from kdops.triton.bckd_loc_loss import bckd_loc_loss_fwd

    dev = triton_device()
    (sr, tr, sl, tl), pri, w = _levels_gfl(42, torch.float32)
    ins = [[x.to(dev) for x in xs] for xs in (sr, tr, sl, tl, pri, w)]
    loss, g, gw = bckd_loc_loss_fwd(*ins, [None, None], [8.0, 16.0], 1, 0, 4, [0.0] * 4, [1.0] * 4,
                               abs(math.log(16 / 1000)), [1.0, 0.5], True, True)
    S, Wt = [leaf(x.double()) for x in sr], [leaf(x.double()) for x in w]
    ref = R.bckd_loc_loss(S, [x.double() for x in tr], [x.double() for x in sl], [x.double() for x in tl],
                          [x.double() for x in pri], decoder="gfl", weight=Wt, strides=[8, 16], reg_max=4)
    ref = ref * torch.tensor([1.0, 0.5], dtype=F64)
    ref.sum().backward()
    assert loss.shape == (2,) and [x.shape for x in g] == [x.shape for x in sr]
    assert [x.shape for x in gw] == [x.shape for x in w]
    close(loss.cpu(), ref.detach(), torch.float32, scale=10)
    for a, b in zip(g + gw, S + Wt):
        close(a.cpu(), b.grad, torch.float32, scale=b.grad.abs().max().item())
