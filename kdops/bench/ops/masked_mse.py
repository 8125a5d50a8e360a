"""Bench entry masked_mse: FGD-style factorised weights over a COCO FPN."""
from __future__ import annotations

import torch

import kdops
from kdops import reference

from ..problems import feature_pass_bytes, fpn, fpn_features
from ..registry import Case, Impl, register


def fgd_authors_chain(student, teacher, pixel_weight, channel_weight):
    """The eager chain FGD's code runs (sqrt of each weight factor applied to both maps, then
    a summed MSE) -- what users of the authors' code pay today."""
    out = []
    for s, t, pw, cw in zip(student, teacher, pixel_weight, channel_weight):
        sp, sc = torch.sqrt(pw).unsqueeze(1), torch.sqrt(cw)[:, :, None, None]
        fs = torch.mul(torch.mul(s, sp), sc)
        ft = torch.mul(torch.mul(t, sp), sc)
        out.append(torch.nn.functional.mse_loss(fs, ft, reduction="sum"))
    return torch.stack(out)


@register("masked_mse")
def cases(device, dtype, size):
    N, C, levels, _, _ = fpn(size)

    def make():
        student, teacher, g = fpn_features(device, dtype, levels, N, C)
        return {
            "student": student,
            "teacher": teacher,
            "pixel_weight": [torch.rand(N, h, w, generator=g).to(device) for h, w in levels],
            "channel_weight": [torch.rand(N, C, generator=g).to(device) for _ in levels],
        }

    def kd(student, teacher, pixel_weight, channel_weight):
        return kdops.masked_mse(student, teacher, pixel_weight=pixel_weight, channel_weight=channel_weight)

    def ref(student, teacher, pixel_weight, channel_weight):
        return reference.masked_mse(student, teacher, pixel_weight=pixel_weight, channel_weight=channel_weight)

    def min_bytes(inp):
        weights = sum(p.numel() * 4 for p in inp["pixel_weight"]) + sum(c.numel() * 4 for c in inp["channel_weight"])
        return feature_pass_bytes(inp) + weights

    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return [
        Case(
            op="masked_mse", label=f"FPN P3-P{2 + len(levels)} N={N} C={C} pixel x channel weights",
            make_inputs=make,
            impls=[Impl("kdops", kd), Impl("eager", ref), Impl("compile", ref, compile=True),
                   Impl("eager (FGD code)", fgd_authors_chain)],
            grad_inputs=["student"], min_bytes=min_bytes, atol=tol, rtol=tol,
        )
    ]
