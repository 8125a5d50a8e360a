"""Bench entry gather_level_features: HEAD's RoI-to-anchor sampling over a COCO FPN, R sweep."""
from __future__ import annotations

import torch

import kdops
from kdops import reference

from ..problems import fpn, random_levels, roof_fresh
from ..registry import Case, Impl, register

R_SWEEP = (64, 256, 1024, 4096)
QUICK_R = 1024  # the case of the quick (default) selection; --full runs the whole sweep


def random_rows(R: int, N: int, levels, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lvl = torch.randint(0, len(levels), (R,), generator=g)
    H = torch.tensor([h for h, _ in levels])[lvl]
    W = torch.tensor([w for _, w in levels])[lvl]
    return torch.stack([lvl, torch.randint(0, N, (R,), generator=g), (torch.rand(R, generator=g) * H).long(),
                        (torch.rand(R, generator=g) * W).long()], 1)


@register("gather_level_features")
def cases(device, dtype, size):
    N, C, levels, _, _ = fpn(size)
    out = []
    for R in R_SWEEP:
        def make(R=R):
            return {"features": random_levels(levels, N, C, device, dtype, seed=R),
                    "index": random_rows(R, N, levels, seed=R).to(device)}

        def kd(features, index):
            return kdops.gather_level_features(features, index, validate=False)

        def ref(features, index):
            return reference.gather_level_features(features, index)

        def min_bytes(inp, R=R):
            e = torch.empty((), dtype=dtype).element_size()
            return 2 * R * C * e + sum(N * C * h * w for h, w in levels) * e  # rows in/out, zeroed grads

        def roof(features, index, R=R):
            # in (N,C,H,W) maps every gathered element is its own 64-byte line: the forward must touch
            # R x C lines, here a strided read of that many lines of the largest level (sequential, so
            # the prefetcher helps: a lower bound of the random reads)
            f = max(features, key=lambda x: x.numel()).detach().reshape(-1)
            step = max(1, 64 // f.element_size())
            lines = f[::step][:R * C]
            rows = [torch.full((R, C), v, device=f.device, dtype=f.dtype) for v in (0.0, 1.0)]
            return roof_fresh(features) + rows + [lines.sum()]

        out.append(Case(op="gather_level_features", label=f"FPN P3-P{2 + len(levels)} N={N} C={C} R={R}",
                        make_inputs=make, impls=[Impl("kdops", kd), Impl("eager (per-level loop)", ref),
                               Impl("compile", ref, compile=True), Impl("roof", roof, roof=True)],
                        bound=("write every level's gradient once (fresh zeros: the backward returns dense "
                               "level gradients), read R x C elements each in its own 64-byte line (a strided "
                               "read: in (N,C,H,W) maps a row's C values are H*W apart), write the R x C rows "
                               "and read their gradient"),
                        grad_inputs=["features"], min_bytes=min_bytes, quick=R == QUICK_R,
                        # rows hitting one pixel are summed in another order by index_put
                        atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-5 if dtype == torch.float32 else 2e-2))
    return out
