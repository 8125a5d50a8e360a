"""kdops.mask_pool against a loop over objects (float64), gradcheck and the Triton kernels."""
import re

import pytest
import torch
from helpers import LOW, assert_compiled_matches_eager, close, compile_for_gpu, leaf, triton_device

import kdops
from kdops import reference


def make(N=2, C=5, H=9, W=11, K=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    m = (torch.rand(K, H, W, generator=g, dtype=torch.float64) > 0.6).to(dtype)
    return f, m, torch.randint(0, N, (K,), generator=g)


def soft_masks(K, H, W, seed=1):
    # instance-like soft masks: a random 0/1 blob times a random weight (float masks get gradients)
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(K, H, W, generator=g, dtype=torch.float64) > 0.5) * torch.rand(K, H, W, generator=g,
                                                                                    dtype=torch.float64)


def oracle(f, m, bi):
    # one object at a time, straight from the definition, in float64; objects without an image give 0
    N = f.shape[0]
    rows = [(f[b].double() * m[k].double()).sum((1, 2)) if 0 <= b < N else f.new_zeros(f.shape[1]).double()
            for k, b in enumerate(bi.tolist())]
    return torch.stack(rows) if rows else torch.zeros(0, f.shape[1], dtype=torch.float64)


def grads_vs_oracle(f, m, bi, w):
    """(out, grad_f, grad_m) of kdops and of the oracle for <out, w>, on float copies of f, m."""
    F, M = leaf(f), leaf(m)
    out = kdops.mask_pool(F, M, bi)
    gF, gM = torch.autograd.grad((out.double() * w).sum(), (F, M))
    Fr, Mr = leaf(f, torch.float64), leaf(m, torch.float64)
    ref = oracle(Fr, Mr, bi)
    rF, rM = torch.autograd.grad((ref * w).sum(), (Fr, Mr))
    return (out, gF, gM), (ref, rF, rM)


def maps_masks_weights(N, C, H, W, masks, seed, dtype):
    """(N,C,H,W) random maps and the given float64 masks in dtype, and float64 output weights."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    return f, masks.to(dtype), torch.randn(masks.shape[0], C, generator=g, dtype=torch.float64)


def assert_grads_match_oracle(f, m, w, bi, dtype):
    """kdops' result and both gradients of <out, w> equal the oracle's at dtype's tolerance; returns
    kdops' (out, grad_f)."""
    (out, gF, gM), (ref, rF, rM) = grads_vs_oracle(f, m, bi, w)
    assert out.dtype == gF.dtype == gM.dtype == dtype
    close(out, ref, dtype, scale=ref.abs().max().item())
    close(gF, rF, dtype, scale=rF.abs().max().item())
    close(gM, rM, dtype, scale=rM.abs().max().item())
    return out, gF


def test_parity_and_grads_float64():
    f, m, bi = make()
    F, M = leaf(f), leaf(m)
    out = kdops.mask_pool(F, M, bi)
    Fr, Mr = leaf(f), leaf(m)
    ref = oracle(Fr, Mr, bi)
    close(out, ref, torch.float64)
    close(reference.mask_pool(f, m, bi), ref, torch.float64)
    w = torch.randn(out.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (F, M)), torch.autograd.grad((ref * w).sum(), (Fr, Mr))):
        close(a, b, torch.float64)
    assert torch.autograd.gradcheck(lambda f, m: kdops.mask_pool(f, m, bi), (leaf(f[:, :2]), leaf(m)))


@pytest.mark.parametrize("dtype", [torch.float32] + list(LOW))
def test_low_precision(dtype):
    f, m, bi = make(dtype=dtype)
    out = kdops.mask_pool(f, m, bi)
    assert out.dtype == dtype
    ref = oracle(f, m, bi)
    close(out, ref, dtype, scale=ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32] + list(LOW))
def test_parity_odd_sizes_unsorted_images_all_dtypes(dtype):
    # odd sizes, objects in no particular image order, a map large enough for several
    # float32 pixel blocks in the half/bfloat16 path (H*W = 2961 > 2048), soft masks
    bi = torch.tensor([2, 0, 0, 1, 2, 0, 1, 1, 2, 0, 2, 2, 1])
    assert_grads_match_oracle(*maps_masks_weights(3, 7, 47, 63, soft_masks(13, 47, 63, seed=5), 4, dtype), bi, dtype)


def box_confined_masks(K, H, W, seed):
    """Instance masks nonzero only inside a random box each (some one row tall, one empty, one
    on the last row), soft values: most row bands of the map meet only some of the objects."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(K, H, W, dtype=torch.float64)
    for k in range(K):
        y0 = int(torch.randint(0, H, (1,), generator=g))
        h = int(torch.randint(1, max(2, H // 3), (1,), generator=g))
        x0 = int(torch.randint(0, W, (1,), generator=g))
        w = int(torch.randint(1, max(2, W // 2), (1,), generator=g))
        blob = torch.rand(min(h, H - y0), min(w, W - x0), generator=g, dtype=torch.float64)
        m[k, y0:y0 + h, x0:x0 + w] = blob * (blob > 0.3)
    m[0] = 0  # a zero mask pools to exactly 0
    m[1, -1, :3] = 1.0  # one on the last row only
    m[1, :-1] = 0
    return m


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32] + list(LOW))
def test_masks_confined_to_boxes_match_the_dense_oracle(dtype):
    # the CPU kernel multiplies each band of rows only with the masks that have a nonzero row
    # there: every object, band and gradient must still equal the dense definition, with
    # several bands per map (W = 40: 51 rows per 2048-pixel band, H = 160 -> 4 bands), objects
    # unsorted by image, masks of one row and a zero mask
    N, H = 3, 160
    f, m, w = maps_masks_weights(N, 6, H, 40, box_confined_masks(14, H, 40, seed=10), 9, dtype)
    bi = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1])
    out, gF = assert_grads_match_oracle(f, m, w, bi, dtype)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    # rows of an image that no mask of that image touches get an exact zero gradient
    touched = torch.zeros(N, H, dtype=torch.bool)
    for k, b in enumerate(bi.tolist()):
        touched[b] |= (m[k] != 0).any(1)
    assert (gF.permute(0, 2, 1, 3)[~touched] == 0).all()


def test_nan_in_the_map_reaches_only_the_objects_whose_band_it_is_in():
    # a NaN far from an object's mask rows does not poison it (the dense product would)
    f = torch.randn(1, 3, 200, 20, dtype=torch.float64)
    m = torch.zeros(2, 200, 20, dtype=torch.float64)
    m[0, 2:5, 3:9] = 1.0
    m[1, 190:195, 1:4] = 1.0
    f[0, 1, 196, 10] = float("nan")
    out = kdops.mask_pool(f, m, torch.tensor([0, 0]))
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1, 1])  # same band: 0 * NaN, as dense
    torch.testing.assert_close(out[0], oracle(f.nan_to_num(0.0), m, torch.tensor([0, 0]))[0])


def test_float32_accumulates_in_float32_on_a_coco_sized_map():
    # P3 size: 15200-term sums of positive values with a large mean; a half-precision
    # accumulator would be off by far more than fp16's output rounding
    g = torch.Generator().manual_seed(6)
    f = torch.rand(2, 4, 100, 152, generator=g, dtype=torch.float64) + 1
    m = soft_masks(5, 100, 152, seed=7)
    bi = torch.tensor([0, 1, 1, 0, 1])
    ref = oracle(f, m, bi)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        fd, md = f.to(dtype), m.to(dtype)
        out = kdops.mask_pool(fd, md, bi)
        exact = oracle(fd, md, bi)  # the rounded inputs, summed exactly
        rel = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]  # ~ output rounding
        torch.testing.assert_close(out.double(), exact, rtol=rel, atol=0)
    close(kdops.mask_pool(f.float(), m.float(), bi), ref, torch.float32, scale=ref.abs().max().item())


def test_gradcheck_both_inputs_unsorted_and_out_of_range():
    g = torch.Generator().manual_seed(8)
    f = leaf(torch.randn(3, 3, 5, 6, generator=g, dtype=torch.float64))
    m = leaf(soft_masks(6, 5, 6, seed=9))
    bi = torch.tensor([2, 0, 5, 2, -1, 0])  # unsorted, two objects without an image
    assert torch.autograd.gradcheck(lambda f, m: kdops.mask_pool(f, m, bi), (f, m))
    assert torch.autograd.gradgradcheck(lambda f, m: kdops.mask_pool(f, m, bi), (f, m))
    # only one input requiring grad: the backward op is asked for that gradient alone
    assert torch.autograd.gradcheck(lambda f: kdops.mask_pool(f, m.detach(), bi), (f,))
    assert torch.autograd.gradcheck(lambda m: kdops.mask_pool(f.detach(), m, bi), (m,))


def test_backward_op_computes_only_what_is_asked():
    f, m, bi = make()
    g = torch.randn(7, 5, dtype=torch.float64)
    gf, gm = torch.ops.kdops.mask_pool_bwd(g, f, m, bi, True, False)
    assert gf.shape == f.shape and gm.numel() == 0
    gf2, gm2 = torch.ops.kdops.mask_pool_bwd(g, f, m, bi, False, True)
    assert gf2.numel() == 0 and gm2.shape == m.shape
    F, M = leaf(f), leaf(m)
    rF, rM = torch.autograd.grad((oracle(F, M, bi) * g).sum(), (F, M))
    close(gf, rF, torch.float64)
    close(gm2, rM, torch.float64)


def test_bool_masks():
    f, m, bi = make()
    close(kdops.mask_pool(f, m.bool(), bi), oracle(f, m, bi), torch.float64)


def test_bool_and_uint8_masks_get_no_gradient_float_masks_do():
    f, m, bi = make(dtype=torch.float32)
    F = leaf(f)
    for mk in (m.bool(), m.to(torch.uint8)):
        out = kdops.mask_pool(F, mk, bi)
        close(out, oracle(f, m, bi), torch.float32, scale=10)
        (gF,) = torch.autograd.grad(out.sum(), F)
        assert gF.shape == f.shape
    # a float mask of another dtype is cast to the feature's dtype, differentiably
    M64 = leaf(m, torch.float64)
    out = kdops.mask_pool(F, M64, bi)
    assert out.dtype == torch.float32
    gF, gM = torch.autograd.grad(out.sum(), (F, M64))
    assert gM.dtype == torch.float64
    Fr, Mr = leaf(f, torch.float64), leaf(m, torch.float64)
    rM = torch.autograd.grad(oracle(Fr, Mr, bi).sum(), Mr)[0]
    close(gM, rM, torch.float32, scale=rM.abs().max().item())


def test_empty_and_out_of_range_batch():
    f, m, bi = make()
    assert kdops.mask_pool(f, m[:0], bi[:0]).shape == (0, 5)
    out = kdops.mask_pool(f, m[:2], torch.tensor([0, 5]))
    assert not out[1].any() and out[0].any()


def test_empty_inputs_and_their_gradients():
    f, m, bi = make()
    F = leaf(f)
    out = kdops.mask_pool(F, leaf(m[:0]), bi[:0])
    assert out.shape == (0, 5)
    (gF,) = torch.autograd.grad(out.sum(), F)
    assert gF.shape == f.shape and not gF.any()
    # no images: every object is out of range
    z = kdops.mask_pool(torch.zeros(0, 5, 9, 11, dtype=torch.float64), m, bi)
    assert z.shape == (7, 5) and not z.any()
    # no channels, no pixels
    assert kdops.mask_pool(f[:, :0], m, bi).shape == (7, 0)
    M = leaf(m[:, :0])
    e = kdops.mask_pool(leaf(f[:, :, :0]), M, bi)
    assert e.shape == (7, 5) and not e.any()
    assert torch.autograd.grad(e.sum(), M)[0].shape == (7, 0, 11)


def test_out_of_range_objects_send_and_get_no_gradient():
    f, m, _ = make(K=6)
    bi = torch.tensor([0, 9, 1, -3, 1, 2])  # N = 2: objects 1, 3 and 5 have no image
    F, M = leaf(f), leaf(m)
    out = kdops.mask_pool(F, M, bi)
    assert not out[[1, 3, 5]].any() and out[[0, 2, 4]].all()
    w = torch.randn(out.shape, dtype=torch.float64)
    gF, gM = torch.autograd.grad((out * w).sum(), (F, M))
    assert not gM[[1, 3, 5]].any() and gM[[0, 2, 4]].any()
    keep = torch.tensor([0, 2, 4])
    Fr = leaf(f)
    close(gF, torch.autograd.grad((oracle(Fr, m[keep], bi[keep]) * w[keep]).sum(), Fr)[0], torch.float64)


def test_non_contiguous_inputs():
    f, m, bi = make(C=6)
    m = soft_masks(7, 9, 11, seed=3)
    ref = oracle(f, m, bi)
    cl = f.contiguous(memory_format=torch.channels_last)
    nc = f.transpose(2, 3).contiguous().transpose(2, 3)
    mt = m.transpose(1, 2).contiguous().transpose(1, 2)
    for ff, mm in ((cl, m), (nc, m), (f, mt), (f[:, ::2], m)):
        r = ref if ff.shape[1] == 6 else oracle(ff, m, bi)
        close(kdops.mask_pool(ff, mm, bi), r, torch.float64)
    F = leaf(cl)
    gF = torch.autograd.grad(kdops.mask_pool(F, m, bi).sum(), F)[0]
    Fr = leaf(f)
    close(gF, torch.autograd.grad(oracle(Fr, m, bi).sum(), Fr)[0], torch.float64)


def test_bad_inputs():
    f, m, bi = make()
    with pytest.raises(ValueError, match=re.escape("`masks` must have shape (K,9,11)")):
        kdops.mask_pool(f, m[:, :3], bi)
    with pytest.raises(ValueError, match=re.escape("`batch_index` must have shape (7,)")):
        kdops.mask_pool(f, m, bi[:3])
    with pytest.raises(TypeError, match="`batch_index` must have dtype"):
        kdops.mask_pool(f, m, bi.int())
    with pytest.raises(ValueError, match="`feature` must be 4-D"):
        kdops.mask_pool(f[0], m, bi)


@pytest.mark.parametrize(
    "args, exc, words",
    [
        (lambda f, m, b: (f, m[0], b), ValueError, "`masks` must be 3-D"),
        (lambda f, m, b: (f, m.int(), b), TypeError, "`masks` must have dtype"),
        (lambda f, m, b: (f.long(), m, b), TypeError, "`feature` must have dtype"),
        (lambda f, m, b: (f, m, b[:, None]), ValueError, "`batch_index` must be 1-D"),
        (lambda f, m, b: (f.numpy(), m, b), TypeError, "`feature` must be a torch.Tensor"),
        (lambda f, m, b: (f, m, b.tolist()), TypeError, "`batch_index` must be a torch.Tensor"),
        (lambda f, m, b: (f, m.to("meta"), b), ValueError, "`masks` is on meta"),
    ],
)
def test_more_bad_inputs(args, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        kdops.mask_pool(*args(*make()))


def test_deterministic_two_runs_and_deterministic_mode():
    N, C, H, W, K = 2, 16, 23, 29, 40
    g = torch.Generator().manual_seed(10)
    f = torch.randn(N, C, H, W, generator=g)
    m = soft_masks(K, H, W, seed=11).float()
    bi = torch.randint(0, N, (K,), generator=g)
    w = torch.randn(K, C, generator=g)

    def run():
        F, M = leaf(f), leaf(m)
        out = kdops.mask_pool(F, M, bi)
        return (out, *torch.autograd.grad((out * w).sum(), (F, M)))

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a, b = run(), run()
    finally:
        torch.use_deterministic_algorithms(before)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    close(a[0], oracle(f, m, bi), torch.float32, scale=a[0].abs().max().item())


def test_torch_compile_fullgraph():
    f, m, bi = make(dtype=torch.float32)
    a_in, b_in = leaf(f), leaf(f)
    cf = torch.compile(lambda f, m, b: kdops.mask_pool(f, m, b).pow(2).sum(), fullgraph=True, backend="aot_eager")
    a = cf(a_in, m, bi)
    b = kdops.mask_pool(b_in, m, bi).pow(2).sum()
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a_in.grad, b_in.grad)


def test_torch_compile_fullgraph_float_and_bool_masks():
    f, m, bi = make(dtype=torch.float32)
    ms = soft_masks(7, 9, 11).float()

    def fn(xs, mb, bi):
        feat, mask = xs
        return kdops.mask_pool(feat, mask, bi).pow(2).sum() + kdops.mask_pool(feat * 2, mb, bi).sum()

    assert_compiled_matches_eager(fn, [f, ms], m.bool(), bi)


def test_torch_compile_inductor():
    f, m, bi = make(dtype=torch.float32)
    ms = soft_masks(7, 9, 11).float()
    conv = torch.nn.Conv2d(5, 5, 1)

    def step(x, mask):
        return kdops.mask_pool(conv(x), mask, bi).square().sum()

    runs = []
    for fn in (torch.compile(step, fullgraph=True), step):
        x, mk = leaf(f), leaf(ms)
        out = fn(x, mk)
        out.backward()
        runs.append((out, x.grad, mk.grad))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        f = torch.empty(2, 8, 13, 17, dtype=torch.bfloat16)
        out = kdops.mask_pool(f, torch.empty(11, 13, 17, dtype=torch.bool), torch.zeros(11, dtype=torch.int64))
        assert out.shape == (11, 8) and out.dtype == torch.bfloat16
        gf, gm = torch.ops.kdops.mask_pool_bwd(out, f, torch.empty(11, 13, 17, dtype=torch.bfloat16),
                                               torch.zeros(11, dtype=torch.int64), True, False)
        assert gf.shape == f.shape and gm.numel() == 0


def test_reference_fallback_without_the_extension():
    # KDOPS_BACKEND=reference: no kernels, the object loop runs (bool masks cast, float masks differentiable)
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = (
        "import warnings, torch, kdops\n"
        "warnings.simplefilter('ignore')\n"
        "assert not kdops.HAS_C\n"
        "f = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)\n"
        "m = torch.rand(3, 4, 5, dtype=torch.float64, requires_grad=True)\n"
        "bi = torch.tensor([1, 7, 0])\n"
        "out = kdops.mask_pool(f, m, bi)\n"
        "assert not out[1].any() and torch.allclose(out[0], (f[1] * m[0]).sum((1, 2)))\n"
        "assert torch.allclose(kdops.mask_pool(f, m > 0.5, bi)[2], (f[0] * (m[2] > 0.5)).sum((1, 2)))\n"
        "assert torch.autograd.gradcheck(lambda f, m: kdops.mask_pool(f, m, bi), (f, m))\n"
        "print('OK')\n")
    env = dict(os.environ, PYTHONPATH=root, KDOPS_BACKEND="reference")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_image_segments_cover_every_object_once():
    pytest.importorskip("triton")
    from kdops.triton.mask_pool import image_segments

    g = torch.Generator().manual_seed(12)
    N = 4
    bi = torch.randint(-1, N + 1, (37,), generator=g)  # includes -1 and N (out of range)
    bi[:3] = torch.tensor([-7, 1, 1])
    for block in (1, 2, 4, 16, 64):
        order, bounds, tiles = image_segments(bi, N, block)
        assert tiles.shape[1] == 3 and tiles.shape[0] <= min(37, -(-37 // block) + N)
        seen = []
        for n, lo, hi in tiles.tolist():
            assert hi - lo <= block
            if lo >= hi:
                continue
            assert bounds[n] <= lo and hi <= bounds[n + 1]
            ks = order[lo:hi].tolist()
            assert all(bi[k] == n for k in ks)
            seen += ks
        valid = [k for k in range(37) if 0 <= bi[k] < N]
        assert sorted(seen) == valid  # each object with an image exactly once
        for n in range(N):  # segments keep object order (stable)
            seg = order[bounds[n]:bounds[n + 1]].tolist()
            assert seg == [k for k in range(37) if bi[k] == n]


# --------------------------------------------------------------------------- Triton
def _triton_case(dtype, N=3, C=6, H=7, W=9, K=11, seed=13):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    m = soft_masks(K, H, W, seed=seed + 1).to(dtype)
    bi = torch.randint(0, N, (K,), generator=g)
    bi[[2, 5]] = torch.tensor([N + 4, -1])  # objects without an image
    w = torch.randn(K, C, generator=g, dtype=torch.float64).to(dtype)
    return f, m, bi, w


def _oracle_all(f, m, bi, w):
    F, M = leaf(f, torch.float64), leaf(m, torch.float64)
    ref = oracle(F, M, bi)
    gF, gM = torch.autograd.grad((ref * w.double()).sum(), (F, M))
    return ref, gF, gM


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_triton_forward_and_backward_match_oracle(dtype):
    from kdops.triton.mask_pool import mask_pool_bwd, mask_pool_fwd

    dev = triton_device()
    f, m, bi, w = _triton_case(dtype)
    out = mask_pool_fwd(f.to(dev), m.to(dev), bi.to(dev))
    gf, gm = mask_pool_bwd(w.to(dev), f.to(dev), m.to(dev), bi.to(dev), True, True)
    ref, rF, rM = _oracle_all(f, m, bi, w)
    assert out.dtype == gf.dtype == gm.dtype == dtype
    close(out.cpu(), ref, dtype, scale=ref.abs().max().item())
    close(gf.cpu(), rF, dtype, scale=rF.abs().max().item())
    close(gm.cpu(), rM, dtype, scale=rM.abs().max().item())
    assert not out[[2, 5]].any() and not gm[[2, 5]].any()
    # only what is asked for
    gf1, gm1 = mask_pool_bwd(w.to(dev), f.to(dev), m.to(dev), bi.to(dev), True, False)
    assert gm1.numel() == 0 and torch.equal(gf1, gf)
    gf2, gm2 = mask_pool_bwd(w.to(dev), f.to(dev), m.to(dev), bi.to(dev), False, True)
    assert gf2.numel() == 0 and torch.equal(gm2, gm)
    # fixed summation order: bitwise reproducible
    again = mask_pool_bwd(w.to(dev), f.to(dev), m.to(dev), bi.to(dev), True, True)
    assert torch.equal(again[0], gf) and torch.equal(again[1], gm)
    assert torch.equal(mask_pool_fwd(f.to(dev), m.to(dev), bi.to(dev)), out)


@pytest.mark.triton
def test_triton_many_objects_per_image_strided_and_empty():
    from kdops.triton.mask_pool import mask_pool_bwd, mask_pool_fwd

    dev = triton_device()
    # 150 objects on 2 images: several object tiles (<= 64 objects) per image, and an image with none
    f, m, bi, w = _triton_case(torch.float32, N=3, C=5, H=6, W=5, K=150, seed=15)
    bi = torch.where(bi == 1, 0, bi)
    assert int((bi == 0).sum()) > 64
    ref, rF, rM = _oracle_all(f, m, bi, w)
    fd = f.to(dev).contiguous(memory_format=torch.channels_last)  # read through its strides
    md = m.to(dev).transpose(1, 2).contiguous().transpose(1, 2)
    out = mask_pool_fwd(fd, md, bi.to(dev))
    gf, gm = mask_pool_bwd(w.to(dev).t().contiguous().t(), fd, md, bi.to(dev), True, True)
    close(out.cpu(), ref, torch.float32, scale=ref.abs().max().item())
    close(gf.cpu(), rF, torch.float32, scale=rF.abs().max().item())
    close(gm.cpu(), rM, torch.float32, scale=rM.abs().max().item())
    assert not gf[1].any()
    e = mask_pool_fwd(f.to(dev), m[:0].to(dev), bi[:0].to(dev))
    assert e.shape == (0, 5)
    egf, egm = mask_pool_bwd(w[:0].to(dev), f.to(dev), m[:0].to(dev), bi[:0].to(dev), True, True)
    assert egf.shape == f.shape and not egf.any() and egm.shape == (0, 6, 5)


@pytest.mark.triton
def test_triton_gradcheck():
    # float64 gradcheck of the launchers (the CUDA kernels of the op) through an autograd wrapper
    from kdops.triton.mask_pool import mask_pool_bwd, mask_pool_fwd

    dev = triton_device()
    f, m, bi, w = _triton_case(torch.float64, N=2, C=3, H=4, W=5, K=6, seed=17)
    F, M = leaf(f.to(dev)), leaf(m.to(dev))

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, F, M):
            ctx.save_for_backward(F, M)
            return mask_pool_fwd(F, M, bi.to(dev))

        @staticmethod
        def backward(ctx, g):
            F, M = ctx.saved_tensors
            return mask_pool_bwd(g, F, M, bi.to(dev), True, True)

    assert torch.autograd.gradcheck(Fn.apply, (F, M))


@pytest.mark.parametrize("dtype, acc", [("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32"), ("fp64", "fp64")])
def test_triton_kernels_compile_for_sm90(dtype, acc):
    import triton.language as tl

    from kdops.triton.mask_pool import _grad_feature_kernel, _grad_masks_kernel, _pool_kernel

    ACC = tl.float64 if acc == "fp64" else tl.float32
    dot = 0 if dtype == "fp64" else 1
    blocks = dict(BLOCK_K=16, BLOCK_C=16, BLOCK_HW=16) if dtype == "fp64" else dict(BLOCK_K=32, BLOCK_C=64,
                                                                                       BLOCK_HW=64)
    const = dict(ACC=ACC, DOT=dot, **blocks)
    i32 = "i32"
    strides = {k: i32 for k in ("s_n", "s_c", "s_h", "s_w")}
    mstrides = {k: i32 for k in ("m_k", "m_h", "m_w")}
    sizes = {"C": i32, "HW": i32, "W": i32}
    compile_for_gpu(_pool_kernel, {"f_ptr": f"*{dtype}", "m_ptr": f"*{dtype}", "order_ptr": "*i64", "tile_ptr": "*i64",
                                   "out_ptr": f"*{dtype}", **sizes, **strides, **mstrides}, const)
    compile_for_gpu(_grad_feature_kernel, {"g_ptr": f"*{dtype}", "m_ptr": f"*{dtype}", "order_ptr": "*i64",
                                           "bounds_ptr": "*i64", "gf_ptr": f"*{dtype}", **sizes, **mstrides}, const)
    compile_for_gpu(_grad_masks_kernel, {"g_ptr": f"*{dtype}", "f_ptr": f"*{dtype}", "order_ptr": "*i64",
                                         "tile_ptr": "*i64", "gm_ptr": f"*{dtype}", **sizes, **strides}, const)
