"""kdops.gather_level_features: read (level, image, y, x) feature columns of an FPN."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import reference
from ._registry import compiling, register_op, use_kernel
from ._validation import as_levels, check_index_tensor, check_levels

OP = "gather_level_features"


def gather_level_features(features: Sequence[torch.Tensor], index: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    r"""Gathers one feature column per index row from a list of FPN levels.

    .. math::
        \mathrm{out}[r, c] = F_{l_r}[b_r, c, y_r, x_r], \qquad \mathrm{index}[r] = (l_r, b_r, y_r, x_r)

    HEAD (Wang et al., "Head-to-Head ... Cross-Architecture Knowledge Distillation",
    ECCV 2022) traces every RoI of the teacher's R-CNN head to the student anchor it came
    from and reads the student head's feature there; its code loops over levels with
    boolean masks. Here one kernel reads all rows; the backward pass adds each row's
    gradient into its level (rows hitting one pixel accumulate), summed per destination
    in a fixed order -- deterministic, no atomics, fp32 accumulation.

    Args:
        features: sequence of L tensors (N,C,H_l,W_l) with one N, C, dtype and device
            (a single tensor is one level).
        index: (R,4) int64 rows [level, batch, y, x] on the features' device.
        validate: check every row is in range and raise ValueError otherwise (one host
            synchronisation). ``validate=False`` skips the check (no sync, the hot path);
            out-of-range rows then give zero rows and receive no gradient -- the kernels
            never read or write outside the maps. The check is also skipped while
            torch.compile traces and for fake / meta tensors.

    Returns:
        (R,C) in the features' dtype.
    """
    feats, is_seq = as_levels(OP, "features", features)
    first = check_levels(OP, "features", feats, is_seq)
    check_index_tensor(OP, "index", index, like=first, shape=(None, 4), what="(R,4) rows [level, batch, y, x]")
    if validate and not compiling(index):
        _validate_rows(feats, index)
    if not use_kernel(OP, first.device):
        return reference.gather_level_features(feats, index)
    return torch.ops.kdops.gather_level_features_fwd(feats, index)


def _validate_rows(feats, index):
    if index.shape[0] == 0:
        return
    sizes = torch.tensor([[len(feats), 0, 0, 0]] + [[1, f.shape[0], f.shape[2], f.shape[3]] for f in feats],
                         device=index.device)
    lvl = index[:, 0]
    lim = sizes[1 + lvl.clamp(0, len(feats) - 1)]
    bad = (lvl < 0) | (lvl >= len(feats)) | (index[:, 1:] < 0).any(1) | (index[:, 1:] >= lim[:, 1:]).any(1)
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        row = index[r].tolist()
        where = f"level {row[0]} of {len(feats)}"
        if 0 <= row[0] < len(feats):
            f = feats[row[0]]
            where += f" with (N,H,W) = {(f.shape[0], f.shape[2], f.shape[3])}"
        raise ValueError(
            f"kdops.{OP}: `index` row {r} = {row} is out of range ({where}); rows are "
            "[level, batch, y, x]. Pass validate=False to skip this check (such rows then give zeros)"
        )


def _fake_fwd(features, index):
    return features[0].new_empty((index.shape[0], features[0].shape[1]))


def _fake_bwd(grad, index, sizes):
    return [grad.new_empty(tuple(sizes[i:i + 4])) for i in range(0, len(sizes), 4)]


def _setup_context(ctx, inputs, output):
    features, index = inputs
    ctx.sizes = [s for f in features for s in f.shape]
    ctx.save_for_backward(index)


def _backward(ctx, grad):
    (index,) = ctx.saved_tensors
    grads = torch.ops.kdops.gather_level_features_bwd(grad, index, ctx.sizes)
    return list(grads), None


def _bwd_backward(ctx, grads):
    # the adjoint of the adjoint is the gather itself
    (index,) = ctx.saved_tensors
    return torch.ops.kdops.gather_level_features_fwd(list(grads), index), None, None


def _bwd_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


register_op(OP, fake={"gather_level_features_fwd": _fake_fwd, "gather_level_features_bwd": _fake_bwd},
            autograd={"gather_level_features_fwd": (_backward, _setup_context),
                      "gather_level_features_bwd": (_bwd_backward, _bwd_setup_context)})
