"""Bench entry bckd_cls_loss: BCKD's classification distillation on a COCO-sized RetinaNet head:
9 anchors per location at batch 2 over P3-P7 of 800x1216 (~365k anchors), K = 80 classes,
mmdet's (N, 9*80, H, W) layout."""
from __future__ import annotations

import torch

import kdops
from kdops import reference

from ..problems import dense_head_maps, fpn
from ..registry import Case, Impl, register

K = 80


@register("bckd_cls_loss")
def cls_cases(device, dtype, size):
    N, _, levels, _, _ = fpn(size)
    J = 9

    def make():
        g = torch.Generator().manual_seed(0)
        return {
            "student": [x.requires_grad_() for x in dense_head_maps(levels, N, J, K, g, device, dtype, 2.0)],
            "teacher": dense_head_maps(levels, N, J, K, g, device, dtype, 2.0),
            "weight": [torch.ones(N, h * w * J, device=device) for h, w in levels],
        }

    def kd(student, teacher, weight):
        return kdops.bckd_cls_loss(student, teacher, weight=weight, avg_factor=100.0)

    def ref(student, teacher, weight):
        return reference.bckd_cls_loss(student, teacher, weight=weight, avg_factor=100.0)

    def min_bytes(inp):
        n = sum(s.numel() for s in inp["student"])
        return n * inp["student"][0].element_size() * 3  # read s, t; write grad

    bufs = {}

    def roof(student, teacher, weight):
        # compute bound: the two exponentials per element that the student's and the teacher's softmax
        # need (the logs are per anchor, the gradient reuses the exponentials), into kept buffers
        out = []
        for i, (s, t) in enumerate(zip(student, teacher)):
            if i not in bufs:
                bufs[i] = (torch.empty_like(s), torch.empty_like(t))
            out += [torch.exp(s, out=bufs[i][0]), torch.exp(t, out=bufs[i][1])]
        return out

    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return [Case(op="bckd_cls_loss", label=f"RetinaNet head, {J} anchors/loc, K={K}, N={N}",
                 make_inputs=make, impls=[Impl("kdops", kd), Impl("eager", ref), Impl("compile", ref, compile=True),
                                          Impl("roof", roof, roof=True)],
                 grad_inputs=["student"], min_bytes=min_bytes, atol=tol, rtol=tol,
                 bound=("compute: torch.exp over the student's and the teacher's logits (2 exponentials per "
                        "element, what the two softmaxes need; into kept buffers), vectorised on every thread"))]
