"""Every Triton kernel, as its launcher really launches it on a GPU, compiles for sm_90 (also with
int64 sizes, within an sm_90 block's shared memory, and with no floating-point atomics outside
the non-deterministic paths of MSDA and RoIAlign); and no launcher reads a device value on the
host (no synchronisation), checked on meta tensors.

The interpreter (how CI runs the Triton kernels) type-checks far less than the compiler: an
int32/int64 mix in a loop carry, a dtype the hardware has no atomic for, a constexpr used as a
value... pass there and fail on the first GPU call. Here each op's Triton launcher runs on
small CPU tensors with `JITFunction.run` replaced by a recorder (so the launcher takes its GPU
path: GPU block sizes, no interpreter branches), and every recorded launch -- the kernel, the
types of its arguments and its constexprs -- is compiled to a cubin for sm_90 by Triton's own
compiler, in fp32, bf16 and fp16 (and fp64 where the op supports it). No GPU is needed.
A launcher's later host code runs on the garbage the recorder leaves in its outputs; it may
fail then, after the launches that matter were recorded.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import INTERPRET, compile_for_gpu, deterministic_algorithms

pytestmark = pytest.mark.skipif(INTERPRET, reason="kernels are interpreted in this process (TRITON_INTERPRET=1)")

triton = pytest.importorskip("triton")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_PTR = {torch.float32: "*fp32", torch.float64: "*fp64", torch.float16: "*fp16", torch.bfloat16: "*bf16",
        torch.int64: "*i64", torch.int32: "*i32", torch.uint8: "*u8", torch.bool: "*i1", torch.int8: "*i8"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas")
SM90_SHARED_BYTES = 227 * 1024  # the most shared memory one block may use on sm_90


@contextlib.contextmanager
def recorded_launches(specialize_ones: bool = False):
    """Replaces JITFunction.run: each launch is recorded as (kernel, signature, constexprs, options).
    specialize_ones: an int argument equal to 1 becomes the constexpr 1, as Triton's launcher
    passes it on a GPU (so `H.to(...)` on such an argument fails there)."""
    from triton.runtime.jit import JITFunction

    launches = []

    def record(self, *args, grid, warmup=False, **kwargs):
        sig, const = {}, {}
        values = dict(zip([p.name for p in self.params], args))
        values.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
        for p in self.params:
            v = values[p.name]
            if p.is_constexpr:
                const[p.name] = v
            elif isinstance(v, torch.Tensor):
                sig[p.name] = _PTR[v.dtype]
            elif isinstance(v, bool):
                sig[p.name] = "i1"
            elif isinstance(v, int) and specialize_ones and v == 1:
                const[p.name] = 1
            elif isinstance(v, int):
                sig[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            elif isinstance(v, float):
                sig[p.name] = "fp32"
            else:
                raise TypeError(f"{self.fn.__name__}: argument {p.name} of type {type(v).__name__}")
        options = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
        launches.append((self, sig, const, options))

    saved = JITFunction.run
    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = saved


def compile_recorded(run, expected, wide_ints: bool = False, kernels=None, specialize_ones: bool = False):
    with recorded_launches(specialize_ones) as launches:
        try:
            run()
        except Exception:  # host code reading the recorder's garbage; the launches were recorded
            pass
    names = {fn.fn.__name__ for fn, *_ in launches}
    assert set(expected) <= names, f"launches recorded: {sorted(names)}, expected {sorted(expected)}"
    seen = set()
    for fn, sig, const, options in launches:
        key = (fn.fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in const.items())))
        if key in seen:
            continue
        seen.add(key)
        if wide_ints:  # what Triton passes for sizes and strides of 2^31 or more
            sig = {k: "i64" if v == "i32" else v for k, v in sig.items()}
        kernel = compile_for_gpu(fn, sig, const, **options)
        # a launch asking for more shared memory than an H100/H200 block has fails at run time
        assert kernel.metadata.shared <= SM90_SHARED_BYTES, (fn.fn.__name__, kernel.metadata.shared, const)
        if kernels is not None:
            kernels.append((fn.fn.__name__, kernel))
    return names


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_feature_losses_compile(dtype):
    from kdops.triton import masked_mse, pcc_mse

    s, t = rnd(2, 3, 5, 7, dtype=dtype), rnd(2, 3, 5, 7, dtype=dtype)
    pw, cw = rnd(2, 5, 7, dtype=dtype).abs(), rnd(2, 3, dtype=dtype).abs()
    compile_recorded(lambda: masked_mse.masked_mse_fwd(s, t, pw, cw, 1.0), ["_masked_mse_kernel"])
    compile_recorded(lambda: masked_mse.masked_mse_bwd(torch.ones(()), s, t, pw, cw, 1.0, True, True),
                     ["_masked_mse_kernel", "_masked_mse_wgrad_kernel"])
    compile_recorded(lambda: masked_mse.masked_mse_fwd(s, t, None, None, 1.0), ["_masked_mse_kernel"])
    for norm in (0, 1):
        compile_recorded(lambda: pcc_mse.pcc_mse_fwd(s, t, norm, 1e-6), ["_pcc_stats_kernel"])
        coeffs = torch.rand(3 if norm == 0 else 6, 8, dtype=torch.float64)
        compile_recorded(lambda: pcc_mse.pcc_mse_bwd(torch.ones(()), s, t, coeffs, norm, True, True),
                         ["_pcc_loss_grad_kernel"])


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_spatial_ops_compile(dtype):
    from kdops.triton import box_masks, box_pool, gather_level_features, mask_pool

    feats = [rnd(2, 3, 6, 7, dtype=dtype), rnd(2, 3, 3, 4, dtype=dtype)]
    idx = torch.tensor([[0, 0, 1, 2], [1, 1, 2, 3], [0, 0, 1, 2]])
    compile_recorded(lambda: gather_level_features.gather_level_features_fwd(feats, idx), ["_gather_kernel"])
    compile_recorded(lambda: gather_level_features.gather_level_features_bwd(rnd(3, 3, dtype=dtype), idx,
                                                                             [2, 3, 6, 7, 2, 3, 3, 4]),
                     ["_segment_sum_kernel"])
    ranges = torch.tensor([[[0, 0, 3, 2], [1, 1, 6, 5]], [[0, 0, 1, 1], [0, 0, 3, 2]]])
    bi = torch.tensor([0, 1])
    for mean in (False, True):
        compile_recorded(lambda: box_pool.box_pool_fwd(feats, ranges, bi, mean),
                         ["_sat_kernel", "_mark_rows_kernel", "_box_query_kernel"])
        compile_recorded(lambda: box_pool.box_paint_fwd(rnd(2, 2, 3, dtype=dtype), ranges, bi,
                                                        [2, 6, 7, 2, 3, 4], mean), ["_paint_kernel"])
    compile_recorded(lambda: box_masks.box_masks_fwd(ranges[0], torch.rand(2, dtype=torch.float64), bi, 2, 6, 7,
                                                     dtype), ["_max_paint_kernel"])
    m = torch.rand(2, 6, 7).to(dtype)
    compile_recorded(lambda: mask_pool.mask_pool_fwd(feats[0], m, bi), ["_pool_kernel"])
    compile_recorded(lambda: mask_pool.mask_pool_bwd(rnd(2, 3, dtype=dtype), feats[0], m, bi, True, True),
                     ["_grad_feature_kernel", "_grad_masks_kernel"])


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_ms_deform_attn_compiles(dtype):
    from kdops.triton import ms_deform_attn as msda

    value = rnd(2, 26, 2, 4, dtype=dtype)
    shapes, starts = torch.tensor([[4, 5], [2, 3]]), torch.tensor([0, 20])
    loc, attn = torch.rand(2, 3, 2, 2, 2, 2).to(dtype), torch.rand(2, 3, 2, 2, 2).to(dtype)
    go = rnd(2, 3, 8, dtype=dtype)
    compile_recorded(lambda: msda.ms_deform_attn_fwd(value, shapes, starts, loc, attn), ["_fwd_kernel"])
    compile_recorded(lambda: msda.ms_deform_attn_bwd(go, value, shapes, starts, loc, attn, True, True, False),
                     ["_bwd_kernel"])
    compile_recorded(lambda: msda.ms_deform_attn_bwd(go, value, shapes, starts, loc, attn, True, True, True),
                     ["_bwd_kernel", "_keys_kernel", "_gather_value_grad_kernel"])


def _deterministic(run):
    def wrapped():
        with deterministic_algorithms():
            return run()
    return wrapped


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_roi_align_compiles(dtype):
    from kdops.triton import roi_align as ra

    feats = [rnd(2, 3, 6, 7, dtype=dtype), rnd(2, 3, 3, 4, dtype=dtype).transpose(2, 3)]
    rois = torch.tensor([[0, 1, 1, 5, 5], [1, 0, 0, 9, 9]]).to(dtype)
    levels, sizes = torch.tensor([0, 1]), [2, 3, 6, 7, 2, 3, 4, 3]
    for sr in (0, 2):
        for aligned in (True, False):
            for out in ((7, 5), (14, 14)):  # 14 x 14 (mask heads): the largest tile
                compile_recorded(lambda: ra.roi_align_fwd(feats, rois, levels, [0.5, 0.25], *out, sr, aligned),
                                 ["_fwd_kernel"])
            grad = rnd(2, 3, 7, 5, dtype=dtype)
            compile_recorded(lambda: ra.roi_align_bwd(grad, rois, levels, [0.5, 0.25], sr, aligned, sizes),
                             ["_bwd_atomic_kernel"])
            compile_recorded(_deterministic(lambda: ra.roi_align_bwd(grad, rois, levels, [0.5, 0.25], sr, aligned,
                                                                     sizes)), ["_bwd_plane_kernel"])
    # every size, stride, level index and the sampling ratio equal to 1: Triton passes them as
    # the constexpr 1
    ones = [rnd(1, 1, 1, 1, dtype=dtype), rnd(1, 1, 1, 1, dtype=dtype)]
    rois1, levels1 = torch.tensor([[0, 0, 0, 1, 1]]).to(dtype), torch.tensor([1])
    for aligned in (True, False):
        compile_recorded(lambda: ra.roi_align_fwd(ones, rois1, levels1, [1.0, 1.0], 1, 1, 1, aligned), ["_fwd_kernel"],
                         specialize_ones=True)
        grad = rnd(1, 1, 1, 1, dtype=dtype)
        compile_recorded(lambda: ra.roi_align_bwd(grad, rois1, levels1, [1.0, 1.0], 1, aligned, [1] * 8),
                         ["_bwd_atomic_kernel"], specialize_ones=True)
        compile_recorded(_deterministic(lambda: ra.roi_align_bwd(grad, rois1, levels1, [1.0, 1.0], 1, aligned,
                                                                 [1] * 8)), ["_bwd_plane_kernel"],
                         specialize_ones=True)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_nms_mask_compiles(dtype):
    from kdops.triton import nms_mask as nm

    # K = 37 (2 words a row), 2000 (COCO proposals: 63 words, the scan's block 64), 16384 (512 words:
    # the scan's removed words in 4 warps' registers); K = 1: K, W and the row-block count are all the
    # constexpr 1 Triton passes on a GPU. The threshold goes in as its float64 bit pattern: an int64
    # (0.5), an int32 (0.0: the pattern 0) or the constexpr 1 (5e-324, the pattern 1)
    for K, thr, ones in ((37, 0.5, False), (37, 0.0, False), (2000, 0.7, False), (16384, 0.5, False),
                         (1, 5e-324, True)):
        boxes = rnd(2, K, 4, dtype=dtype)
        valid = torch.ones(2, K, dtype=torch.bool)
        compile_recorded(lambda: nm.nms_mask_fwd(boxes, valid, thr), ["_iou_mask_kernel", "_scan_kernel"],
                         specialize_ones=ones)


def test_nms_mask_iou_is_ieee_fp64_without_fused_multiply_adds():
    # the bitmask's IoU must round as the C++ kernel's does: fp64 IEEE division and no FMA contraction
    # (the launcher passes enable_fp_fusion=False; compiled here the same way)
    import re

    from kdops.triton import nms_mask as nm

    with recorded_launches() as launches:
        nm.nms_mask_fwd(rnd(2, 37, 4), torch.ones(2, 37, dtype=torch.bool), 0.5)
    (fn, sig, const, options), = [x for x in launches if x[0].fn.__name__ == "_iou_mask_kernel"]
    ptx = {fuse: compile_for_gpu(fn, sig, const, enable_fp_fusion=fuse, **options).asm["ptx"] for fuse in (False, True)}
    assert re.search(r"\bdiv\.rn\.f64\b", ptx[False])
    assert not re.search(r"\bfma\.[a-z.]*f64\b", ptx[False])
    assert re.search(r"\bfma\.[a-z.]*f64\b", ptx[True])  # the check sees contraction where it is allowed


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_bckd_kernels_compile(dtype):
    from kdops.triton import bckd_cls_loss, bckd_loc_loss

    s5, t5 = rnd(2, 3, 4, 1, 5, dtype=dtype), rnd(2, 3, 4, 1, 5, dtype=dtype)
    w = torch.rand(24, dtype=dtype)
    for beta in (1.0, 2.0, 1.5):
        compile_recorded(lambda: bckd_cls_loss.bckd_cls_loss_fwd(s5, t5, w, beta, 1.0, True, True), ["_cls_kernel"])
    compile_recorded(lambda: bckd_cls_loss.bckd_cls_loss_fwd(s5, t5, None, 2.0, 1.0, True, False), ["_cls_kernel"])
    A, K = 12, 3
    logits = [rnd(A, K, dtype=dtype), rnd(A, K, dtype=dtype)]
    anchors = torch.rand(A, 4).to(dtype) * 10
    anchors[:, 2:] += anchors[:, :2]
    for decoder, D, pri, reg_max in ((0, 4, anchors, 16), (1, 4 * 8, anchors[:, :2].contiguous(), 7),
                                     (2, 4, anchors, 16)):
        reg = [rnd(A, D, dtype=dtype), rnd(A, D, dtype=dtype)]
        for loss in (0, 1):
            compile_recorded(lambda: bckd_loc_loss.bckd_loc_loss_fwd(
                [reg[0]], [reg[1]], [logits[0]], [logits[1]], [pri], [torch.rand(A, dtype=dtype)],
                [torch.full((A,), 8.0, dtype=dtype)] if decoder == 1 else [None], [0.0], decoder, loss, reg_max,
                [0.0] * 4, [1.0] * 4, 4.135, [1.0], True, True), ["_loc_kernel"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_at_coco_sizes_fit_in_shared_memory(dtype):
    # block sizes follow the problem (mask_pool's GEMM tiles, box_pool's rows per step, MSDA's
    # sample tiles): record them at the sizes the bench uses, where the tiles are largest
    from kdops.triton import box_pool, mask_pool
    from kdops.triton import ms_deform_attn as msda

    f = torch.empty(2, 256, 100, 152, dtype=dtype)
    bi = torch.arange(100) % 2
    compile_recorded(lambda: mask_pool.mask_pool_fwd(f, torch.empty(100, 100, 152, dtype=dtype), bi),
                     ["_pool_kernel"])
    compile_recorded(lambda: mask_pool.mask_pool_bwd(torch.empty(100, 256, dtype=dtype), f,
                                                     torch.empty(100, 100, 152, dtype=dtype), bi, True, True),
                     ["_grad_feature_kernel", "_grad_masks_kernel"])
    ranges = torch.tensor([[[0, 0, 151, 99]] * 100])
    compile_recorded(lambda: box_pool.box_pool_fwd([f], ranges, bi, False), ["_sat_kernel"])
    compile_recorded(lambda: box_pool.box_paint_fwd(torch.empty(1, 100, 256, dtype=dtype), ranges, bi,
                                                    [2, 100, 152], False), ["_paint_kernel"])
    shapes = torch.tensor([[100, 152], [50, 76], [25, 38], [13, 19]])
    starts = torch.cumsum(shapes.prod(1), 0) - shapes.prod(1)
    S = int(shapes.prod(1).sum())
    value = torch.empty(2, S, 8, 32, dtype=dtype)
    loc, attn = torch.rand(2, 300, 8, 4, 4, 2).to(dtype), torch.rand(2, 300, 8, 4, 4).to(dtype)
    compile_recorded(lambda: msda.ms_deform_attn_fwd(value, shapes, starts, loc, attn), ["_fwd_kernel"])
    compile_recorded(lambda: msda.ms_deform_attn_bwd(torch.empty(2, 300, 256, dtype=dtype), value, shapes, starts,
                                                     loc, attn, True, True, True),
                     ["_bwd_kernel", "_keys_kernel", "_gather_value_grad_kernel"])


def _meta_launches():
    """Each Triton launcher on meta tensors (shapes, dtypes and devices, but no values)."""
    from kdops.triton import bckd_cls_loss, bckd_loc_loss, box_masks, box_pool, gather_level_features, mask_pool, masked_mse, pcc_mse
    from kdops.triton import ms_deform_attn as msda
    from kdops.triton import nms_mask, roi_align

    def r(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    def i(values):
        return torch.tensor(values).to("meta")

    feats, idx = [r(2, 3, 6, 7), r(2, 3, 3, 4)], i([[0, 0, 1, 2], [1, 1, 2, 3], [0, 0, 1, 2]])
    ranges, bi = i([[[0, 0, 3, 2], [1, 1, 6, 5]], [[0, 0, 1, 1], [0, 0, 3, 2]]]), i([0, 1])
    s, t = r(2, 3, 5, 7), r(2, 3, 5, 7)
    value, shapes, starts = r(2, 26, 2, 4), i([[4, 5], [2, 3]]), i([0, 20])
    loc, attn = r(2, 3, 2, 2, 2, 2), r(2, 3, 2, 2, 2)
    rois, roi_sizes = r(3, 5), [2, 3, 6, 7, 2, 3, 3, 4]
    return {
        "masked_mse_fwd": lambda: masked_mse.masked_mse_fwd(s, t, r(2, 5, 7), r(2, 3), 1.0),
        "masked_mse_bwd": lambda: masked_mse.masked_mse_bwd(r(()), s, t, r(2, 5, 7), r(2, 3), 1.0, True, True),
        "pcc_mse_fwd": lambda: pcc_mse.pcc_mse_fwd(s, t, 1, 1e-6),
        "pcc_mse_bwd": lambda: pcc_mse.pcc_mse_bwd(r(()), s, t, r(3, 8, dtype=torch.float64), 0, True, True),
        "gather_fwd": lambda: gather_level_features.gather_level_features_fwd(feats, idx),
        "gather_bwd": lambda: gather_level_features.gather_level_features_bwd(r(3, 3), idx, [2, 3, 6, 7, 2, 3, 3, 4]),
        "box_pool_fwd": lambda: box_pool.box_pool_fwd(feats, ranges, bi, True),
        "box_paint_fwd": lambda: box_pool.box_paint_fwd(r(2, 2, 3), ranges, bi, [2, 6, 7, 2, 3, 4], True),
        "box_masks_fwd": lambda: box_masks.box_masks_fwd(ranges[0], r(2, dtype=torch.float64), bi, 2, 6, 7,
                                                         torch.float32),
        "mask_pool_fwd": lambda: mask_pool.mask_pool_fwd(feats[0], r(2, 6, 7), bi),
        "mask_pool_bwd": lambda: mask_pool.mask_pool_bwd(r(2, 3), feats[0], r(2, 6, 7), bi, True, True),
        "msda_fwd": lambda: msda.ms_deform_attn_fwd(value, shapes, starts, loc, attn),
        "msda_bwd_sorted": lambda: msda.ms_deform_attn_bwd(r(2, 3, 8), value, shapes, starts, loc, attn, True, True,
                                                           True),
        "msda_bwd_atomic": lambda: msda.ms_deform_attn_bwd(r(2, 3, 8), value, shapes, starts, loc, attn, True, True,
                                                           False),
        "roi_align_fwd": lambda: roi_align.roi_align_fwd(feats, rois, idx[:, 0], [0.25, 0.125], 7, 5, 0, True),
        "roi_align_bwd_atomic": lambda: roi_align.roi_align_bwd(r(3, 3, 7, 5), rois, idx[:, 0], [0.25, 0.125], 0,
                                                                True, roi_sizes),
        "roi_align_bwd_deterministic": _deterministic(lambda: roi_align.roi_align_bwd(
            r(3, 3, 7, 5), rois, idx[:, 0], [0.25, 0.125], 2, False, roi_sizes)),
        "nms_mask_fwd": lambda: nms_mask.nms_mask_fwd(r(2, 37, 4), r(2, 37, dtype=torch.bool), 0.5),
        "bckd_cls_loss_fwd": lambda: bckd_cls_loss.bckd_cls_loss_fwd(r(2, 3, 4, 1, 5), r(2, 3, 4, 1, 5), r(24), 1.5, 1.0, True, True),
        "bckd_loc_loss_fwd": lambda: bckd_loc_loss.bckd_loc_loss_fwd([r(12, 4)], [r(12, 4)], [r(12, 3)], [r(12, 3)], [r(12, 4)],
                                                  [r(12)], [None], [0.0], 0, 0, 16, [0.0] * 4, [1.0] * 4, 4.1, [1.0],
                                                  True, True),
    }


@pytest.mark.parametrize("name", sorted(_meta_launches()))
def test_launchers_never_read_device_values_on_the_host(name):
    # a meta tensor has no values: .item(), int(t), bool(t) or .tolist() on one raises, so a
    # launcher that completes here launches its kernels without a host synchronisation (what
    # torch.cuda.set_sync_debug_mode("error") checks on a GPU, here for every launcher without one)
    with recorded_launches() as launches:
        _meta_launches()[name]()
    assert launches, f"{name} launched no kernel"


@pytest.mark.parametrize("name", sorted(_meta_launches()))
def test_kernels_compile_with_64_bit_sizes_and_strides(name):
    # a tensor of 2^31 elements or more makes Triton pass its sizes and strides as int64: the
    # kernels must still type-check (no int32 loop carry re-assigned an int64, and so on)
    assert compile_recorded(_meta_launches()[name], [], wide_ints=True), f"{name} launched no kernel"


# the only launches allowed floating-point atomics: MSDA's value gradient and RoIAlign's feature
# gradient when determinism is off (torch.are_deterministic_algorithms_enabled() is False)
NON_DETERMINISTIC = {"msda_bwd_atomic", "roi_align_bwd_atomic"}


@pytest.mark.parametrize("name", sorted(_meta_launches()))
def test_no_floating_point_atomics_outside_the_non_deterministic_path(name):
    # an atomic float add sums in whatever order the threads arrive: results then differ from run
    # to run. Integer max/min atomics (box_masks_fwd) are order-free. Read from the compiled PTX.
    import re

    kernels = []
    compile_recorded(_meta_launches()[name], [], kernels=kernels)
    assert kernels, f"{name} launched no kernel"
    atomics = {op for _, k in kernels for op in re.findall(r"\b(?:atom|red)\.[a-z0-9_.]+", k.asm["ptx"])}
    float_adds = {op for op in atomics if re.search(r"\.add\.(?:f|bf)\d+", op)}
    if name in NON_DETERMINISTIC:
        assert float_adds, f"{name}: expected its float atomics (is the check still looking?), got {atomics}"
    else:
        assert not float_adds, f"{name}: floating-point atomics {float_adds} in a deterministic path"
