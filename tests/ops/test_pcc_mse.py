"""kdops.pcc_mse against mmrazor's PKDLoss normalisation and F.instance_norm + MSE."""
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_compiled_matches_eager, close, grads_of, leaf, triton_device

import kdops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def mmrazor_norm(feat):
    # mmrazor PKDLoss.norm, verbatim semantics: per channel over (N,H,W), unbiased std + 1e-6
    N, C, H, W = feat.shape
    feat = feat.permute(1, 0, 2, 3).reshape(C, -1)
    mean = feat.mean(dim=-1, keepdim=True)
    std = feat.std(dim=-1, keepdim=True)
    feat = (feat - mean) / (std + 1e-6)
    return feat.reshape(C, N, H, W).permute(1, 0, 2, 3)


def oracle(s, t, norm):
    s, t = s.double(), t.double()
    if norm == "channel":
        return F.mse_loss(mmrazor_norm(s), mmrazor_norm(t))
    return F.mse_loss(F.instance_norm(s, eps=1e-5), F.instance_norm(t, eps=1e-5))


def make(shape=(2, 5, 7, 9), seed=0, dtype=torch.float64, corr=0.7):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1.5
    t = corr * s + torch.randn(shape, generator=g, dtype=torch.float64)
    return s.to(dtype), t.to(dtype)


@pytest.mark.parametrize("norm", ["channel", "instance"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (3, 4, 1, 1), (1, 3, 33, 1), (2, 16, 40, 37)])
def test_parity_float64_value_and_grads(norm, shape):
    s, t = make(shape)
    if norm == "instance" and shape[2] * shape[3] == 1:
        pytest.skip("instance norm of a 1x1 plane is degenerate in F.instance_norm too")
    out_k, g_k = grads_of(lambda s, t: kdops.pcc_mse(s, t, norm=norm), [leaf(s), leaf(t)])
    out_r, g_r = grads_of(lambda s, t: oracle(s, t, norm), [leaf(s), leaf(t)])
    close(out_k, out_r, torch.float64)
    for a, b in zip(g_k, g_r):
        close(a, b, torch.float64, scale=b.abs().max().item())


@pytest.mark.parametrize("norm", ["channel", "instance"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_low_precision(norm, dtype):
    s, t = make((2, 8, 13, 17), seed=2)
    # an offset that makes a naive sum-of-squares variance cancel in low precision
    s, t = (s + 40).to(dtype), (t - 25).to(dtype)
    S = leaf(s)
    out = kdops.pcc_mse(S, t, norm=norm)
    out.backward()
    S64 = leaf(s.double())
    ref = oracle(S64, t.double(), norm)
    ref.backward()
    assert out.dtype == torch.float32 and S.grad.dtype == dtype
    close(out, ref, dtype)
    close(S.grad, S64.grad, dtype, scale=S64.grad.abs().max().item())


def test_gradcheck_float64():
    for norm in ("channel", "instance"):
        s, t = make((2, 3, 4, 5), seed=4)
        assert torch.autograd.gradcheck(lambda s, t: kdops.pcc_mse(s, t, norm=norm), (leaf(s), leaf(t)))
        assert torch.autograd.gradcheck(lambda s: kdops.pcc_mse(s, t, norm=norm, eps=0.3), (leaf(s),))


def test_constant_channels_are_finite():
    s, t = make((2, 4, 6, 6))
    s[:, 1] = 3.25
    t[:, 2] = -1.0
    s[0, 3] = 0.5  # a constant instance plane
    for norm in ("channel", "instance"):
        S, T = leaf(s), leaf(t)
        out = kdops.pcc_mse(S, T, norm=norm)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(S.grad).all() and torch.isfinite(T.grad).all()
        # a constant channel normalises to 0, so its loss term is the other side's mean square
        close(out, oracle(s, t, norm), torch.float64)
        # gradient of the non-constant channels still matches the oracle
        S64 = leaf(s)
        oracle(S64, t, norm).backward()
        keep = [0, 2] if norm == "channel" else [0, 2]
        close(S.grad[1:, keep], S64.grad[1:, keep], torch.float64)


def test_single_element_channel_is_finite():
    s, t = make((1, 3, 1, 1))
    out = kdops.pcc_mse(leaf(s), t)
    assert torch.isfinite(out) and out.item() == 0.0


def test_sequence_of_levels():
    pairs = [make((2, 6, h, w), seed=h) for h, w in [(11, 13), (6, 7), (3, 4)]]
    S, T = [leaf(p[0]) for p in pairs], [p[1] for p in pairs]
    out = kdops.pcc_mse(S, T)
    assert out.shape == (3,)
    for i in range(3):
        close(out[i], oracle(S[i], T[i], "channel"), torch.float64)


def test_non_contiguous_inputs():
    s, t = make((2, 6, 9, 8))
    S = s.transpose(2, 3)
    T = t.transpose(2, 3)
    assert not S.is_contiguous()
    close(kdops.pcc_mse(S, T), oracle(S, T, "channel"), torch.float64)
    cl = s.to(memory_format=torch.channels_last)
    close(kdops.pcc_mse(cl, t, norm="instance"), oracle(s, t, "instance"), torch.float64)


def test_empty_inputs():
    s = leaf(torch.zeros(0, 4, 5, 5))
    out = kdops.pcc_mse(s, torch.zeros(0, 4, 5, 5))
    assert out.item() == 0.0
    out.backward()
    assert s.grad.shape == s.shape


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: kdops.pcc_mse(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5)), ValueError, "`teacher` must have the shape"),
        (lambda: kdops.pcc_mse(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), norm="batch"), ValueError, "`norm` must be"),
        (lambda: kdops.pcc_mse(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), eps=-1.0), ValueError, "`eps` must be"),
        (lambda: kdops.pcc_mse(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), norm="instance", eps=0.0), ValueError, "must be > 0"),
        (lambda: kdops.pcc_mse(torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)), ValueError, "`student` must be 4-D"),
        (lambda: kdops.pcc_mse([torch.zeros(1, 2, 3, 3)], torch.zeros(1, 2, 3, 3)), ValueError, "`teacher` must be a sequence of 1 tensors"),
        (lambda: kdops.pcc_mse(torch.zeros(1, 2, 3, 3, dtype=torch.int64), torch.zeros(1, 2, 3, 3)), TypeError, "`student` must have dtype"),
    ],
)
def test_bad_inputs(call, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        call()


def test_deterministic_across_thread_counts():
    s, t = make((2, 32, 30, 31), dtype=torch.float32)
    threads = torch.get_num_threads()
    res = []
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            for norm in ("channel", "instance"):
                S = leaf(s)
                out = kdops.pcc_mse(S, t, norm=norm)
                out.backward()
                res.append((out, S.grad))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(res[:2], res[2:]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_torch_compile_fullgraph():
    s, t = make(dtype=torch.float32)

    def f(s, t):
        return kdops.pcc_mse([s, s * 2], [t, t], norm="channel").sum() / 2

    assert_compiled_matches_eager(f, s, t)


def test_torch_compile_fullgraph_with_folded_scale():
    # the student-only path (the fwd_grad schema with its scale) traced whole, per-level scales
    s, t = make(dtype=torch.float32)

    def f(s, t):
        return kdops.pcc_mse([s, s * 2], [t, t], norm="instance", scale=[3.0, 0.5]).sum()

    assert_compiled_matches_eager(f, s, t)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        s = torch.empty(2, 4, 6, 8, dtype=torch.float16, requires_grad=True)
        out = kdops.pcc_mse(s, torch.empty(2, 4, 6, 8, dtype=torch.float16), norm="instance")
        assert out.shape == () and out.dtype == torch.float32


@pytest.mark.triton
@pytest.mark.parametrize("norm", ["channel", "instance"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_kernel_matches_oracle(norm, dtype):
    from kdops.triton.pcc_mse import pcc_mse_bwd, pcc_mse_fwd

    dev = triton_device()
    s, t = make((2, 8, 13, 17), seed=5)
    s[:, 3] = 2.0  # constant channel
    S, T = s.to(dev, dtype), t.to(dev, dtype)
    code, eps = (0, 1e-6) if norm == "channel" else (1, 1e-5)
    loss, coeffs = pcc_mse_fwd(S, T, code, eps)
    gs, gt = pcc_mse_bwd(torch.tensor(0.75, device=dev), S, T, coeffs, code, True, True)
    S64, T64 = leaf(S.double().cpu()), leaf(T.double().cpu())
    ref = oracle(S64, T64, norm)
    rs, rt = torch.autograd.grad(ref * 0.75, (S64, T64))
    close(loss.cpu(), ref, dtype)
    keep = [c for c in range(8) if c != 3]  # the eager oracle's grad is NaN on a constant channel
    close(gs.cpu()[:, keep], rs[:, keep], dtype, scale=rs.abs().nan_to_num().max().item())
    close(gt.cpu(), rt, dtype, scale=rt.abs().max().item())
    assert torch.isfinite(gs.cpu()).all()


@pytest.mark.triton
@pytest.mark.parametrize("norm", ["channel", "instance"])
def test_triton_fwd_grad_matches_oracle(norm):
    from kdops.triton.pcc_mse import pcc_mse_fwd_grad

    dev = triton_device()
    s, t = make(seed=5)
    code = 0 if norm == "channel" else 1
    eps = 1e-6 if norm == "channel" else 1e-5
    loss, gs = pcc_mse_fwd_grad(s.float().to(dev), t.float().to(dev), code, eps, 1.5)
    S = leaf(s)
    ref = kdops.reference.pcc_mse(S, t, norm=norm, eps=eps) * 1.5
    (rg,) = torch.autograd.grad(ref, S)
    close(loss.cpu(), ref, torch.float32)
    close(gs.cpu(), rg, torch.float32, scale=rg.abs().max().item())


@pytest.mark.parametrize("norm", ["channel", "instance"])
@pytest.mark.parametrize("weight", [1.0, 2.5])
def test_cpu_student_only_gradient_comes_from_the_forward_pass(norm, weight):
    """As for masked_mse: on the CPU with only the student learning, pcc_mse_fwd_grad writes the
    gradient in the forward pass; backward scales it. Gradients equal the oracle's whatever the
    incoming gradient, a retained graph keeps its saved gradient, and with a teacher that needs a
    gradient too the recomputing backward op runs."""
    s, t = make(seed=6)
    S = leaf(s)
    loss = kdops.pcc_mse(S, t, norm=norm)
    assert "pcc_mse_fwd_grad" in loss.grad_fn.name()
    ref_s = leaf(s)
    (want,) = torch.autograd.grad(oracle(ref_s, t, norm) * weight, ref_s)
    (loss * weight).backward(retain_graph=True)
    close(S.grad, want, torch.float64)
    S.grad.mul_(0.0)
    (loss * weight).backward()
    close(S.grad, want, torch.float64)
    T = leaf(t)
    loss = kdops.pcc_mse(S, T, norm=norm)
    assert "pcc_mse_fwd_grad" not in loss.grad_fn.name()
    ref_s, ref_t = leaf(s), leaf(t)
    want_s, want_t = torch.autograd.grad(oracle(ref_s, ref_t, norm) * weight, [ref_s, ref_t])
    gs, gt = torch.autograd.grad(loss * weight, [S, T])
    close(gs, want_s, torch.float64)
    close(gt, want_t, torch.float64)


@pytest.mark.triton
def test_triton_kernel_empty():
    from kdops.triton.pcc_mse import pcc_mse_bwd, pcc_mse_fwd

    s = torch.zeros(0, 3, 4, 4, device=triton_device())
    loss, coeffs = pcc_mse_fwd(s, s, 0, 1e-6)
    gs, gt = pcc_mse_bwd(torch.ones((), device=s.device), s, s, coeffs, 0, True, False)
    assert loss.item() == 0 and gs.shape == s.shape and gt.numel() == 0


def test_double_backward_refused_not_silently_wrong():
    s, t = make()
    S = leaf(s)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(kdops.pcc_mse(S, t), S, create_graph=True)


@pytest.mark.parametrize("dtype, acc", [("fp32", "fp32"), ("fp16", "fp32"), ("bf16", "fp32"), ("fp64", "fp64")])
def test_triton_kernels_compile_for_sm90(dtype, acc):
    import triton.language as tl
    from helpers import compile_for_gpu

    from kdops.triton.pcc_mse import _pcc_loss_grad_kernel, _pcc_stats_kernel

    ACC = tl.float64 if acc == "fp64" else tl.float32
    geo = {"M": "i32", "HW": "i32", "run_stride": "i32", "nchunks": "i32"}
    compile_for_gpu(_pcc_stats_kernel, {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "part_ptr": f"*{acc}", **geo},
                    {"ACC": ACC, "BLOCK": 1024})
    for grads in [(True, True), (False, False)]:
        compile_for_gpu(_pcc_loss_grad_kernel,
                        {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "coef_ptr": f"*{acc}", "gl_ptr": f"*{acc}",
                         "gs_ptr": f"*{dtype}", "gt_ptr": f"*{dtype}", "part_ptr": f"*{acc}", **geo},
                        {"GRAD_S": grads[0], "GRAD_T": grads[1], "ACC": ACC, "BLOCK": 1024})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("norm", ["channel", "instance"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_op_matches_oracle_without_host_sync(norm, dtype):
    s, t = make((2, 16, 37, 41), seed=9)
    S = leaf(s, dtype).cuda().detach().requires_grad_()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = kdops.pcc_mse(S, t.to(dtype).cuda(), norm=norm)
        (out * 3).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    S64 = leaf(S.detach().double().cpu())
    ref = oracle(S64, t.to(dtype).double(), norm)
    (ref * 3).backward()
    close(out.cpu(), ref, dtype)
    close(S.grad.cpu(), S64.grad, dtype, scale=S64.grad.abs().max().item())


@pytest.mark.parametrize("norm", ["channel", "instance"])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_scale_folds_a_loss_weight_into_the_op(norm, teacher_grad):
    """scale multiplies the loss and its gradients inside the op (both CPU paths: the student-only
    forward-gradient one and the recomputing one), per level for sequences; with the weight folded
    and an incoming gradient of 1 (loss.backward()) the student's gradient is the oracle's times it."""
    s, t = make(seed=8)
    S, T = leaf(s), (leaf(t) if teacher_grad else t)
    loss = kdops.pcc_mse([S, S[:, :, :3]], [T, T[:, :, :3]], norm=norm, scale=2.5)
    rs, rt = leaf(s), (leaf(t) if teacher_grad else t)
    ref = torch.stack([oracle(rs, rt, norm), oracle(rs[:, :, :3], rt[:, :, :3], norm)]) * 2.5
    close(loss, ref, torch.float64)
    loss.sum().backward()
    ref.sum().backward()
    close(S.grad, rs.grad, torch.float64)
    if teacher_grad:
        close(T.grad, rt.grad, torch.float64)
    assert torch.autograd.gradcheck(lambda a: kdops.pcc_mse(a, t, norm=norm, scale=-0.5), (leaf(s),))


def test_scale_per_level():
    s, t = make(seed=10)
    S = leaf(s)
    loss = kdops.pcc_mse([S, S[:, :, :3]], [t, t[:, :, :3]], norm="instance", scale=[0.25, 4.0])
    rs = leaf(s)
    ref = torch.stack([oracle(rs, t, "instance") * 0.25, oracle(rs[:, :, :3], t[:, :, :3], "instance") * 4.0])
    close(loss, ref, torch.float64)
    loss.sum().backward()
    ref.sum().backward()
    close(S.grad, rs.grad, torch.float64)


def test_scale_bad_values():
    s, t = make(seed=9)
    with pytest.raises(ValueError, match=r"`scale` must hold 2 number"):
        kdops.pcc_mse([s, s], [t, t], scale=[1.0])
    with pytest.raises(TypeError, match="`scale` must be a number when the features are a single tensor"):
        kdops.pcc_mse(s, t, scale=[1.0])
    with pytest.raises(ValueError, match="`scale` must be a finite number"):
        kdops.pcc_mse(s, t, scale=float("nan"))
    with pytest.raises(TypeError, match="`scale` must be a number"):
        kdops.pcc_mse(s, t, scale="2")
