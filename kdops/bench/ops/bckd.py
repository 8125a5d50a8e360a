"""Bench entries bckd_cls_loss and bckd_loc_loss: BCKD on COCO-sized dense heads.

RetinaNet-style head: 9 anchors per location at batch 2 over P3-P7 of 800x1216 (~365k
anchors), K = 80, mmdet's (N, 9*80, H, W) layout; GFL head: 1 anchor per location,
reg_max = 16 (68 regression channels).
"""
from __future__ import annotations

import torch

import kdops
from kdops import reference

from ..problems import fpn
from ..registry import Case, Impl, register

K = 80


def _anchors(levels, strides, J, device, dtype):
    """mmdet-style square anchors (J scales) at every location, ordered (h, w, j)."""
    out = []
    for (h, w), s in zip(levels, strides):
        yy, xx = torch.meshgrid(torch.arange(h) * float(s), torch.arange(w) * float(s), indexing="ij")
        c = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1).repeat_interleave(J, 0)
        half = (4 * s * 2 ** (torch.arange(J) / J)).repeat(h * w)[:, None]
        out.append(torch.cat([c - half, c + half], 1).to(device, dtype))
    return out


def _head(levels, N, J, C, g, device, dtype, scale=1.0):
    return [(torch.randn(N, J * C, h, w, generator=g) * scale).to(device, dtype) for h, w in levels]


@register("bckd_cls_loss")
def cls_cases(device, dtype, size):
    N, _, levels, _, _ = fpn(size)
    J = 9

    def make():
        g = torch.Generator().manual_seed(0)
        return {
            "student": [x.requires_grad_() for x in _head(levels, N, J, K, g, device, dtype, 2.0)],
            "teacher": _head(levels, N, J, K, g, device, dtype, 2.0),
            "weight": [torch.ones(N, h * w * J, device=device) for h, w in levels],
        }

    def kd(student, teacher, weight):
        return kdops.bckd_cls_loss(student, teacher, weight=weight, avg_factor=100.0)

    def ref(student, teacher, weight):
        return reference.bckd_cls_loss(student, teacher, weight=weight, avg_factor=100.0)

    def min_bytes(inp):
        n = sum(s.numel() for s in inp["student"])
        return n * inp["student"][0].element_size() * 3  # read s, t; write grad

    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return [Case(op="bckd_cls_loss", label=f"RetinaNet head, {J} anchors/loc, K={K}, N={N}",
                 make_inputs=make, impls=[Impl("kdops", kd), Impl("eager", ref), Impl("compile", ref, compile=True)],
                 grad_inputs=["student"], min_bytes=min_bytes, atol=tol, rtol=tol)]


@register("bckd_loc_loss")
def loc_cases(device, dtype, size):
    N, _, levels, strides, _ = fpn(size)
    cases = []
    for decoder, J, D in (("gfl", 1, 68), ("delta_xywh", 9, 4)):
        def make(J=J, D=D):
            g = torch.Generator().manual_seed(1)
            return {
                "student_reg": [x.requires_grad_() for x in _head(levels, N, J, D, g, device, dtype, 0.5)],
                "teacher_reg": _head(levels, N, J, D, g, device, dtype, 0.5),
                "student_logits": _head(levels, N, J, K, g, device, dtype, 2.0),
                "teacher_logits": _head(levels, N, J, K, g, device, dtype, 2.0),
                "priors": _anchors(levels, strides, J, device, torch.float32),
                "weight": [torch.ones(N, h * w * J, device=device) for h, w in levels],
            }

        extra = dict(strides=list(strides), reg_max=16) if decoder == "gfl" else dict(stds=(0.1, 0.1, 0.2, 0.2))

        def kd(decoder=decoder, extra=extra, **inp):
            return kdops.bckd_loc_loss(**inp, decoder=decoder, avg_factor=100.0, **extra)

        def ref(decoder=decoder, extra=extra, **inp):
            return reference.bckd_loc_loss(**inp, decoder=decoder, avg_factor=100.0, **extra)

        def min_bytes(inp):
            e = inp["student_reg"][0].element_size()
            reg = sum(r.numel() for r in inp["student_reg"])
            lg = sum(x.numel() for x in inp["student_logits"])
            return (3 * reg + 2 * lg) * e  # read both regs and logits once; write grad_reg

        tol = 1e-4 if dtype == torch.float32 else 2e-2
        cases.append(Case(op="bckd_loc_loss", label=f"{decoder} head, {J} anchors/loc, K={K}, N={N}",
                          make_inputs=make,
                          impls=[Impl("kdops", kd), Impl("eager", ref), Impl("compile", ref, compile=True)],
                          grad_inputs=["student_reg"], min_bytes=min_bytes, atol=tol, rtol=tol))
    return cases
