"""Hostile inputs straight into the kernels (`torch.ops.kdops.*` and the Triton launchers, no
Python validation).

The public functions validate their arguments before any kernel runs; these tests call the
kernels directly, as `validate=False`, a custom wrapper or a traced graph may, with indices,
ranges, batch indices, sizes and sampling locations far outside their valid range (int64
extremes, NaN, inf). Each call must either raise a RuntimeError naming the op, or return
exactly what the op's contract says (out-of-range rows / boxes / objects contribute nothing),
checked against the eager oracles in `kdops.reference`. Backends: the C++ CPU kernels, the
Triton kernels (under TRITON_INTERPRET=1 in CI, where an unmasked wild read crashes the
interpreter) and, on a GPU, whatever `torch.ops.kdops` dispatches to for CUDA tensors.

What they cannot see in a normal build -- a read or write a few bytes out of bounds that does
not crash -- `tests/sanitize.sh` makes visible for the C++ kernels (`make test` runs it last):
it builds the extension with AddressSanitizer and UBSan and runs this file and the op tests
against that build.
"""
from __future__ import annotations

import math

import pytest
import torch

import kdops
from kdops import reference

needs_c = pytest.mark.skipif(not kdops.HAS_C, reason="needs the compiled CPU kernels")

I64_MIN, I64_MAX = -(2**63), 2**63 - 1
EXTREMES = [I64_MIN, I64_MIN + 1, -(2**40), -(2**31) - 1, -2, -1, 0, 1, 2**31, 2**40, I64_MAX - 1, I64_MAX]


def hostile_int(g: torch.Generator, shape, lo: int, hi: int, p_extreme: float = 0.3) -> torch.Tensor:
    """Integers mostly in [lo, hi) (valid and just outside), a fraction at int64 extremes."""
    base = torch.randint(lo, hi, shape, generator=g)
    ext = torch.tensor(EXTREMES)[torch.randint(0, len(EXTREMES), shape, generator=g)]
    pick = torch.rand(shape, generator=g) < p_extreme
    return torch.where(pick, ext, base)


MODULE = {  # op -> kdops.triton module that holds its Triton launcher (same signature as the op)
    "gather_level_features_fwd": "gather_level_features", "gather_level_features_bwd": "gather_level_features",
    "box_pool_fwd": "box_pool", "box_paint_fwd": "box_pool", "box_masks_fwd": "box_masks",
    "mask_pool_fwd": "mask_pool", "mask_pool_bwd": "mask_pool",
    "ms_deform_attn_fwd": "ms_deform_attn", "ms_deform_attn_bwd": "ms_deform_attn",
    "nms_mask_fwd": "nms_mask",
}
# the C++ CPU kernels; the Triton kernels (on the GPU, or on CPU tensors under TRITON_INTERPRET=1);
# torch.ops.kdops on CUDA tensors (Triton or CUDA C++, as registered)
BACKENDS = [pytest.param("cpu", marks=needs_c), pytest.param("triton", marks=pytest.mark.triton),
            pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


def kernel(backend: str, name: str):
    if backend != "triton":
        return getattr(torch.ops.kdops, name)
    import importlib

    return getattr(importlib.import_module(f"kdops.triton.{MODULE[name]}"), name)


def on(backend: str) -> str:
    from helpers import triton_device

    return {"cpu": "cpu", "cuda": "cuda"}.get(backend) or triton_device()


def trials(backend: str, n: int) -> int:
    from helpers import INTERPRET

    return max(n // 8, 3) if backend == "triton" and INTERPRET else n  # the interpreter: ~5 ms per program


def raises_op_error(fn, *words):
    with pytest.raises(RuntimeError) as e:
        fn()
    msg = str(e.value)
    assert "kdops" in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_fwd_bwd_with_any_index_rows(backend):
    fwd, bwd, dev = kernel(backend, "gather_level_features_fwd"), kernel(backend, "gather_level_features_bwd"), on(backend)
    g = torch.Generator().manual_seed(0)
    for trial in range(trials(backend, 40)):
        L = int(torch.randint(1, 4, (1,), generator=g))
        C = int(torch.randint(1, 6, (1,), generator=g))
        shapes = [tuple(int(v) for v in torch.randint(0 if trial % 5 == 4 else 1, 5, (3,), generator=g))
                  for _ in range(L)]
        feats = [torch.randn(n, C, h, w, generator=g, dtype=torch.float64) for n, h, w in shapes]
        if trial % 3 == 1:  # strided levels (channels_last, a slice)
            feats = [f.to(memory_format=torch.channels_last) if i % 2 else f[:, :, :, : max(f.shape[3] - 1, 0)]
                     for i, f in enumerate(feats)]
        R = int(torch.randint(0, 30, (1,), generator=g))
        idx = valid_rows_with_one_bad_coordinate(g, R, [(f.shape[0], f.shape[2], f.shape[3]) for f in feats])
        out = fwd([f.to(dev) for f in feats], idx.to(dev)).cpu()
        torch.testing.assert_close(out, reference.gather_level_features(feats, idx), rtol=0, atol=0)
        # adjoint: every in-range row adds its gradient at its destination (duplicates accumulate)
        grad = torch.randn(R, C, generator=g, dtype=torch.float64)
        flat = [int(v) for f in feats for v in (f.shape[0], C, f.shape[2], f.shape[3])]
        got = [t.cpu() for t in bwd(grad.to(dev), idx.to(dev), flat)]
        for lvl, (f, gl) in enumerate(zip(feats, got)):
            want = torch.zeros(f.shape, dtype=torch.float64)
            for r in range(R):
                lv, n, y, x = (int(v) for v in idx[r])
                if lv == lvl and 0 <= n < f.shape[0] and 0 <= y < f.shape[2] and 0 <= x < f.shape[3]:
                    want[n, :, y, x] += grad[r]
            torch.testing.assert_close(gl, want, rtol=0, atol=1e-12)


def valid_rows_with_one_bad_coordinate(g, R, sizes):
    """(R,4) rows [level, batch, y, x], each valid (where its level is not empty), and in 3 of 5 rows
    one coordinate replaced by a value just past its bound or an int64 extreme: every bound check
    is needed on its own."""
    L = len(sizes)
    lv = torch.randint(0, L, (R,), generator=g)
    bound = torch.tensor([[L, *s] for s in sizes])[lv]  # (R,4): the bound of each coordinate
    rows = torch.cat([lv[:, None], (torch.rand(R, 3, generator=g) * bound[:, 1:]).long()], 1)
    which = torch.randint(0, 4, (R,), generator=g)
    pick = torch.randint(0, 4 + len(EXTREMES), (R,), generator=g)
    near = torch.stack([torch.full((R,), -1), bound[torch.arange(R), which], bound[torch.arange(R), which] + 1,
                        torch.full((R,), -2)], 1)
    bad = torch.where(pick < 4, near.gather(1, pick.clamp(max=3)[:, None])[:, 0],
                      torch.tensor(EXTREMES)[(pick - 4).clamp(min=0)])
    corrupt = torch.rand(R, generator=g) < 0.6
    rows[torch.arange(R)[corrupt], which[corrupt]] = bad[corrupt]
    return rows


@needs_c
def test_gather_raw_op_rejects_inconsistent_arguments():
    f = [torch.randn(2, 3, 4, 5)]
    raises_op_error(lambda: torch.ops.kdops.gather_level_features_fwd(f, torch.zeros(3, 3, dtype=torch.long)),
                    "index")
    raises_op_error(lambda: torch.ops.kdops.gather_level_features_fwd(f, torch.zeros(3, 4, dtype=torch.int32)),
                    "index")
    raises_op_error(lambda: torch.ops.kdops.gather_level_features_fwd([], torch.zeros(0, 4, dtype=torch.long)))
    idx = torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(RuntimeError):  # grad (R,C) not matching the sizes' C, or R
        torch.ops.kdops.gather_level_features_bwd(torch.randn(3, 2), idx, [2, 3, 4, 5])
    with pytest.raises(RuntimeError):
        torch.ops.kdops.gather_level_features_bwd(torch.randn(2, 3), idx, [2, 3, 4, 5])
    with pytest.raises(RuntimeError):
        torch.ops.kdops.gather_level_features_bwd(torch.randn(3, 3), idx, [2, 3, 4])
    with pytest.raises(RuntimeError):
        torch.ops.kdops.gather_level_features_bwd(torch.randn(3, 3), idx, [2, 3, -4, 5])


def _hostile_ranges(g, K, H, W):
    x = torch.sort(torch.stack([hostile_int(g, (K,), -3, W + 3), hostile_int(g, (K,), -3, W + 3)], 1), 1)[0]
    y = torch.sort(torch.stack([hostile_int(g, (K,), -3, H + 3), hostile_int(g, (K,), -3, H + 3)], 1), 1)[0]
    r = torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1)
    flip = torch.rand(K, generator=g) < 0.15  # some empty (x0 > x1 or y0 > y1) ranges as they come
    return torch.where(flip[:, None], r[:, [2, 3, 0, 1]], r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mean", [False, True])
def test_box_pool_and_paint_with_any_ranges_and_batch_index(mean, backend):
    pool, paint, dev = kernel(backend, "box_pool_fwd"), kernel(backend, "box_paint_fwd"), on(backend)
    g = torch.Generator().manual_seed(1 + mean)
    for trial in range(trials(backend, 30)):
        L = int(torch.randint(1, 4, (1,), generator=g))
        N = int(torch.randint(0, 3, (1,), generator=g))
        C = int(torch.randint(1, 11, (1,), generator=g))
        K = int(torch.randint(0, 12, (1,), generator=g))
        hw = [tuple(int(v) for v in torch.randint(0, 7, (2,), generator=g)) for _ in range(L)]
        feats = [torch.randn(N, C, h, w, generator=g, dtype=torch.float64) for h, w in hw]
        if trial % 4 == 3:
            feats = [f.to(memory_format=torch.channels_last) for f in feats]
        ranges = torch.stack([_hostile_ranges(g, K, h, w) for h, w in hw])
        bi = hostile_int(g, (K,), -1, N + 1, p_extreme=0.15)
        out = pool([f.to(dev) for f in feats], ranges.to(dev), bi.to(dev), mean).cpu()
        assert out.shape == (L, K, C)
        for lvl, f in enumerate(feats):
            want = reference.box_pool_ranges(f, ranges[lvl], bi, mean)
            torch.testing.assert_close(out[lvl], want, rtol=1e-12, atol=1e-12)
        values = torch.randn(L, K, C, generator=g, dtype=torch.float64)
        if trial % 3 == 2:  # (K,C) read in place for every level
            values = values[:1].expand(L, K, C)
        sizes = [v for h, w in hw for v in (N, h, w)]
        maps = [m.cpu() for m in paint(values.to(dev), ranges.to(dev), bi.to(dev), sizes, mean)]
        for lvl, (h, w) in enumerate(hw):
            want = reference.box_paint_ranges(values[lvl], ranges[lvl], bi, (N, h, w), mean)
            torch.testing.assert_close(maps[lvl], want, rtol=1e-12, atol=1e-12)


@needs_c
def test_box_pool_and_paint_raw_ops_reject_inconsistent_arguments():
    f = [torch.randn(2, 3, 4, 5)]
    r = torch.zeros(1, 2, 4, dtype=torch.long)
    bi = torch.zeros(2, dtype=torch.long)
    raises_op_error(lambda: torch.ops.kdops.box_pool_fwd(f, r[:, :, :3], bi, False), "ranges")
    raises_op_error(lambda: torch.ops.kdops.box_pool_fwd(f, r.expand(2, 2, 4), bi, False), "ranges")
    raises_op_error(lambda: torch.ops.kdops.box_pool_fwd(f, r, bi[:1], False), "batch_index")
    raises_op_error(lambda: torch.ops.kdops.box_pool_fwd(f + [torch.randn(3, 3, 2, 2)], r.expand(2, 2, 4), bi,
                                                         False))
    raises_op_error(lambda: torch.ops.kdops.box_pool_fwd([], r[:0], bi, False))
    v = torch.randn(1, 2, 3)
    raises_op_error(lambda: torch.ops.kdops.box_paint_fwd(v, r, bi, [2, 4], False), "sizes")
    raises_op_error(lambda: torch.ops.kdops.box_paint_fwd(v, r, bi, [2, 4, 5, 2, 4, 5], False))
    raises_op_error(lambda: torch.ops.kdops.box_paint_fwd(v[:, :1], r, bi, [2, 4, 5], False))
    with pytest.raises(RuntimeError):
        torch.ops.kdops.box_paint_fwd(v, r, bi, [2, -4, 5], False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_box_masks_fwd_with_any_ranges_weights_and_batch_index(backend):
    max_paint, dev = kernel(backend, "box_masks_fwd"), on(backend)
    g = torch.Generator().manual_seed(3)
    for trial in range(trials(backend, 40)):
        N, H, W = (int(v) for v in torch.randint(0, 6, (3,), generator=g))
        K = int(torch.randint(0, 12, (1,), generator=g))
        ranges = _hostile_ranges(g, K, H, W)
        bi = hostile_int(g, (K,), -1, N + 1, p_extreme=0.15)
        w = torch.randn(K, generator=g, dtype=torch.float64)
        special = torch.tensor([math.nan, math.inf, -math.inf, 0.0, 1e-300, 1e300], dtype=torch.float64)
        pick = torch.rand(K, generator=g) < 0.2
        w = torch.where(pick, special[torch.randint(0, len(special), (K,), generator=g)], w)
        dtype = [torch.float32, torch.float64, torch.float16, torch.bfloat16][trial % 4]
        got = max_paint(ranges.to(dev), w.to(dev), bi.to(dev), N, H, W, dtype).cpu()
        assert got.shape == (N, H, W) and got.dtype == dtype
        # oracle: a loop over boxes (NaN weights are not > 0: skipped like weights <= 0)
        want = torch.zeros(N, H, W, dtype=torch.float64)
        for k in range(K):
            x0, y0, x1, y1 = (int(v) for v in ranges[k])
            n, wk = int(bi[k]), float(w[k])
            if not (wk > 0 and 0 <= n < N):
                continue
            x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, W - 1), min(y1, H - 1)
            if x0 <= x1 and y0 <= y1:
                want[n, y0:y1 + 1, x0:x1 + 1] = want[n, y0:y1 + 1, x0:x1 + 1].clamp(min=wk)
        torch.testing.assert_close(got, want.to(dtype), rtol=0, atol=0)


@needs_c
def test_box_masks_fwd_raw_op_rejects_bad_sizes():
    r = torch.zeros(1, 4, dtype=torch.long)
    w = torch.ones(1, dtype=torch.float64)
    bi = torch.zeros(1, dtype=torch.long)
    raises_op_error(lambda: torch.ops.kdops.box_masks_fwd(r, w, bi, 1, -2, 3, torch.float32), "non-negative")
    raises_op_error(lambda: torch.ops.kdops.box_masks_fwd(r, w, bi, 1, 2, 2**31, torch.float32), "W")
    raises_op_error(lambda: torch.ops.kdops.box_masks_fwd(r[:, :3], w, bi, 1, 2, 3, torch.float32), "ranges")
    raises_op_error(lambda: torch.ops.kdops.box_masks_fwd(r, w[:0], bi, 1, 2, 3, torch.float32))
    raises_op_error(lambda: torch.ops.kdops.box_masks_fwd(r, w, bi, 1, 2, 3, torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's inf / NaN arithmetic under the interpreter
def test_nms_mask_with_non_finite_huge_and_degenerate_boxes(backend):
    """NaN, inf, huge (1e300: areas overflow), tiny and degenerate (x2 < x1, y2 < y1) boxes, all-invalid
    groups, thresholds outside [0,1] and NaN, every dtype: the reference's mask (torchvision's formula),
    never a kept invalid box."""
    nms, dev = kernel(backend, "nms_mask_fwd"), on(backend)
    g = torch.Generator().manual_seed(5)
    special = torch.tensor([math.nan, math.inf, -math.inf, 1e300, -1e300, 1e-300, 0.0, 5.0], dtype=torch.float64)
    for trial in range(trials(backend, 40)):
        G, K = int(torch.randint(0, 4, (1,), generator=g)), int(torch.randint(0, 70, (1,), generator=g))
        xy = torch.rand(G, 1, 2, generator=g, dtype=torch.float64) * 50 + torch.randn(G, K, 2, generator=g,
                                                                                        dtype=torch.float64) * 4
        boxes = torch.cat([xy, xy + torch.rand(G, K, 2, generator=g, dtype=torch.float64) * 20 + 4], 2)
        pick = torch.rand(G, K, 4, generator=g) < 0.15
        boxes = torch.where(pick, special[torch.randint(0, len(special), (G, K, 4), generator=g)], boxes)
        swap = torch.rand(G, K, generator=g) < 0.1  # degenerate: x2 < x1 and y2 < y1
        boxes = torch.where(swap[..., None], boxes[..., [2, 3, 0, 1]], boxes)
        valid = torch.rand(G, K, generator=g) < (0.0 if trial % 5 == 3 else 0.8)
        dtype = [torch.float64, torch.float32, torch.float16, torch.bfloat16][trial % 4]
        thr = [0.5, 0.0, 1.0, -1.0, 2.0, math.nan, 0.3][trial % 7]
        b = boxes.to(dtype)
        got = nms(b.to(dev), valid.to(dev), thr).cpu()
        assert got.shape == (G, K) and got.dtype == torch.bool
        assert torch.equal(got, reference.nms_mask(b, thr, valid)), (trial, dtype, thr)
        assert not (got & ~valid).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nms_mask_raw_op_rejects_inconsistent_arguments(backend):
    # the kernels index valid (and the keep mask) by the boxes' (G,K): a mismatch is refused, not read
    nms, dev = kernel(backend, "nms_mask_fwd"), on(backend)
    b, v = torch.zeros(2, 3, 4, device=dev), torch.ones(2, 3, dtype=torch.bool, device=dev)
    raises_op_error(lambda: nms(b[..., :3], v, 0.5), "boxes")
    raises_op_error(lambda: nms(b[0], v, 0.5), "boxes")
    raises_op_error(lambda: nms(b.long(), v, 0.5), "floating")
    raises_op_error(lambda: nms(b, v[:, :2], 0.5), "valid")
    raises_op_error(lambda: nms(b, v.float(), 0.5), "valid")
    raises_op_error(lambda: nms(b, v[None], 0.5), "valid")
    raises_op_error(lambda: nms(b[:1], v, 0.5), "valid")


@needs_c
def test_box_ranges_raw_op_with_non_finite_and_huge_boxes_matches_the_tensor_ops():
    from kdops.ops.box_ranges import _ranges_tensor_ops

    g = torch.Generator().manual_seed(4)
    special = torch.tensor([math.nan, math.inf, -math.inf, 1e30, -1e30, 3e38, 0.0, -0.5], dtype=torch.float64)
    for trial in range(24):
        K = int(torch.randint(0, 10, (1,), generator=g))
        boxes = torch.rand(K, 4, generator=g, dtype=torch.float64) * 300 - 50
        pick = torch.rand(K, 4, generator=g) < 0.3
        boxes = torch.where(pick, special[torch.randint(0, len(special), (K, 4), generator=g)], boxes)
        dtype = [torch.float32, torch.float64][trial % 2]
        boxes = boxes.to(dtype)
        rule = ["center", "lgd", "fgd"][trial % 3]
        sizes, strides = [(25, 38), (13, 19)], [8.0, 16.0]
        image = (200.0, 300.0) if rule == "fgd" else None
        for clip in (True, False):
            got = torch.ops.kdops.box_ranges_fwd(boxes, [h for h, _ in sizes], [w for _, w in sizes], strides, rule,
                                                 None, *(image or (0.0, 0.0)), clip)
            want = _ranges_tensor_ops(boxes, sizes, strides, rule, image, clip)
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{rule} clip={clip} {boxes}")
            if clip:  # clipped ranges lie on the map or are the empty [1,1,0,0]
                x0, y0, x1, y1 = got.unbind(-1)
                empty = (x0 > x1) | (y0 > y1)
                for lvl, (h, w) in enumerate(sizes):
                    ok = (x0[lvl] >= 0) & (x1[lvl] < w) & (y0[lvl] >= 0) & (y1[lvl] < h)
                    assert bool((ok | empty[lvl]).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_pool_with_any_batch_index(backend):
    fwd, bwd, dev = kernel(backend, "mask_pool_fwd"), kernel(backend, "mask_pool_bwd"), on(backend)
    g = torch.Generator().manual_seed(5)
    for trial in range(trials(backend, 20)):
        N, C, H, W = (int(v) for v in torch.randint(0, 5, (4,), generator=g))
        K = int(torch.randint(0, 8, (1,), generator=g))
        f = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
        m = torch.rand(K, H, W, generator=g, dtype=torch.float64)
        bi = hostile_int(g, (K,), -1, N + 1, p_extreme=0.2)
        out = fwd(f.to(dev), m.to(dev), bi.to(dev)).cpu()
        torch.testing.assert_close(out, reference.mask_pool(f, m, bi), rtol=1e-12, atol=1e-12)
        grad = torch.randn(K, C, generator=g, dtype=torch.float64)
        gf, gm = (t.cpu() for t in bwd(grad.to(dev), f.to(dev), m.to(dev), bi.to(dev), True, True))
        ok = (bi >= 0) & (bi < N)
        want_gf = torch.zeros_like(f)
        want_gm = torch.zeros_like(m)
        for k in range(K):
            if ok[k]:
                want_gf[bi[k]] += grad[k][:, None, None] * m[k][None]
                want_gm[k] = (grad[k][:, None, None] * f[bi[k]]).sum(0)
        torch.testing.assert_close(gf, want_gf, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gm, want_gm, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ms_deform_attn_with_far_and_non_finite_sampling_locations(backend):
    fwd, bwd, dev = kernel(backend, "ms_deform_attn_fwd"), kernel(backend, "ms_deform_attn_bwd"), on(backend)
    g = torch.Generator().manual_seed(6)
    shapes = torch.tensor([[4, 5], [2, 3]])
    start = torch.tensor([0, 20])
    N, M, D, Q, L, P = 2, 2, 3, 5, 2, 2
    value = torch.randn(N, 26, M, D, generator=g, dtype=torch.float64)
    loc = torch.rand(N, Q, M, L, P, 2, generator=g, dtype=torch.float64) * 3 - 1  # many outside [0,1]
    special = torch.tensor([1e30, -1e30, 1e9, -1e9, 2.0**62, 0.5], dtype=torch.float64)
    pick = torch.rand(loc.shape, generator=g) < 0.2
    loc = torch.where(pick, special[torch.randint(0, len(special), loc.shape, generator=g)], loc)
    attn = torch.rand(N, Q, M, L, P, generator=g, dtype=torch.float64)
    args = [t.to(dev) for t in (value, shapes, start, loc, attn)]
    out = fwd(*args)
    torch.testing.assert_close(out.cpu(), reference.ms_deform_attn(value, shapes, start, loc, attn), rtol=1e-10,
                               atol=1e-10)
    go = torch.randn_like(out)
    gv, gl, ga = bwd(go, *args, True, True, True)
    assert all(bool(t.isfinite().all()) for t in (gv, gl, ga))
    # the gradients of the far samples' value reads: none (zero padding), so grad_value is the oracle's
    leaf = value.detach().requires_grad_()
    ref_gv = torch.autograd.grad(reference.ms_deform_attn(leaf, shapes, start, loc, attn),
                                 leaf, go.cpu())[0]
    torch.testing.assert_close(gv.cpu(), ref_gv, rtol=1e-10, atol=1e-10)
    # non-finite locations: read nothing out of the value map (the sanitizer build checks), finite or NaN out
    for bad in (math.nan, math.inf, -math.inf):
        loc2 = loc.clone()
        loc2[0, 1, 0, 0, 0, 0] = bad
        args[3] = loc2.to(dev)
        out2 = fwd(*args)
        assert out2.shape == out.shape
        bwd(go, *args, True, True, True)


@needs_c
def test_ms_deform_attn_raw_op_rejects_shapes_that_do_not_fit_the_value():
    value = torch.randn(1, 26, 2, 3)
    loc = torch.rand(1, 5, 2, 2, 2, 2)
    attn = torch.rand(1, 5, 2, 2, 2)
    shapes, start = torch.tensor([[4, 5], [2, 3]]), torch.tensor([0, 20])
    raises_op_error(lambda: torch.ops.kdops.ms_deform_attn_fwd(value, torch.tensor([[4, 5], [3, 3]]), start, loc,
                                                               attn), "sum(H*W)")
    raises_op_error(lambda: torch.ops.kdops.ms_deform_attn_fwd(value, shapes, torch.tensor([0, 21]), loc, attn))
    raises_op_error(lambda: torch.ops.kdops.ms_deform_attn_fwd(value, torch.tensor([[-4, 5], [2, 3]]), start, loc,
                                                               attn))
    raises_op_error(lambda: torch.ops.kdops.ms_deform_attn_fwd(value, torch.tensor([[2**62, 2**62], [2, 3]]), start,
                                                               loc, attn))
    # 4 * (2^62 + 5) wraps around to 20 in int64: unchecked, level 0 would "fit" in 20 rows
    wrapping = torch.tensor([[4, 2**62 + 5], [2, 3]])
    raises_op_error(lambda: torch.ops.kdops.ms_deform_attn_fwd(value, wrapping, start, loc, attn), "overflow")
    with pytest.raises(ValueError, match="sum"):
        kdops.ms_deform_attn(value, wrapping, start, loc, attn)
    raises_op_error(lambda: torch.ops.kdops.ms_deform_attn_fwd(value, shapes, start, loc[..., :1], attn))
    raises_op_error(lambda: torch.ops.kdops.ms_deform_attn_bwd(torch.randn(3), value, shapes, start, loc, attn,
                                                               True, True, True))


@needs_c
def test_loss_raw_ops_reject_mismatched_shapes():
    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    with pytest.raises(RuntimeError):
        torch.ops.kdops.masked_mse_fwd(s, t[:, :, :3], None, None, 1.0)
    with pytest.raises(RuntimeError):
        torch.ops.kdops.masked_mse_fwd(s, t, torch.rand(2, 4, 4), None, 1.0)
    with pytest.raises(RuntimeError):
        torch.ops.kdops.masked_mse_fwd(s, t, None, torch.rand(2, 2), 1.0)
    with pytest.raises(RuntimeError):
        torch.ops.kdops.masked_mse_bwd(torch.ones(()), s, t[:1], None, None, 1.0, True, False)
    with pytest.raises(RuntimeError):
        torch.ops.kdops.pcc_mse_fwd(s, t[:, :2], 0, 1e-6)
    loss, coeffs = torch.ops.kdops.pcc_mse_fwd(s, t, 0, 1e-6)
    with pytest.raises(RuntimeError):  # coefficients of the wrong number of groups
        torch.ops.kdops.pcc_mse_bwd(torch.ones(()), s, t, coeffs[:1], 0, True, True)
    with pytest.raises(RuntimeError):
        torch.ops.kdops.pcc_mse_bwd(torch.ones(()), s, t, coeffs, 1, True, True)
    with pytest.raises(RuntimeError):
        torch.ops.kdops.bckd_cls_loss_fwd(torch.randn(6, 4), torch.randn(6, 3), None, 2.0, 1.0, True, False)
    with pytest.raises(RuntimeError):
        torch.ops.kdops.bckd_cls_loss_fwd(torch.randn(6, 4), torch.randn(6, 4), torch.rand(5), 2.0, 1.0, True, False)


def _layout(x: torch.Tensor, kind: int) -> torch.Tensor:
    """The same values in another memory layout: contiguous, channels_last, a strided slice of a
    larger tensor, or (for size-1-expandable tensors) a stride-0 broadcast."""
    if kind == 1 and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if kind == 2:
        big = torch.zeros(*[2 * s + 1 for s in x.shape], dtype=x.dtype)
        view = big[tuple(slice(1, 2 * s + 1, 2) for s in x.shape)]
        view.copy_(x)
        return view
    if kind == 3 and x.shape[0] > 0:  # every image the same: expand image 0 (stride 0)
        y = x[:1].expand(x.shape)
        x.copy_(y)  # the oracle sees the same values
        return y
    return x


def oracle_grads(out, leaves):
    """Gradients of out w.r.t. leaves, zeros where out does not depend on one (empty inputs)."""
    if not out.requires_grad:
        return [torch.zeros_like(x) for x in leaves]
    gs = torch.autograd.grad(out, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, gs)]


MODULE.update({"masked_mse_fwd": "masked_mse", "masked_mse_bwd": "masked_mse", "pcc_mse_fwd": "pcc_mse",
               "pcc_mse_bwd": "pcc_mse"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_losses_with_any_shapes_and_layouts(backend):
    # zero-size dimensions, odd sizes, and every input in its own layout (channels_last, strided
    # slices, stride-0 broadcasts): loss and gradients against the formulas in float64
    mfwd, mbwd = kernel(backend, "masked_mse_fwd"), kernel(backend, "masked_mse_bwd")
    pfwd, pbwd = kernel(backend, "pcc_mse_fwd"), kernel(backend, "pcc_mse_bwd")
    dev = on(backend)
    g = torch.Generator().manual_seed(7)
    for trial in range(trials(backend, 24)):
        N, C, H, W = (int(v) for v in torch.randint(0 if trial % 6 == 5 else 1, 6, (4,), generator=g))
        s, t = (torch.randn(N, C, H, W, generator=g, dtype=torch.float64) for _ in range(2))
        pw, cw = torch.rand(N, H, W, generator=g, dtype=torch.float64), torch.rand(N, C, generator=g, dtype=torch.float64)
        kinds = torch.randint(0, 4, (4,), generator=g).tolist()
        s, t, pw, cw = (_layout(x, k) for x, k in zip((s, t, pw, cw), kinds))
        leaves = [x.detach().clone().requires_grad_() for x in (s, t, pw, cw)]
        want = reference.masked_mse(leaves[0], leaves[1], pixel_weight=leaves[2], channel_weight=leaves[3]) * 0.5
        args = [x.to(dev) for x in (s, t, pw, cw)]
        got = mfwd(*args, 0.5).cpu()
        torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
        gs, gpw, gcw = (x.cpu() for x in mbwd(torch.full((), 2.0, dtype=torch.float64, device=dev), *args, 0.5,
                                              True, True))
        ws, _, wpw, wcw = oracle_grads(want * 2.0, leaves)
        for a, b in ((gs, ws), (gpw, wpw), (gcw, wcw)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        for code, norm in ((0, "channel"), (1, "instance")):
            if (N * H * W if code == 0 else H * W) < 2:
                continue  # one sample per group: no spread to normalise by (instance_norm refuses it too)
            leaves = [x.detach().clone().requires_grad_() for x in (s, t)]
            want = reference.pcc_mse(leaves[0], leaves[1], norm=norm)
            loss, coeffs = pfwd(args[0], args[1], code, 1e-6 if code == 0 else 1e-5)
            torch.testing.assert_close(loss.cpu(), want.detach(), rtol=1e-9, atol=1e-12)
            gs, gt = pbwd(torch.ones((), dtype=torch.float64, device=dev), args[0], args[1], coeffs, code, True, True)
            ws, wt = oracle_grads(want, leaves)
            torch.testing.assert_close(gs.cpu(), ws, rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(gt.cpu(), wt, rtol=1e-8, atol=1e-10)


MODULE.update({"bckd_cls_loss_fwd": "bckd_cls_loss"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_bckd_cls_with_any_strided_anchor_views(backend):
    # bckd_cls_loss_fwd reads (N,H,W,J,K) views through their strides (mmdet's (N,J*K,H,W) without a
    # copy): views of permuted, sliced and broadcast buffers, zero-size dimensions, any beta
    fwd, dev = kernel(backend, "bckd_cls_loss_fwd"), on(backend)
    g = torch.Generator().manual_seed(8)
    for trial in range(trials(backend, 24)):
        shape = [int(v) for v in torch.randint(0 if trial % 6 == 5 else 1, 4, (5,), generator=g)]
        views = []
        for _ in range(2):
            perm = torch.randperm(5, generator=g).tolist()
            base = torch.randn([shape[p] for p in perm], generator=g, dtype=torch.float64) * 3
            x = base.permute([perm.index(d) for d in range(5)])  # an (N,H,W,J,K) view of a permuted buffer
            views.append(_layout(x.clone(), 2) if trial % 3 == 0 else x)
        s, t = views
        A = shape[0] * shape[1] * shape[2] * shape[3]
        w = _layout(torch.rand(A, generator=g, dtype=torch.float64), 2) if trial % 2 else None
        beta = [1.0, 2.0, 1.5, 0.5][trial % 4]
        ls = s.detach().clone().requires_grad_()
        lw = w.detach().clone().requires_grad_() if w is not None else None
        want = reference.bckd_cls_loss(ls.reshape(A, shape[4]), t.reshape(A, shape[4]), weight=lw, beta=beta) * 0.25
        loss, gs, gw = fwd(s.to(dev), t.to(dev), w.to(dev) if w is not None else None, beta, 0.25, True,
                           w is not None)
        torch.testing.assert_close(loss.cpu(), want.detach(), rtol=1e-9, atol=1e-12)
        grads = oracle_grads(want, [ls] + ([lw] if lw is not None else []))
        torch.testing.assert_close(gs.cpu(), grads[0], rtol=1e-7, atol=1e-10)
        if w is not None:
            torch.testing.assert_close(gw.cpu().reshape(-1), grads[1], rtol=1e-7, atol=1e-10)
