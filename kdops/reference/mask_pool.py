"""Reference of kdops.mask_pool: a loop over objects."""
from __future__ import annotations


def mask_pool(feature, masks, batch_index):
    """out[k, c] = sum_{y,x} masks[k,y,x] * feature[b_k, c, y, x]."""
    out = feature.new_zeros((masks.shape[0], feature.shape[1]))
    for k in range(masks.shape[0]):
        b = int(batch_index[k])
        if 0 <= b < feature.shape[0]:
            out[k] = (feature[b] * masks[k].to(feature.dtype)[None]).sum((1, 2))
    return out
