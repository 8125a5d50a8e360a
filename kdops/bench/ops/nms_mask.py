"""Bench entry nms_mask: proposal NMS per (image, FPN level) group, against torchvision's batched_nms.

The problems are the NMS of HEAD's assistant proposals: G = images x 5 levels groups of K candidates,
each group in score order, ~90% of them valid (the rest padding or under the score threshold), IoU
threshold 0.7 (mmdet's RPN). Candidates come in clusters of ~8 jittered boxes around random objects,
sized by level (32 * 2^level px), so that NMS keeps ~45-50% of the valid ones. Shapes: HEAD's toy scale
(16 images, K = 1000 per level) and COCO (2 images, K = 2000 per level: mmdet's RPN nms_pre);
``--size small`` a smoke test (2 images x 3 levels, K = 200).

The peer is ``torchvision.ops.batched_nms`` on the valid candidates with the group as its index
(what an mmdet / torchvision pipeline runs), its kept indices scattered into a (G,K) mask so the
results compare; its boolean-mask selection and variable-length result are part of what it costs
(and what syncs a GPU). No backward (a boolean mask) and no torch.compile row (the reference's loop).
"""
from __future__ import annotations

import torch

import kdops
from kdops import reference

from ..problems import fpn
from ..registry import Case, Impl, register

LEVELS = 5
IOU_THRESHOLD = 0.7
SHAPES = {"coco": [(16, 1000, False), (2, 2000, True)], "small": [(2, 200, True)]}  # (images, K, quick)


def candidates(G: int, K: int, image, levels: int, seed: int = 0, per_cluster: int = 8, jitter: float = 0.1):
    """(G,K,4) float32 proposals: group g on level g % levels; clusters of ~per_cluster boxes around
    random centres, sides 32 * 2^level px (log-normal spread), centres and sides jittered."""
    g = torch.Generator().manual_seed(seed)
    H, W = image
    n = max(1, K // per_cluster)
    base = (32.0 * 2.0 ** (torch.arange(G) % levels).double())[:, None, None]
    size = base * torch.exp(torch.randn(G, n, 2, generator=g, dtype=torch.float64) * 0.3)
    centre = torch.rand(G, n, 2, generator=g, dtype=torch.float64) * torch.tensor([W, H], dtype=torch.float64)
    pick = torch.randint(0, n, (G, K), generator=g)[..., None].expand(G, K, 2)
    c, s = torch.gather(centre, 1, pick), torch.gather(size, 1, pick)
    c = c + torch.randn(G, K, 2, generator=g, dtype=torch.float64) * jitter * s
    s = s * torch.exp(torch.randn(G, K, 2, generator=g, dtype=torch.float64) * jitter)
    return torch.cat([c - s / 2, c + s / 2], 2).float()


def _peer():
    try:
        from torchvision.ops import batched_nms
    except Exception:  # noqa: BLE001 - torchvision missing or without its compiled ops
        return None

    def tv(boxes, valid, scores):
        G, K = valid.shape
        group = torch.arange(G, device=boxes.device)[:, None].expand(G, K)
        flat = valid.reshape(-1).nonzero()[:, 0]
        kept = batched_nms(boxes.reshape(-1, 4)[flat], scores.reshape(-1)[flat], group.reshape(-1)[flat],
                           IOU_THRESHOLD)
        keep = torch.zeros(G * K, dtype=torch.bool, device=boxes.device)
        keep[flat[kept]] = True
        return keep.view(G, K)

    return Impl("torchvision batched_nms", tv)


@register("nms_mask")
def cases(device, dtype, size):
    device = torch.device(device)
    _, _, _, _, image = fpn(size)
    levels = LEVELS if size == "coco" else 3
    out = []
    for images, K, quick in SHAPES[size]:
        G = images * levels

        def make(G=G, K=K):
            boxes = candidates(G, K, image, levels, seed=K)
            valid = torch.rand(G, K, generator=torch.Generator().manual_seed(K + 1)) < 0.9
            scores = torch.linspace(1.0, 0.0, K).expand(G, K).contiguous()  # each group in score order
            return {"boxes": boxes.to(device, dtype), "valid": valid.to(device), "scores": scores.to(device)}

        def kd(boxes, valid, scores):
            return kdops.nms_mask(boxes, IOU_THRESHOLD, valid)

        def ref(boxes, valid, scores):
            return reference.nms_mask(boxes, IOU_THRESHOLD, valid)

        def roof(boxes, valid, scores):
            # read the boxes and the valid mask once, write the (G,K) mask once (fresh)
            return [boxes.sum(), valid.sum(), torch.zeros(valid.shape, dtype=torch.bool, device=valid.device)]

        impls = [Impl("kdops", kd), Impl("eager (IoU matrix + loop)", ref)]
        peer = _peer()
        if peer is not None:
            impls.append(peer)
        impls.append(Impl("roof", roof, roof=True))
        out.append(Case(op="nms_mask", label=f"{images} images x {levels} levels: G={G} K={K} IoU>{IOU_THRESHOLD}",
                        make_inputs=make, impls=impls, backward=False, atol=0, rtol=0, quick=quick,
                        bound=("read the boxes and the valid mask once, write the (G,K) mask once: the memory "
                               "floor; greedy NMS does up to K^2/2 IoUs per group, so it is compute-bound")))
    return out
