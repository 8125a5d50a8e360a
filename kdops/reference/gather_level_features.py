"""Reference of kdops.gather_level_features: HEAD's per-level loop with boolean masks."""
from __future__ import annotations

import torch


def gather_level_features(features, index):
    """out[r] = features[l_r][b_r, :, y_r, x_r]; rows out of range give zeros.

    The way HEAD's code samples the student head: one pass per level, selecting that
    level's rows with a boolean mask and reading them by advanced indexing.
    """
    feats = [features] if isinstance(features, torch.Tensor) else list(features)
    out = feats[0].new_zeros((index.shape[0], feats[0].shape[1]))
    for lvl, f in enumerate(feats):
        N, _, H, W = f.shape
        b, y, x = index[:, 1], index[:, 2], index[:, 3]
        sel = (index[:, 0] == lvl) & (b >= 0) & (b < N) & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        rows = sel.nonzero().squeeze(1)
        if rows.numel():
            out = out.index_put((rows,), f[b[rows], :, y[rows], x[rows]])
    return out
