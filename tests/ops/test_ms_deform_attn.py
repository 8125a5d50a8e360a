"""kdops.ms_deform_attn against an eager grid_sample oracle written from mmcv's
multi_scale_deformable_attn_pytorch (and an analytic pixel-centre check)."""
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import INTERPRET, close, grads_of, leaf, triton_device

import kdops
from kdops import reference

LEVELS = [(7, 9), (4, 5), (3, 1), (2, 3)]  # odd sizes, a 1-wide level


def oracle(value, spatial_shapes, level_start_index, loc, attn):
    # mmcv's formula: per level, grid_sample((N*M, D, H, W), 2*loc-1) then an attention-weighted sum
    N, _, M, D = value.shape
    _, Q, _, L, P, _ = loc.shape
    value = value.double()
    outs = []
    for lvl, (H, W) in enumerate(spatial_shapes.tolist()):
        s0 = int(level_start_index[lvl])
        v = value[:, s0:s0 + H * W].permute(0, 2, 3, 1).reshape(N * M, D, H, W)
        grid = (2 * loc.double()[:, :, :, lvl] - 1).permute(0, 2, 1, 3, 4).reshape(N * M, Q, P, 2)
        outs.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    samples = torch.stack(outs, -2).flatten(-2)  # (N*M, D, Q, L*P)
    w = attn.double().permute(0, 2, 1, 3, 4).reshape(N * M, 1, Q, L * P)
    return (samples * w).sum(-1).view(N, M * D, Q).transpose(1, 2)


def geometry(levels=LEVELS):
    shapes = torch.tensor(levels, dtype=torch.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    return shapes, torch.cumsum(sizes, 0) - sizes, int(sizes.sum())


def make(N=3, Q=6, M=2, D=5, P=3, levels=LEVELS, seed=0, dtype=torch.float64, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    shapes, starts, S = geometry(levels)
    L = len(levels)
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)
    loc = torch.rand(N, Q, M, L, P, 2, generator=g, dtype=torch.float64) * (1 + 2 * spread) - spread
    attn = torch.rand(N, Q, M, L, P, generator=g, dtype=torch.float64)
    return value.to(dtype), shapes, starts, loc.to(dtype), attn.to(dtype)


def run_all(fn, value, shapes, starts, loc, attn):
    ins = [leaf(value), shapes, starts, leaf(loc), leaf(attn)]
    if value.device.type == "cpu":
        return grads_of(fn, ins)
    out = fn(*ins)  # grads_of's fixed output weights, on the device
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape).to(out.device)
    return out.detach(), torch.autograd.grad((out * w).sum(), [ins[0], ins[3], ins[4]])


@pytest.mark.parametrize("cfg", [dict(), dict(N=1, Q=1, M=1, D=1, P=1, levels=[(1, 1)]),
                                 dict(N=2, Q=9, M=3, D=7, P=4, levels=[(5, 3), (1, 7)]), dict(D=32, M=1, Q=3)])
def test_parity_float64_value_and_all_grads(cfg):
    v, sh, st, loc, attn = make(**cfg)
    out_k, g_k = run_all(kdops.ms_deform_attn, v, sh, st, loc, attn)
    out_r, g_r = run_all(oracle, v, sh, st, loc, attn)
    close(out_k, out_r, torch.float64)
    for name, a, b in zip(["value", "sampling_locations", "attention_weights"], g_k, g_r):
        close(a, b, torch.float64, msg=f"grad of {name}")


def test_reference_module_matches_oracle():
    v, sh, st, loc, attn = make(seed=4)
    close(reference.ms_deform_attn(v, sh, st, loc, attn), oracle(v, sh, st, loc, attn), torch.float64)


def test_pixel_centres_return_the_pixels():
    # analytic: a sample at a pixel centre reads that pixel exactly; outside the map reads 0
    v, sh, st, _, _ = make(N=1, M=1, D=4)
    H, W = LEVELS[0]
    ys, xs = torch.tensor([0, 3, 6]), torch.tensor([8, 0, 4])
    yc, xc = ys.double() + 0.5, xs.double() + 0.5
    loc = torch.zeros(1, 3, 1, len(LEVELS), 2, 2, dtype=torch.float64)
    loc[0, :, 0, 0, 0, 0] = xc / W
    loc[0, :, 0, 0, 0, 1] = yc / H
    loc[..., 1:, :, :] = -5.0  # every other level and point: far outside
    loc[..., 0, 1, :] = 7.0
    attn = torch.zeros(1, 3, 1, len(LEVELS), 2, dtype=torch.float64)
    attn[..., 0, 0] = 2.0
    attn[..., 1:, :] = 1.0
    attn[..., 0, 1] = 1.0
    out = kdops.ms_deform_attn(v, sh, st, loc, attn)
    expect = 2.0 * v[0, ys * W + xs, 0]
    torch.testing.assert_close(out[0], expect, rtol=0, atol=1e-12)


def test_gradcheck_float64():
    v, sh, st, loc, attn = make(N=2, Q=2, M=2, D=2, P=2, levels=[(3, 4), (2, 1)], spread=0.1, seed=1)
    # keep samples away from pixel-grid lines, where bilinear interpolation is not differentiable
    f = lambda v, loc, attn: kdops.ms_deform_attn(v, sh, st, loc, attn)  # noqa: E731
    assert torch.autograd.gradcheck(f, (leaf(v), leaf(loc), leaf(attn)), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_against_float64(dtype):
    v, sh, st, loc, attn = make(N=2, Q=8, M=2, D=8, P=4, seed=2)
    V, LOC, A = leaf(v, dtype), leaf(loc, dtype), leaf(attn, dtype)
    out = kdops.ms_deform_attn(V, sh, st, LOC, A)
    assert out.dtype == dtype and out.shape == (2, 8, 16)
    gout = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    out.backward(gout.to(dtype))
    ins = [leaf(V.double()), sh, st, leaf(LOC.double()), leaf(A.double())]
    ref = oracle(*ins)
    ref.backward(gout)
    close(out, ref, dtype, scale=ref.abs().max().item())
    for got, want in [(V.grad, ins[0].grad), (LOC.grad, ins[3].grad), (A.grad, ins[4].grad)]:
        assert got.dtype == dtype
        close(got, want, dtype, scale=want.abs().max().item())


def test_locations_and_weights_in_other_dtype_are_cast_like_mmcv():
    v, sh, st, loc, attn = make()
    V = v.float()
    out = kdops.ms_deform_attn(V, sh, st, loc, attn)  # float64 locations, float32 value
    assert out.dtype == torch.float32
    close(out, oracle(v.float().double(), sh, st, loc.float(), attn.float()), torch.float32)


def test_non_contiguous_inputs_and_int32_geometry():
    v, sh, st, loc, attn = make()
    V = v.transpose(2, 3).contiguous().transpose(2, 3)
    LOC = torch.stack([loc, loc + 1], -1)[..., 0]
    A = torch.stack([attn + 1, attn], -1)[..., 1]
    assert not V.is_contiguous() and not LOC.is_contiguous() and not A.is_contiguous()
    out = kdops.ms_deform_attn(V, sh.int(), st.int(), LOC, A)
    close(out, oracle(v, sh, st, loc, attn), torch.float64)


@pytest.mark.parametrize("N, Q", [(3, 0), (0, 4)])
def test_empty_queries_and_batch(N, Q):
    v, sh, st, loc, attn = make(N=N, Q=Q)
    ins = [leaf(v), sh, st, leaf(loc), leaf(attn)]
    out = kdops.ms_deform_attn(*ins)
    assert out.shape == (N, Q, 2 * 5)
    out.sum().backward()
    assert ins[0].grad.shape == v.shape and torch.all(ins[0].grad == 0)
    assert ins[3].grad.shape == loc.shape


def test_far_outside_and_huge_locations_read_zero():
    v, sh, st, loc, attn = make()
    loc = torch.full_like(loc, 1e30)
    loc[..., 0] = -1e30
    V = leaf(v)
    out = kdops.ms_deform_attn(V, sh, st, loc, attn)
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.all(V.grad == 0)


def _bad(**kw):
    v, sh, st, loc, attn = make(N=2, Q=3)
    args = dict(value=v, spatial_shapes=sh, level_start_index=st, sampling_locations=loc, attention_weights=attn)
    args.update(kw)
    return args


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(level_start_index=torch.tensor([0, 63, 84, 86])), ValueError, "`level_start_index` must be the exclusive"),
    (dict(spatial_shapes=torch.tensor([[7, 9], [4, 5], [3, 1], [2, 4]])), ValueError, "sums to sum(H*W)=94"),
    (dict(spatial_shapes=torch.tensor([[7, 9], [4, 5], [3, 1], [-2, -3]])), ValueError, "must be non-negative"),
    (dict(spatial_shapes=torch.zeros(4, 2)), TypeError, "`spatial_shapes` must have dtype"),
    (dict(spatial_shapes=torch.zeros(4, 3, dtype=torch.int64)), ValueError, "`spatial_shapes` must be (L,2)"),
    (dict(level_start_index=torch.zeros(3, dtype=torch.int64)), ValueError, "`level_start_index` must have shape (4,)"),
    (dict(value=torch.zeros(2, 92, 10)), ValueError, "`value` must be 4-D (N,S,M,D)"),
    (dict(value=torch.zeros(2, 92, 2, 5, dtype=torch.int32)), TypeError, "`value` must have dtype"),
    (dict(sampling_locations=torch.zeros(2, 3, 2, 4, 3)), ValueError, "`sampling_locations` must be 6-D"),
    (dict(sampling_locations=torch.zeros(2, 3, 2, 3, 3, 2)), ValueError,
     "`sampling_locations` must have shape (2, 3, 2, 4, 3, 2)"),
    (dict(attention_weights=torch.zeros(2, 3, 2, 4, 2)), ValueError, "`attention_weights` must have shape (2, 3, 2, 4, 3)"),
    (dict(attention_weights=torch.zeros(2, 3, 2, 4, 3, device="meta")), ValueError, "move every input to one device"),
    (dict(value=[1.0]), TypeError, "`value` must be a torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(kwargs, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        kdops.ms_deform_attn(**_bad(**kwargs))


def test_double_backward_refused_not_silently_wrong():
    v, sh, st, loc, attn = make(N=1, Q=2)
    V = leaf(v)
    (g,) = torch.autograd.grad(kdops.ms_deform_attn(V, sh, st, loc, attn).sum(), V)
    assert g.shape == v.shape
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(kdops.ms_deform_attn(V, sh, st, loc, attn).sum(), V, create_graph=True)


def test_kernel_itself_rejects_inconsistent_geometry():
    # the C++ kernel checks too (no out-of-bounds read even when called directly)
    a = _bad()
    with pytest.raises(RuntimeError, match="level_start_index is inconsistent"):
        torch.ops.kdops.ms_deform_attn_fwd(a["value"], a["spatial_shapes"], torch.tensor([0, 63, 80, 86]),
                                           a["sampling_locations"], a["attention_weights"])
    with pytest.raises(RuntimeError, match="must equal sum"):
        torch.ops.kdops.ms_deform_attn_fwd(a["value"][:, :80], a["spatial_shapes"], a["level_start_index"],
                                           a["sampling_locations"], a["attention_weights"])


def test_deterministic_across_thread_counts_and_modes():
    v, sh, st, loc, attn = make(N=2, Q=40, M=4, D=16, P=4, levels=[(23, 31), (12, 16), (6, 8)], dtype=torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n, det in [(1, False), (threads, False), (threads, True)]:
            torch.set_num_threads(n)
            torch.use_deterministic_algorithms(det)
            results.append(run_all(kdops.ms_deform_attn, v, sh, st, loc, attn))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0])
        for a, b in zip(grads, results[0][1]):
            assert torch.equal(a, b)


def test_cuda_backend_selection():
    import os
    import subprocess
    import sys

    from kdops.ops._registry import has_kernel
    from kdops.ops.ms_deform_attn import cuda_backend

    # the CUDA key always has a kernel: CUDA C++ when compiled in, else the Triton launchers
    assert has_kernel("ms_deform_attn_fwd", "CUDA") and has_kernel("ms_deform_attn_bwd", "CUDA")
    assert cuda_backend() in ("cuda", "triton")
    code = "import torch; from kdops.ops.ms_deform_attn import cuda_backend; print(cuda_backend())"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = lambda val: subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,  # noqa: E731
                                     env={**os.environ, "KDOPS_MSDA_BACKEND": val})
    assert run("triton").stdout.strip() == "triton"
    bad = run("cudnn")
    assert bad.returncode != 0 and "KDOPS_MSDA_BACKEND must be" in bad.stderr


def test_torch_compile_fullgraph():
    v, sh, st, loc, attn = make(dtype=torch.float32)

    def f(v, sh, st, loc, attn):
        return kdops.ms_deform_attn(v * 2, sh, st, loc.sigmoid(), attn.softmax(-1)).square().sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    a, b = [leaf(v), sh, st, leaf(loc), leaf(attn)], [leaf(v), sh, st, leaf(loc), leaf(attn)]
    ya, yb = cf(*a), f(*b)
    ya.backward()
    yb.backward()
    torch.testing.assert_close(ya, yb)
    for i in (0, 3, 4):
        torch.testing.assert_close(a[i].grad, b[i].grad)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, _, S = geometry()
    with FakeTensorMode():
        sh, st = torch.tensor(LEVELS), torch.tensor([0, 63, 83, 86])
        v = torch.empty(2, S, 8, 32, dtype=torch.bfloat16, requires_grad=True)
        loc = torch.empty(2, 300, 8, 4, 4, 2, dtype=torch.bfloat16, requires_grad=True)
        attn = torch.empty(2, 300, 8, 4, 4, dtype=torch.bfloat16, requires_grad=True)
        out = kdops.ms_deform_attn(v, sh, st, loc, attn)
        assert out.shape == (2, 300, 256) and out.dtype == torch.bfloat16
        out.sum().backward()
        assert v.grad.shape == v.shape and loc.grad.shape == loc.shape and attn.grad.shape == attn.shape


# ---- Triton kernels (TRITON_INTERPRET=1 on the CPU in CI, or a GPU) -------------------------------

def _triton_case(dtype, seed=5):
    dev = triton_device()
    v, sh, st, loc, attn = make(N=2, Q=3, M=2, D=6, P=3, levels=[(5, 7), (3, 2), (1, 1)], seed=seed)
    return dev, [x.to(dev) if x.dtype == torch.int64 else x.to(dev, dtype) for x in (v, sh, st, loc, attn)]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_kernels_match_oracle(dtype, deterministic):
    from kdops.triton.ms_deform_attn import ms_deform_attn_bwd, ms_deform_attn_fwd

    dev, (v, sh, st, loc, attn) = _triton_case(dtype)
    out = ms_deform_attn_fwd(v, sh, st, loc, attn)
    go = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    gv, gl, ga = ms_deform_attn_bwd(go.to(dev, dtype), v, sh, st, loc, attn, True, True, deterministic)
    ins = [leaf(v.double().cpu()), sh.cpu(), st.cpu(), leaf(loc.double().cpu()), leaf(attn.double().cpu())]
    ref = oracle(*ins)
    ref.backward(go)
    close(out.cpu(), ref, dtype, scale=ref.abs().max().item())
    for got, want in [(gv, ins[0].grad), (gl, ins[3].grad), (ga, ins[4].grad)]:
        assert got.dtype == dtype and got.shape == want.shape
        close(got.cpu(), want, dtype, scale=want.abs().max().item())


@pytest.mark.triton
def test_triton_deterministic_value_grad_is_reproducible_and_partial_grads():
    from kdops.triton.ms_deform_attn import ms_deform_attn_bwd, ms_deform_attn_fwd

    dev, (v, sh, st, loc, attn) = _triton_case(torch.float32, seed=6)
    loc[0, 0, 0, 0, :2] = loc[0, 1, 1, 0, 0]  # samples that share corners
    go = torch.randn(ms_deform_attn_fwd(v, sh, st, loc, attn).shape, device=dev)
    a = ms_deform_attn_bwd(go, v, sh, st, loc, attn, True, False, True)
    b = ms_deform_attn_bwd(go, v, sh, st, loc, attn, True, False, True)
    assert torch.equal(a[0], b[0]) and a[1].numel() == 0 and a[2].numel() == 0
    c = ms_deform_attn_bwd(go, v, sh, st, loc, attn, False, True, False)
    assert c[0].numel() == 0 and c[1].shape == loc.shape
    cpu = torch.ops.kdops.ms_deform_attn_bwd(go.cpu(), v.cpu(), sh.cpu(), st.cpu(), loc.cpu(), attn.cpu(),
                                             True, True, True)
    torch.testing.assert_close(a[0].cpu(), cpu[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c[1].cpu(), cpu[1], atol=1e-4, rtol=1e-4)


@pytest.mark.triton
def test_triton_empty_and_out_of_range_geometry_stays_in_bounds():
    from kdops.triton.ms_deform_attn import ms_deform_attn_bwd, ms_deform_attn_fwd

    dev, (v, sh, st, loc, attn) = _triton_case(torch.float32)
    out = ms_deform_attn_fwd(v, sh, st, loc[:, :0], attn[:, :0])
    assert out.shape == (2, 0, 12)
    gv, _, _ = ms_deform_attn_bwd(out, v, sh, st, loc[:, :0], attn[:, :0], True, True, True)
    assert torch.all(gv == 0)
    # spatial_shapes claiming more rows than value has (unchecked on a GPU): rows past S are
    # masked, i.e. read as zeros -- the oracle on a zero-padded value
    big = sh * 3
    out = ms_deform_attn_fwd(v, big, st, loc, attn)
    rows = int((st.cpu() + big.cpu()[:, 0] * big.cpu()[:, 1]).max())
    padded = torch.zeros(v.shape[0], rows, *v.shape[2:], dtype=torch.float64)
    padded[:, :v.shape[1]] = v.double().cpu()
    ref = oracle(padded, big.cpu(), st.cpu(), loc.double().cpu(), attn.double().cpu())
    close(out.cpu(), ref, torch.float32)
    gv, gl, _ = ms_deform_attn_bwd(torch.ones_like(out), v, big, st, loc, attn, True, True, False)
    assert torch.isfinite(gv).all() and torch.isfinite(gl).all()


# ---- the registered CUDA kernel (CUDA C++ or Triton), on a lent GPU --------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_kernel_matches_oracle_and_is_reproducible(dtype, deterministic):
    v, sh, st, loc, attn = make(N=3, Q=37, M=4, D=32, P=4, levels=[(23, 31), (12, 16), (6, 8), (3, 4)], seed=7)
    ins = [leaf(v.cuda().to(dtype)), sh.cuda(), st.cuda(), leaf(loc.cuda().to(dtype)), leaf(attn.cuda().to(dtype))]
    try:
        torch.use_deterministic_algorithms(deterministic)
        out, grads = run_all(kdops.ms_deform_attn, *ins)
        out2, grads2 = run_all(kdops.ms_deform_attn, *ins)
    finally:
        torch.use_deterministic_algorithms(False)
    ref, rgrads = run_all(oracle, *[x.detach().double().cpu() if x.is_floating_point() else x.cpu() for x in ins])
    close(out.cpu(), ref, dtype, scale=ref.abs().max().item())
    for got, want in zip(grads, rgrads):
        close(got.cpu(), want, dtype, scale=want.abs().max().item())
    if deterministic:
        assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_cxx_and_triton_backends_agree():
    from kdops.triton.ms_deform_attn import ms_deform_attn_bwd, ms_deform_attn_fwd

    v, sh, st, loc, attn = [x.cuda() if x.dtype == torch.int64 else x.cuda().float()
                            for x in make(N=2, Q=50, M=8, D=32, P=4, levels=[(25, 38), (13, 19)], seed=8)]
    go = torch.randn(2, 50, 256, device="cuda")
    a = torch.ops.kdops.ms_deform_attn_fwd(v, sh, st, loc, attn)  # the registered backend
    torch.testing.assert_close(a, ms_deform_attn_fwd(v, sh, st, loc, attn), atol=1e-5, rtol=1e-5)
    for det in (False, True):
        ga = torch.ops.kdops.ms_deform_attn_bwd(go, v, sh, st, loc, attn, True, True, det)
        gb = ms_deform_attn_bwd(go, v, sh, st, loc, attn, True, True, det)
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
