"""Bench entry box_ranges: image boxes to per-level feature-pixel ranges over a COCO FPN, per
rule, K sweep (integer output, no backward). The eager reference builds each box's dense mask."""
from __future__ import annotations

import kdops
from kdops import reference

from ..problems import fpn
from ..registry import Case, Impl, register
from .box_pool import K_SWEEP, QUICK_K, coco_boxes


@register("box_ranges")
def cases(device, dtype, size):
    N, _, levels, strides, image = fpn(size)
    sizes = [(N, h, w) for h, w in levels]
    out = []
    for rule in ("center", "fgd"):
        for K in K_SWEEP[:3]:  # the reference loops over boxes in Python: K=1000 would dominate the run
            def make(K=K):
                boxes, _ = coco_boxes(K, N, image, seed=K)
                return {"boxes": boxes.to(device)}

            def kd(boxes, rule=rule):
                return kdops.box_ranges(boxes, sizes, strides, rule=rule, image_size=image)

            def ref(boxes, rule=rule):
                return reference.box_ranges(boxes, sizes, strides, rule=rule, image_size=image)

            out.append(Case(op="box_ranges", label=f"FPN P3-P{2 + len(levels)} K={K} rule={rule}",
                            make_inputs=make, impls=[Impl("kdops", kd), Impl("eager (dense masks)", ref)],
                            backward=False, atol=0, rtol=0, quick=K == QUICK_K and rule == "fgd"))
    return out
