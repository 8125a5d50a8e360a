"""kdops.roi_align: RoIAlign over FPN levels in one op (mmdet's SingleRoIExtractor + mmcv's RoIAlign)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from .. import reference
from ..reference.roi_align import roi_levels
from ._registry import compiling, register_op, use_kernel
from ._validation import (
    as_levels, check_flag, check_index_tensor, check_levels, check_number, check_strides, check_tensor,
    per_level_numbers,
)

OP = "roi_align"

__all__ = ["roi_align", "roi_levels"]


def roi_align(features, rois: torch.Tensor, strides: Union[float, Sequence[float]], *,
              output_size: Union[int, Tuple[int, int]] = 7, sampling_ratio: int = 0, aligned: bool = True,
              finest_scale: float = 56.0, levels: Optional[torch.Tensor] = None,
              validate: bool = True) -> torch.Tensor:
    r"""RoIAlign (He et al., Mask R-CNN, ICCV 2017) of every RoI from its FPN level, in one op.

    The R-CNN heads of HEAD's assistant and of the two-stage teacher read their RoI features this
    way; mmdet does it with ``SingleRoIExtractor``: a level per RoI, then one mmcv ``RoIAlign`` per
    level over a boolean-mask selection, written back by index. Here one kernel does every level and
    its backward writes each level's gradient once, deterministically.

    For RoI :math:`r` on level :math:`l` with scale :math:`s = 1/\mathrm{stride}_l` and box
    :math:`(x_1, y_1, x_2, y_2)`, with :math:`o = 0.5` when ``aligned`` (else 0):
    the box :math:`(x_1 s - o, \ldots)` is cut into ``output_size`` bins, each the average of a
    :math:`g_h \times g_w` grid of bilinear samples (zero outside :math:`[-1, H] \times [-1, W]`,
    clamped to the border inside), :math:`g = ` ``sampling_ratio`` or, when 0,
    :math:`\lceil \text{RoI size} / \text{output size} \rceil` per axis -- exactly mmcv's
    ``RoIAlign(pool_mode='avg')`` (and torchvision's ``roi_align``); without ``aligned`` RoIs are at
    least 1x1, as there.

    Levels: with a sequence of L > 1 levels and ``levels=None``, mmdet's ``map_roi_levels``:
    :math:`l = \mathrm{clamp}(\lfloor \log_2(\sqrt{wh} / \texttt{finest\_scale} + 10^{-6}) \rfloor, 0, L-1)`,
    computed in the features' dtype as mmdet does (RoIs with :math:`wh < 0` match no level and get
    zeros, as in mmdet's loop). One level (a tensor, or a sequence of one): every RoI pools from it,
    as mmdet's single-level path and mmcv's ``RoIAlign(spatial_scale=1/stride)``.

    Args:
        features: (N,C,H,W) or a sequence of L such levels (one N, C, dtype, device).
        rois: (R,5) ``[batch_index, x1, y1, x2, y2]`` in input-image pixels (mmdet's ``bbox2roi``),
            floating, on the features' device; cast to the features' dtype first (as mmdet).
            Not differentiable: RoI coordinates get no gradient (as in mmcv); pass them detached.
        strides: the stride of each level (a number for a single level).
        output_size: bins per side, an int or (height, width). Default 7 (Faster R-CNN).
        sampling_ratio: samples per bin per axis; 0 (default, mmdet's R-CNN configs) adapts to the
            RoI size.
        aligned: the half-pixel shift of Detectron2's ROIAlignV2 and mmdet's configs (default True).
        finest_scale: mmdet's ``SingleRoIExtractor.finest_scale`` (default 56).
        levels: optional (R,) int64 level of every RoI, instead of the mapping above; rows outside
            [0, L) give zeros.
        validate: check that every RoI's image index is an integer in [0, N) and raise ValueError
            otherwise (one host synchronisation). ``validate=False`` skips it (the hot path: no sync);
            such rows then give zeros -- the kernels never read outside the maps. Skipped while
            torch.compile traces and for fake / meta tensors.

    Returns:
        (R, C, out_h, out_w) in the features' dtype (accumulated in float32, float64 for float64).
    """
    feats, is_seq = as_levels(OP, "features", features)
    first = check_levels(OP, "features", feats, is_seq)
    check_tensor(OP, "rois", rois, ndim=2, like=first, what="(R,5) [batch_index, x1, y1, x2, y2]")
    if rois.shape[1] != 5:
        raise ValueError(f"kdops.{OP}: `rois` must have shape (R,5) [batch_index, x1, y1, x2, y2] (mmdet's "
                         f"bbox2roi), got {tuple(rois.shape)}")
    if rois.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"kdops.{OP}: `rois` requires grad, but RoIAlign gives no gradient w.r.t. the box "
                         f"coordinates (neither does mmcv's); pass rois.detach()")
    scales = [1.0 / float(s) for s in per_level_numbers(OP, "strides", check_strides(OP, strides, allow_none=False),
                                                        len(feats), is_seq)]
    out_h, out_w = _output_size(output_size)
    check_number(OP, "sampling_ratio", sampling_ratio, low=0, integer=True)
    check_flag(OP, "aligned", aligned)
    check_number(OP, "finest_scale", finest_scale, low=0.0, low_open=True)
    rois = rois.to(first.dtype)
    if levels is None:
        levels = (roi_levels(rois, len(feats), float(finest_scale)) if len(feats) > 1
                  else torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device))
    else:
        check_index_tensor(OP, "levels", levels, like=first, shape=(rois.shape[0],), what="(R,) level of each RoI")
    if validate and not compiling(rois):
        _validate_rows(rois, levels, first.shape[0], scales, (out_h, out_w), int(sampling_ratio))
    if not use_kernel(OP, first.device):
        return reference.roi_align(feats, rois, levels, scales, (out_h, out_w), int(sampling_ratio), aligned)
    return torch.ops.kdops.roi_align_fwd(feats, rois, levels, scales, out_h, out_w, int(sampling_ratio), aligned)


def _output_size(size) -> Tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ValueError(f"kdops.{OP}: `output_size` must be a positive int or (height, width) of positive ints, "
                         f"got {size!r}")
    return int(size[0]), int(size[1])


#: samples per bin along an axis beyond which the kernels refuse a RoI (csrc/cpu/roi_align.cpp kMaxGrid)
MAX_GRID = 1 << 14


def _validate_rows(rois: torch.Tensor, levels: torch.Tensor, n: int, scales, out_size, sampling_ratio: int) -> None:
    if rois.shape[0] == 0:
        return
    b = rois[:, 0]
    bad = ~((b == b.trunc()) & (b >= 0) & (b < n))
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        raise ValueError(f"kdops.{OP}: `rois` row {r} has image index {float(b[r])!r}, expected an integer in "
                         f"[0, {n}) (the features' batch); rows are [batch_index, x1, y1, x2, y2]. Pass "
                         f"validate=False to skip this check (such rows then give zeros)")
    if sampling_ratio > 0:
        return
    scale = torch.tensor(scales, dtype=torch.float64, device=rois.device)[levels.clamp(0, len(scales) - 1)]
    size = torch.stack([rois[:, 4] - rois[:, 2], rois[:, 3] - rois[:, 1]], 1).double() * scale[:, None]
    bins = torch.tensor(out_size, dtype=torch.float64, device=rois.device)
    big = ((size / bins).ceil() > MAX_GRID).any(1)
    if bool(big.any()):
        r = int(big.nonzero()[0, 0])
        raise ValueError(f"kdops.{OP}: `rois` row {r} is {tuple(size[r].tolist())} (height, width) feature pixels on "
                         f"its level: more than {MAX_GRID} samples per bin with sampling_ratio=0; are the boxes in "
                         f"input-image pixels and the strides right?")


# ------------------------------------------------------------------------------------ registration
def _fake_fwd(features, rois, levels, scales, out_h, out_w, sampling_ratio, aligned):
    return features[0].new_empty((rois.shape[0], features[0].shape[1], out_h, out_w))


def _fake_bwd(grad, rois, levels, scales, sampling_ratio, aligned, sizes):
    return [grad.new_empty(tuple(sizes[i:i + 4])) for i in range(0, len(sizes), 4)]


def _setup_context(ctx, inputs, output):
    features, rois, levels, scales, out_h, out_w, sampling_ratio, aligned = inputs
    ctx.sizes = [s for f in features for s in f.shape]
    ctx.args = (list(scales), sampling_ratio, aligned, out_h, out_w)
    ctx.save_for_backward(rois, levels)


def _backward(ctx, grad):
    rois, levels = ctx.saved_tensors
    scales, sampling_ratio, aligned, _, _ = ctx.args
    grads = torch.ops.kdops.roi_align_bwd(grad.contiguous(), rois, levels, scales, sampling_ratio, aligned, ctx.sizes)
    return list(grads), None, None, None, None, None, None, None


def _bwd_setup_context(ctx, inputs, output):
    grad, rois, levels, scales, sampling_ratio, aligned, sizes = inputs
    ctx.args = (list(scales), sampling_ratio, aligned, grad.shape[2], grad.shape[3])
    ctx.save_for_backward(rois, levels)


def _bwd_backward(ctx, grads):
    # the backward is linear in grad: its adjoint is the forward itself
    rois, levels = ctx.saved_tensors
    scales, sampling_ratio, aligned, out_h, out_w = ctx.args
    gg = torch.ops.kdops.roi_align_fwd(list(grads), rois, levels, scales, out_h, out_w, sampling_ratio, aligned)
    return gg, None, None, None, None, None, None


register_op(OP, fake={"roi_align_fwd": _fake_fwd, "roi_align_bwd": _fake_bwd},
            autograd={"roi_align_fwd": (_backward, _setup_context),
                      "roi_align_bwd": (_bwd_backward, _bwd_setup_context)})
