"""Dense-head layouts shared by the ops and their Triton launchers.

mmdet's dense heads output (N,J*C,H,W) maps: J anchors per location, C values per anchor
(classes, or 4 box values, or 4*(reg_max+1) GFL bins). The kernels read them in place as
(N,H,W,J,C) strided views, anchors ordered (n,h,w,j) exactly as mmdet's
``x.permute(0,2,3,1).reshape(-1, C)`` orders them; flat (A,C) rows are (1,1,A,1,C).
"""
from __future__ import annotations

import torch


def anchor_view(x: torch.Tensor, per_anchor: int) -> torch.Tensor:
    """(A,C) -> (1,1,A,1,C); (N,J*C,H,W) -> (N,H,W,J,C), a view (no copy); C = ``per_anchor``."""
    if x.dim() == 2:
        return x[None, None, :, None, :]
    N, JC, H, W = x.shape
    return x.unflatten(1, (JC // per_anchor if per_anchor else 1, per_anchor)).permute(0, 3, 4, 1, 2)


def unview(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A tensor in :func:`anchor_view`'s shape back to the head tensor's shape (a view when dense)."""
    return g.reshape(like.shape) if like.dim() == 2 else g.permute(0, 3, 4, 1, 2).reshape(like.shape)
