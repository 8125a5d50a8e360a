"""kdops.roi_align against mmdet's SingleRoIExtractor over mmcv's RoIAlign (the peer), the eager
reference (written from mmcv's kernel) and float64 gradcheck."""
import re

import pytest
import torch
from helpers import LOW, assert_compiled_matches_eager, assert_same_across_thread_counts, close, leaf

import kdops
from kdops import reference

STRIDES = [4, 8, 16, 32]


def make(N=2, C=5, img=96, strides=STRIDES, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, C, -(-img // s), -(-img // s), generator=g, dtype=torch.float64).to(dtype)
            for s in strides]


def boxes(R=40, N=2, img=96, seed=1, dtype=torch.float64):
    """RoIs of every size (every level), some partly or wholly outside the image."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(R, 2, generator=g, dtype=torch.float64) * img * 1.2 - 0.1 * img
    wh = torch.rand(R, 2, generator=g, dtype=torch.float64) ** 2 * img * 1.5 + 0.5
    b = torch.randint(0, N, (R, 1), generator=g).double()
    return torch.cat([b, xy, xy + wh], 1).to(dtype)


def peer_extractor(C, strides=STRIDES, **layer):
    mmdet = pytest.importorskip("mmdet.models.roi_heads.roi_extractors")
    cfg = dict(type="RoIAlign", output_size=7, sampling_ratio=0)
    cfg.update(layer)
    return mmdet.SingleRoIExtractor(roi_layer=cfg, out_channels=C, featmap_strides=list(strides))


def test_matches_mmdet_single_roi_extractor_forward_and_backward():
    feats = [leaf(f) for f in make(C=6, img=480, dtype=torch.float32)]
    rois = boxes(R=120, img=480, dtype=torch.float32)
    rois = torch.cat([rois, torch.tensor([[1.0, 30.0, 40.0, 20.0, 41.0]])])  # w h < 0: no level, zeros in mmdet
    ext = peer_extractor(6)
    ref_in = [leaf(f) for f in feats]
    want = ext(ref_in, rois)
    got = kdops.roi_align(feats, rois, STRIDES)
    assert set(reference.roi_levels(rois, 4, 56.0).tolist()) == {-1, 0, 1, 2, 3}  # every level and the -1 row
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[-1], torch.zeros_like(got[-1]))
    w = torch.randn(got.shape)
    for a, b in zip(torch.autograd.grad(got, feats, w), torch.autograd.grad(want, ref_in, w)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aligned,sampling_ratio,size", [(False, 2, (7, 7)), (True, 2, (5, 3)), (False, 0, (4, 6))])
def test_matches_mmcv_roi_align_on_one_level(aligned, sampling_ratio, size):
    mmcv_ops = pytest.importorskip("mmcv.ops")
    f = leaf(make(C=4, img=64, strides=[4], dtype=torch.float32)[0])
    rois = boxes(R=50, img=64, dtype=torch.float32)
    layer = mmcv_ops.RoIAlign(size, spatial_scale=0.25, sampling_ratio=sampling_ratio, pool_mode="avg",
                              aligned=aligned)
    f2 = leaf(f)
    want = layer(f2, rois)
    got = kdops.roi_align(f, rois, 4, output_size=size, sampling_ratio=sampling_ratio, aligned=aligned)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    w = torch.randn(got.shape)
    torch.testing.assert_close(torch.autograd.grad(got, f, w)[0], torch.autograd.grad(want, f2, w)[0],
                               rtol=1e-5, atol=1e-6)


def test_matches_torchvision_when_installed():
    tv = pytest.importorskip("torchvision.ops")
    f = make(C=3, img=64, strides=[8])[0]
    rois = boxes(R=30, img=64)
    want = tv.roi_align(f, rois, (7, 7), spatial_scale=1 / 8, sampling_ratio=0, aligned=True)
    close(kdops.roi_align(f, rois, 8), want, torch.float64)


def test_reference_parity_and_gradcheck_float64():
    feats = make(C=3, img=48)
    rois = boxes(R=14, img=48)
    lv = reference.roi_levels(rois, 4, 6.0)  # a small finest scale spreads these RoIs over the levels
    assert len(set(lv.tolist())) >= 3
    close(kdops.roi_align(feats, rois, STRIDES, finest_scale=6.0), reference.roi_align(feats, rois, lv, [1 / s for s in STRIDES]),
          torch.float64)
    feats, rois = make(N=1, C=2, img=40), boxes(R=8, N=1, img=40)
    xs = [leaf(f) for f in feats]
    assert torch.autograd.gradcheck(lambda *x: kdops.roi_align(list(x), rois, STRIDES, output_size=(3, 2), finest_scale=6.0), xs)
    assert torch.autograd.gradgradcheck(lambda *x: kdops.roi_align(list(x), rois, STRIDES, output_size=(3, 2), finest_scale=6.0), xs)


@pytest.mark.parametrize("dtype", [torch.float32] + list(LOW))
def test_dtypes_accumulate_in_float32(dtype):
    feats64 = make(C=8, img=96)
    rois = boxes(R=60, img=96)
    feats = [leaf(f, dtype) for f in feats64]
    out = kdops.roi_align(feats, rois.to(dtype), STRIDES)
    assert out.dtype == dtype
    # the oracle sees the same rounded inputs (rois cast to the features' dtype, as mmdet does)
    ref_in = [leaf(f.detach().double()) for f in feats]
    r = rois.to(dtype).double()
    want = reference.roi_align(ref_in, r, reference.roi_levels(rois.to(dtype), 4, 56.0), [1 / s for s in STRIDES])
    close(out, want, dtype, scale=want.abs().max().item())
    w = torch.randn(out.shape, dtype=torch.float64)
    got_g = torch.autograd.grad(out, feats, w.to(dtype))
    want_g = torch.autograd.grad(want, ref_in, w.to(dtype).double(), allow_unused=True, materialize_grads=True)
    for a, b in zip(got_g, want_g):
        close(a, b, dtype, scale=max(b.abs().max().item(), 1.0))


def test_out_of_range_rows_give_zeros_and_no_gradient():
    feats = [leaf(f) for f in make(C=3)]
    rois = boxes(R=12)
    rois[0, 0] = 5.0  # image out of range
    rois[1, 0] = -1.0
    rois[2, 1:] = float("nan")
    rois[3, 1:] = torch.tensor([float("inf"), 0.0, float("inf"), 10.0], dtype=torch.float64)
    levels = torch.tensor([0, 1, 2, 3, -1, 4, 0, 1, 2, 3, 1, 0])
    with pytest.raises(ValueError, match=re.escape("`rois` row 0 has image index 5.0, expected an integer in [0, 2)")):
        kdops.roi_align(feats, rois, STRIDES, levels=levels)
    out = kdops.roi_align(feats, rois, STRIDES, levels=levels, validate=False)
    assert torch.equal(out[:6], torch.zeros_like(out[:6]))
    keep = torch.arange(6, 12)
    want = reference.roi_align([f.detach() for f in feats], rois[keep], levels[keep], [1 / s for s in STRIDES])
    close(out[6:], want, torch.float64)
    g = torch.autograd.grad(out[:6].sum() + 0 * out.sum(), feats)
    assert all(torch.equal(x, torch.zeros_like(x)) for x in g)


def test_empty_rois_and_empty_levels():
    feats = [leaf(f) for f in make(C=3)]
    out = kdops.roi_align(feats, torch.zeros(0, 5, dtype=torch.float64), STRIDES)
    assert out.shape == (0, 3, 7, 7)
    g = torch.autograd.grad(out.sum(), feats, allow_unused=True, materialize_grads=True)
    assert all(torch.equal(x, torch.zeros_like(x)) for x in g)
    empty = [leaf(torch.zeros(2, 3, 0, 5, dtype=torch.float64)), feats[1]]
    rois = boxes(R=6)
    out = kdops.roi_align(empty, rois, [4, 8], levels=torch.tensor([0, 1, 0, 1, 0, 1]))
    assert torch.equal(out[0::2], torch.zeros_like(out[0::2]))
    close(out[1::2], reference.roi_align([feats[1]], rois[1::2], torch.zeros(3, dtype=torch.long), [1 / 8]),
          torch.float64)


def test_single_level_pools_every_roi_and_layouts_agree():
    f = make(C=4, img=64, strides=[8])[0]
    rois = boxes(R=20, img=64)
    a = kdops.roi_align(f, rois, 8)
    b = kdops.roi_align([f], rois, [8])
    close(a, reference.roi_align([f], rois, torch.zeros(20, dtype=torch.long), [1 / 8]), torch.float64)
    assert torch.equal(a, b)
    assert torch.equal(a, kdops.roi_align(f.contiguous(memory_format=torch.channels_last), rois, 8))
    assert torch.equal(a, kdops.roi_align(f.transpose(2, 3).contiguous().transpose(2, 3), rois, 8))


def test_bad_inputs():
    feats = make(C=3)
    rois = boxes(R=4)
    with pytest.raises(ValueError, match=re.escape("`rois` must have shape (R,5)")):
        kdops.roi_align(feats, rois[:, :4], STRIDES)
    with pytest.raises(ValueError, match="rois.detach()"):
        kdops.roi_align(feats, rois.clone().requires_grad_(), STRIDES)
    with pytest.raises(ValueError, match=re.escape("`strides` must be 4 positive finite number(s)")):
        kdops.roi_align(feats, rois, [4, 8, 16])
    with pytest.raises(ValueError, match="`output_size` must be a positive int"):
        kdops.roi_align(feats, rois, STRIDES, output_size=(7, 0))
    with pytest.raises(TypeError, match="`sampling_ratio` must be an int"):
        kdops.roi_align(feats, rois, STRIDES, sampling_ratio=2.0)
    with pytest.raises(ValueError, match="`sampling_ratio` must be a finite int >= 0"):
        kdops.roi_align(feats, rois, STRIDES, sampling_ratio=-1)
    with pytest.raises(TypeError, match="`aligned` must be True or False"):
        kdops.roi_align(feats, rois, STRIDES, aligned=1)
    with pytest.raises(ValueError, match="`finest_scale` must be a finite number > 0"):
        kdops.roi_align(feats, rois, STRIDES, finest_scale=0)
    with pytest.raises(TypeError, match="`levels` must have dtype in"):
        kdops.roi_align(feats, rois, STRIDES, levels=torch.zeros(4))
    with pytest.raises(ValueError, match=re.escape("`levels` must have shape (4,)")):
        kdops.roi_align(feats, rois, STRIDES, levels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="`rois` must have dtype"):
        kdops.roi_align(feats, rois.long(), STRIDES)
    huge = rois.clone()
    huge[0, 3] = 1e9
    with pytest.raises(ValueError, match="`rois` row 0 is .* feature pixels"):
        kdops.roi_align(feats, huge, STRIDES, levels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="samples per bin"):  # the raw op refuses it too (no endless loop)
        torch.ops.kdops.roi_align_fwd(feats, huge, torch.zeros(4, dtype=torch.long), [0.25] * 4, 7, 7, 0, True)


def test_deterministic_across_runs_and_thread_counts():
    feats = make(C=16, img=128, dtype=torch.float32)
    rois = torch.cat([boxes(R=300, img=128, dtype=torch.float32)] * 2)  # repeated RoIs add into the same pixels

    def run():
        fl = [leaf(f) for f in feats]
        out = kdops.roi_align(fl, rois, STRIDES)
        return (out,) + torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum(), fl)

    assert_same_across_thread_counts(run)


@pytest.mark.parametrize("validate", [True, False])
def test_torch_compile_fullgraph(validate):
    feats = make(C=4, dtype=torch.float32)
    rois = boxes(R=20, dtype=torch.float32)

    def f(feats, rois):
        return (kdops.roi_align(feats, rois, STRIDES, validate=validate) ** 2).sum()

    assert_compiled_matches_eager(f, feats, rois)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        feats = [torch.empty(2, 8, 24, 24, dtype=torch.bfloat16, requires_grad=True),
                 torch.empty(2, 8, 12, 12, dtype=torch.bfloat16, requires_grad=True)]
        rois = torch.empty(9, 5, dtype=torch.float32)
        out = kdops.roi_align(feats, rois, [4, 8], output_size=(7, 5))
        assert out.shape == (9, 8, 7, 5) and out.dtype == torch.bfloat16
        g = torch.ops.kdops.roi_align_bwd(out, rois.bfloat16(), torch.zeros(9, dtype=torch.long), [0.25, 0.125], 0,
                                          True, [s for f in feats for s in f.shape])
        assert [x.shape for x in g] == [f.shape for f in feats]


def test_raw_op_with_hostile_rois_levels_and_batch_indices():
    """Straight into the kernel (also run under AddressSanitizer by tests/sanitize.sh): NaN / inf
    coordinates, RoIs far outside or degenerate, image indices and levels out of range. Rows the
    reference can pool agree with it; the others are zeros; the gradient is finite."""
    g = torch.Generator().manual_seed(7)
    feats = [torch.randn(2, 3, h, w, generator=g, dtype=torch.float64) for h, w in ((9, 11), (5, 6), (1, 1))]
    scales = [0.25, 0.125, 1 / 32]
    sizes = [s for f in feats for s in f.shape]
    R = 200
    rois = torch.rand(R, 5, generator=g, dtype=torch.float64) * 160 - 40
    rois[:, 0] = torch.randint(-1, 4, (R,), generator=g).double() + torch.where(
        torch.rand(R, generator=g) < 0.1, 0.5, 0.0).double()  # out of range and fractional images
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 2e3, -2e3, 0.0], dtype=torch.float64)
    pick = torch.rand(R, 5, generator=g) < 0.1
    rois[pick] = special[torch.randint(0, len(special), (int(pick.sum()),), generator=g)]
    levels = torch.randint(-1, 4, (R,), generator=g)
    for sr, aligned in ((0, True), (2, False), (0, False)):
        out = torch.ops.kdops.roi_align_fwd(feats, rois, levels, scales, 3, 4, sr, aligned)
        gfeat = torch.ops.kdops.roi_align_bwd(torch.ones_like(out), rois, levels, scales, sr, aligned, sizes)
        assert all(x.isfinite().all() for x in gfeat)
        b = rois[:, 0].trunc()
        ok = (levels >= 0) & (levels < 3) & (b >= 0) & (b < 2)
        assert torch.equal(out[~ok], torch.zeros_like(out[~ok]))
        finite = ok & rois[:, 1:].isfinite().all(1)
        rows = finite.nonzero().squeeze(1)
        want = reference.roi_align(feats, rois[rows], levels[rows], scales, (3, 4), sr, aligned)
        close(out[rows], want, torch.float64)
        assert out.isfinite().all()
