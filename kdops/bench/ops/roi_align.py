"""Bench entry roi_align: HEAD's assistant R-CNN pooling its RoIs from a COCO student FPN, R sweep.

The problem is the one HEAD's assistant solves every step (and the teacher's R-CNN head on the same
RoIs): RoIAlign 7x7, sampling_ratio 0 (adaptive), aligned, on P3-P6 (strides 8-64) of a batch-2
800x1216 FPN with 256 channels, RoIs of 16-512 px (log-uniform sides, mmdet's level mapping spreads
them over the levels). The peer is mmdet's SingleRoIExtractor over mmcv's RoIAlign when they are
installed (float32/float64 on the CPU: mmcv's CPU kernel has no half types). No torch.compile row:
the eager reference's loop counts depend on the RoIs (adaptive sampling grid), so it cannot trace
without data-dependent shapes.
"""
from __future__ import annotations

import torch

import kdops
from kdops import reference

from ..problems import fpn, random_levels, roof_fresh
from ..registry import Case, Impl, register

R_SWEEP = (256, 1024, 4096)
QUICK_R = 1024
N_LEVELS = 4  # HEAD's assistant: the student's P3-P6


def random_rois(R: int, N: int, image, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    H, W = image
    side = torch.exp(torch.empty(R, 2).uniform_(torch.log(torch.tensor(16.0)).item(),
                                                torch.log(torch.tensor(512.0)).item(), generator=g))
    c = torch.rand(R, 2, generator=g) * torch.tensor([W, H])
    lo = c - side / 2
    return torch.cat([torch.randint(0, N, (R, 1), generator=g).float(), lo, lo + side], 1)


def _peer(device, dtype, strides, C):
    """mmdet's SingleRoIExtractor (mmcv's RoIAlign per level), where it runs this case."""
    if device.type == "cpu" and dtype not in (torch.float32, torch.float64):
        return None
    try:
        from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor

        ext = SingleRoIExtractor(roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0),
                                 out_channels=C, featmap_strides=list(strides))
    except Exception:  # noqa: BLE001 - mmdet/mmcv missing or without this device's ops
        return None
    return Impl("mmdet SingleRoIExtractor + mmcv", lambda features, rois: ext(features, rois))


@register("roi_align")
def cases(device, dtype, size):
    device = torch.device(device)
    N, C, levels, strides, image = fpn(size)
    levels, strides = levels[:N_LEVELS], strides[:N_LEVELS]
    scales = [1.0 / s for s in strides]
    out = []
    for R in R_SWEEP:
        def make(R=R):
            return {"features": random_levels(levels, N, C, device, dtype, seed=R),
                    "rois": random_rois(R, N, image, seed=R).to(device, dtype)}

        def kd(features, rois):
            return kdops.roi_align(features, rois, strides, validate=False)

        def ref(features, rois):
            return reference.roi_align(features, rois, reference.roi_levels(rois, len(features), 56.0), scales)

        def min_bytes(inp, R=R):
            e = torch.empty((), dtype=dtype).element_size()
            return 2 * R * C * 49 * e + sum(N * C * h * w for h, w in levels) * e * 2  # out + its grad, levels r + w

        def roof(features, rois, R=R):
            # read every level once, write the pooled output and each level's gradient (fresh) once
            return roof_fresh(features) + [torch.zeros(R, C, 7, 7, device=features[0].device,
                                                       dtype=features[0].dtype)] + [f.sum() for f in features]

        impls = [Impl("kdops", kd), Impl("eager (mmcv's formula)", ref)]
        peer = _peer(device, dtype, strides, C)
        if peer is not None:
            impls.append(peer)
        impls.append(Impl("roof", roof, roof=True))
        out.append(Case(op="roi_align", label=f"RoIAlign 7x7 P3-P6 N={N} C={C} R={R}", make_inputs=make,
                        impls=impls, grad_inputs=["features"], min_bytes=min_bytes, quick=R == QUICK_R,
                        bound=("read every level once, write the (R,C,7,7) output and every level's gradient "
                               "(fresh zeros) once: the memory floor; the op also does ~4 bilinear taps per "
                               "sample and 1-16 samples per bin"),
                        atol=1e-4 if dtype in (torch.float32, torch.float64) else 3e-2,
                        rtol=1e-4 if dtype in (torch.float32, torch.float64) else 3e-2))
    return out
