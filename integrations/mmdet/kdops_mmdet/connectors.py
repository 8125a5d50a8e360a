"""Connectors: student-side adapters trained with the student and dropped at export.

``type`` is one of ``conv1x1``, ``conv_norm_act`` (a stack of conv-norm-activation blocks, mmcv's
``ConvModule``), ``linear`` (over the last dimension, for (N, D) or token features), or any
module registered in mmdet's / kdops' MODELS.
"""
from __future__ import annotations

import copy

import torch.nn as nn

from .registry import MODELS


class LinearConnector(nn.Linear):
    """``nn.Linear`` over the last dimension; (N, C, H, W) maps are mapped over C instead."""

    def forward(self, x):
        if x.dim() == 4:
            return super().forward(x.movedim(1, -1)).movedim(-1, 1)
        return super().forward(x)


def _conv_norm_act(in_channels, out_channels, num_convs=1, kernel_size=3, norm_cfg=dict(type="BN"),
                   act_cfg=dict(type="ReLU"), last_act=True):
    from mmcv.cnn import ConvModule

    layers = []
    for i in range(num_convs):
        last = i == num_convs - 1
        layers.append(ConvModule(in_channels if i == 0 else out_channels, out_channels, kernel_size,
                                 padding=kernel_size // 2, norm_cfg=norm_cfg,
                                 act_cfg=act_cfg if (last_act or not last) else None))
    return nn.Sequential(*layers)


_BUILTIN = {
    "conv1x1": lambda in_channels, out_channels, bias=True: nn.Conv2d(in_channels, out_channels, 1, bias=bias),
    "conv_norm_act": _conv_norm_act,
    "linear": lambda in_features, out_features, bias=True: LinearConnector(in_features, out_features, bias=bias),
}


def build_connector(cfg: dict, where: str) -> nn.Module:
    cfg = copy.deepcopy(dict(cfg))
    kind = cfg.pop("type", None)
    if kind in _BUILTIN:
        try:
            return _BUILTIN[kind](**cfg)
        except TypeError as e:
            raise ValueError(f"kdops_mmdet: {where}: bad arguments for connector {kind!r}: {e}") from None
    if kind is None:
        raise ValueError(f"kdops_mmdet: {where}: a connector needs a `type` ({', '.join(_BUILTIN)} or a registered "
                         f"module)")
    try:
        return MODELS.build(dict(type=kind, **cfg))
    except KeyError:
        raise ValueError(f"kdops_mmdet: {where}: unknown connector type {kind!r}; built in: "
                         f"{', '.join(_BUILTIN)}, or a module registered in mmdet's MODELS") from None
