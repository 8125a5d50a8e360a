"""Bench entry box_masks: FGD's fg/bg masks over a COCO FPN, K sweep (no backward)."""
from __future__ import annotations

import torch

import kdops
from kdops import reference

from ..problems import fpn
from ..registry import Case, Impl, register
from .box_pool import K_SWEEP, QUICK_K, coco_boxes


@register("box_masks")
def cases(device, dtype, size):
    N, _, levels, strides, image = fpn(size)
    sizes = [(N, h, w) for h, w in levels]
    out = []
    for K in K_SWEEP:
        def make(K=K):
            boxes, bi = coco_boxes(K, N, image, seed=K)
            return {"boxes": boxes.clamp(min=0).to(device), "batch_index": bi.to(device)}

        def kd(boxes, batch_index):
            fg, bg = kdops.box_masks(boxes, batch_index, sizes, strides, image_size=image)
            return tuple(fg) + tuple(bg)

        def ref(boxes, batch_index):
            fg, bg = reference.box_masks(boxes.cpu(), batch_index.cpu(), sizes, strides, image_size=image)
            return tuple(x.to(boxes.device) for x in fg + bg)

        def roof(boxes, batch_index):
            return [torch.zeros(s, device=boxes.device) for s in sizes for _ in range(2)]

        out.append(Case(op="box_masks", label=f"FPN P3-P{2 + len(levels)} N={N} K={K} (FGD masks)",
                        make_inputs=make, impls=[Impl("kdops", kd), Impl("eager (FGD loop)", ref),
                                                 Impl("roof", roof, roof=True)],
                        bound="write the foreground and the background mask of every level once (fresh zeros)",
                        backward=False, atol=1e-6, rtol=1e-5, quick=K == QUICK_K))
    return out
