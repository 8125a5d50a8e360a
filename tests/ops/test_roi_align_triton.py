"""The Triton kernels of kdops::roi_align_fwd / _bwd (kdops/triton/roi_align.py) against the eager
reference (kdops/reference/roi_align.py, bitwise mmcv's CPU RoIAlign) and autograd through it.

Run under TRITON_INTERPRET=1 on the CPU (make test) or on a GPU. The launchers are called directly
(not kdops.roi_align, whose CPU kernel may not be built). Shapes are small: the interpreter costs
about a millisecond per program instance and the deterministic backward walks its samples one by one.
"""
from __future__ import annotations

import pytest
import torch
from helpers import close, deterministic_algorithms, triton_device

from kdops.reference.roi_align import roi_align as reference

# NaN / inf RoIs: numpy warns about its inf / NaN arithmetic under the interpreter
pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

N, C = 2, 3
SIZES = [(12, 10), (7, 6), (4, 5)]  # an image of 48 x 40 at strides 4, 8, 16 (rounded up)
SCALES = [0.25, 0.125, 0.0625]
NAN = float("nan")


def features(dtype=torch.float32, seed=0):
    """Three levels, none of them contiguous: channels_last, a strided slice, an H/W transpose."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    (h0, w0), (h1, w1), (h2, w2) = SIZES
    f0 = rnd(N, C, h0, w0).to(memory_format=torch.channels_last)
    f1 = rnd(N, C, h1, 2 * w1 + 1)[..., 1::2]
    f2 = rnd(N, C, w2, h2).transpose(2, 3)
    feats = [f0, f1, f2]
    assert not any(f.is_contiguous() for f in feats) and [f.shape[2:] for f in feats] == SIZES
    return feats


def rois_and_levels(dtype=torch.float32, seed=1, nan=True):
    """RoIs on every level (several per level, sizes giving adaptive grids of 1 to 4 samples), one
    partly outside the map, one much wider than the map (most samples outside it), one tall;
    rows with level -1 / L, image indices out of range (2, -1) or fractional (-0.5 and 1.7 truncate
    to 0 and 1, as mmcv's int cast), an inverted box, and (nan=True) a NaN RoI (zeros)."""
    g = torch.Generator().manual_seed(seed)
    R = 12
    xy = torch.rand(R, 2, generator=g) * torch.tensor([34.0, 40.0])
    wh = torch.rand(R, 2, generator=g) * 30 + 2
    rand = torch.cat([torch.randint(0, N, (R, 1), generator=g).double(), xy, xy + wh], 1)
    rows = rand.tolist() + [
        [0, -12.0, -6.0, 18.0, 20.0],  # partly outside (above, left of) the map
        [1, 30.0, 35.0, 70.0, 60.0],  # partly outside (below, right of) it
        [1, -500.0, 10.0, 560.0, 21.0],  # 1060 px wide: 53 samples per bin on level 0, the map is 10
        [0, 5.0, -300.0, 20.0, 330.0],  # tall, on level 1
        [0, 4.0, 4.0, 20.0, 20.0],  # level -1
        [1, 4.0, 4.0, 20.0, 20.0],  # level L
        [2, 4.0, 4.0, 20.0, 20.0],  # image 2 (out of range)
        [-1, 4.0, 4.0, 20.0, 20.0],  # image -1
        [-0.5, 4.0, 6.0, 20.0, 28.0],  # image 0
        [1.7, 4.0, 6.0, 20.0, 28.0],  # image 1
        [0, 20.0, 24.0, 12.0, 10.0],  # inverted: 0 samples when aligned (grid <= 0), 1x1 when not
    ]
    levels = list(torch.randint(0, len(SIZES), (R,), generator=g).tolist())
    levels[:3] = [0, 1, 2]
    levels += [0, 2, 0, 1, -1, len(SIZES), 0, 1, 1, 2, 0]
    if nan:
        rows += [[0, NAN, 4.0, 20.0, 20.0], [1, 4.0, 4.0, 20.0, NAN], [NAN, 4.0, 4.0, 20.0, 20.0]]
        levels += [0, 1, 0]
    return torch.tensor(rows, dtype=torch.float64).to(dtype), torch.tensor(levels)


def finite_rows(rois):
    return rois.isfinite().all(1)


def run_fwd(feats, rois, levels, out=(7, 5), sr=0, aligned=True):
    from kdops.triton.roi_align import roi_align_fwd

    dev = triton_device()
    return roi_align_fwd([f.to(dev) for f in feats], rois.to(dev), levels.to(dev), SCALES, out[0], out[1], sr,
                         aligned).cpu()


def run_bwd(grad, rois, levels, sizes, sr=0, aligned=True):
    from kdops.triton.roi_align import roi_align_bwd

    dev = triton_device()
    return [g.cpu() for g in roi_align_bwd(grad.to(dev), rois.to(dev), levels.to(dev), SCALES, sr, aligned, sizes)]


def ref_grads(feats, rois, levels, grad, out, sr, aligned):
    """Autograd of the reference w.r.t. the features."""
    leaves = [f.detach().clone().requires_grad_() for f in feats]
    return torch.autograd.grad(reference(leaves, rois, levels, SCALES, out, sr, aligned), leaves, grad)


def sizes_of(feats):
    return [s for f in feats for s in f.shape]


@pytest.mark.parametrize("sr", [0, 2])
@pytest.mark.parametrize("aligned", [True, False])
def test_forward_and_atomic_backward_match_reference_fp32(sr, aligned):
    feats = features()
    rois, levels = rois_and_levels()
    out = run_fwd(feats, rois, levels, (7, 5), sr, aligned)
    keep = finite_rows(rois)
    ref = reference(feats, rois, levels, SCALES, (7, 5), sr, aligned)
    assert out.shape == (rois.shape[0], C, 7, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not out[~keep].any(), "NaN RoIs give zeros"
    bad = (levels < 0) | (levels >= len(SIZES)) | (rois[:, 0] <= -1) | (rois[:, 0] >= N)
    assert bad.sum() == 4 and not out[bad].any()  # level -1, level L, image 2, image -1
    assert out[keep & ~bad].abs().amax((1, 2, 3)).gt(0).sum() >= 12  # the rows that pool something
    # backward (default path: float atomics)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    got = run_bwd(grad, rois, levels, sizes_of(feats), sr, aligned)
    want = ref_grads(feats, rois, levels, grad, (7, 5), sr, aligned)
    for a, b, f in zip(got, want, feats):
        assert a.shape == f.shape and a.dtype == torch.float32 and a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert a.abs().sum() > 0


@pytest.mark.parametrize("sr,aligned", [(0, True), (2, False)])
def test_deterministic_backward_matches_reference_and_is_bitwise_reproducible(sr, aligned):
    feats = features()
    rois, levels = rois_and_levels()
    pick = torch.tensor([0, 1, 2, 12, 13, 15, 16, 17, 18, 20, 21, 23, 24, 25])  # all levels, bad rows, NaNs
    rois, levels = rois[pick], levels[pick]
    out = (3, 2)
    grad = torch.randn(len(pick), C, *out, generator=torch.Generator().manual_seed(3))
    with deterministic_algorithms():
        got = run_bwd(grad, rois, levels, sizes_of(feats), sr, aligned)
        again = run_bwd(grad, rois, levels, sizes_of(feats), sr, aligned)
    want = ref_grads(feats, rois, levels, grad, out, sr, aligned)
    for a, b, c in zip(got, want, again):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(a, c)
        assert a.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    feats = features(dtype)
    rois, levels = rois_and_levels(dtype, nan=False)
    out = run_fwd(feats, rois, levels, (3, 3), 0, True)
    ref = reference(feats, rois, levels, SCALES, (3, 3), 0, True)
    assert out.dtype == dtype
    close(out, ref, dtype, scale=ref.abs().max().item())
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    got = run_bwd(grad, rois, levels, sizes_of(feats), 0, True)
    want = ref_grads(feats, rois, levels, grad, (3, 3), 0, True)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        close(a, b, dtype, scale=b.abs().max().item())


def test_hostile_coordinates_end_with_zeros_and_finite_gradients():
    # inf / huge RoIs: the adaptive grid is non-finite (0 samples) or has sample indices beyond 2^24
    # (dropped); a 2e6 px wide one still pools the ~2W+3 samples near the map. Every loop ends.
    feats = [f[:, :2] for f in features()]
    inf = float("inf")
    rois = torch.tensor([[0, -inf, 0.0, inf, 9.0], [1, 0.0, inf, 5.0, inf], [0, -1e30, -1e30, 1e30, 1e30],
                         [1, -1e6, 3.0, 1e6, 20.0], [0, 1e30, 1e30, 2e30, 2e30], [0, NAN, NAN, NAN, NAN]])
    levels = torch.tensor([0, 1, 0, 1, 2, 0])
    sizes = sizes_of(feats)
    for sr in (0, 2):
        out = run_fwd(feats, rois, levels, (2, 2), sr, True)
        assert out.isfinite().all()
        # with sampling_ratio 2 even the wide RoI's 2 x 2 samples per bin are far outside the map
        pooled = [3] if sr == 0 else []
        assert out[pooled].abs().sum() > 0 if pooled else True
        assert not out[[i for i in range(6) if i not in pooled]].any()
        grad = torch.ones(out.shape)
        atomic = run_bwd(grad, rois, levels, sizes, sr, True)
        with deterministic_algorithms():
            det = run_bwd(grad, rois, levels, sizes, sr, True)
        for a, b in zip(atomic, det):
            assert a.isfinite().all()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_empty_inputs_launch_nothing_and_give_zeros():
    feats = features()
    rois, levels = rois_and_levels(nan=False)
    out = run_fwd(feats, rois[:0], levels[:0])
    assert out.shape == (0, C, 7, 5)
    grads = run_bwd(torch.zeros(0, C, 7, 5), rois[:0], levels[:0], sizes_of(feats))
    assert [g.shape for g in grads] == [f.shape for f in feats] and not any(g.any() for g in grads)
    # no channels
    empty_c = [f[:, :0] for f in feats]
    assert run_fwd(empty_c, rois, levels).shape == (rois.shape[0], 0, 7, 5)
    assert [g.shape for g in run_bwd(torch.zeros(rois.shape[0], 0, 7, 5), rois, levels, sizes_of(empty_c))] == \
        [f.shape for f in empty_c]
    # an empty level: its rows are zeros, the other levels are unaffected
    f = [feats[0], feats[1][:, :, :0], feats[2]]
    pick = torch.tensor([0, 1, 2])  # levels 0, 1, 2
    out = run_fwd(f, rois[pick], levels[pick], (2, 2))
    assert not out[1].any()
    torch.testing.assert_close(out[[0, 2]], run_fwd(feats, rois[pick], levels[pick], (2, 2))[[0, 2]])
    for det in (False, True):
        with deterministic_algorithms(det):
            g = run_bwd(torch.ones(3, C, 2, 2), rois[pick], levels[pick], sizes_of(f))
        assert g[1].shape == (N, C, 0, 6) and g[0].abs().sum() > 0 and g[2].abs().sum() > 0
