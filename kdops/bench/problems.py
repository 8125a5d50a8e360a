"""Problem sizes shared by the bench entries."""
from __future__ import annotations

from typing import List, Tuple

# COCO-like FPN of a batch at 800x1216 (P3-P7, strides 8..128), C=256.
COCO_LEVELS: List[Tuple[int, int]] = [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]
COCO_STRIDES: List[int] = [8, 16, 32, 64, 128]
COCO_IMAGE: Tuple[int, int] = (800, 1216)
# A small problem for quick checks and CI smoke runs.
SMALL_LEVELS: List[Tuple[int, int]] = [(24, 40), (12, 20), (6, 10)]
SMALL_STRIDES: List[int] = [8, 16, 32]
SMALL_IMAGE: Tuple[int, int] = (192, 320)


def fpn(size: str):
    """(batch, channels, level sizes, strides, image size) for a problem name."""
    if size == "coco":
        return 2, 256, COCO_LEVELS, COCO_STRIDES, COCO_IMAGE
    if size == "small":
        return 2, 32, SMALL_LEVELS, SMALL_STRIDES, SMALL_IMAGE
    raise ValueError(f"kdops bench: unknown --size {size!r}; use 'coco' or 'small'")
