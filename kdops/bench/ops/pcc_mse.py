"""Bench entry pcc_mse: PKD (channel norm) and LGD (instance norm) over a COCO FPN."""
from __future__ import annotations

import torch

import kdops
from kdops import reference

from ..problems import FEATURE_BOUND, feature_pass_bytes, fpn, fpn_features, roof_feature_pass
from ..registry import Case, Impl, register


@register("pcc_mse")
def cases(device, dtype, size):
    N, C, levels, _, _ = fpn(size)

    def make():
        student, teacher, _ = fpn_features(device, dtype, levels, N, C)
        return {"student": student, "teacher": teacher}

    tol = 1e-4 if dtype == torch.float32 else 3e-2
    out = []
    for norm in ("channel", "instance"):
        kd = lambda student, teacher, _n=norm: kdops.pcc_mse(student, teacher, norm=_n)  # noqa: E731
        ref = lambda student, teacher, _n=norm: reference.pcc_mse(student, teacher, norm=_n)  # noqa: E731
        paper = "PKD" if norm == "channel" else "LGD InstanceNorm"
        out.append(Case(
            op="pcc_mse", label=f"{paper}: norm={norm}, FPN P3-P{2 + len(levels)} N={N} C={C}",
            make_inputs=make,
            impls=[Impl("kdops", kd), Impl("eager", ref), Impl("compile", ref, compile=True),
                   Impl("roof", roof_feature_pass, roof=True)],
            grad_inputs=["student"], min_bytes=feature_pass_bytes, atol=tol, rtol=tol, bound=FEATURE_BOUND,
        ))
    return out
