"""kdops.masked_mse against an independent eager formula (the weighted MSE written out)."""
import re

import pytest
import torch
from helpers import LOW, assert_compiled_matches_eager, close, grads_of, leaf, triton_device

import kdops
from kdops._dtype import acc_dtype

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def oracle(s, t, pw, cw, reduction="sum"):
    # written from the definition: sum_{n,c,h,w} pw[n,h,w] cw[n,c] (s-t)^2, in float64
    w = torch.ones_like(s, dtype=torch.float64)
    if pw is not None:
        w = w * pw.double()[:, None]
    if cw is not None:
        w = w * cw.double()[:, :, None, None]
    loss = (w * (s.double() - t.double()) ** 2).sum()
    return loss / max(s.numel(), 1) if reduction == "mean" else loss


def make(shape=(2, 5, 7, 9), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    s = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    pw = torch.rand(N, H, W, generator=g, dtype=torch.float64)
    cw = torch.rand(N, C, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (s, t, pw, cw)]


@pytest.mark.parametrize("weights", ["none", "pixel", "channel", "both"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_parity_float64_values_and_all_grads(weights, reduction):
    s, t, pw, cw = make((3, 6, 11, 13))
    pw = pw if weights in ("pixel", "both") else None
    cw = cw if weights in ("channel", "both") else None
    ins = [leaf(s), leaf(t)] + [leaf(x) if x is not None else None for x in (pw, cw)]
    fn_k = lambda s, t, pw, cw: kdops.masked_mse(s, t, pixel_weight=pw, channel_weight=cw, reduction=reduction)  # noqa: E731
    out_k, g_k = grads_of(fn_k, ins)
    ins_r = [leaf(x) if x is not None else None for x in ins]
    out_r, g_r = grads_of(lambda s, t, pw, cw: oracle(s, t, pw, cw, reduction), ins_r)
    close(out_k, out_r, torch.float64)
    for a, b in zip(g_k, g_r):
        close(a, b, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_low_precision(dtype):
    s, t, pw, cw = make((2, 8, 13, 17), seed=1)
    S, T = leaf(s, dtype), leaf(t, dtype, requires_grad=False)
    out = kdops.masked_mse(S, T, pixel_weight=pw.to(dtype), channel_weight=cw.to(dtype), reduction="mean")
    assert out.dtype == acc_dtype(dtype)  # fp32 accumulation and result
    out.backward()
    S64 = leaf(S.double())
    ref = oracle(S64, T.double(), pw.to(dtype).double(), cw.to(dtype).double(), "mean")
    ref.backward()
    close(out, ref, dtype)
    assert S.grad.dtype == dtype
    close(S.grad, S64.grad, dtype, scale=S64.grad.abs().max().item())


def test_sequence_of_levels_gives_per_level_losses():
    levels = [make((2, 4, h, w), seed=h) for h, w in [(9, 12), (5, 6), (3, 3)]]
    S = [leaf(x[0]) for x in levels]
    T = [x[1] for x in levels]
    PW = [x[2] for x in levels]
    CW = [x[3] for x in levels]
    out = kdops.masked_mse(S, T, pixel_weight=PW, channel_weight=CW)
    assert out.shape == (3,)
    for i in range(3):
        close(out[i], oracle(S[i], T[i], PW[i], CW[i]), torch.float64)
    out.sum().backward()
    for i in range(3):
        close(S[i].grad, 2 * PW[i][:, None] * CW[i][:, :, None, None] * (S[i] - T[i]), torch.float64)


def test_non_contiguous_inputs():
    s, t, pw, cw = make((2, 5, 9, 7))
    S = leaf(s.transpose(2, 3).contiguous()).transpose(2, 3)  # non-contiguous view, (2,5,7,9)... of shape
    S_leaf = S
    T = t.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    PW = pw.transpose(1, 2).contiguous().transpose(1, 2)
    CW = torch.cat([cw, cw], 1)[:, ::2]
    assert not S.is_contiguous() and not T.is_contiguous() and not PW.is_contiguous() and not CW.is_contiguous()
    out = kdops.masked_mse(S_leaf, T, pixel_weight=PW, channel_weight=CW)
    close(out, oracle(S_leaf, T, PW, CW), torch.float64)


def test_gradcheck_float64():
    s, t, pw, cw = make((2, 3, 5, 4))
    ins = tuple(leaf(x) for x in (s, t, pw, cw))
    f = lambda s, t, pw, cw: kdops.masked_mse(s, t, pixel_weight=pw, channel_weight=cw, reduction="mean")  # noqa: E731
    assert torch.autograd.gradcheck(f, ins)
    assert torch.autograd.gradcheck(lambda s: kdops.masked_mse(s, ins[1]), (ins[0],))


def test_empty_batch_and_empty_spatial():
    for shape in [(0, 4, 5, 5), (2, 4, 0, 5)]:
        s, t, pw, cw = make(shape)
        S = leaf(s)
        out = kdops.masked_mse(S, t, pixel_weight=pw, channel_weight=cw, reduction="mean")
        assert out.item() == 0.0
        out.backward()
        assert S.grad.shape == shape


def test_no_grad_path_matches():
    s, t, pw, cw = make()
    with torch.no_grad():
        a = kdops.masked_mse(leaf(s), t, pixel_weight=pw, channel_weight=cw)
    close(a, oracle(s, t, pw, cw), torch.float64)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(teacher=torch.zeros(2, 5, 7, 8)), ValueError, "`teacher` must have the shape"),
        (dict(teacher=torch.zeros(2, 5, 7, 9, dtype=torch.float16)), TypeError, "cast one"),
        (dict(pixel_weight=torch.zeros(2, 9, 7)), ValueError, "`pixel_weight` must have shape (2, 7, 9)"),
        (dict(channel_weight=torch.zeros(2, 4)), ValueError, "`channel_weight` must have shape (2, 5)"),
        (dict(channel_weight=torch.zeros(2, 5, dtype=torch.int64)), TypeError, "`channel_weight` must have dtype"),
        (dict(student=torch.zeros(5, 7, 9)), ValueError, "`student` must be 4-D"),
        (dict(student=torch.zeros(2, 5, 7, 9, dtype=torch.int32)), TypeError, "`student` must have dtype"),
        (dict(student=[1.0]), TypeError, "`student[0]` must be a torch.Tensor"),
        (dict(reduction="avg"), ValueError, "`reduction` must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, exc, words):
    args = dict(student=torch.zeros(2, 5, 7, 9), teacher=torch.zeros(2, 5, 7, 9), pixel_weight=None,
                channel_weight=None, reduction="sum")
    args.update(kwargs)
    if isinstance(args["student"], list):
        args["teacher"] = [torch.zeros(1)]
    with pytest.raises(exc, match=re.escape(words)):
        kdops.masked_mse(args.pop("student"), args.pop("teacher"), **args)


def test_sequence_length_mismatch():
    a = [torch.zeros(1, 2, 3, 3)] * 2
    with pytest.raises(ValueError, match="`teacher` must be a sequence of 2 tensors, like `student`"):
        kdops.masked_mse(a, a[:1])
    with pytest.raises(ValueError, match="sequence of 2 tensors"):
        kdops.masked_mse(a, a, pixel_weight=[torch.zeros(1, 3, 3)])


def test_deterministic_across_runs_and_thread_counts():
    s, t, pw, cw = make((2, 16, 40, 37), dtype=torch.float32)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, threads, 1):
            torch.set_num_threads(n)
            S = leaf(s)
            pwl, cwl = leaf(pw), leaf(cw)
            out = kdops.masked_mse(S, t, pixel_weight=pwl, channel_weight=cwl)
            out.backward()
            outs.append((out, S.grad, pwl.grad, cwl.grad))
    finally:
        torch.set_num_threads(threads)
    for o in outs[1:]:
        for a, b in zip(o, outs[0]):
            assert torch.equal(a, b)


def test_torch_compile_fullgraph():
    s, t, pw, cw = make(dtype=torch.float32)

    def f(s, t, pw, cw):
        return kdops.masked_mse(s, t, pixel_weight=pw, channel_weight=cw) * 0.5

    assert_compiled_matches_eager(f, s, t, pw, cw)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        s = torch.empty(2, 4, 6, 8, dtype=torch.bfloat16, requires_grad=True)
        out = kdops.masked_mse(s, torch.empty(2, 4, 6, 8, dtype=torch.bfloat16), pixel_weight=torch.empty(2, 6, 8))
        assert out.shape == () and out.dtype == torch.float32
        seq = kdops.masked_mse([s, s], [s, s])
        assert seq.shape == (2,)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights", [False, True])
def test_triton_kernel_matches_oracle(dtype, weights):
    from kdops.triton.masked_mse import masked_mse_bwd, masked_mse_fwd

    dev = triton_device()
    s, t, pw, cw = make((2, 8, 13, 17), seed=3)
    S, T = s.to(dev, dtype), t.to(dev, dtype)
    pwa = pw.to(dev, acc_dtype(dtype)) if weights else None
    cwa = cw.to(dev, acc_dtype(dtype)) if weights else None
    scale = 1.0 / S.numel()
    loss = masked_mse_fwd(S, T, pwa, cwa, scale)
    gl = torch.tensor(1.5, device=dev)
    grad, gpw, gcw = masked_mse_bwd(gl, S, T, pwa, cwa, scale, True, weights)
    ins = [leaf(S.double().cpu()), T.double().cpu(),
           leaf(pwa.double().cpu()) if weights else None, leaf(cwa.double().cpu()) if weights else None]
    ref = oracle(*ins, reduction="mean")
    req = [x for x in ins if x is not None and x.requires_grad]
    rg = torch.autograd.grad(ref * 1.5, req)
    close(loss.cpu(), ref, dtype)
    close(grad.cpu(), rg[0], dtype, scale=rg[0].abs().max().item())
    if weights:
        close(gpw.cpu(), rg[1], torch.float32, scale=rg[1].abs().max().item())
        close(gcw.cpu(), rg[2], torch.float32, scale=rg[2].abs().max().item())


@pytest.mark.triton
@pytest.mark.parametrize("weights", [False, True])
def test_triton_fwd_grad_matches_oracle(weights):
    from kdops.triton.masked_mse import masked_mse_fwd_grad

    dev = triton_device()
    s, t, pw, cw = make((2, 8, 13, 17), seed=4)
    S, T = s.to(dev, torch.float32), t.to(dev, torch.float32)
    pwa = pw.to(dev, torch.float32) if weights else None
    cwa = cw.to(dev, torch.float32) if weights else None
    loss, grad = masked_mse_fwd_grad(S, T, pwa, cwa, 0.5)
    ins = [leaf(s), t, pw if weights else None, cw if weights else None]
    ref = oracle(*ins) * 0.5
    (rg,) = torch.autograd.grad(ref, ins[0])
    close(loss.cpu(), ref, torch.float32)
    close(grad.cpu(), rg, torch.float32, scale=rg.abs().max().item())


@pytest.mark.triton
def test_triton_kernel_empty():
    from kdops.triton.masked_mse import masked_mse_bwd, masked_mse_fwd

    dev = triton_device()
    s = torch.zeros(0, 3, 4, 4, device=dev)
    assert masked_mse_fwd(s, s, None, None, 1.0).item() == 0
    grad, _, _ = masked_mse_bwd(torch.ones((), device=dev), s, s, None, None, 1.0, True, False)
    assert grad.shape == s.shape


def test_double_backward_refused_not_silently_wrong():
    s, t, _, _ = make()
    S = leaf(s)
    (g,) = torch.autograd.grad(kdops.masked_mse(S, t), S, create_graph=False)
    close(g, 2 * (s - t), torch.float64)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(kdops.masked_mse(S, t), S, create_graph=True)


@pytest.mark.parametrize("weight", [1.0, 2.5])
def test_cpu_student_only_gradient_comes_from_the_forward_pass(weight):
    """The KD case on the CPU (only the student learns): masked_mse_fwd_grad writes the gradient in
    the forward pass and backward scales it -- in place once the graph is freed, not at all for an
    incoming gradient of 1. Gradients are the oracle's, whatever the incoming gradient, and an
    in-place edit of the returned gradient (clipping) cannot reach a retained graph's saved one."""
    s, t, pw, cw = make()
    S = leaf(s)
    loss = kdops.masked_mse(S, t, pixel_weight=pw, channel_weight=cw)
    assert "masked_mse_fwd_grad" in loss.grad_fn.name()
    want = 2 * weight * pw[:, None] * cw[:, :, None, None] * (s - t)
    (loss * weight).backward(retain_graph=True)
    close(S.grad, want, torch.float64)
    S.grad.mul_(0.0)  # e.g. clipping edits .grad in place: the retained graph must not see it
    (loss * weight).backward()
    close(S.grad, want, torch.float64)
    T = leaf(t)  # the teacher needs a gradient too: the recomputing backward op
    loss = kdops.masked_mse(S, T)
    assert "masked_mse_fwd_grad" not in loss.grad_fn.name()
    gs, gt = torch.autograd.grad(loss * weight, [S, T])
    close(gs, 2 * weight * (s - t), torch.float64)
    close(gt, -2 * weight * (s - t), torch.float64)


def test_retain_graph_and_repeated_backward():
    s, t, pw, _ = make()
    S = leaf(s)
    loss = kdops.masked_mse(S, t, pixel_weight=pw) * 3.0
    loss.backward(retain_graph=True)
    loss.backward()
    close(S.grad, 2 * 6.0 * pw[:, None] * (s - t), torch.float64)


@pytest.mark.parametrize("dtype, acc", [("fp32", "fp32"), ("fp16", "fp32"), ("bf16", "fp32"), ("fp64", "fp64")])
def test_triton_kernels_compile_for_sm90(dtype, acc):
    import triton.language as tl
    from helpers import compile_for_gpu

    from kdops.triton.masked_mse import _masked_mse_kernel, _masked_mse_wgrad_kernel

    ACC = tl.float64 if acc == "fp64" else tl.float32
    for flags in [(True, True, True), (False, False, False)]:
        compile_for_gpu(_masked_mse_kernel,
                        {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "pw_ptr": f"*{acc}", "cw_ptr": f"*{acc}",
                         "g_ptr": f"*{dtype}", "gl_ptr": f"*{acc}", "part_ptr": f"*{acc}", "numel": "i64", "C": "i32",
                         "HW": "i32", "gscale": "fp32"},
                        {"HAS_PW": flags[0], "HAS_CW": flags[1], "WRITE_GRAD": flags[2], "ACC": ACC, "BLOCK": 1024})
    compile_for_gpu(_masked_mse_wgrad_kernel,
                    {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "pw_ptr": f"*{acc}", "cw_ptr": f"*{acc}",
                     "gl_ptr": f"*{acc}", "gpw_ptr": f"*{acc}", "gcw_part_ptr": f"*{acc}", "C": "i32", "HW": "i32",
                     "nblk": "i32", "scale": "fp32"},
                    {"HAS_PW": True, "HAS_CW": True, "ACC": ACC, "BLOCK": 256})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_op_matches_oracle_without_host_sync(dtype):
    s, t, pw, cw = make((2, 16, 37, 41), seed=9)
    S = leaf(s, dtype).cuda().detach().requires_grad_()
    PW, CW = leaf(pw).cuda().detach().requires_grad_(), cw.float().cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = kdops.masked_mse(S, t.to(dtype).cuda(), pixel_weight=PW, channel_weight=CW, reduction="mean")
        out.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    S64, PW64 = leaf(S.detach().double().cpu()), leaf(PW.detach().double().cpu())
    ref = oracle(S64, t.to(dtype).double(), PW64, CW.double().cpu(), "mean")
    ref.backward()
    close(out.cpu(), ref, dtype)
    close(S.grad.cpu(), S64.grad, dtype, scale=S64.grad.abs().max().item())
    close(PW.grad.cpu(), PW64.grad, torch.float32, scale=PW64.grad.abs().max().item())


@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_scale_folds_a_loss_weight_into_the_op(weights, teacher_grad):
    """scale multiplies the loss and its gradients inside the op, on both CPU paths (student-only
    forward gradient, and the recomputing backward op), with reduction 'mean' too."""
    g = torch.Generator().manual_seed(11)
    s = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    pw = torch.rand(2, 5, 6, generator=g, dtype=torch.float64) if weights else None
    cw = torch.rand(2, 3, generator=g, dtype=torch.float64) if weights else None
    for reduction in ("sum", "mean"):
        S, T = s.clone().requires_grad_(), (t.clone().requires_grad_() if teacher_grad else t)
        loss = kdops.masked_mse(S, T, pixel_weight=pw, channel_weight=cw, reduction=reduction, scale=-3.0)
        rs, rt = s.clone().requires_grad_(), (t.clone().requires_grad_() if teacher_grad else t)
        ref = kdops.reference.masked_mse(rs, rt, pixel_weight=pw, channel_weight=cw, reduction=reduction) * -3.0
        torch.testing.assert_close(loss, ref)
        loss.backward()
        ref.backward()
        torch.testing.assert_close(S.grad, rs.grad)
        if teacher_grad:
            torch.testing.assert_close(T.grad, rt.grad)
    with pytest.raises(ValueError, match="`scale` must be a finite number"):
        kdops.masked_mse(s, t, scale=float("inf"))
    S = s.clone().requires_grad_()
    per_level = kdops.masked_mse([S, S[:, :, :2]], [t, t[:, :, :2]], scale=[2.0, -1.0])
    ref = torch.stack([kdops.reference.masked_mse(s, t) * 2.0, -kdops.reference.masked_mse(s[:, :, :2], t[:, :, :2])])
    torch.testing.assert_close(per_level, ref)
    with pytest.raises(ValueError, match=r"`scale\[1\]` must be a finite number"):
        kdops.masked_mse([s, s], [t, t], scale=[1.0, float("nan")])


def test_torch_compile_fullgraph_with_folded_scale():
    g = torch.Generator().manual_seed(12)
    s = torch.randn(2, 3, 5, 6, generator=g)
    t = torch.randn(2, 3, 5, 6, generator=g)

    def f(s, t):
        return kdops.masked_mse([s, s[:, :, :2]], [t, t[:, :, :2]], reduction="mean", scale=[2.0, 0.25]).sum()

    assert_compiled_matches_eager(f, s, t)
