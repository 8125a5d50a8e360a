"""kdops.box_ranges: the C++ CPU op against the tensor-op path (bitwise) and both against dense
per-box masks written from each rule's own pixel test."""
import importlib
import re

import pytest
import torch
from box_helpers import IMAGE, SIZES, STRIDES, make_boxes

import kdops
from kdops.ops.box_ranges import _ranges_tensor_ops, all_level_ranges
from kdops.reference.box_ranges import box_mask_dense

box_ranges_mod = importlib.import_module("kdops.ops.box_ranges")  # (kdops.ops.box_ranges is the function)


def per_box_image(K, seed=0, dtype=torch.int64):
    """(K,2) (height, width) per box: IMAGE and two other (padded) image sizes."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([IMAGE, (96, 128), (120, 150)], dtype=torch.float64)
    return sizes[torch.randint(0, 3, (K,), generator=g)].to(dtype)


def _tensor_ops_only(monkeypatch):
    """Routes all_level_ranges to its tensor ops (the GPU path), as on a device without the C++ op."""
    monkeypatch.setattr(box_ranges_mod, "HAS_C", False)


def _cpp_only(monkeypatch):
    """Fails the test if the tensor ops run: on the CPU kdops::box_ranges_fwd must compute the ranges."""
    def unreachable(*args, **kwargs):
        raise AssertionError("the tensor-op path ran on the CPU")

    monkeypatch.setattr(box_ranges_mod, "_ranges_tensor_ops", unreachable)


@pytest.mark.parametrize("rule", ["center", "lgd", "fgd"])
@pytest.mark.parametrize("image_size", [None, IMAGE, "per_box"])
@pytest.mark.parametrize("path", ["cpp", "tensor_ops"])
def test_box_ranges_match_dense_masks(rule, image_size, path, monkeypatch):
    (_cpp_only if path == "cpp" else _tensor_ops_only)(monkeypatch)
    boxes, _ = make_boxes(40, seed=2)
    if image_size == "per_box":
        image_size = per_box_image(boxes.shape[0], seed=3)
        oracle_image = (image_size[:, 0], image_size[:, 1])
    else:
        oracle_image = image_size
    r = kdops.box_ranges(boxes, SIZES, STRIDES, rule, image_size)
    assert r.shape == (3, boxes.shape[0], 4) and r.dtype == torch.int64
    for lvl, ((H, W), s) in enumerate(zip(SIZES, STRIDES)):
        m = box_mask_dense(boxes, (H, W), s, rule, oracle_image).bool()
        xs, ys = torch.arange(W), torch.arange(H)
        x0, y0, x1, y1 = (v[:, None] for v in r[lvl].unbind(1))
        rect = ((y0 <= ys) & (ys <= y1))[:, :, None] & ((x0 <= xs) & (xs <= x1))[:, None, :]
        assert torch.equal(rect, m), (rule, lvl)


COCO_SIZES = [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]
COCO_STRIDES = [8, 16, 32, 64, 128]
COCO_IMAGE = (800, 1216)


def hard_boxes(K, seed, image=COCO_IMAGE):
    """float64 boxes where rounding decides: integer coordinates in [-64, 1300] and multiples of
    stride/2 (pixel centres and edges of every level), plus random, inverted, zero-size, outside,
    huge (+-1e12), NaN and +-inf coordinates."""
    g = torch.Generator().manual_seed(seed)
    ints = torch.randint(-64, 1301, (K, 4), generator=g).double()
    half = torch.tensor([4.0, 8, 16, 32, 64])[torch.randint(0, 5, (K, 4), generator=g)]
    grid = (torch.randint(-64, 1301, (K, 4), generator=g) / half).round() * half
    rand = torch.rand(K, 4, generator=g, dtype=torch.float64) * 1400 - 100
    boxes = torch.cat([ints, grid, rand])
    # most boxes ordered (x1 <= x2, y1 <= y2), the rest left inverted
    lo, hi = torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])
    ordered = torch.rand(boxes.shape[0], 1, generator=g) < 0.85
    boxes = torch.where(ordered, torch.cat([lo, hi], 1), boxes)
    flat = boxes[: K // 4].clone()
    flat[:, 2] = flat[:, 0]  # zero width
    flat[K // 8:, 3] = flat[K // 8:, 1]  # zero area
    H, W = image
    nan, inf = float("nan"), float("inf")
    special = torch.tensor([
        [-30.0, -20, 40, 30], [W - 10, H - 10, W + 50, H + 40], [W + 10, 10, W + 90, 90], [-90, -90, -5, -5],
        [-1e12, -1e12, 1e12, 1e12], [1e12, 1e12, 2e12, 2e12], [-2e12, 5, -1e12, 90], [5, 5, 1e12, 1e12],
        [nan, 10, 50, 50], [10, 10, 50, nan], [nan, nan, nan, nan], [-inf, -inf, inf, inf], [inf, 10, inf, 50],
        [-inf, 10, 20, 50], [10, -inf, 50, -inf], [0, 0, 0, 0], [W, H, W, H], [4, 4, 12, 12], [8, 8, 24, 24],
        [0, 0, W, H], [-0.0, -0.0, 0.5, 0.5], [3.99999, 4.00001, 11.99999, 12.00001],
    ], dtype=torch.float64)
    return torch.cat([boxes, flat, special])


def _image_kinds(K, image, seed):
    g = torch.Generator().manual_seed(seed)
    per_box = torch.tensor([image, (image[0] - 32, image[1] + 64), (image[1], image[0])], dtype=torch.float64)
    pick = per_box[torch.randint(0, 3, (K,), generator=g)]
    odd = pick + torch.rand(K, 2, generator=g, dtype=torch.float64) * 3 - 1.5  # non-integer sizes
    return {"none": None, "tuple": image, "tuple_float": (image[0] + 0.25, image[1] - 0.5),
            "int64": pick.long(), "int32": pick.int(), "float32": odd.float(), "float64": odd,
            "float64_strided": odd.t().contiguous().t()}


def _img_arg(image_size):  # what _check_rule hands to all_level_ranges
    return tuple(float(v) for v in image_size) if isinstance(image_size, tuple) else image_size


def aligned_boxes(K, sizes, strides, image, dtype, seed):
    """K boxes with coordinates on a rule's decision points, or one ulp off them, where the
    rounding of each operation decides: pixel centres (n + 1/2) s, edges n s, and n img / size
    (LGD's and FGD's scaled edges); a fifth of them far out (n up to 2^22), where float32's
    spacing exceeds 1/2 and the centre rule's correction steps act. image: as _img_arg gives."""
    g = torch.Generator().manual_seed(seed)
    lvl = torch.randint(0, len(sizes), (K, 4), generator=g)
    s = torch.tensor(strides, dtype=torch.float64)[lvl]
    size = torch.tensor([[w, h, w, h] for h, w in sizes], dtype=torch.float64).gather(0, lvl)
    n = (torch.rand(K, 4, generator=g, dtype=torch.float64) * (size + 6)).floor() - 3
    far = torch.rand(K, 1, generator=g) < 0.2
    n = torch.where(far, torch.randint(-2 ** 22, 2 ** 22, (K, 4), generator=g).double(), n)
    if image is None:
        img = s * size
    elif isinstance(image, tuple):
        img = torch.tensor([image[1], image[0]] * 2, dtype=torch.float64).expand(K, 4)
    else:
        img = image.to(torch.float64)[:, [1, 0, 1, 0]]
    kind = torch.randint(0, 3, (K, 4), generator=g)
    x = torch.where(kind == 0, (n + 0.5) * s, torch.where(kind == 1, n * s, n * img / size)).to(dtype)
    if dtype in (torch.float32, torch.float64):
        nudge = torch.randint(-1, 2, (K, 4), generator=g)
        inf = torch.tensor(float("inf"), dtype=dtype)
        x = torch.where(nudge > 0, torch.nextafter(x, inf), torch.where(nudge < 0, torch.nextafter(x, -inf), x))
    return torch.cat([torch.minimum(x[:, :2], x[:, 2:]), torch.maximum(x[:, :2], x[:, 2:])], 1)


def assert_cpp_matches_tensor_ops(boxes, sizes, strides, rule, n_aligned=3000):
    K = boxes.shape[0]
    for name, image_size in _image_kinds(K + n_aligned, COCO_IMAGE, seed=K).items():
        img = _img_arg(image_size)
        aligned = aligned_boxes(n_aligned, sizes, strides, img if img is None or isinstance(img, tuple)
                                else img[K:], boxes.dtype, seed=K + 1)
        b = torch.cat([boxes, aligned]) if K else boxes
        if isinstance(img, torch.Tensor):
            img = img[:b.shape[0]]
        for clip in (True, False):
            got = all_level_ranges(b, sizes, strides, rule, img, clip)
            ref = _ranges_tensor_ops(b, sizes, strides, rule, img, clip)
            assert got.dtype == torch.int64 and got.shape == (len(sizes), b.shape[0], 4)
            assert torch.equal(got, ref), (rule, name, clip, b.dtype, (got != ref).nonzero()[:5].tolist())


@pytest.mark.parametrize("rule", ["center", "lgd", "fgd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_box_ranges_cpp_bitwise_equals_tensor_ops(rule, dtype):
    # the C++ op reproduces every rounding of the tensor ops (GPU path): every rule, image kind, clip
    boxes = hard_boxes(1500, seed=21).to(dtype)
    assert_cpp_matches_tensor_ops(boxes, COCO_SIZES, COCO_STRIDES, rule)
    small, _ = make_boxes(200, seed=22, dtype=dtype)
    assert_cpp_matches_tensor_ops(small, SIZES, STRIDES, rule)
    # one level, non-integer strides (rounded to float32 once), no boxes, non-contiguous boxes
    assert_cpp_matches_tensor_ops(boxes, [(51, 77)], [15.7], rule)
    assert_cpp_matches_tensor_ops(boxes, [(40, 60), (21, 30), (11, 15)], [6.25, 12.1, 24.3], rule)
    assert_cpp_matches_tensor_ops(boxes[:0], COCO_SIZES, COCO_STRIDES, rule, n_aligned=0)
    assert_cpp_matches_tensor_ops(boxes.t().contiguous().t()[::3], COCO_SIZES, COCO_STRIDES, rule)


def test_box_ranges_cpp_many_boxes_any_thread_count():
    # ~39K boxes: the C++ op splits them over threads; the same ranges for any thread count
    boxes = hard_boxes(12000, seed=23).float()
    img = _image_kinds(boxes.shape[0], COCO_IMAGE, seed=24)["float32"]
    threads = torch.get_num_threads()
    try:
        for rule, image in (("center", None), ("fgd", img)):
            ref = _ranges_tensor_ops(boxes, COCO_SIZES, COCO_STRIDES, rule, image)
            for n in (1, 2):
                torch.set_num_threads(n)
                assert torch.equal(all_level_ranges(boxes, COCO_SIZES, COCO_STRIDES, rule, image), ref), (rule, n)
    finally:
        torch.set_num_threads(threads)


def test_box_ranges_cpp_op_checks_its_arguments():
    op = torch.ops.kdops.box_ranges_fwd
    b = torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match="boxes must be"):
        op(torch.zeros(3, 5), [4], [4], [8.0], "center", None, 0.0, 0.0, True)
    with pytest.raises(RuntimeError, match="one entry per level"):
        op(b, [4, 2], [4], [8.0], "center", None, 0.0, 0.0, True)
    with pytest.raises(RuntimeError, match="rule must be"):
        op(b, [4], [4], [8.0], "box", None, 0.0, 0.0, True)
    with pytest.raises(RuntimeError, match=re.escape("image_hw must be (K,2)")):
        op(b, [4], [4], [8.0], "fgd", torch.zeros(2, 2), 0.0, 0.0, True)
    with pytest.raises(RuntimeError, match="both"):
        op(b, [4], [4], [8.0], "fgd", None, 32.0, 0.0, True)
    assert op(b, [4], [4], [8.0], "fgd", None, 32.0, 32.0, True).shape == (1, 3, 4)


def test_box_ranges_compile_fullgraph_and_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    boxes, _ = make_boxes(12, seed=4, dtype=torch.float32)
    img = per_box_image(boxes.shape[0], seed=5)

    def f(b, i):
        return kdops.box_ranges(b, SIZES, STRIDES, "lgd", i), kdops.box_ranges(b, SIZES, STRIDES, "fgd", IMAGE)

    want = f(boxes, img)
    for dynamic in (False, True):
        got = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=dynamic)(boxes, img)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    with FakeTensorMode():
        fake = kdops.box_ranges(torch.empty(11, 4, dtype=torch.bfloat16), SIZES, STRIDES, "center")
        assert fake.shape == (3, 11, 4) and fake.dtype == torch.int64


def test_box_ranges_exact_boundaries():
    # integer boxes on the pixel grid: centre rule is strict, LGD closed, FGD floor/ceil
    b = torch.tensor([[4.0, 4, 20, 20], [8.0, 8, 8, 24]])
    c = kdops.box_ranges(b, [(10, 10)], [8], "center")[0]
    assert c.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]  # centre 12 inside (4,20); zero width -> empty
    lgd = kdops.box_ranges(b, [(10, 10)], [8], "lgd")[0]
    assert lgd.tolist() == [[1, 1, 2, 2], [1, 1, 0, 0]]  # 0.5 <= x <= 2.5; zero width covers nothing
    f = kdops.box_ranges(b, [(10, 10)], [8], "fgd")[0]
    assert f.tolist() == [[0, 0, 3, 3], [1, 1, 1, 3]]
    per_box = kdops.box_ranges(b, [(10, 10)], [8], "fgd", torch.tensor([[80, 80], [80, 80]]))
    assert torch.equal(per_box, kdops.box_ranges(b, [(10, 10)], [8], "fgd", (80, 80)))
