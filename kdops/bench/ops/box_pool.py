"""Bench entries box_pool and box_paint: LGD-style pooling / painting over a COCO FPN, K sweep."""
from __future__ import annotations

import torch

import kdops
from kdops import reference

from ..problems import fpn, roof_fresh, roof_read
from ..registry import Case, Impl, register

K_SWEEP = (1, 10, 100, 1000)
QUICK_K = 100  # the case of the quick (default) selection; --full runs the whole sweep


def coco_boxes(K: int, N: int, image, seed: int = 0):
    """K boxes spread over N images, COCO-like sizes (many small, some large), some crossing the border."""
    g = torch.Generator().manual_seed(seed)
    H, W = image
    wh = (torch.rand(K, 2, generator=g) ** 2) * torch.tensor([W * 0.6, H * 0.6]) + 4
    ctr = torch.rand(K, 2, generator=g) * torch.tensor([W, H])
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], 1)
    return boxes, torch.randint(0, N, (K,), generator=g)


def _cases(op, device, dtype, size):
    N, C, levels, strides, image = fpn(size)
    cases = []
    for K in K_SWEEP:
        def make(K=K):
            g = torch.Generator().manual_seed(K)
            boxes, bi = coco_boxes(K, N, image, seed=K)
            inp = {"boxes": boxes.to(device), "batch_index": bi.to(device)}
            if op == "box_pool":
                inp["features"] = [torch.randn(N, C, h, w, generator=g).to(device, dtype).requires_grad_()
                                   for h, w in levels]
            else:
                inp["values"] = torch.randn(K, C, generator=g).to(device, dtype).requires_grad_()
            return inp

        if op == "box_pool":
            def kd(features, boxes, batch_index):
                return kdops.box_pool(features, boxes, batch_index, strides)

            def ref(features, boxes, batch_index):
                return reference.box_pool(features, boxes, batch_index, strides)
            grad = ["features"]
        else:
            sizes = [(N, h, w) for h, w in levels]

            def kd(values, boxes, batch_index):
                return tuple(kdops.box_paint(values, boxes, batch_index, sizes, strides))

            def ref(values, boxes, batch_index):
                return tuple(reference.box_paint(values, boxes, batch_index, sizes, strides))
            grad = ["values"]

        if op == "box_pool":
            def roof(features, boxes, batch_index):
                return roof_read(features) + roof_fresh(features)
            bound = "read every level once (a sum), write every level's gradient once (fresh zeros)"
        else:
            upstream = {}

            def roof(values, boxes, batch_index):
                if not upstream:  # the maps' upstream gradient, as the bench's backward receives it
                    upstream["g"] = [torch.ones(n, C, h, w, device=device, dtype=dtype) for n, h, w in sizes]
                return [torch.zeros(n, C, h, w, device=device, dtype=dtype) for n, h, w in sizes] + \
                    roof_read(upstream["g"]) + [torch.zeros_like(values)]
            bound = ("write every output map once (fresh zeros), read its upstream gradient once (a sum), write "
                     "the values' gradient")

        def min_bytes(inp):
            e = torch.empty((), dtype=dtype).element_size()
            return 2 * sum(N * C * h * w for h, w in levels) * e  # read (or write) the maps, fwd + bwd

        tol = 1e-3 if dtype == torch.float32 else 5e-2
        cases.append(Case(
            op=op, label=f"FPN P3-P{2 + len(levels)} N={N} C={C} K={K}", make_inputs=make,
            impls=[Impl("kdops", kd), Impl("eager (per-image mask matmul)", ref),
                   Impl("compile", ref, compile=True), Impl("roof", roof, roof=True)],
            grad_inputs=grad, min_bytes=min_bytes, atol=tol, rtol=tol, quick=K == QUICK_K, bound=bound))
    return cases


@register("box_pool")
def pool_cases(device, dtype, size):
    return _cases("box_pool", device, dtype, size)


@register("box_paint")
def paint_cases(device, dtype, size):
    return _cases("box_paint", device, dtype, size)
