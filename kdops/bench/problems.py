"""Problem sizes and inputs shared by the bench entries."""
from __future__ import annotations

from typing import List, Tuple

import torch

# COCO-like FPN of a batch at 800x1216 (P3-P7, strides 8..128), C=256.
COCO_LEVELS: List[Tuple[int, int]] = [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]
COCO_STRIDES: List[int] = [8, 16, 32, 64, 128]
COCO_IMAGE: Tuple[int, int] = (800, 1216)
# A small problem for quick checks and CI smoke runs.
SMALL_LEVELS: List[Tuple[int, int]] = [(24, 40), (12, 20), (6, 10)]
SMALL_STRIDES: List[int] = [8, 16, 32]
SMALL_IMAGE: Tuple[int, int] = (192, 320)


def _levels(levels) -> str:
    return ", ".join(f"{h}x{w}" for h, w in levels)


#: what each --size means (kdops bench --help prints these)
SIZES = {
    "coco": (f"COCO-like FPN: batch 2 at {COCO_IMAGE[0]}x{COCO_IMAGE[1]}, C=256, P3-P7 ({_levels(COCO_LEVELS)}), "
             f"strides {'/'.join(map(str, COCO_STRIDES))}; per op the shapes of its paper (e.g. MSDA: a 300-query "
             "Deformable DETR decoder)"),
    "small": (f"a smoke-test problem: batch 2 at {SMALL_IMAGE[0]}x{SMALL_IMAGE[1]}, C=32, 3 levels "
              f"({_levels(SMALL_LEVELS)}), strides {'/'.join(map(str, SMALL_STRIDES))}; seconds per op"),
}


def fpn(size: str):
    """(batch, channels, level sizes, strides, image size) for a problem name."""
    if size == "coco":
        return 2, 256, COCO_LEVELS, COCO_STRIDES, COCO_IMAGE
    if size == "small":
        return 2, 32, SMALL_LEVELS, SMALL_STRIDES, SMALL_IMAGE
    raise ValueError(f"kdops bench: unknown --size {size!r}; use 'coco' or 'small'")


def fpn_features(device, dtype, levels, N: int, C: int, seed: int = 0):
    """Random student (requires grad) and teacher FPN levels, and the generator for more inputs."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda h, w: torch.randn(N, C, h, w, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    student = [mk(h, w).requires_grad_() for h, w in levels]
    teacher = [mk(h, w) for h, w in levels]
    return student, teacher, g


def random_levels(levels, N: int, C: int, device, dtype, seed: int):
    """FPN levels (N,C,h,w) of standard normal values that require grad, seeded."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, C, h, w, generator=g).to(device, dtype).requires_grad_() for h, w in levels]


def feature_pass_bytes(inputs) -> int:
    """Minimal traffic of a feature loss: read student and teacher, write the student gradient."""
    return sum(s.numel() for s in inputs["student"]) * inputs["student"][0].element_size() * 3


def dense_head_anchors(levels, strides, J, device, dtype):
    """mmdet-style square anchors (J scales) at every location, ordered (h, w, j)."""
    out = []
    for (h, w), s in zip(levels, strides):
        yy, xx = torch.meshgrid(torch.arange(h) * float(s), torch.arange(w) * float(s), indexing="ij")
        c = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1).repeat_interleave(J, 0)
        half = (4 * s * 2 ** (torch.arange(J) / J)).repeat(h * w)[:, None]
        out.append(torch.cat([c - half, c + half], 1).to(device, dtype))
    return out


def dense_head_maps(levels, N, J, C, g, device, dtype, scale=1.0):
    """Random mmdet-layout (N, J*C, H, W) head outputs, one per level."""
    return [(torch.randn(N, J * C, h, w, generator=g) * scale).to(device, dtype) for h, w in levels]


# ------------------------------------------------------------------------------------------ roofs
# The machine's own limit for a case (Impl(roof=True)): the least traffic the op's result needs, done
# with plain torch passes into fresh tensors (as an op's backward allocates its gradients), timed in the
# same run as the implementations. Each returns its outputs so nothing is optimised away.
FEATURE_BOUND = ("read student and teacher once, write the student's gradient once into a fresh tensor "
                 "(torch.sub per level)")


def roof_feature_pass(student, teacher, **_):
    """A feature loss's least traffic: read both maps, write the student's gradient (fresh)."""
    return [torch.sub(s, t) for s, t in zip(student, teacher)]


def roof_read(tensors):
    """Read every element once (a sum per tensor: one pass, a scalar written)."""
    return [x.sum() for x in tensors]


def roof_fresh(tensors):
    """Write a fresh zero tensor shaped like each (as a backward's dense gradient is allocated)."""
    return [torch.zeros_like(x) for x in tensors]
