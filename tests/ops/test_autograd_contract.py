"""The autograd contract of docs/architecture.md (the op contract), one suite over every public differentiable op, loss
and module:

1. higher-order gradients are either correct (checked against autograd of the eager reference
   formulas of kdops.reference) or refused with a clear error, in eager and under torch.compile
   -- never silently wrong;
2. a retained graph backpropagated k times gives k times the gradient;
3. returned gradients (autograd.grad results and .grad) are plain tensors: editable in place,
   and not aliasing state the graph still needs;
4. empty inputs (an empty level, an empty batch, no boxes / rows) give exact zeros: a finite 0
   (or empty) result and exact-zero gradients of the inputs' shapes, whatever the weights.

Every case is a small factory returning float64 CPU inputs of small odd sizes; the oracles are
the eager formulas of kdops.reference (or formulas written here), never kdops itself.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Callable, List, Optional

import pytest
import torch
import torch.nn.functional as F

import kdops
from kdops import reference as R
from kdops.losses import BCKDLoss, FeatureMimicLoss, PKDLoss

F64 = torch.float64
N, C = 2, 3
SIZES = [(5, 7), (3, 4)]
STRIDES = [8, 16]
IMAGE = (40, 56)  # (h, w): SIZES[0] at stride 8
REFUSAL = re.compile(r"double backward|create_graph|differentiate twice", re.IGNORECASE)
_MSDA_MODULE = importlib.import_module("kdops.nn.ms_deform_attn")

pytestmark = pytest.mark.skipif(not kdops.HAS_C, reason="the contract is the kernels' (kdops._C not built)")


@dataclass
class Case:
    fn: Callable  # fn(*inputs) -> Tensor
    inputs: List  # tensors; the floating ones with requires_grad=True are differentiated
    ref: Optional[Callable] = None  # the same computation from kdops.reference formulas


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def rnd(*shape, seed, scale=1.0, grad=True):
    return (torch.randn(*shape, generator=_gen(seed), dtype=F64) * scale).requires_grad_(grad)


def pos(*shape, seed, grad=True):
    return (torch.rand(*shape, generator=_gen(seed), dtype=F64) + 0.25).requires_grad_(grad)


def boxes_and_batch(K=5, seed=100):
    g = _gen(seed)
    xy = torch.rand(K, 2, generator=g, dtype=F64) * torch.tensor([50.0, 36.0], dtype=F64) - 4
    wh = torch.rand(K, 2, generator=g, dtype=F64) * 30 + 10
    return torch.cat([xy, xy + wh], 1), torch.arange(K) % N


def nchw(x, H, W):
    """(A,D) in (n,h,w) order -> mmdet's (N,D,H,W) head layout."""
    return x.reshape(N, H, W, -1).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- op cases
def masked_mse_case(pw=False, cw=False, levels=False, reduction="sum"):
    def make():
        sizes = SIZES if levels else SIZES[:1]
        ss = [rnd(N, C, h, w, seed=1 + i) for i, (h, w) in enumerate(sizes)]
        ts = [rnd(N, C, h, w, seed=11 + i) for i, (h, w) in enumerate(sizes)]
        pws = [pos(N, h, w, seed=21 + i) for i, (h, w) in enumerate(sizes)] if pw else None
        cws = [pos(N, C, seed=31 + i) for i in range(len(sizes))] if cw else None
        L = len(sizes)

        def split(xs):
            s, t = list(xs[:L]), list(xs[L:2 * L])
            rest = list(xs[2 * L:])
            p = [rest.pop(0) for _ in range(L)] if pw else None
            c = [rest.pop(0) for _ in range(L)] if cw else None
            if not levels:
                s, t, p, c = s[0], t[0], p and p[0], c and c[0]
            return s, t, p, c

        def call(op):
            def f(*xs):
                s, t, p, c = split(xs)
                return op(s, t, pixel_weight=p, channel_weight=c, reduction=reduction)
            return f

        return Case(call(kdops.masked_mse), ss + ts + (pws or []) + (cws or []), call(R.masked_mse))
    return make


def pcc_mse_case(norm, levels=False):
    def make():
        sizes = SIZES if levels else SIZES[:1]
        ss = [rnd(N, C, h, w, seed=1 + i) for i, (h, w) in enumerate(sizes)]
        # a correlated teacher: the loss is far from its maximum
        ts = [(s.detach() * 0.7 + rnd(N, C, h, w, seed=11 + i, grad=False)).requires_grad_()
              for i, (s, (h, w)) in enumerate(zip(ss, sizes))]
        L = len(sizes)

        def call(op):
            def f(*xs):
                s, t = list(xs[:L]), list(xs[L:])
                return op(s if levels else s[0], t if levels else t[0], norm=norm)
            return f

        return Case(call(kdops.pcc_mse), ss + ts, call(R.pcc_mse))
    return make


def gather_case():
    feats = [rnd(N, C, h, w, seed=40 + i) for i, (h, w) in enumerate(SIZES)]
    # repeated rows accumulate in backward
    index = torch.tensor([[0, 0, 1, 2], [1, 1, 2, 3], [0, 1, 4, 6], [0, 0, 1, 2], [1, 0, 0, 0], [0, 1, 3, 5],
                          [1, 1, 2, 3]])
    return Case(lambda *f: kdops.gather_level_features(list(f), index), feats,
                lambda *f: R.gather_level_features(list(f), index))


def box_pool_case(reduce):
    def make():
        boxes, bi = boxes_and_batch()
        feats = [rnd(N, C, h, w, seed=50 + i) for i, (h, w) in enumerate(SIZES)]
        return Case(lambda *f: kdops.box_pool(list(f), boxes, bi, STRIDES, reduce=reduce), feats,
                    lambda *f: R.box_pool(list(f), boxes, bi, STRIDES, reduce=reduce))
    return make


def box_paint_case(per_level):
    def make():
        boxes, bi = boxes_and_batch()
        K = boxes.shape[0]
        v = rnd(len(SIZES), K, C, seed=60) if per_level else rnd(K, C, seed=60)
        sizes = [(N, h, w) for h, w in SIZES]

        def call(op):
            return lambda v: torch.cat([o.reshape(-1) for o in op(v, boxes, bi, sizes, STRIDES)])

        return Case(call(kdops.box_paint), [v], call(R.box_paint))
    return make


def mask_pool_case():
    f = rnd(N, C, *SIZES[0], seed=70)
    m = torch.rand(4, *SIZES[0], generator=_gen(71), dtype=F64).requires_grad_()
    bi = torch.tensor([0, 1, 1, 0])
    return Case(lambda f, m: kdops.mask_pool(f, m, bi), [f, m], lambda f, m: R.mask_pool(f, m, bi))


MSDA_SHAPES = torch.tensor(SIZES)
MSDA_STARTS = torch.tensor([0, SIZES[0][0] * SIZES[0][1]])
MSDA_S = sum(h * w for h, w in SIZES)


def msda_case():
    M, D, Q, L, P = 2, 3, 4, len(SIZES), 2
    value = rnd(N, MSDA_S, M, D, seed=80)
    loc = (torch.rand(N, Q, M, L, P, 2, generator=_gen(81), dtype=F64) * 0.8 + 0.1).requires_grad_()
    attn = torch.rand(N, Q, M, L, P, generator=_gen(82), dtype=F64).requires_grad_()

    def call(op):
        return lambda v, l, a: op(v, MSDA_SHAPES, MSDA_STARTS, l, a)

    return Case(call(kdops.ms_deform_attn), [value, loc, attn], call(R.ms_deform_attn))


def bckd_cls_case(weighted):
    def make():
        H, W = SIZES[0]
        A, K = N * H * W, 4
        s = rnd(A, K, seed=90, scale=2.0)
        t = rnd(A, K, seed=91, scale=2.0, grad=False)
        if not weighted:
            return Case(lambda s: kdops.bckd_cls_loss(s, t), [s], lambda s: R.bckd_cls_loss(s, t))
        w = pos(A, seed=92)
        # mmdet's (N,K,H,W) head layout, read in place
        return Case(lambda s, w: kdops.bckd_cls_loss(nchw(s, H, W), nchw(t, H, W), weight=w), [s, w],
                    lambda s, w: R.bckd_cls_loss(nchw(s, H, W), nchw(t, H, W), weight=w))
    return make


LOC_KW = {"distance": {}, "gfl": dict(strides=8.0, reg_max=3),
          "delta_xywh": dict(means=(0.1, 0.0, 0.0, 0.2), stds=(0.1, 0.1, 0.2, 0.2))}


def loc_inputs(decoder, A, seed):
    g = _gen(seed)
    if decoder == "delta_xywh":
        c, wh = torch.rand(A, 2, generator=g, dtype=F64) * 60, torch.rand(A, 2, generator=g, dtype=F64) * 20 + 2
        pri = torch.cat([c - wh / 2, c + wh / 2], 1)
        sr = torch.randn(A, 4, generator=g, dtype=F64) * 0.5
        tr = sr + torch.randn(A, 4, generator=g, dtype=F64) * 0.3
    elif decoder == "gfl":
        c = torch.rand(A, 2, generator=g, dtype=F64) * 80
        pri = torch.cat([c - 4, c + 4], 1)
        sr, tr = (torch.randn(A, 16, generator=g, dtype=F64) * 2 for _ in range(2))
    else:
        pri = torch.rand(A, 2, generator=g, dtype=F64) * 50
        sr, tr = (torch.rand(A, 4, generator=g, dtype=F64) * 10 + 1 for _ in range(2))
    sl, tl = (torch.randn(A, 4, generator=g, dtype=F64) * 2 for _ in range(2))
    w = torch.rand(A, generator=g, dtype=F64) + 0.25
    return sr, tr, sl, tl, pri, w


def bckd_loc_case(decoder):
    def make():
        sr, tr, sl, tl, pri, w = loc_inputs(decoder, 9, seed=95)
        kw = dict(decoder=decoder, avg_factor=5.0, **LOC_KW[decoder])

        def call(op):
            return lambda sr, w: op(sr, tr, sl, tl, pri, weight=w, **kw)

        return Case(call(kdops.bckd_loc_loss), [sr.requires_grad_(), w.requires_grad_()], call(R.bckd_loc_loss))
    return make


# --------------------------------------------------------------------------- loss and module cases
def pkd_case():
    s0, t0 = rnd(N, C, *SIZES[0], seed=1), rnd(N, C, *SIZES[0], seed=2)
    s1, t1 = rnd(N, C, 3, 4, seed=3), rnd(N, C, 4, 5, seed=4)  # heights differ: the student is resized
    loss = PKDLoss(loss_weight=0.7)

    def ref(s0, s1, t0, t1):  # mmrazor's PKDLoss: resize, per-channel normalised MSE / 2
        s1 = F.interpolate(s1, t1.shape[2:], mode="bilinear")
        return R.pcc_mse([s0, s1], [t0, t1], norm="channel").sum() * 0.5 * 0.7

    return Case(lambda s0, s1, t0, t1: loss([s0, s1], [t0, t1]), [s0, s1, t0, t1], ref)


def fgd_attention_oracle(t, temperature):
    """FGD's get_attention: A^S = HW softmax_hw(mean_c|F| / T), A^C = C softmax_c(mean_hw|F| / T)."""
    n, c, h, w = t.shape
    a = t.abs()
    spatial = (h * w) * F.softmax((a.mean(1) / temperature).reshape(n, -1), 1).reshape(n, h, w)
    channel = c * F.softmax(a.mean((2, 3)) / temperature, 1)
    return spatial, channel


def feature_mimic_case(attention, sizes=SIZES, n=N, K=5, teacher_grad=True):
    def make():
        boxes, bi = boxes_and_batch(K)
        ss = [rnd(n, C, h, w, seed=1 + i) for i, (h, w) in enumerate(sizes)]
        ts = [rnd(n, C, h, w, seed=11 + i, grad=teacher_grad) for i, (h, w) in enumerate(sizes)]
        kw = dict(fg_weight=2.0, bg_weight=0.5, attention=attention, temperature=0.5, loss_weight=0.3)
        loss = FeatureMimicLoss(strides=STRIDES, **kw)
        L = len(sizes)

        def fn(*xs):
            return loss(list(xs[:L]), list(xs[L:]), boxes=boxes, batch_index=bi, image_size=IMAGE)

        def ref(*xs):
            S, T = list(xs[:L]), list(xs[L:])
            fg, bg = R.box_masks(boxes, bi, [(n, h, w) for h, w in sizes], STRIDES, rule="fgd", image_size=IMAGE,
                                 mode="fgd", dtype=F64)
            total = 0.0
            for s, t, f, b in zip(S, T, fg, bg):
                pw, cw = kw["fg_weight"] * f + kw["bg_weight"] * b, None
                if attention:
                    sa, cw = fgd_attention_oracle(t.detach(), kw["temperature"])
                    pw = pw * sa
                total = total + R.masked_mse(s, t, pixel_weight=pw, channel_weight=cw) / max(n, 1)
            return total * kw["loss_weight"]

        return Case(fn, ss + ts, ref)
    return make


def bckd_module_case(sizes=SIZES, n=N):
    def make():
        K, reg_max = 4, 3
        cs = [rnd(n, K, h, w, seed=1 + i, scale=2.0) for i, (h, w) in enumerate(sizes)]
        ct = [rnd(n, K, h, w, seed=11 + i, scale=2.0, grad=False) for i, (h, w) in enumerate(sizes)]
        rs = [rnd(n, 4 * (reg_max + 1), h, w, seed=21 + i) for i, (h, w) in enumerate(sizes)]
        rt = [rnd(n, 4 * (reg_max + 1), h, w, seed=31 + i, grad=False) for i, (h, w) in enumerate(sizes)]
        pri = []
        for (h, w), s in zip(sizes, STRIDES):
            yy, xx = torch.meshgrid(torch.arange(h, dtype=F64) * s, torch.arange(w, dtype=F64) * s, indexing="ij")
            c = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
            pri.append(torch.cat([c - 2 * s, c + 2 * s], 1))
        lw = [torch.rand(n, h * w, generator=_gen(41 + i), dtype=F64).round() for i, (h, w) in enumerate(sizes)]
        mod = BCKDLoss(reg_max=reg_max, strides=STRIDES)
        L = len(sizes)

        def fn(*xs):
            out = mod(list(xs[:L]), ct, list(xs[L:]), rt, pri, weight=lw, avg_factor=7.0)
            return out["loss_bckd_cls"] + out["loss_bckd_loc"]

        def ref(*xs):  # the authors' LDHead: NovelKDLoss (weight 1) + 4 * GIoU of GFL-decoded boxes
            cls = R.bckd_cls_loss(list(xs[:L]), ct, weight=lw, avg_factor=7.0)
            loc = R.bckd_loc_loss(list(xs[L:]), rt, list(xs[:L]), ct, pri, decoder="gfl", weight=lw, avg_factor=7.0,
                                  reg_max=reg_max, strides=STRIDES)
            return cls.sum() + 4.0 * loc.sum()

        return Case(fn, cs + rs, ref)
    return make


def msda_module_case(bs=N, Q=4, shapes=SIZES):
    def make():
        torch.manual_seed(0)
        embed, M, L, P = 8, 2, len(shapes), 2
        mod = kdops.nn.MSDeformAttn(embed_dims=embed, num_heads=M, num_levels=L, num_points=P, dropout=0.0,
                                    batch_first=True).double()
        with torch.no_grad():  # off the initialisation (zero offsets / attention logits): every path matters
            for i, p in enumerate(mod.parameters()):
                p.copy_(torch.randn(p.shape, generator=_gen(200 + i), dtype=F64) * 0.3)
        S = sum(h * w for h, w in shapes)
        spatial = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
        starts = torch.cat([spatial.new_zeros(1), (spatial[:, 0] * spatial[:, 1]).cumsum(0)[:-1]])
        q = rnd(bs, Q, embed, seed=210)
        v = rnd(bs, S, embed, seed=211)
        refp = (torch.rand(bs, Q, L, 2, generator=_gen(212), dtype=F64) * 0.6 + 0.2).requires_grad_()

        def fn(q, v, r):
            return mod(q, value=v, reference_points=r, spatial_shapes=spatial, level_start_index=starts)

        def ref(q, v, r):  # the same module with its sampling done by the grid_sample reference
            saved = _MSDA_MODULE.ms_deform_attn
            _MSDA_MODULE.ms_deform_attn = R.ms_deform_attn
            try:
                return fn(q, v, r)
            finally:
                _MSDA_MODULE.ms_deform_attn = saved

        return Case(fn, [q, v, refp], ref)
    return make


CASES = {
    "masked_mse": masked_mse_case(),
    "masked_mse-pixel_weight": masked_mse_case(pw=True),
    "masked_mse-channel_weight": masked_mse_case(cw=True),
    "masked_mse-both_weights-mean": masked_mse_case(pw=True, cw=True, reduction="mean"),
    "masked_mse-levels-both_weights": masked_mse_case(pw=True, cw=True, levels=True),
    "pcc_mse-channel": pcc_mse_case("channel"),
    "pcc_mse-instance": pcc_mse_case("instance"),
    "pcc_mse-levels": pcc_mse_case("channel", levels=True),
    "gather_level_features": gather_case,
    "box_pool-sum": box_pool_case("sum"),
    "box_pool-mean": box_pool_case("mean"),
    "box_paint": box_paint_case(per_level=False),
    "box_paint-per_level_values": box_paint_case(per_level=True),
    "mask_pool": mask_pool_case,
    "ms_deform_attn": msda_case,
    "bckd_cls_loss": bckd_cls_case(weighted=False),
    "bckd_cls_loss-weight": bckd_cls_case(weighted=True),
    "bckd_loc_loss-distance": bckd_loc_case("distance"),
    "bckd_loc_loss-gfl": bckd_loc_case("gfl"),
    "bckd_loc_loss-delta_xywh": bckd_loc_case("delta_xywh"),
    "PKDLoss": pkd_case,
    "FeatureMimicLoss": feature_mimic_case(attention=False),
    "FeatureMimicLoss-attention": feature_mimic_case(attention=True),
    "BCKDLoss": bckd_module_case(),
    "nn.MSDeformAttn": msda_module_case(),
}


# --------------------------------------------------------------------------- helpers
def diff_inputs(inputs):
    return [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]


def weights_like(out, kind):
    """Upstream gradient: all ones (a plain .sum(): the incoming gradient is exactly 1), or a ramp."""
    if kind == "ones":
        return torch.ones_like(out)
    return torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)


HEADS = {
    # the first-order gradient is the op's backward applied to constant weights
    "linear": lambda out: (weights_like(out, "ramp") * out).sum(),
    # (w*out + out^2/4).sum(): the first-order gradient depends on the inputs even for linear ops, so
    # a gradient penalty goes through the op's backward and through the backward's own derivative
    "nonlinear": lambda out: (weights_like(out, "ramp") * out + 0.25 * out * out).sum(),
}


def _materialised(grads, inputs):
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def first_and_penalty_grads(fn, inputs, head):
    """First-order gradients with create_graph=True, then the gradients of sum(g^2) (None = unused)."""
    diff = diff_inputs(inputs)
    g = torch.autograd.grad(HEADS[head](fn(*inputs)), diff, create_graph=True, allow_unused=True)
    g = _materialised(g, diff)
    pen = sum((x * x).sum() for x in g if x.requires_grad)
    if not isinstance(pen, torch.Tensor):
        return g, [None] * len(diff)
    return g, list(torch.autograd.grad(pen, diff, allow_unused=True))


def refused(fn, inputs, head):
    """(True, None) when higher-order gradients raise a clear error, else (False, results)."""
    try:
        return False, first_and_penalty_grads(fn, inputs, head)
    except RuntimeError as e:
        assert REFUSAL.search(str(e)), f"higher-order gradients failed with an unclear error: {e}"
        return True, None


# --------------------------------------------------------------------------- 1. higher order
@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_higher_order_gradients_correct_or_refused(name, head):
    case = CASES[name]()
    diff = diff_inputs(case.inputs)
    was_refused, res = refused(case.fn, case.inputs, head)
    if was_refused:  # refused in eager: must be refused under torch.compile too
        fresh = CASES[name]()
        torch._dynamo.reset()
        compiled = torch.compile(fresh.fn, fullgraph=False, backend="aot_eager")
        # Under compile the refusal is AOTAutograd's: its double-backward node raises when reached. With
        # the nonlinear head every input reaches it through the incoming gradient. (With constant upstream
        # weights torch 2.14 hangs that node off a dummy input when the saved tensors are values derived
        # inside the graph -- _aot_autograd/runtime_wrappers.py, CompiledFunctionBackward -- so a penalty
        # w.r.t. the inputs can come back None for any compiled function: a torch limitation, not kdops'.)
        with pytest.raises(RuntimeError, match=REFUSAL):
            first_and_penalty_grads(compiled, fresh.inputs, "nonlinear")
        return
    g, gg = res
    ref_inputs = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
                  for x in case.inputs]
    g_ref, gg_ref = first_and_penalty_grads(case.ref, ref_inputs, head)
    for i, (a, b) in enumerate(zip(g, g_ref)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=lambda m: f"first-order gradient {i}: {m}")
    for i, (x, a, b) in enumerate(zip(diff, gg, gg_ref)):
        b = torch.zeros_like(x) if b is None else b
        if b.any():  # the penalty depends on input i: its first-order gradient must carry a graph to it
            assert g[i].requires_grad, (
                f"input {i}: the first-order gradient under create_graph=True carries no graph (requires_grad="
                f"False), but the gradient penalty depends on the input: silently wrong, neither correct nor refused")
            assert a is not None, (
                f"input {i}: autograd says the gradient penalty does not use this input, but it does (max |d pen| "
                f"{b.abs().max().item():.3g}): silently wrong, neither correct nor refused")
        torch.testing.assert_close(torch.zeros_like(x) if a is None else a, b, atol=1e-9, rtol=1e-8,
                                   msg=lambda m: f"gradient of the gradient penalty w.r.t. input {i} (a first-order "
                                                 f"gradient without its full graph is silently wrong): {m}")


# --------------------------------------------------------------------------- 2. retained graph
@pytest.mark.parametrize("weights", ["ones", "ramp"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_retained_graph_backpropagated_k_times_gives_k_times(name, weights):
    k = 3
    case = CASES[name]()
    diff = diff_inputs(case.inputs)
    out = case.fn(*case.inputs)
    loss = (out * weights_like(out, weights)).sum()
    for _ in range(k):
        loss.backward(retain_graph=True)
    fresh = CASES[name]()
    out1 = fresh.fn(*fresh.inputs)
    single = torch.autograd.grad((out1 * weights_like(out1, weights)).sum(), diff_inputs(fresh.inputs),
                                 allow_unused=True)
    for i, (x, s) in enumerate(zip(diff, single)):
        assert (x.grad is None) == (s is None), f"input {i}: a gradient in one run and none in the other"
        if s is not None:
            torch.testing.assert_close(x.grad, k * s, atol=0, rtol=1e-12,
                                       msg=lambda m: f"input {i}: {k} backward passes vs {k} x one: {m}")


# --------------------------------------------------------------------------- 3. plain gradients
@pytest.mark.parametrize("weights", ["ones", "ramp"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_returned_gradients_are_plain_editable_tensors(name, weights):
    case = CASES[name]()
    diff = diff_inputs(case.inputs)
    out = case.fn(*case.inputs)
    loss = (out * weights_like(out, weights)).sum()
    g = torch.autograd.grad(loss, diff, retain_graph=True, allow_unused=True)
    assert all(x is not None for x in g), "an input that requires grad got no gradient"
    for i, x in enumerate(g):
        assert not x.requires_grad and x.grad_fn is None, (
            f"input {i}: the gradient returned without create_graph is attached to the graph (requires_grad="
            f"{x.requires_grad}, grad_fn={x.grad_fn}): not a plain tensor")
    keep = [x.clone() for x in g]
    for x in g:  # e.g. gradient clipping on the returned tensors
        x.clamp_(-1, 1)
        x.mul_(2)
    again = torch.autograd.grad(loss, diff, retain_graph=True)
    for i, (a, b) in enumerate(zip(again, keep)):
        assert torch.equal(a, b), f"input {i}: editing a returned gradient changed a later gradient of the graph"
    # .grad after backward: editable in place, and zero_grad(set_to_none=False) + backward again works
    loss.backward(retain_graph=True)
    for i, x in enumerate(diff):
        assert not x.grad.requires_grad, f"input {i}: .grad is attached to the graph: not a plain tensor"
        x.grad.clamp_(-1, 1)
        x.grad.mul_(2)
        x.grad.zero_()
    loss.backward()
    for i, (x, b) in enumerate(zip(diff, keep)):
        assert torch.equal(x.grad, b), f"input {i}: .grad after zero_() and a second backward is not the gradient"


# --------------------------------------------------------------------------- 4. empty inputs
INF = float("inf")


def masked_mse_empty(shape, levels=False, reduction="sum"):
    def make():
        shapes = shape if levels else [shape]
        ss = [rnd(*s, seed=1 + i) for i, s in enumerate(shapes)]
        ts = [rnd(*s, seed=11 + i) for i, s in enumerate(shapes)]
        pws = [pos(s[0], s[2], s[3], seed=21 + i) for i, s in enumerate(shapes)]
        cws = []
        for i, s in enumerate(shapes):  # a non-finite channel weight: an empty sum is still 0
            cw = torch.ones(s[0], s[1], dtype=F64)
            if cw.numel():
                cw.view(-1)[0] = INF
            cws.append(cw.requires_grad_())
        L = len(shapes)

        def fn(*xs):
            s, t, p, c = (list(xs[i * L:(i + 1) * L]) for i in range(4))
            if not levels:
                s, t, p, c = s[0], t[0], p[0], c[0]
            return kdops.masked_mse(s, t, pixel_weight=p, channel_weight=c, reduction=reduction)

        return Case(fn, ss + ts + pws + cws)
    return make


def pcc_empty(shape, norm):
    return lambda: Case(lambda s, t: kdops.pcc_mse(s, t, norm=norm), [rnd(*shape, seed=1), rnd(*shape, seed=2)])


def gather_empty(shapes):
    def make():
        feats = [rnd(*s, seed=40 + i) for i, s in enumerate(shapes)]
        index = torch.zeros(0, 4, dtype=torch.int64)
        return Case(lambda *f: kdops.gather_level_features(list(f), index), feats)
    return make


def box_pool_empty(shapes, K, reduce):
    def make():
        boxes, bi = boxes_and_batch(K)
        feats = [rnd(*s, seed=50 + i) for i, s in enumerate(shapes)]
        return Case(lambda *f: kdops.box_pool(list(f), boxes, bi, STRIDES[:len(f)], reduce=reduce), feats)
    return make


def box_paint_empty(sizes, K):
    def make():
        boxes, bi = boxes_and_batch(K)
        v = rnd(K, C, seed=60)
        return Case(lambda v: torch.cat([o.reshape(-1) for o in kdops.box_paint(v, boxes, bi, sizes,
                                                                                  STRIDES[:len(sizes)])]), [v])
    return make


def mask_pool_empty(fshape, K):
    def make():
        f = rnd(*fshape, seed=70)
        m = torch.rand(K, *fshape[2:], generator=_gen(71), dtype=F64).requires_grad_()
        return Case(lambda f, m: kdops.mask_pool(f, m, torch.arange(K) % N), [f, m])
    return make


def msda_empty(n, Q, shapes):
    def make():
        M, D, L, P = 2, 3, len(shapes), 2
        spatial = torch.tensor(shapes, dtype=torch.int64)
        starts = torch.cat([spatial.new_zeros(1), (spatial[:, 0] * spatial[:, 1]).cumsum(0)[:-1]])
        value = rnd(n, int((spatial[:, 0] * spatial[:, 1]).sum()), M, D, seed=80)
        loc = torch.rand(n, Q, M, L, P, 2, generator=_gen(81), dtype=F64).requires_grad_()
        attn = torch.rand(n, Q, M, L, P, generator=_gen(82), dtype=F64).requires_grad_()
        return Case(lambda v, l, a: kdops.ms_deform_attn(v, spatial, starts, l, a), [value, loc, attn])
    return make


def bckd_cls_empty(shape, reduction="sum"):
    def make():
        s = rnd(*shape, seed=90)
        t = rnd(*shape, seed=91, grad=False)
        A = shape[0] if len(shape) == 2 else shape[0] * shape[2] * shape[3]
        w = pos(A, seed=92)
        return Case(lambda s, w: kdops.bckd_cls_loss(s, t, weight=w, reduction=reduction), [s, w])
    return make


def bckd_loc_empty(decoder, H=0):
    def make():
        D = 16 if decoder == "gfl" else 4
        sr, tr = rnd(N, D, H, 7, seed=93), rnd(N, D, H, 7, seed=94, grad=False)
        sl, tl = rnd(N, 4, H, 7, seed=95, grad=False), rnd(N, 4, H, 7, seed=96, grad=False)
        pri = torch.zeros(0, 2 if decoder != "delta_xywh" else 4, dtype=F64)
        w = pos(0, seed=97)
        kw = dict(decoder=decoder, **LOC_KW[decoder])
        return Case(lambda sr, w: kdops.bckd_loc_loss(sr, tr, sl, tl, pri, weight=w, **kw), [sr, w])
    return make


def pkd_empty(shapes):
    def make():
        ss = [rnd(*s, seed=1 + i) for i, s in enumerate(shapes)]
        ts = [rnd(*s, seed=11 + i) for i, s in enumerate(shapes)]
        L = len(shapes)
        return Case(lambda *xs: PKDLoss()(list(xs[:L]), list(xs[L:])), ss + ts)
    return make


EMPTY_LEVELS = [(0, 7), (3, 0)]
EMPTY_CASES = {
    "masked_mse-H0-inf_weight": masked_mse_empty((N, C, 0, 7)),
    "masked_mse-W0-inf_weight": masked_mse_empty((N, C, 5, 0)),
    "masked_mse-N0": masked_mse_empty((0, C, 5, 7)),
    "masked_mse-levels-empty-inf_weight-mean": masked_mse_empty([(N, C, 0, 7), (N, C, 3, 0)], levels=True,
                                                                 reduction="mean"),
    "pcc_mse-channel-H0": pcc_empty((N, C, 0, 7), "channel"),
    "pcc_mse-channel-N0": pcc_empty((0, C, 5, 7), "channel"),
    "pcc_mse-instance-W0": pcc_empty((N, C, 5, 0), "instance"),
    "pcc_mse-instance-N0": pcc_empty((0, C, 5, 7), "instance"),
    "gather_level_features-R0": gather_empty([(N, C, h, w) for h, w in SIZES]),
    "gather_level_features-H0-R0": gather_empty([(N, C, 0, 7), (N, C, 3, 4)]),
    "gather_level_features-N0-R0": gather_empty([(0, C, h, w) for h, w in SIZES]),
    "box_pool-K0": box_pool_empty([(N, C, h, w) for h, w in SIZES], 0, "sum"),
    "box_pool-K0-mean": box_pool_empty([(N, C, h, w) for h, w in SIZES], 0, "mean"),
    "box_pool-empty_levels": box_pool_empty([(N, C, h, w) for h, w in EMPTY_LEVELS], 5, "sum"),
    "box_pool-empty_levels-mean": box_pool_empty([(N, C, h, w) for h, w in EMPTY_LEVELS], 5, "mean"),
    "box_pool-N0": box_pool_empty([(0, C, h, w) for h, w in SIZES], 5, "mean"),
    "box_paint-K0": box_paint_empty([(N, h, w) for h, w in SIZES], 0),
    "box_paint-empty_levels": box_paint_empty([(N, h, w) for h, w in EMPTY_LEVELS], 5),
    "box_paint-N0": box_paint_empty([(0, h, w) for h, w in SIZES], 5),
    "mask_pool-K0": mask_pool_empty((N, C, 5, 7), 0),
    "mask_pool-H0": mask_pool_empty((N, C, 0, 7), 4),
    "mask_pool-N0": mask_pool_empty((0, C, 5, 7), 4),
    "ms_deform_attn-N0": msda_empty(0, 4, SIZES),
    "ms_deform_attn-Q0": msda_empty(N, 0, SIZES),
    "ms_deform_attn-empty_levels": msda_empty(N, 4, EMPTY_LEVELS),
    "bckd_cls_loss-A0": bckd_cls_empty((0, 4)),
    "bckd_cls_loss-H0-mean": bckd_cls_empty((N, 4, 0, 7), "mean"),
    "bckd_cls_loss-N0": bckd_cls_empty((0, 4, 5, 7)),
    "bckd_loc_loss-distance-H0": bckd_loc_empty("distance"),
    "bckd_loc_loss-gfl-H0": bckd_loc_empty("gfl"),
    "bckd_loc_loss-delta_xywh-H0": bckd_loc_empty("delta_xywh"),
    "PKDLoss-empty_levels": pkd_empty([(N, C, h, w) for h, w in EMPTY_LEVELS]),
    "PKDLoss-N0": pkd_empty([(0, C, h, w) for h, w in SIZES]),
    "FeatureMimicLoss-empty_levels": feature_mimic_case(False, sizes=EMPTY_LEVELS),
    "FeatureMimicLoss-N0": feature_mimic_case(False, n=0, K=0),
    "FeatureMimicLoss-attention-empty_levels": feature_mimic_case(True, sizes=EMPTY_LEVELS),
    "FeatureMimicLoss-attention-N0": feature_mimic_case(True, n=0, K=0),
    "BCKDLoss-empty_levels": bckd_module_case(sizes=EMPTY_LEVELS),
    "BCKDLoss-N0": bckd_module_case(n=0),
    "nn.MSDeformAttn-N0": msda_module_case(bs=0),
    "nn.MSDeformAttn-Q0": msda_module_case(Q=0),
}


@pytest.mark.parametrize("name", sorted(EMPTY_CASES))
def test_empty_inputs_give_exact_zeros(name):
    case = EMPTY_CASES[name]()
    diff = diff_inputs(case.inputs)
    out = case.fn(*case.inputs)
    assert torch.isfinite(out).all(), f"non-finite result on empty inputs: {out}"
    assert not out.any(), f"nonzero result on empty inputs: {out}"
    assert out.requires_grad, "the result of inputs that require grad does not require grad"
    grads = torch.autograd.grad(out.sum(), diff, allow_unused=True)
    for i, (x, g) in enumerate(zip(diff, grads)):
        if g is None:  # not reached: a zero gradient
            continue
        assert g.shape == x.shape and g.dtype == x.dtype, f"input {i}: gradient {g.shape} {g.dtype} for {x.shape}"
        assert torch.isfinite(g).all() and not g.any(), f"input {i}: gradient is not exactly zero: {g}"
