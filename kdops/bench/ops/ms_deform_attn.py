"""Bench entry ms_deform_attn: Deformable DETR's encoder and a 300-query decoder.

Levels: C3-C5 + one extra level of an 800x1216 image (strides 8/16/32/64), M=8 heads, D=32
channels per head, L=4 levels, P=4 points. The encoder's queries are all pixels of the four
levels (Q = S = 20197); the decoder has 300 queries. On the CPU only the decoder runs (the eager
grid_sample reference of the encoder takes minutes there); on CUDA both, at batch 2 and 8.
``size="small"``: a 192x320 image (Q = S = 1275 for the encoder) and 100 decoder queries.

Reading the result check: bilinear interpolation is not differentiable on pixel-grid lines, and
the encoder's reference points are pixel centres, so a sample can land within fp32 rounding of
a line; its location gradient is then the other one-sided derivative in one implementation
than in another (seen once in 326k samples at size="small", fp32: both agree with float64 on
their own side). In bf16 the eager grid_sample reference computes the grid in bf16 and is far
less accurate than kdops (which accumulates in fp32): a bf16 "mismatch" of eager is eager's error.
"""
from __future__ import annotations

import torch

import kdops
from kdops import reference

from ..registry import Case, Impl, register

M, D, P = 8, 32, 4
STRIDES = (8, 16, 32, 64)


def levels_of(image):
    H, W = image
    out = []
    for s in STRIDES:
        out.append((-(-H // s), -(-W // s)))  # ceil: the padded feature size
    return out


def make_problem(device, dtype, N, levels, Q, encoder, seed=0):
    """Inputs as a Deformable DETR layer produces them: reference points (pixel centres for the
    encoder, uniform for the decoder) plus small learned offsets; softmax attention weights."""

    def make():
        g = torch.Generator(device="cpu").manual_seed(seed)
        shapes = torch.tensor(levels, dtype=torch.int64)
        sizes = shapes[:, 0] * shapes[:, 1]
        S = int(sizes.sum())
        L = len(levels)
        if encoder:
            ref = torch.cat([torch.stack(torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w,
                                                        indexing="ij")[::-1], -1).reshape(-1, 2) for h, w in levels])
            ref = ref[None, :, None, None, None, :].expand(N, Q, 1, 1, 1, 2)
        else:
            ref = torch.rand(N, Q, 1, 1, 1, 2, generator=g)
        offs = torch.randn(N, Q, M, L, P, 2, generator=g) * 0.02
        loc = (ref + offs).to(device=device, dtype=dtype)
        attn = torch.randn(N, Q, M, L * P, generator=g).softmax(-1).view(N, Q, M, L, P).to(device=device, dtype=dtype)
        value = torch.randn(N, S, M, D, generator=g).to(device=device, dtype=dtype)
        dev_shapes = shapes.to(device)
        return {
            "value": value.requires_grad_(),
            "spatial_shapes": dev_shapes,
            "level_start_index": (torch.cumsum(sizes, 0) - sizes).to(device),
            "sampling_locations": loc.requires_grad_(),
            "attention_weights": attn.requires_grad_(),
        }

    return make


def _mmcv_impl(device):
    """mmcv's CUDA op, when mmcv with compiled CUDA ops is installed (never on the CPU: mmcv has no
    CPU kernel for it and runs the same grid_sample formula as our eager reference there)."""
    if device.type != "cuda":
        return None
    try:
        from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction
    except Exception:  # noqa: BLE001 - mmcv missing or built without CUDA ops
        return None

    def fn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return MultiScaleDeformableAttnFunction.apply(value, spatial_shapes, level_start_index, sampling_locations,
                                                      attention_weights, 64)

    return Impl("mmcv (CUDA)", fn)


def min_bytes(inp):
    e = inp["value"].element_size()
    v, loc, attn = inp["value"].numel(), inp["sampling_locations"].numel(), inp["attention_weights"].numel()
    N, Q = inp["sampling_locations"].shape[:2]
    out = N * Q * M * D
    # fwd: read loc, attn (values gathered: at least the output's worth), write out;
    # bwd: read grad_out, loc, attn, write grad_value (dense), grad_loc, grad_attn
    return e * (2 * (loc + attn) + 2 * out + out + v + loc + attn)


BOUND = ("memory: read the sampling locations and attention weights (forward and backward) and the upstream "
         "gradient once, write the output, the value's dense gradient and the locations' and weights' gradients "
         "once (fresh); the op itself is bound by its data-dependent bilinear gathers and scatters")
_UPSTREAM = {}


def roof(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    N, Q = sampling_locations.shape[:2]
    key = (N, Q, value.dtype, value.device)
    if key not in _UPSTREAM:
        _UPSTREAM[key] = torch.ones(N, Q, M * D, device=value.device, dtype=value.dtype)
    g = _UPSTREAM[key]
    return [torch.zeros_like(g), g.sum(), torch.zeros_like(value), sampling_locations.sum(), attention_weights.sum(),
            sampling_locations.sum(), attention_weights.sum(), torch.zeros_like(sampling_locations),
            torch.zeros_like(attention_weights)]


@register("ms_deform_attn")
def cases(device, dtype, size):
    device = torch.device(device)
    if size not in ("coco", "small"):
        raise ValueError(f"kdops bench: unknown --size {size!r}; use 'coco' or 'small'")
    image = (800, 1216) if size == "coco" else (192, 320)
    levels = levels_of(image)
    S = sum(h * w for h, w in levels)
    n_dec = 300 if size == "coco" else 100
    batches = (2, 8) if device.type == "cuda" else (2,)
    problems = []
    for N in batches:
        if device.type == "cuda" or size == "small":
            problems.append((f"encoder N={N} Q=S={S}", N, S, True))
        problems.append((f"decoder N={N} Q={n_dec} S={S}", N, n_dec, False))

    def kd(**kw):
        return kdops.ms_deform_attn(**kw)

    def ref(**kw):
        return reference.ms_deform_attn(**kw)

    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
    out = []
    for label, N, Q, encoder in problems:
        impls = [Impl("kdops", kd), Impl("eager", ref), Impl("compile", ref, compile=True)]
        peer = _mmcv_impl(device)
        if peer is not None:
            impls.append(peer)
        impls.append(Impl("roof", roof, roof=True))
        out.append(Case(
            op="ms_deform_attn", label=f"Deformable DETR {label} M={M} D={D} L=4 P={P}",
            make_inputs=make_problem(device, dtype, N, levels, Q, encoder),
            impls=impls, grad_inputs=["value", "sampling_locations", "attention_weights"],
            min_bytes=min_bytes, atol=tol, rtol=tol, bound=BOUND,
            quick=not encoder and N == 2))  # quick selection: the batch-2 decoder
    return out
