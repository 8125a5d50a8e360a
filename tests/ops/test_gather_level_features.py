"""kdops.gather_level_features against a row-by-row oracle (and its scatter-add adjoint)."""
import re

import pytest
import torch
from helpers import (
    LOW, assert_compiled_matches_eager, assert_same_across_thread_counts, close, compile_for_gpu, leaf, triton_device,
)

import kdops

SIZES = [(13, 17), (7, 9), (4, 5)]


def make(N=2, C=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, C, h, w, generator=g, dtype=torch.float64).to(dtype) for h, w in SIZES]


def rows(R=40, N=2, seed=1, dup=True):
    g = torch.Generator().manual_seed(seed)
    lvl = torch.randint(0, len(SIZES), (R,), generator=g)
    H = torch.tensor([s[0] for s in SIZES])[lvl]
    W = torch.tensor([s[1] for s in SIZES])[lvl]
    idx = torch.stack([lvl, torch.randint(0, N, (R,), generator=g),
                       (torch.rand(R, generator=g) * H).long(), (torch.rand(R, generator=g) * W).long()], 1)
    if dup:  # repeated destinations must accumulate
        idx = torch.cat([idx, idx[:5], idx[:2]])
    return idx


def oracle(feats, idx):
    # one row at a time, straight from the definition (float64)
    return torch.stack([feats[l][b, :, y, x].double() for l, b, y, x in idx.tolist()]) if len(idx) else \
        torch.zeros(0, feats[0].shape[1], dtype=torch.float64)


def test_parity_float64_and_duplicate_rows_accumulate():
    feats = [leaf(f) for f in make()]
    idx = rows()
    out = kdops.gather_level_features(feats, idx)
    ref_in = [leaf(f) for f in feats]
    ref = oracle(ref_in, idx)
    close(out, ref, torch.float64)
    w = torch.randn(out.shape, dtype=torch.float64)
    g = torch.autograd.grad((out * w).sum(), feats)
    gr = torch.autograd.grad((ref * w).sum(), ref_in)
    for a, b in zip(g, gr):
        close(a, b, torch.float64)
    # explicit: a row repeated 3 times sends 3x its gradient
    l, b, y, x = idx[0].tolist()
    n_rep = int((idx == idx[0]).all(1).sum())
    assert n_rep >= 3
    out1 = kdops.gather_level_features(feats, idx)
    g1 = torch.autograd.grad(out1.sum(), feats)
    assert torch.allclose(g1[l][b, :, y, x], torch.full((6,), float(n_rep), dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32] + list(LOW))
def test_low_precision_exact_copy_and_fp32_accumulation(dtype):
    feats = [leaf(f) for f in make(dtype=dtype)]
    idx = torch.cat([rows()] + [rows(dup=False)[:1]] * 50)  # one destination hit 50+ times
    out = kdops.gather_level_features(feats, idx)
    assert out.dtype == dtype
    assert torch.equal(out.double(), oracle(feats, idx))  # a gather is exact
    gout = torch.randn(out.shape, dtype=torch.float64)
    g = torch.autograd.grad(out, feats, gout.to(dtype))
    ref_in = [leaf(f.detach().double()) for f in feats]
    gr = torch.autograd.grad(oracle(ref_in, idx), ref_in, gout.to(dtype).double())
    for a, b in zip(g, gr):
        close(a, b, dtype, scale=b.abs().max().item())


def test_single_tensor_and_non_contiguous_levels():
    feats = make()
    idx = rows()
    cl = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    nc = [f.transpose(2, 3).contiguous().transpose(2, 3) for f in feats]
    a = kdops.gather_level_features(feats, idx)
    assert torch.equal(a, kdops.gather_level_features(cl, idx))
    assert torch.equal(a, kdops.gather_level_features(nc, idx))
    i0 = idx[idx[:, 0] == 0]
    assert torch.equal(kdops.gather_level_features(feats[0], i0), oracle(feats, i0))


def test_gradcheck_float64():
    feats = tuple(leaf(f[:, :3]) for f in make())
    idx = rows(12)
    assert torch.autograd.gradcheck(lambda *f: kdops.gather_level_features(list(f), idx), feats)
    # the backward op is differentiable too (its adjoint is the gather)
    small = (leaf(torch.randn(2, 2, 3, 4, dtype=torch.float64)), leaf(torch.randn(2, 2, 2, 2, dtype=torch.float64)))
    rows_small = torch.tensor([[0, 1, 2, 3], [1, 0, 1, 1], [0, 1, 2, 3], [1, 1, 0, 0]])
    assert torch.autograd.gradgradcheck(lambda *f: kdops.gather_level_features(list(f), rows_small) ** 2, small)


@pytest.mark.parametrize("bad_row, words", [
    ([3, 0, 0, 0], "level 3 of 3"),
    ([-1, 0, 0, 0], "row 2 = [-1, 0, 0, 0]"),
    ([0, 2, 0, 0], "(N,H,W) = (2, 13, 17)"),
    ([1, 0, 7, 0], "row 2 = [1, 0, 7, 0]"),
    ([2, 0, 0, 5], "row 2 = [2, 0, 0, 5]"),
    ([2, 0, 0, -1], "out of range"),
])
def test_out_of_range_rows_raise_and_validate_false_is_safe(bad_row, words):
    feats = [leaf(f) for f in make()]
    idx = torch.tensor([[0, 1, 2, 3], [1, 0, 6, 8], bad_row])
    with pytest.raises(ValueError, match=re.escape(words)):
        kdops.gather_level_features(feats, idx)
    out = kdops.gather_level_features(feats, idx, validate=False)
    assert not out[2].any()
    close(out[:2], oracle(feats, idx[:2]), torch.float64)
    g = torch.autograd.grad(out.sum(), feats)
    assert sum(x.sum() for x in g).item() == 2 * 6  # the bad row sends nothing


def test_empty_rows():
    feats = [leaf(f) for f in make()]
    out = kdops.gather_level_features(feats, torch.zeros(0, 4, dtype=torch.int64))
    assert out.shape == (0, 6)
    g = torch.autograd.grad(out.sum(), feats, allow_unused=True)
    assert all(x is None or not x.any() for x in g)


@pytest.mark.parametrize("index, exc, words", [
    (torch.zeros(3, 4, dtype=torch.int32), TypeError, "`index` must have dtype in (int64)"),
    (torch.zeros(3, 3, dtype=torch.int64), ValueError, "`index` must have shape (*, 4)"),
    (torch.zeros(4, dtype=torch.int64), ValueError, "`index` must be 2-D"),
    ([[0, 0, 0, 0]], TypeError, "`index` must be a torch.Tensor"),
])
def test_bad_index(index, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        kdops.gather_level_features(make(), index)


def test_bad_features():
    idx = torch.zeros(1, 4, dtype=torch.int64)
    f = make()
    with pytest.raises(ValueError, match=re.escape("`features[1]` has (N,C) = (2, 5)")):
        kdops.gather_level_features([f[0], f[1][:, :5]], idx)
    with pytest.raises(TypeError, match=re.escape("`features[1]` is torch.float32")):
        kdops.gather_level_features([f[0], f[1].float()], idx)
    with pytest.raises(ValueError, match="empty sequence"):
        kdops.gather_level_features([], idx)


def test_deterministic_across_runs_and_thread_counts():
    feats = make(C=32, dtype=torch.float32)
    idx = torch.cat([rows(500, seed=3)] * 4)

    def run():
        fl = [leaf(f) for f in feats]
        out = kdops.gather_level_features(fl, idx)
        return torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum(), fl)

    assert_same_across_thread_counts(run)


@pytest.mark.parametrize("validate", [True, False])
def test_torch_compile_fullgraph(validate):
    feats = make(dtype=torch.float32)
    idx = rows()

    def f(feats, idx):
        return (kdops.gather_level_features(feats, idx, validate=validate) ** 2).sum()

    assert_compiled_matches_eager(f, feats, idx)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        feats = [torch.empty(2, 8, h, w, dtype=torch.float16, requires_grad=True) for h, w in SIZES]
        for validate in (True, False):
            out = kdops.gather_level_features(feats, torch.zeros(7, 4, dtype=torch.int64), validate=validate)
            assert out.shape == (7, 8) and out.dtype == torch.float16
        g = torch.ops.kdops.gather_level_features_bwd(out, torch.zeros(7, 4, dtype=torch.int64),
                                                      [s for f in feats for s in f.shape])
        assert [x.shape for x in g] == [f.shape for f in feats]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_triton_gather_and_scatter(dtype):
    from kdops.triton.gather_level_features import gather_level_features_bwd, gather_level_features_fwd

    dev = triton_device()
    feats = make(C=5, dtype=dtype)
    idx = torch.cat([rows(30, seed=4), torch.tensor([[5, 0, 0, 0], [0, 0, -1, 0], [1, 2, 0, 0]])])
    out = gather_level_features_fwd([f.to(dev) for f in feats], idx.to(dev))
    valid = idx[:-3]
    assert torch.equal(out[:-3].cpu().double(), oracle(feats, valid)) and not out[-3:].any()
    g = torch.randn(idx.shape[0], 5, dtype=torch.float64).to(dtype)
    sizes = [s for f in feats for s in f.shape]
    got = gather_level_features_bwd(g.to(dev), idx.to(dev), sizes)
    ref_in = [leaf(f.double()) for f in feats]
    ref = torch.autograd.grad(oracle(ref_in, valid), ref_in, g[:-3].double())
    for a, b in zip(got, ref):
        assert a.dtype == dtype
        close(a.cpu(), b, dtype, scale=b.abs().max().item())
    again = gather_level_features_bwd(g.to(dev), idx.to(dev), sizes)
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    assert gather_level_features_fwd([f.to(dev) for f in feats], idx[:0].to(dev)).shape == (0, 5)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "fp64"])
def test_triton_kernels_compile_for_sm90(dtype):
    import triton.language as tl

    from kdops.triton._segments import _segment_sum_kernel
    from kdops.triton.gather_level_features import _gather_kernel

    i32 = "i32"
    compile_for_gpu(_gather_kernel, {"f_ptr": f"*{dtype}", "idx_ptr": "*i64", "out_ptr": f"*{dtype}", "R": i32, "C": i32,
                                     "lvl": i32, "N": i32, "H": i32, "W": i32, "s_n": "i64", "s_c": "i64", "s_h": i32,
                                     "s_w": i32}, {"BLOCK_R": 32, "BLOCK_C": 128})
    acc = tl.float64 if dtype == "fp64" else tl.float32
    compile_for_gpu(_segment_sum_kernel, {"src_ptr": f"*{dtype}", "row_ptr": "*i64", "coef_ptr": "*i64", "key_ptr": "*i64",
                                          "out_ptr": f"*{dtype}", "J": i32, "C": i32, "key_lo": i32, "key_hi": i32,
                                          "HW": i32}, {"HAS_COEF": False, "ACC": acc, "BLOCK_C": 64})
