"""``kdops.FusedRoIExtractor``: mmdet's ``SingleRoIExtractor`` with every level pooled by one
:func:`kdops.roi_align` call.

    bbox_roi_extractor=dict(
        type='kdops.FusedRoIExtractor',           # was 'SingleRoIExtractor'
        roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0),
        out_channels=256, featmap_strides=[4, 8, 16, 32])

Same config keys, same results: the level of each RoI is mmdet's ``map_roi_levels`` and the pooling
is mmcv's ``RoIAlign`` (average mode, ``aligned``), term for term (tests compare the two extractors,
forward and backward). What changes is the cost: mmdet selects each level's RoIs with a boolean mask
and runs mmcv's kernel once per level (single-threaded on the CPU) and writes the results back by
index; here one kernel reads every level and one backward writes each level's gradient once,
deterministically. On the CPU that is ~5-10x faster forward and backward (benchmarks/kd_step.py,
issue 17), which is most of what HEAD's assistant and teacher R-CNN heads cost.

As with mmcv's RoIAlign, the RoI coordinates get no gradient. Every level takes part in the graph
(its gradient is zero where no RoI reads it), so DDP sees the same parameters used on every rank,
which mmdet's extractor arranges with a ``feats[i].sum() * 0`` term.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor
from torch import Tensor

import kdops
from kdops.reference.roi_align import roi_levels

from .registry import MODELS

_NAME = "kdops.FusedRoIExtractor"


@MODELS.register_module(name="FusedRoIExtractor")
class FusedRoIExtractor(SingleRoIExtractor):
    """Drop-in for ``SingleRoIExtractor`` with a ``RoIAlign`` layer (see the module doc).

    Args: those of ``SingleRoIExtractor`` (``roi_layer``, ``out_channels``, ``featmap_strides``,
    ``finest_scale``, ``init_cfg``). ``roi_layer`` must be mmcv's ``RoIAlign`` in average mode
    (``pool_mode='avg'``, the default, as every mmdet R-CNN config); ``output_size``,
    ``sampling_ratio`` and ``aligned`` are honoured.
    """

    def __init__(self, roi_layer: dict, out_channels: int, featmap_strides, finest_scale: int = 56,
                 init_cfg=None) -> None:
        layer = dict(roi_layer) if isinstance(roi_layer, dict) else None
        if layer is None or layer.get("type") != "RoIAlign":
            raise ValueError(f"{_NAME}: roi_layer must be dict(type='RoIAlign', ...) (mmcv's RoIAlign, which this "
                             f"extractor computes with kdops.roi_align), got {roi_layer!r}; keep "
                             f"type='SingleRoIExtractor' for other RoI layers")
        if layer.get("pool_mode", "avg") != "avg" or layer.get("use_torchvision", False):
            raise ValueError(f"{_NAME}: roi_layer must use pool_mode='avg' and use_torchvision=False (kdops.roi_align "
                             f"is mmcv's average RoIAlign), got {roi_layer!r}")
        super().__init__(roi_layer=roi_layer, out_channels=out_channels, featmap_strides=featmap_strides,
                         finest_scale=finest_scale, init_cfg=init_cfg)
        first = self.roi_layers[0]
        self.output_size: Tuple[int, int] = tuple(int(v) for v in first.output_size)
        self.sampling_ratio = int(first.sampling_ratio)
        self.aligned = bool(first.aligned)

    def forward(self, feats: Tuple[Tensor], rois: Tensor, roi_scale_factor: Optional[float] = None) -> Tensor:
        feats = tuple(feats[:self.num_inputs])
        if len(feats) != len(self.featmap_strides):
            raise ValueError(f"{_NAME}: got {len(feats)} feature levels for featmap_strides {self.featmap_strides}")
        rois = rois.detach().type_as(feats[0])  # as mmdet (the fp16 cast) and mmcv (no gradient w.r.t. RoIs)
        if len(feats) == 1:  # mmdet's single-level path: every RoI, no rescaling
            levels = torch.zeros(rois.shape[0], dtype=torch.long, device=rois.device)
        else:
            levels = roi_levels(rois, len(feats), float(self.finest_scale))
            if roi_scale_factor is not None:
                rois = self.roi_rescale(rois, roi_scale_factor)
        return kdops.roi_align(list(feats), rois, list(self.featmap_strides), output_size=self.output_size,
                               sampling_ratio=self.sampling_ratio, aligned=self.aligned, levels=levels,
                               validate=False)


def use_fused_extractor(roi_head_cfg) -> bool:
    """Switches an R-CNN head config's ``bbox_roi_extractor`` from ``SingleRoIExtractor`` to
    ``kdops.FusedRoIExtractor`` in place when its layer is mmcv's average RoIAlign; returns whether it did."""
    ext = roi_head_cfg.get("bbox_roi_extractor") if roi_head_cfg is not None else None
    if not ext or ext.get("type") not in ("SingleRoIExtractor", "mmdet.SingleRoIExtractor"):
        return False
    layer = ext.get("roi_layer") or {}
    if layer.get("type") != "RoIAlign" or layer.get("pool_mode", "avg") != "avg" or layer.get("use_torchvision"):
        return False
    ext["type"] = _NAME
    return True
