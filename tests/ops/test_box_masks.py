"""kdops.box_masks against FGD's mask loop (per image, per box, slice max) and dense masks."""
import re

import pytest
import torch

import kdops
from kdops import reference
from kdops.reference.box_ranges import box_mask_dense

SIZES = [(2, 25, 38), (2, 13, 19), (2, 7, 10)]
STRIDES = [32, 64, 128]
IMAGE = (800, 1216)


def gt(K=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(K, 2, generator=g) * torch.tensor([1216.0, 800.0])
    wh = torch.rand(K, 2, generator=g) ** 2 * 500 + 1
    boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([1216.0, 800.0]))], 1)
    boxes = torch.cat([boxes, torch.tensor([[0.0, 0, 1216, 800], [100, 100, 100, 300]])])  # whole image, zero width
    return boxes, torch.randint(0, 2, (boxes.shape[0],), generator=g)


@pytest.mark.parametrize("image_size", [IMAGE, None])
@pytest.mark.parametrize("K", [0, 1, 5, 30])
def test_fgd_masks_match_the_authors_loop(image_size, K):
    boxes, bi = gt(K, seed=K)
    if K < 30:
        boxes, bi = boxes[:K], bi[:K]
    fg, bg = kdops.box_masks(boxes, bi, SIZES, STRIDES, image_size=image_size)
    fr, br = reference.box_masks(boxes, bi, SIZES, STRIDES, image_size=image_size)
    for a, b in zip(fg + bg, fr + br):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    for b in bg:  # background sums to 1 per image (or is all-zero foreground-covered)
        s = b.sum((1, 2))
        assert torch.all(((s - 1).abs() < 1e-5) | (s == 0))


def test_overlapping_boxes_take_the_max_weight():
    boxes = torch.tensor([[0.0, 0, 64, 64], [32, 32, 48, 48]])  # small box inside a big one
    fg, bg = kdops.box_masks(boxes, torch.zeros(2, dtype=torch.int64), (1, 10, 10), 16)
    big = 1 / ((4 + 1) * (4 + 1))
    small = 1 / ((3 + 1 - 2) * (3 + 1 - 2))
    assert fg[0, 0, 0] == pytest.approx(big) and fg[0, 2, 2] == pytest.approx(small)
    assert fg[0, 5, 5] == 0 and bg[0, 5, 5] == pytest.approx(1 / (100 - 25))


@pytest.mark.parametrize("rule", ["center", "lgd", "fgd"])
def test_binary_masks_match_dense_union(rule):
    boxes, bi = gt(40, seed=3)
    fg, bg = kdops.box_masks(boxes, bi, SIZES, STRIDES, rule=rule, mode="binary", image_size=IMAGE)
    for (N, H, W), s, f, b in zip(SIZES, STRIDES, fg, bg):
        m = box_mask_dense(boxes, (H, W), s, rule, IMAGE)
        union = torch.stack([m[bi == n].amax(0) if (bi == n).any() else torch.zeros(H, W, dtype=torch.float64)
                             for n in range(N)])
        assert torch.equal(f.double(), union) and torch.equal(b, 1 - f)


def test_feeds_masked_mse_as_fgd_pixel_weight():
    boxes, bi = gt(10, seed=4)
    g = torch.Generator().manual_seed(5)
    s = [torch.randn(n, 4, h, w, generator=g) for n, h, w in SIZES]
    t = [torch.randn(n, 4, h, w, generator=g) for n, h, w in SIZES]
    fg, bg = kdops.box_masks(boxes, bi, SIZES, STRIDES, image_size=IMAGE)
    alpha, beta = 2e-5, 1e-5
    loss = kdops.masked_mse(s, t, pixel_weight=[alpha * f + beta * b for f, b in zip(fg, bg)])
    # FGD's two terms: alpha * sum(fg * (s - t)^2) + beta * sum(bg * (s - t)^2)
    fr, br = reference.box_masks(boxes, bi, SIZES, STRIDES, image_size=IMAGE)
    ref = torch.stack([alpha * ((a - b) ** 2 * f[:, None]).sum() + beta * ((a - b) ** 2 * q[:, None]).sum()
                       for a, b, f, q in zip(s, t, fr, br)])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-9)


def test_compile_and_single_level():
    boxes, bi = gt(8, seed=6)
    f = torch.compile(lambda b, i: kdops.box_masks(b, i, SIZES[0], STRIDES[0], image_size=IMAGE),
                      fullgraph=True, backend="aot_eager")
    a = f(boxes, bi)
    b = kdops.box_masks(boxes, bi, SIZES[0], STRIDES[0], image_size=IMAGE)
    assert isinstance(b[0], torch.Tensor)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_inputs():
    b, i = torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match=re.escape("`mode` must be 'fgd' or 'binary'")):
        kdops.box_masks(b, i, (1, 4, 4), 8, mode="soft")
    with pytest.raises(ValueError, match=re.escape("`sizes` must be one (N,H,W)")):
        kdops.box_masks(b, i, (4, 4), 8)
    with pytest.raises(ValueError, match=re.escape("`batch_index` must have shape (2,)")):
        kdops.box_masks(b, i[:1], (1, 4, 4), 8)


# --------------------------------------------------------------------------- kdops::box_masks_fwd
from helpers import compile_for_gpu, triton_device  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def dense_max_paint(ranges, weight, batch_index, size):
    """Independent oracle: the max over per-box dense (H,W) masks, in float64 (one image at a time)."""
    N, H, W = size
    out = torch.zeros(N, H, W, dtype=torch.float64)
    ys, xs = torch.arange(H)[:, None], torch.arange(W)[None, :]
    x0, y0, x1, y1 = (v[:, None, None] for v in ranges.unbind(1))
    for n in range(N):
        sel = batch_index == n
        m = (ys >= y0[sel]) & (ys <= y1[sel]) & (xs >= x0[sel]) & (xs <= x1[sel])  # (K_n,H,W)
        if sel.any():
            out[n] = torch.where(m, weight.double()[sel][:, None, None], 0.0).amax(0).clamp(min=0)
    return out


def random_paint_problem(K, size, seed):
    """Boxes with overlaps, equal weights, border crossing, empty ranges, zero / negative weights and
    out-of-range batch indices."""
    N, H, W = size
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(-4, W + 2, (K,), generator=g)
    y0 = torch.randint(-4, H + 2, (K,), generator=g)
    x1 = x0 + torch.randint(-2, W + 3, (K,), generator=g)  # some x1 < x0: empty
    y1 = y0 + torch.randint(-2, H // 2 + 3, (K,), generator=g)
    ranges = torch.stack([x0, y0, x1, y1], 1)
    levels = torch.tensor([1 / 3, 0.25, 0.5, 1.0, 1e-3, 0.0, -0.5, 1 / 7], dtype=torch.float64)
    weight = levels[torch.randint(0, len(levels), (K,), generator=g)]  # many exact ties
    weight = torch.where(torch.rand(K, generator=g) < 0.3, torch.rand(K, generator=g, dtype=torch.float64), weight)
    bi = torch.randint(-1, N + 1, (K,), generator=g)  # -1 and N are out of range
    return ranges, weight, bi


def max_paint_op(ranges, weight, bi, size, dtype):
    return torch.ops.kdops.box_masks_fwd(ranges, weight, bi, *size, dtype)


needs_c = pytest.mark.skipif(not kdops.HAS_C, reason="needs the compiled extension")


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K, size, seed", [(1, (1, 9, 11), 0), (20, (2, 13, 17), 1), (200, (3, 25, 38), 2),
                                          (60, (2, 1, 40), 3), (60, (2, 40, 1), 4)])
def test_max_paint_matches_dense_oracle(dtype, K, size, seed):
    ranges, weight, bi = random_paint_problem(K, size, seed)
    out = max_paint_op(ranges, weight, bi, size, dtype)
    ref = dense_max_paint(ranges, weight, bi, size)
    assert out.dtype == dtype and out.shape == size
    assert torch.equal(out, ref.to(dtype))  # a max of rounded weights: exact
    # the torch sparse table (fallback on devices without a kernel) agrees bitwise
    assert torch.equal(reference.box_masks_fwd(ranges, weight, bi, size, dtype), out)


@needs_c
def test_max_paint_edge_cases():
    empty = torch.zeros(0, 4, dtype=torch.int64)
    for size in [(2, 5, 6), (0, 5, 6), (2, 0, 6), (2, 5, 0)]:
        out = torch.ops.kdops.box_masks_fwd(empty, torch.zeros(0, dtype=torch.float64),
                                            torch.zeros(0, dtype=torch.int64), *size, torch.float32)
        assert out.shape == size and not out.any()
    big = 2 ** 62
    ranges = torch.tensor([[-big, -big, big, big], [2, 1, 3, 1], [0, 0, 5, 4], [1, 1, 2, 2], [0, 0, 1, 1],
                           [4, 3, 2, 3], [-big, -big, -1, 4]])
    weight = torch.tensor([0.25, 0.5, 1.0, 2.0, float("nan"), 9.0, 9.0], dtype=torch.float64)
    bi = torch.tensor([0, 0, 5, -big, 1, 1, 1])
    out = max_paint_op(ranges, weight, bi, (2, 5, 6), torch.float32)
    exp = torch.zeros(2, 5, 6)
    exp[0] = 0.25
    exp[0, 1, 2:4] = 0.5
    assert torch.equal(out, exp)  # huge ranges clipped; bad images, NaN, empty and off-map boxes skipped


@needs_c
def test_max_paint_is_deterministic_across_runs_and_threads():
    size = (3, 300, 200)  # several row blocks per image: parallel over (image, row block)
    ranges, weight, bi = random_paint_problem(400, size, seed=7)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = max_paint_op(ranges, weight, bi, size, torch.float32)
        torch.set_num_threads(2)
        two = max_paint_op(ranges, weight, bi, size, torch.float32)
        again = max_paint_op(ranges, weight, bi, size, torch.float32)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two) and torch.equal(two, again)
    assert torch.equal(two, dense_max_paint(ranges, weight, bi, size).float())


@needs_c
def test_max_paint_under_deterministic_algorithms_and_compile():
    ranges, weight, bi = random_paint_problem(30, (2, 13, 17), seed=8)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = max_paint_op(ranges, weight, bi, (2, 13, 17), torch.bfloat16)
    finally:
        torch.use_deterministic_algorithms(before)
    f = torch.compile(lambda r, w, b: max_paint_op(r, w, b, (2, 13, 17), torch.bfloat16) * 2,
                      fullgraph=True, backend="aot_eager")
    assert torch.equal(f(ranges, weight, bi), out * 2)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = max_paint_op(torch.empty(4, 4, dtype=torch.int64), torch.empty(4, dtype=torch.float64),
                            torch.empty(4, dtype=torch.int64), (2, 7, 9), torch.float16)
        assert fake.shape == (2, 7, 9) and fake.dtype == torch.float16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_box_masks_dtypes_match_the_authors_loop(dtype):
    boxes, bi = gt(20, seed=9)
    fg, bg = kdops.box_masks(boxes, bi, SIZES, STRIDES, image_size=IMAGE, dtype=dtype)
    fr, br = reference.box_masks(boxes, bi, SIZES, STRIDES, image_size=IMAGE, dtype=torch.float64)
    for a, b in zip(fg, fr):
        assert a.dtype == dtype and torch.equal(a, b.to(dtype))
    for a, b in zip(bg, br):
        torch.testing.assert_close(a.double(), b, rtol=1e-2 if dtype != torch.float64 else 1e-12, atol=0)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_max_paint_matches_dense_oracle(dtype):
    from kdops.triton.box_masks import box_masks_fwd

    dev = triton_device()
    for K, size, seed in [(12, (2, 9, 13), 10), (5, (1, 3, 70), 11)]:
        ranges, weight, bi = random_paint_problem(K, size, seed)
        out = box_masks_fwd(ranges.to(dev), weight.to(dev), bi.to(dev), *size, dtype)
        assert out.dtype == dtype and out.shape == size
        assert torch.equal(out.cpu(), dense_max_paint(ranges, weight, bi, size).to(dtype))
        if kdops.HAS_C:  # the CPU kernel gives the same bits
            assert torch.equal(out.cpu(), max_paint_op(ranges, weight, bi, size, dtype))


@pytest.mark.triton
def test_triton_max_paint_edge_cases_and_determinism():
    from kdops.triton.box_masks import box_masks_fwd

    dev = triton_device()
    big = 2 ** 62
    ranges = torch.tensor([[-big, -big, big, big], [2, 1, 3, 1], [0, 0, 5, 4], [4, 3, 2, 3]], device=dev)
    weight = torch.tensor([0.25, 0.5, 1.0, 9.0], dtype=torch.float64, device=dev)
    bi = torch.tensor([0, 0, 5, 1], device=dev)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = box_masks_fwd(ranges, weight, bi, 2, 5, 6, torch.float32)
        again = box_masks_fwd(ranges, weight, bi, 2, 5, 6, torch.float32)
    finally:
        torch.use_deterministic_algorithms(before)
    exp = torch.zeros(2, 5, 6)
    exp[0] = 0.25
    exp[0, 1, 2:4] = 0.5
    assert torch.equal(out.cpu(), exp) and torch.equal(out, again)
    assert not box_masks_fwd(ranges[:0], weight[:0], bi[:0], 2, 5, 6, torch.float16).any()
    assert box_masks_fwd(ranges, weight, bi, 2, 0, 6, torch.float16).shape == (2, 0, 6)


@pytest.mark.parametrize("buf", ["fp32", "fp64"])
def test_triton_max_paint_compiles_for_sm90(buf):
    from kdops.triton.box_masks import _max_paint_kernel

    compile_for_gpu(_max_paint_kernel, {"rng_ptr": "*i64", "w_ptr": f"*{buf}", "bi_ptr": "*i64", "buf_ptr": f"*{buf}",
                                        "N": "i32", "H": "i32", "W": "i32"}, {"BLOCK_H": 4, "BLOCK_W": 128})


@pytest.mark.parametrize("mode", ["fgd", "binary"])
def test_nan_boxes_are_ignored_and_fallback_agrees(mode, monkeypatch):
    boxes, bi = gt(12, seed=12)
    nan_boxes = torch.cat([boxes, torch.tensor([[float("nan"), 10.0, 500, 500], [0, 0, 300, float("nan")]])])
    nan_bi = torch.cat([bi, torch.tensor([0, 1])])
    fg, bg = kdops.box_masks(nan_boxes, nan_bi, SIZES, STRIDES, image_size=IMAGE, mode=mode)
    fr, br = kdops.box_masks(boxes, bi, SIZES, STRIDES, image_size=IMAGE, mode=mode)
    for a, b in zip(fg + bg, fr + br):
        assert torch.equal(a, b)
    # the torch sparse table that runs on devices without a kernel gives the same masks
    import sys

    monkeypatch.setattr(sys.modules["kdops.ops.box_masks"], "use_kernel", lambda op, device: False)
    fs, bs = kdops.box_masks(nan_boxes, nan_bi, SIZES, STRIDES, image_size=IMAGE, mode=mode)
    for a, b in zip(fs + bs, fg + bg):
        assert torch.equal(a, b)
