"""kdops.box_masks against FGD's mask loop (per image, per box, slice max) and dense masks."""
import re

import pytest
import torch

import kdops
from kdops import reference
from kdops.reference.box_pool import box_mask_dense

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
