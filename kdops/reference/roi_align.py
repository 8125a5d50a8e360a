"""Reference of kdops.roi_align: mmdet's SingleRoIExtractor over mmcv's RoIAlign, in eager PyTorch.

Written from mmcv's ``roi_align`` kernel (``roi_align_forward_cpu``: average pooling, adaptive
sampling grid, the ``aligned`` half-pixel shift) and mmdet's ``SingleRoIExtractor`` (``map_roi_levels``
and one RoIAlign per level). The bilinear weights and the order of the sums follow mmcv's kernel:
per bin, the samples row by row, each sample's ``w1 v1 + w2 v2 + w3 v3 + w4 v4`` added in turn, the
sum divided by the sample count. Gradients come from autograd through the gathers.
"""
from __future__ import annotations

from typing import Sequence

import torch


def roi_levels(rois: torch.Tensor, num_levels: int, finest_scale: float) -> torch.Tensor:
    """mmdet's ``SingleRoIExtractor.map_roi_levels``: level floor(log2(sqrt(w h) / finest_scale + 1e-6))
    clamped to [0, L-1], computed in the rois' dtype. Degenerate boxes (w h < 0) give NaN scales, which
    mmdet's loop matches to no level: they are marked -1 here (their features are zero)."""
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    lvl = torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(min=0, max=num_levels - 1)
    return torch.where(torch.isnan(lvl), torch.full_like(lvl, -1), lvl).long()


def roi_align(features, rois: torch.Tensor, levels: torch.Tensor, scales: Sequence[float],
              output_size=(7, 7), sampling_ratio: int = 0, aligned: bool = True) -> torch.Tensor:
    """(R,C,oh,ow): RoI ``r`` average-pooled from level ``levels[r]`` (spatial scale ``scales[l]``) of
    image ``int(rois[r, 0])``; rows whose level or image is out of range are zero."""
    feats = [features] if isinstance(features, torch.Tensor) else list(features)
    f0 = feats[0]
    oh, ow = output_size
    R, C = rois.shape[0], f0.shape[1]
    acc = torch.float64 if f0.dtype == torch.float64 else torch.float32
    out = torch.zeros((R, C, oh, ow), dtype=acc, device=f0.device)
    batch = rois[:, 0].to(acc).trunc().long()  # mmcv: int roi_batch_ind = offset_rois[0]
    for lvl, (f, scale) in enumerate(zip(feats, scales)):
        N, _, H, W = f.shape
        rows = ((levels == lvl) & (batch >= 0) & (batch < N)).nonzero().squeeze(1)
        if rows.numel() == 0 or H == 0 or W == 0:
            continue
        out = out.index_put((rows,), _level(f.to(acc), batch[rows], rois[rows].to(acc), float(scale), oh, ow,
                                            sampling_ratio, aligned))
    return out.to(f0.dtype)


def _level(f, b, r, scale, oh, ow, sampling_ratio, aligned):
    H, W = f.shape[2], f.shape[3]
    off = 0.5 if aligned else 0.0
    x1, y1 = r[:, 1] * scale - off, r[:, 2] * scale - off
    rw, rh = r[:, 3] * scale - off - x1, r[:, 4] * scale - off - y1
    if not aligned:  # force malformed RoIs to be 1x1
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    bh, bw = rh / oh, rw / ow
    if sampling_ratio > 0:
        gh = torch.full_like(rh, float(sampling_ratio))
        gw = torch.full_like(rw, float(sampling_ratio))
    else:
        gh, gw = torch.ceil(rh / oh), torch.ceil(rw / ow)
        # a non-finite or empty RoI has no samples (mmcv: its loops do not run); its features are 0
        gh = torch.where(torch.isfinite(gh) & (gh > 0), gh, torch.zeros_like(gh))
        gw = torch.where(torch.isfinite(gw) & (gw > 0), gw, torch.zeros_like(gw))
    count = (gh * gw).clamp(min=1.0)
    Gh = int(gh.max().item()) if gh.numel() else 0
    Gw = int(gw.max().item()) if gw.numel() else 0
    ph = torch.arange(oh, dtype=f.dtype, device=f.device)
    pw = torch.arange(ow, dtype=f.dtype, device=f.device)
    C = f.shape[1]
    rows = f.permute(0, 2, 3, 1).reshape(-1, C)  # (N*H*W, C): pixel rows, gathered per sample
    out = f.new_zeros((b.shape[0], C, oh, ow))
    zero = torch.zeros((), dtype=f.dtype, device=f.device)
    # sample (iy, ix) of every bin, over the RoIs whose grid has it: each RoI adds its samples row by
    # row, as mmcv's loop does
    for iy in range(Gh):
        for ix in range(Gw):
            sel = ((gh > iy) & (gw > ix)).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            Rl = sel.numel()
            y = y1[sel, None] + ph[None, :] * bh[sel, None] + (iy + 0.5) * bh[sel, None] / gh[sel, None]  # (Rl,oh)
            x = x1[sel, None] + pw[None, :] * bw[sel, None] + (ix + 0.5) * bw[sel, None] / gw[sel, None]  # (Rl,ow)
            yy, xx = y[:, :, None].expand(Rl, oh, ow), x[:, None, :].expand(Rl, oh, ow)
            valid = (yy >= -1.0) & (yy <= H) & (xx >= -1.0) & (xx <= W)
            yc, xc = yy.clamp(min=0.0), xx.clamp(min=0.0)
            y_low, x_low = yc.floor().long().clamp(max=H - 1), xc.floor().long().clamp(max=W - 1)
            top_y, top_x = y_low >= H - 1, x_low >= W - 1
            yc = torch.where(top_y, y_low.to(f.dtype), yc)
            xc = torch.where(top_x, x_low.to(f.dtype), xc)
            y_high = torch.where(top_y, y_low, y_low + 1)
            x_high = torch.where(top_x, x_low, x_low + 1)
            ly, lx = yc - y_low, xc - x_low
            hy, hx = 1.0 - ly, 1.0 - lx
            w = [torch.where(valid, v, zero) for v in (hy * hx, hy * lx, ly * hx, ly * lx)]
            base = (b[sel] * (H * W))[:, None, None]
            total = 0
            for wk, (yi, xi) in zip(w, ((y_low, x_low), (y_low, x_high), (y_high, x_low), (y_high, x_high))):
                v = rows[base + (yi * W + xi).clamp(0, H * W - 1)].permute(0, 3, 1, 2)  # (Rl,C,oh,ow)
                total = total + wk[:, None] * v
            out = out.index_add(0, sel, total)
    return out / count[:, None, None, None]
