"""Every public op and loss, forward and backward, on meta tensors.

Meta tensors have shapes, dtypes and a device but no values: `.item()`, `int(t)`, `bool(t)` or
`.tolist()` on one raises. An op that runs here end to end -- validation, box ranges, the op's
fake kernel, autograd -- reads no device value on the host, so on a GPU it never waits for the
device (what `torch.cuda.set_sync_debug_mode("error")` checks there, in
test_every_op_on_device.py; the Triton launchers themselves are checked the same way in
test_triton_compile_sm90.py). Host checks that need values (gather's row validation, MSDA's
spatial_shapes) are skipped for such tensors, as they are for CUDA tensors.
"""
from __future__ import annotations

import pytest
import torch

import kdops
from kdops.losses import BCKDLoss, FeatureMimicLoss, PKDLoss


def r(*shape, grad=True, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta").requires_grad_(grad)


def i(values):
    return torch.tensor(values).to("meta")


def _cases():
    F = [r(2, 3, 8, 10), r(2, 3, 4, 5)]
    T = [r(2, 3, 8, 10, grad=False), r(2, 3, 4, 5, grad=False)]
    B, BI = torch.tensor([[0.0, 0.0, 40.0, 30.0], [10.0, 5.0, 70.0, 60.0]]).to("meta"), i([0, 1])
    sizes = [(2, 8, 10), (2, 4, 5)]
    rows = i([[0, 0, 1, 1], [1, 1, 2, 3]])
    return {
        "box_pool": lambda: kdops.box_pool(F, B, BI, [4, 8]),
        "box_pool lgd mean": lambda: kdops.box_pool(F, B, BI, [4, 8], rule="lgd", reduce="mean",
                                                    image_size=(32.0, 40.0)),
        "box_paint": lambda: kdops.box_paint(r(2, 3), B, BI, sizes, [4, 8]),
        "box_masks": lambda: kdops.box_masks(B, BI, sizes, [4, 8]),
        "gather_level_features": lambda: kdops.gather_level_features(F, rows),
        "roi_align": lambda: kdops.roi_align(F, r(4, 5, grad=False), [4, 8]),  # mmdet's level mapping too
        "nms_mask": lambda: kdops.nms_mask(r(10, 37, 4), 0.7, r(10, 37, grad=False, dtype=torch.bool)),
        "mask_pool": lambda: kdops.mask_pool(F[0], r(2, 8, 10), BI),
        "masked_mse": lambda: kdops.masked_mse(F[0], T[0], pixel_weight=r(2, 8, 10, grad=False),
                                               channel_weight=r(2, 3, grad=False)),
        "pcc_mse": lambda: kdops.pcc_mse(F, T, norm="instance"),
        "PKDLoss": lambda: PKDLoss()(F, T),
        "FeatureMimicLoss": lambda: FeatureMimicLoss(fg_weight=1e-3, bg_weight=5e-4, attention=True)(
            F[0], T[0], r(2, 8, 10, grad=False)),
        "ms_deform_attn": lambda: kdops.ms_deform_attn(r(2, 26, 2, 4), i([[4, 5], [2, 3]]), i([0, 20]),
                                                       r(2, 3, 2, 2, 2, 2), r(2, 3, 2, 2, 2)),
        "bckd_cls_loss": lambda: kdops.bckd_cls_loss(r(10, 3), r(10, 3, grad=False), weight=r(10)),
        "bckd_loc_loss": lambda: kdops.bckd_loc_loss(r(10, 4), r(10, 4, grad=False), r(10, 3, grad=False),
                                                     r(10, 3, grad=False), r(10, 4, grad=False)),
        "BCKDLoss": lambda: BCKDLoss()([r(2, 3, 4, 5)], [r(2, 3, 4, 5, grad=False)], [r(2, 68, 4, 5)],
                                       [r(2, 68, 4, 5, grad=False)], [r(40, 4, grad=False)]),
    }


@pytest.mark.parametrize("name", sorted(_cases()))
def test_runs_forward_and_backward_on_meta_tensors(name):
    def tensors(x):
        if isinstance(x, torch.Tensor):
            return [x]
        return [t for v in (x.values() if isinstance(x, dict) else x) for t in tensors(v)]

    outs = tensors(_cases()[name]())
    assert outs and all(o.device.type == "meta" for o in outs)
    loss = sum(o.sum() for o in outs if o.requires_grad)
    if isinstance(loss, torch.Tensor):
        loss.backward()
