"""torch.compile(dynamic=True, fullgraph=True) over all the spatial ops together, with gradients."""
import torch
from box_helpers import STRIDES, make_boxes, make_feats
from helpers import leaf

import kdops


def test_torch_compile_dynamic_shapes_all_spatial_ops():
    feats = [leaf(f) for f in make_feats(C=4, dtype=torch.float32)[:2]]
    boxes, bi = make_boxes(6, seed=12, dtype=torch.float32)
    idx = torch.tensor([[0, 1, 3, 4], [1, 0, 2, 2], [0, 1, 3, 4]])

    def f(feats, boxes, bi, idx):
        sizes = [(x.shape[0], x.shape[2], x.shape[3]) for x in feats]
        p = kdops.box_pool(feats, boxes, bi, STRIDES[:2], rule="lgd", reduce="mean")
        q = kdops.box_paint(p[0], boxes, bi, sizes, STRIDES[:2])
        g = kdops.gather_level_features(feats, idx)
        fg, _ = kdops.box_masks(boxes, bi, sizes, STRIDES[:2])
        return p.sum() + sum(x.sum() for x in q) + g.sum() + sum(x.sum() for x in fg)

    a = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)(feats, boxes, bi, idx)
    b = f(feats, boxes, bi, idx)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a, feats)
    gb = torch.autograd.grad(b, feats)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)
