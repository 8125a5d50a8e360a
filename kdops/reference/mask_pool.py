"""Reference of kdops.mask_pool: a loop over objects (test oracle and bench baseline)."""
from __future__ import annotations


def mask_pool(feature, masks, batch_index):
    r"""out[k, c] = sum_{y,x} masks[k,y,x] * feature[b_k, c, y, x], one object at a time.

    The pooling behind LGD's appearance embeddings (Zhang et al., AAAI 2022,
    ``aggregate_per_level`` before its division by the mask area). Objects whose batch
    index is outside [0, N) give 0. Reads each index on the host: eager only.
    """
    out = feature.new_zeros((masks.shape[0], feature.shape[1]))
    for k in range(masks.shape[0]):
        b = int(batch_index[k])
        if 0 <= b < feature.shape[0]:
            out[k] = (feature[b] * masks[k].to(feature.dtype)[None]).sum((1, 2))
    return out
