"""Dense-head layouts in Triton kernels (the views themselves: kdops/_layout.py): mmdet's (N,J*C,H,W) head outputs (or flat (A,C) rows) read in
place as (N,H,W,J,C) strided views, anchors ordered (n,h,w,j) as mmdet's
``permute(0,2,3,1).reshape(-1, C)`` orders them."""
from __future__ import annotations

import triton
import triton.language as tl  # noqa: F401  (a @triton.jit function must see `tl` among its globals)


@triton.jit
def anchor_offsets(a, H, W, J, sN, sH, sW, sJ):
    j = a % J
    r = a // J
    w = r % W
    r = r // W
    h = r % H
    n = r // H
    return n * sN + h * sH + w * sW + j * sJ


def mem_strides5(x):
    """The memory strides of a 5-D view (not FPN strides)."""
    return [int(s) for s in x.stride()]
