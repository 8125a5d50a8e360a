"""Bench entry masked_mse: FGD-style factorised weights over a COCO FPN."""
from __future__ import annotations

import torch

import kdops
from kdops import reference

from ..problems import FEATURE_BOUND, feature_pass_bytes, fpn, fpn_features, roof_feature_pass, roof_read
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

    def roof(student, teacher, pixel_weight, channel_weight):
        return roof_feature_pass(student, teacher) + roof_read(pixel_weight) + roof_read(channel_weight)

    def make_plain():
        student, teacher, _ = fpn_features(device, dtype, levels, N, C)
        return {"student": student, "teacher": teacher}

    def kd_plain(student, teacher):
        return kdops.masked_mse(student, teacher)

    def ref_plain(student, teacher):
        return reference.masked_mse(student, teacher)

    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return [
        Case(
            op="masked_mse", label=f"FPN P3-P{2 + len(levels)} N={N} C={C} pixel x channel weights",
            make_inputs=make,
            impls=[Impl("kdops", kd), Impl("eager", ref), Impl("compile", ref, compile=True),
                   Impl("eager (FGD code)", fgd_authors_chain), Impl("roof", roof, roof=True)],
            grad_inputs=["student"], min_bytes=min_bytes, atol=tol, rtol=tol,
            bound=FEATURE_BOUND + " and read each weight once (a sum)",
        ),
        Case(
            op="masked_mse", label=f"FPN P3-P{2 + len(levels)} N={N} C={C} no weights (FitNet MSE)",
            make_inputs=make_plain,
            impls=[Impl("kdops", kd_plain), Impl("eager", ref_plain), Impl("compile", ref_plain, compile=True),
                   Impl("roof", roof_feature_pass, roof=True)],
            grad_inputs=["student"], min_bytes=feature_pass_bytes, atol=tol, rtol=tol, bound=FEATURE_BOUND,
            quick=False,
        ),
    ]
