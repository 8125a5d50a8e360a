"""kdops.box_pool / box_paint against dense per-box masks written from each rule (box_ranges:
test_box_ranges.py)."""
import re

import pytest
import torch
from box_helpers import IMAGE, SIZES, STRIDES, make_boxes, make_feats
from helpers import LOW, assert_compiled_matches_eager, close, leaf, triton_device

import kdops
from kdops.reference.box_ranges import box_mask_dense

def oracle_pool(feats, boxes, bi, rule, reduce="sum", image_size=None):
    # float64, from the rule's own pixel test: out[k] = sum_{hw} m_k F[b_k]
    outs = []
    for f, s in zip(feats, STRIDES):
        m = box_mask_dense(boxes, f.shape[-2:], s, rule, image_size)
        out = torch.einsum("khw,kchw->kc", m, f.double()[bi])
        if reduce == "mean":
            out = out / m.sum((1, 2))[:, None].clamp(min=1)
        outs.append(out)
    return torch.stack(outs)


@pytest.mark.parametrize("rule", ["center", "lgd", "fgd"])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_pool_parity_float64_and_grad(rule, reduce):
    boxes, bi = make_boxes()
    feats = make_feats(requires_grad=True)
    out = kdops.box_pool(feats, boxes, bi, STRIDES, rule=rule, image_size=IMAGE if rule != "center" else None,
                         reduce=reduce)
    assert out.shape == (3, boxes.shape[0], 5) and out.dtype == torch.float64
    feats_r = [leaf(f) for f in feats]
    ref = oracle_pool(feats_r, boxes, bi, rule, reduce, IMAGE if rule != "center" else None)
    close(out, ref, torch.float64)
    w = torch.randn(out.shape, dtype=torch.float64)
    g = torch.autograd.grad((out * w).sum(), feats)
    gr = torch.autograd.grad((ref * w).sum(), feats_r)
    for a, b in zip(g, gr):
        close(a, b, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32] + list(LOW))
def test_pool_low_precision(dtype):
    boxes, bi = make_boxes(20)
    feats = make_feats(C=8, dtype=dtype)
    out = kdops.box_pool(feats, boxes, bi, STRIDES)
    assert out.dtype == dtype
    ref = oracle_pool(feats, boxes, bi, "center")
    close(out, ref, dtype, scale=ref.abs().max().item())
    v = torch.randn(boxes.shape[0], 8, dtype=torch.float64)
    painted = kdops.box_paint(v.to(dtype), boxes, bi, (2, *SIZES[0]), STRIDES[0])
    assert painted.dtype == dtype
    m = box_mask_dense(boxes, SIZES[0], STRIDES[0], "center")
    ref_p = torch.einsum("khw,kc,kn->nchw", m, v.to(dtype).double(), torch.nn.functional.one_hot(bi, 2).double())
    close(painted, ref_p, dtype, scale=ref_p.abs().max().item())


def test_pool_fp32_on_a_coco_sized_map():
    # fp32 features of P3 size (100x152): the summed-area table must not lose the small boxes
    g = torch.Generator().manual_seed(3)
    f = (torch.rand(2, 4, 100, 152, generator=g) * 4 + 10).float()  # positive, large mean: worst case for a SAT
    boxes = torch.tensor([[1000.0, 700, 1020, 716], [8, 8, 24, 24], [0, 0, 1216, 800], [600, 400, 630, 430]])
    bi = torch.tensor([1, 0, 1, 0])
    out = kdops.box_pool(f, boxes, bi, 8)
    ref = oracle_pool([f], boxes, bi, "center")[0]
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("mean", [False, True])
def test_fallback_references_on_ranges_match_kernels(mean):
    # what runs on devices without a kernel (reference.box_pool_ranges / box_paint_ranges)
    from kdops import reference

    boxes, bi = make_boxes()
    f = make_feats()[0]
    r = kdops.box_ranges(boxes, [SIZES[0]], [8])[0]
    close(reference.box_pool_ranges(f, r, bi, mean), torch.ops.kdops.box_pool_fwd([f], r[None], bi, mean)[0],
          torch.float64)
    v = torch.randn(boxes.shape[0], 5, dtype=torch.float64)
    close(reference.box_paint_ranges(v, r, bi, (2, *SIZES[0]), mean),
          torch.ops.kdops.box_paint_fwd(v[None], r[None], bi, [2, *SIZES[0]], mean)[0], torch.float64)


def test_paint_parity_float64_levels_and_values_per_level():
    boxes, bi = make_boxes()
    sizes = [(2, h, w) for h, w in SIZES]
    v = torch.randn(boxes.shape[0], 5, dtype=torch.float64)
    outs = kdops.box_paint(v, boxes, bi, sizes, STRIDES, rule="lgd")
    assert isinstance(outs, list) and [o.shape for o in outs] == [(2, 5, h, w) for h, w in SIZES]
    vl = torch.randn(3, boxes.shape[0], 5, dtype=torch.float64)
    outs_l = kdops.box_paint(vl, boxes, bi, sizes, STRIDES, rule="lgd")
    for lvl, (H, W) in enumerate(SIZES):
        m = box_mask_dense(boxes, (H, W), STRIDES[lvl], "lgd")
        onehot = torch.nn.functional.one_hot(bi, 2).double()  # (K,N)
        close(outs[lvl], torch.einsum("khw,kc,kn->nchw", m, v, onehot), torch.float64)
        close(outs_l[lvl], torch.einsum("khw,kc,kn->nchw", m, vl[lvl], onehot), torch.float64)
    single = kdops.box_paint(v, boxes, bi, sizes[0], STRIDES[0], rule="lgd")
    assert isinstance(single, torch.Tensor)
    torch.testing.assert_close(single, outs[0])


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_pool_paint_adjoint(reduce):
    boxes, bi = make_boxes(30, seed=5)
    f = make_feats(seed=6)[0]
    v = torch.randn(boxes.shape[0], 5, dtype=torch.float64)
    p = kdops.box_pool(f, boxes, bi, 8, reduce="sum")
    q = kdops.box_paint(v, boxes, bi, (2, 13, 17), 8)
    torch.testing.assert_close((p * v).sum(), (f * q).sum(), rtol=1e-12, atol=1e-12)
    # pool's gradient is paint (with the 1/count for mean), and paint's gradient is pool
    fl = leaf(f)
    gp = torch.autograd.grad((kdops.box_pool(fl, boxes, bi, 8, reduce=reduce) * v).sum(), fl)[0]
    if reduce == "sum":
        close(gp, q, torch.float64)
    # independent oracle: sum_k m_k v_k / count_k painted into image b_k, the masks from the rule's pixel test
    m = box_mask_dense(boxes, (13, 17), 8, "center")
    count = m.sum((1, 2)).clamp(min=1)[:, None] if reduce == "mean" else 1.0
    onehot = torch.nn.functional.one_hot(bi, 2).double()
    close(gp, torch.einsum("khw,kc,kn->nchw", m, v / count, onehot), torch.float64)
    vl = leaf(v)
    gv = torch.autograd.grad((kdops.box_paint(vl, boxes, bi, (2, 13, 17), 8) * f).sum(), vl)[0]
    close(gv, p, torch.float64)


@pytest.mark.parametrize("K", [3, 300])
def test_pool_and_paint_wide_map_many_channels(K):
    # a 37x83 map and C = 19 (two full blocks of 8 channels and a partial one); few boxes give
    # long segments between box edges, many boxes short ones: both sweeps of the kernel
    g = torch.Generator().manual_seed(K)
    f = torch.randn(3, 19, 37, 83, generator=g, dtype=torch.float64)
    xy = torch.rand(K, 2, generator=g, dtype=torch.float64) * torch.tensor([83 * 8.0, 37 * 8.0]) - 20
    wh = torch.rand(K, 2, generator=g, dtype=torch.float64) ** 2 * torch.tensor([83 * 8.0, 37 * 8.0])
    boxes = torch.cat([xy, xy + wh], 1)
    bi = torch.randint(0, 3, (K,), generator=g)
    m = box_mask_dense(boxes, (37, 83), 8, "center")
    for reduce in ("sum", "mean"):
        ref = torch.einsum("khw,kchw->kc", m, f[bi])
        if reduce == "mean":
            ref = ref / m.sum((1, 2))[:, None].clamp(min=1)
        close(kdops.box_pool(f, boxes, bi, 8, reduce=reduce), ref, torch.float64)
        close(kdops.box_pool(f.float(), boxes, bi, 8, reduce=reduce), ref, torch.float32, scale=ref.abs().max().item())
    v = torch.randn(K, 19, generator=g, dtype=torch.float64)
    ref_p = torch.einsum("khw,kc,kn->nchw", m, v, torch.nn.functional.one_hot(bi, 3).double())
    close(kdops.box_paint(v, boxes, bi, (3, 37, 83), 8), ref_p, torch.float64)
    close(kdops.box_paint(v.float(), boxes, bi, (3, 37, 83), 8), ref_p, torch.float32, scale=ref_p.abs().max().item())


def test_gradcheck_pool_and_paint():
    boxes, bi = make_boxes(6, seed=7)
    f = leaf(torch.randn(2, 3, 6, 7, dtype=torch.float64))
    v = leaf(torch.randn(boxes.shape[0], 3, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda f: kdops.box_pool(f, boxes, bi, 16, reduce="mean"), (f,))
    assert torch.autograd.gradcheck(lambda f: kdops.box_pool([f, f[:, :, :3, :4]], boxes, bi, [16, 32]), (f,))
    assert torch.autograd.gradcheck(lambda v: kdops.box_paint(v, boxes, bi, (2, 6, 7), 16), (v,))
    small = leaf(torch.randn(2, 2, 4, 5, dtype=torch.float64))
    assert torch.autograd.gradgradcheck(lambda f: kdops.box_pool(f, boxes, bi, 16, reduce="mean") ** 2, (small,))


def test_empty_and_degenerate_inputs():
    f = make_feats()[0]
    e = kdops.box_pool(f, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 8)
    assert e.shape == (0, 5)
    pe = kdops.box_paint(torch.zeros(0, 5), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), (2, 4, 4), 8)
    assert pe.shape == (2, 5, 4, 4) and not pe.any()
    # outside the image, zero-area, out-of-range batch index: zeros, no error
    boxes = torch.tensor([[500.0, 500, 600, 600], [10, 10, 10, 40], [0, 0, 50, 50]], dtype=torch.float64)
    bi = torch.tensor([0, 1, 7])
    out = kdops.box_pool(f, boxes, bi, 8)
    assert not out.any()
    assert not kdops.box_paint(torch.ones(3, 5), boxes, bi, (2, 13, 17), 8).any()
    z = kdops.box_pool(torch.zeros(0, 5, 3, 3), boxes, bi, 8)
    assert z.shape == (3, 5) and not z.any()


def test_non_contiguous_features():
    boxes, bi = make_boxes()
    f = make_feats()[0]
    cl = f.contiguous(memory_format=torch.channels_last)
    nc = f.transpose(2, 3).contiguous().transpose(2, 3)
    a = kdops.box_pool(f, boxes, bi, 8)
    assert torch.equal(a, kdops.box_pool(cl, boxes, bi, 8))
    assert torch.equal(a, kdops.box_pool(nc, boxes, bi, 8))


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(boxes=torch.zeros(3, 5)), ValueError, "`boxes` must have shape (K,4)"),
        (dict(boxes=torch.zeros(3, 4, dtype=torch.int64)), TypeError, "`boxes` must have dtype"),
        (dict(batch_index=torch.zeros(3, dtype=torch.int32)), TypeError, "`batch_index` must have dtype"),
        (dict(batch_index=torch.zeros(2, dtype=torch.int64)), ValueError, "`batch_index` must have shape (3,)"),
        (dict(batch_index=None), TypeError, "`batch_index` must be a torch.Tensor"),
        (dict(strides=[8, 16]), ValueError, "`strides` must be 3 positive finite number(s)"),
        (dict(rule="box"), ValueError, "`rule` must be one of"),
        (dict(reduce="max"), ValueError, "`reduce` must be 'sum' or 'mean'"),
        (dict(image_size=(10,)), ValueError, "`image_size` must be None"),
        (dict(features=[torch.zeros(2, 5, 4, 4), torch.zeros(2, 6, 2, 2), torch.zeros(2, 5, 1, 1)]), ValueError,
         "`features[1]` has (N,C) = (2, 6)"),
        (dict(features=[torch.zeros(2, 5, 4)] * 3), ValueError, "`features[0]` must be 4-D"),
    ],
)
def test_pool_bad_inputs(kwargs, exc, words):
    args = dict(features=[torch.zeros(2, 5, h, w) for h, w in SIZES], boxes=torch.zeros(3, 4),
                batch_index=torch.zeros(3, dtype=torch.int64), strides=STRIDES)
    args.update(kwargs)
    extra = {k: args.pop(k) for k in ("rule", "reduce", "image_size") if k in args}
    with pytest.raises(exc, match=re.escape(words)):
        kdops.box_pool(args["features"], args["boxes"], args["batch_index"], args["strides"], **extra)


def test_paint_bad_inputs():
    b, bi = torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match=re.escape("`values` must be (K,C) = (3, C)")):
        kdops.box_paint(torch.zeros(4, 5), b, bi, (2, 4, 4), 8)
    with pytest.raises(ValueError, match="`sizes` must be one"):
        kdops.box_paint(torch.zeros(3, 5), b, bi, (2, 4), 8)
    with pytest.raises(TypeError, match="`values` must have dtype"):
        kdops.box_paint(torch.zeros(3, 5, dtype=torch.int64), b, bi, (2, 4, 4), 8)
    with pytest.raises(TypeError, match="`batch_index` must be a torch.Tensor"):
        kdops.box_paint(torch.zeros(3, 5), b, None, (2, 4, 4), 8)
    with pytest.raises(ValueError, match=re.escape("`boxes` is on cpu but the other inputs are on meta")):
        kdops.box_paint(torch.zeros(3, 5, device="meta"), b, bi, (2, 4, 4), 8)


def _pool_paint_run(boxes, bi, feats, v, reduce):
    """Forward and backward of box_pool and box_paint: every output and gradient, flattened."""
    fs, vl = [leaf(f) for f in feats], leaf(v)
    pooled = kdops.box_pool(fs, boxes, bi, STRIDES, reduce=reduce)
    painted = kdops.box_paint(vl, boxes, bi, [(2, h, w) for h, w in SIZES], STRIDES)
    w = torch.linspace(-1, 1, pooled.numel(), dtype=pooled.dtype).reshape(pooled.shape)
    loss = (pooled * w).sum() + sum((p * f.detach()).sum() for p, f in zip(painted, feats))
    grads = torch.autograd.grad(loss, fs + [vl])
    return [pooled.detach(), *(p.detach() for p in painted), *grads]


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_deterministic_across_runs_and_thread_counts(reduce):
    # bitwise equal results and gradients on repeated runs with 1 and 2 threads (float32: rounding
    # would show any change of summation order)
    boxes, bi = make_boxes(60, seed=8)
    feats = make_feats(C=16, dtype=torch.float32)
    v = torch.randn(boxes.shape[0], 16, generator=torch.Generator().manual_seed(9))
    threads = torch.get_num_threads()
    res = []
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            res.append(_pool_paint_run(boxes, bi, feats, v, reduce))
    finally:
        torch.set_num_threads(threads)
    close(res[0][0], oracle_pool(feats, boxes, bi, "center", reduce), torch.float32, scale=10)
    for run in res[1:]:
        assert len(run) == len(res[0])
        for a, b in zip(run, res[0]):
            assert torch.equal(a, b)


def test_torch_compile_fullgraph():
    boxes, bi = make_boxes()
    feats = make_feats(dtype=torch.float32)

    def f(feats, boxes, bi, v):
        pooled = kdops.box_pool(feats, boxes, bi, STRIDES, rule="lgd", reduce="mean")
        painted = kdops.box_paint(v, boxes, bi, [(2, h, w) for h, w in SIZES], STRIDES)
        return pooled.sum() + sum((p * x).sum() for p, x in zip(painted, feats))

    v = torch.randn(boxes.shape[0], 5)
    assert_compiled_matches_eager(f, feats, boxes, bi, v)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        feats = [torch.empty(2, 8, h, w, dtype=torch.bfloat16) for h, w in SIZES]
        boxes, bi = torch.empty(11, 4), torch.zeros(11, dtype=torch.int64)
        assert kdops.box_pool(feats, boxes, bi, STRIDES).shape == (3, 11, 8)
        out = kdops.box_paint(torch.empty(11, 8), boxes, bi, [(2, h, w) for h, w in SIZES], STRIDES)
        assert [o.shape for o in out] == [(2, 8, h, w) for h, w in SIZES]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mean", [False, True])
def test_triton_pool_and_paint_match_oracle(dtype, mean):
    from kdops.triton.box_pool import box_paint_fwd, box_pool_fwd

    dev = triton_device()
    boxes, bi = make_boxes(12, seed=9)
    f = make_feats(C=6)[0]
    r = kdops.box_ranges(boxes, [SIZES[0]], [8])[0]
    m = box_mask_dense(boxes, SIZES[0], 8, "center")
    cnt = m.sum((1, 2)).clamp(min=1)[:, None] if mean else 1.0
    out = box_pool_fwd([f.to(dev, dtype)], r[None].to(dev), bi.to(dev), mean)[0]
    ref = torch.einsum("khw,kchw->kc", m, f.to(dtype).double()[bi]) / cnt
    close(out.cpu(), ref, dtype, scale=ref.abs().max().item())
    v = torch.randn(boxes.shape[0], 6, dtype=torch.float64)
    painted = box_paint_fwd(v[None].to(dev, dtype), r[None].to(dev), bi.to(dev), [2, *SIZES[0]], mean)[0]
    onehot = torch.nn.functional.one_hot(bi, 2).double()
    ref_p = torch.einsum("khw,kc,kn->nchw", m, v.to(dtype).double() / cnt, onehot)
    assert painted.dtype == dtype
    close(painted.cpu(), ref_p, dtype, scale=ref_p.abs().max().item())
    again = box_paint_fwd(v[None].to(dev, dtype), r[None].to(dev), bi.to(dev), [2, *SIZES[0]], mean)[0]
    assert torch.equal(painted, again)  # sorted segment sums, no atomics: bitwise reproducible


@pytest.mark.triton
def test_triton_empty_and_out_of_range_boxes():
    from kdops.triton.box_pool import paint_level, pool_level

    dev = triton_device()
    f = torch.randn(2, 3, 5, 6, device=dev)
    r = torch.tensor([[-9, -9, 40, 40], [3, 3, 2, 2], [0, 0, 1, 1]], device=dev)
    bi = torch.tensor([0, 1, 9], device=dev)
    out = pool_level(f, r, bi, False)
    torch.testing.assert_close(out[0], f[0].sum((1, 2)))
    assert not out[1:].any()
    p = paint_level(torch.ones(3, 3, device=dev), r, bi, 2, 5, 6, False)
    assert p[0].eq(1).all() and not p[1].any()
    assert pool_level(f, r[:0], bi[:0], False).shape == (0, 3)
    # strided maps are read through their strides
    cl = f.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(pool_level(cl, r, bi, True), pool_level(f, r, bi, True))


def test_runs_under_deterministic_algorithms():
    # under torch.use_deterministic_algorithms(True): correct values and gradients, bitwise equal on
    # repeated runs with 1 and 2 threads (pool, its gradient, paint, and the FGD masks)
    boxes, bi = make_boxes(10, seed=11)
    f0 = make_feats(dtype=torch.float32)[0]
    v = torch.randn(boxes.shape[0], 5, generator=torch.Generator().manual_seed(12))
    before, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    runs = []
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            f = leaf(f0)
            out = kdops.box_pool(f, boxes, bi, 8, reduce="mean")
            out.sum().backward()
            painted = kdops.box_paint(v, boxes, bi, (2, 13, 17), 8)
            fg, bg = kdops.box_masks(boxes, bi, (2, 13, 17), 8)
            runs.append([out.detach(), f.grad, painted, fg, bg])
    finally:
        torch.use_deterministic_algorithms(before)
        torch.set_num_threads(threads)
    out, grad, painted, fg, bg = runs[0]
    close(out, oracle_pool([f0], boxes, bi, "center", "mean")[0], torch.float32, scale=10)
    m = box_mask_dense(boxes, (13, 17), 8, "center")
    onehot = torch.nn.functional.one_hot(bi, 2).double()
    count = m.sum((1, 2)).clamp(min=1)[:, None]
    close(grad, torch.einsum("khw,kc,kn->nchw", m, torch.ones(boxes.shape[0], 5, dtype=torch.float64) / count,
                             onehot), torch.float32)
    close(painted, torch.einsum("khw,kc,kn->nchw", m, v.double(), onehot), torch.float32, scale=10)
    ref_fg, ref_bg = kdops.reference.box_masks(boxes, bi, (2, 13, 17), 8)
    close(fg, ref_fg, torch.float32)
    close(bg, ref_bg, torch.float32)
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)


def test_levels_with_mixed_layouts_and_strided_values():
    # one op call serves every level: each level is read through its own strides, and (L,K,C)
    # values are read through theirs (a (K,L,C) tensor transposed, or (K,C) expanded over L)
    boxes, bi = make_boxes(25, seed=13)
    feats = make_feats(C=11, seed=14)
    mixed = [feats[0].contiguous(memory_format=torch.channels_last), feats[1][:, :, :, :].transpose(2, 3)
             .contiguous().transpose(2, 3), feats[2]]
    ref = oracle_pool(feats, boxes, bi, "center")
    close(kdops.box_pool(mixed, boxes, bi, STRIDES), ref, torch.float64)
    sizes = [(2, h, w) for h, w in SIZES]
    vkl = torch.randn(boxes.shape[0], 3, 11, dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(bi, 2).double()
    outs = kdops.box_paint(vkl.transpose(0, 1), boxes, bi, sizes, STRIDES)
    for lvl, (H, W) in enumerate(SIZES):
        m = box_mask_dense(boxes, (H, W), STRIDES[lvl], "center")
        close(outs[lvl], torch.einsum("khw,kc,kn->nchw", m, vkl[:, lvl], onehot), torch.float64)


def test_paint_backward_of_a_plain_sum_reads_broadcast_gradients():
    # sum(p.sum()) hands box_paint's backward expanded (stride-0) gradients: read as such
    boxes, bi = make_boxes(20, seed=15)
    v = leaf(torch.randn(boxes.shape[0], 5, dtype=torch.float64))
    sizes = [(2, h, w) for h, w in SIZES]
    g = torch.autograd.grad(sum(p.sum() for p in kdops.box_paint(v, boxes, bi, sizes, STRIDES)), v)[0]
    ones = [torch.ones(2, 5, h, w, dtype=torch.float64) for h, w in SIZES]
    close(g, sum(kdops.box_pool(ones, boxes, bi, STRIDES)), torch.float64)
    counts = sum(box_mask_dense(boxes, s, st, "center").sum((1, 2)) for s, st in zip(SIZES, STRIDES))
    close(g, counts[:, None].expand(-1, 5) * (bi >= 0)[:, None], torch.float64)


def test_pool_reads_only_the_union_of_boxes_exactly():
    # boxes whose union changes shape from row to row (gaps between boxes, overlaps, a single
    # pixel, a box inside another): pooling reads only the union, and pixels outside every box
    # must not matter at all -- huge values there leave the result unchanged
    g = torch.Generator().manual_seed(16)
    f = torch.randn(1, 3, 20, 30, generator=g, dtype=torch.float64)
    r = torch.tensor([[3, 2, 8, 5], [20, 10, 25, 15], [6, 4, 22, 12], [14, 17, 14, 17], [7, 5, 9, 6], [0, 19, 29, 19]])
    boxes = torch.cat([r[:, :2] * 8 + 1, (r[:, 2:] + 1) * 8 - 1], 1).double()  # centre rule -> exactly r
    bi = torch.zeros(6, dtype=torch.int64)
    assert torch.equal(kdops.box_ranges(boxes, [(20, 30)], [8])[0], r)
    m = box_mask_dense(boxes, (20, 30), 8, "center")
    ref = torch.einsum("khw,chw->kc", m, f[0])
    close(kdops.box_pool(f, boxes, bi, 8), ref, torch.float64)
    outside = m.sum(0) == 0
    loud = torch.where(outside, torch.full_like(f, 1e12), f)
    close(kdops.box_pool(loud, boxes, bi, 8), ref, torch.float64)


def test_many_boxes_plans_made_in_parallel():
    # K*L >= 4096 boxes-levels: the event plans of the (level, image) pairs are made by a task
    # pool; results must match the oracle and not depend on the thread count
    boxes, bi = make_boxes(1400, seed=17)
    feats = make_feats(C=9, seed=18)
    ref = oracle_pool(feats, boxes, bi, "center", "mean")
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, max(threads, 2)):
            torch.set_num_threads(n)
            outs.append(kdops.box_pool(feats, boxes, bi, STRIDES, reduce="mean"))
    finally:
        torch.set_num_threads(threads)
    close(outs[0], ref, torch.float64)
    assert torch.equal(outs[0], outs[1])
