"""Bench entry bckd_loc_loss: BCKD's localisation distillation on COCO-sized dense heads: a GFL
head (1 anchor per location, reg_max = 16: 68 regression channels) and a RetinaNet head (9
anchors, DeltaXYWH), P3-P7 of 800x1216 at batch 2, K = 80 classes."""
from __future__ import annotations

import torch

import kdops
from kdops import reference

from ..problems import dense_head_anchors, dense_head_maps, fpn
from ..registry import Case, Impl, register

K = 80


@register("bckd_loc_loss")
def loc_cases(device, dtype, size):
    N, _, levels, strides, _ = fpn(size)
    cases = []
    for decoder, J, D in (("gfl", 1, 68), ("delta_xywh", 9, 4)):
        def make(J=J, D=D):
            g = torch.Generator().manual_seed(1)
            return {
                "student_reg": [x.requires_grad_() for x in dense_head_maps(levels, N, J, D, g, device, dtype, 0.5)],
                "teacher_reg": dense_head_maps(levels, N, J, D, g, device, dtype, 0.5),
                "student_logits": dense_head_maps(levels, N, J, K, g, device, dtype, 2.0),
                "teacher_logits": dense_head_maps(levels, N, J, K, g, device, dtype, 2.0),
                "priors": dense_head_anchors(levels, strides, J, device, torch.float32),
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

        bufs = {}

        def roof(student_reg, teacher_reg, student_logits, teacher_logits, decoder=decoder, **_):
            # the score gap takes two sigmoids per (anchor, class) and GFL's integral two
            # softmaxes per (anchor, bin): an exponential per element of both logit maps (and of
            # both GFL regression maps), into kept buffers -- which also reads every input once --
            # and the student's regression gradient written once, fresh
            out = []
            for i, x in enumerate(student_logits + teacher_logits + (teacher_reg if decoder == "gfl" else [])):
                if i not in bufs:
                    bufs[i] = torch.empty_like(x)
                out.append(torch.exp(x, out=bufs[i]))
            if decoder == "gfl":
                return out + [torch.exp(s) for s in student_reg]
            return out + [torch.sub(s, t) for s, t in zip(student_reg, teacher_reg)]

        tol = 1e-4 if dtype == torch.float32 else 2e-2
        cases.append(Case(op="bckd_loc_loss", label=f"{decoder} head, {J} anchors/loc, K={K}, N={N}",
                          make_inputs=make,
                          impls=[Impl("kdops", kd), Impl("eager", ref), Impl("compile", ref, compile=True),
                                 Impl("roof", roof, roof=True)],
                          grad_inputs=["student_reg"], min_bytes=min_bytes, atol=tol, rtol=tol,
                          bound=("compute: torch.exp over both logit maps (the score gap's two sigmoids per "
                                 "anchor and class; into kept buffers) and, for GFL, over both regression maps "
                                 "(the integral's two softmaxes per bin), vectorised on every thread; the "
                                 "student's regression gradient written once, fresh (GFL: the exp of the "
                                 "student's map; DeltaXYWH: torch.sub of the regressions)")))
    return cases
