"""kdops.FusedRoIExtractor against mmdet's own SingleRoIExtractor (over mmcv's RoIAlign): the same
config builds both, and they agree forward and backward."""
from __future__ import annotations

import pytest
import torch
from mmdet_testing import require_mmdet

require_mmdet()


def _pair(strides=(4, 8, 16, 32), **layer):
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmdet.utils import register_all_modules

    import kdops_mmdet  # noqa: F401  (registers kdops.FusedRoIExtractor)

    register_all_modules(init_default_scope=True)
    roi_layer = dict(type="RoIAlign", output_size=7, sampling_ratio=0)
    roi_layer.update(layer)
    cfg = dict(roi_layer=roi_layer, out_channels=6, featmap_strides=list(strides))
    return (MMDET_MODELS.build(dict(type="SingleRoIExtractor", **cfg)),
            MMDET_MODELS.build(dict(type="kdops.FusedRoIExtractor", **cfg)))


def _inputs(strides, img=448, R=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(2, 6, img // s, img // s, generator=g) for s in strides]
    xy = torch.rand(R, 2, generator=g) * img
    wh = torch.rand(R, 2, generator=g) ** 2 * img + 1
    rois = torch.cat([torch.randint(0, 2, (R, 1), generator=g).float(), xy, xy + wh], 1)
    return feats, rois


@pytest.mark.parametrize("strides,layer,scale_factor", [
    ((4, 8, 16, 32), {}, None),
    ((4, 8, 16, 32), dict(aligned=False, sampling_ratio=2), None),
    ((4, 8, 16, 32), {}, 1.5),
    ((8,), {}, None),
])
def test_fused_extractor_equals_mmdets(strides, layer, scale_factor):
    ref, fused = _pair(strides, **layer)
    feats, rois = _inputs(strides)
    a_in = [f.clone().requires_grad_() for f in feats]
    b_in = [f.clone().requires_grad_() for f in feats]
    want = ref(a_in, rois, roi_scale_factor=scale_factor)
    got = fused(b_in, rois, roi_scale_factor=scale_factor)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    w = torch.randn(got.shape)
    for a, b in zip(torch.autograd.grad(want, a_in, w), torch.autograd.grad(got, b_in, w)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)  # every level has a gradient (DDP), as mmdet's


def test_fused_extractor_no_rois_and_bad_layers():
    from kdops_mmdet.roi_extractor import FusedRoIExtractor, use_fused_extractor

    ref, fused = _pair()
    feats, _ = _inputs((4, 8, 16, 32))
    out = fused(feats, torch.zeros(0, 5))
    assert out.shape == (0, 6, 7, 7)
    with pytest.raises(ValueError, match="roi_layer must be dict\\(type='RoIAlign'"):
        FusedRoIExtractor(roi_layer=dict(type="RoIPool", output_size=7), out_channels=6, featmap_strides=[4])
    with pytest.raises(ValueError, match="pool_mode='avg'"):
        FusedRoIExtractor(roi_layer=dict(type="RoIAlign", output_size=7, pool_mode="max"), out_channels=6,
                          featmap_strides=[4])
    head = dict(bbox_roi_extractor=dict(type="SingleRoIExtractor", roi_layer=dict(type="RoIAlign", output_size=7)))
    assert use_fused_extractor(head) and head["bbox_roi_extractor"]["type"] == "kdops.FusedRoIExtractor"
    other = dict(bbox_roi_extractor=dict(type="GenericRoIExtractor", roi_layer=dict(type="RoIAlign", output_size=7)))
    assert not use_fused_extractor(other) and other["bbox_roi_extractor"]["type"] == "GenericRoIExtractor"
