"""kdops.nn's LGD modules (LGDInstructiveKnowledge, LGDLabelEncoder, lgd_descriptors).

Oracle: an eager transcription, written here, of the authors' release (megvii-research/LGD,
``models/customized_detectors/dynamic_teacher``: ``box_descriptor_encode``, the ``STN`` and
``LabelEncoder`` PointNet with Conv1d + ``LayerNorm([c, 1])``, ``get_inside_gt_mask``'s dense masks,
``aggregate_per_level``, the "stuGuided" ``nn.MultiheadAttention`` on (T,1,C) with its (T,T) mask and
``rendering``), looping over images as the release does. The kdops module's weights are copied into
it (state_dict mapping below); inputs are random, on a batch with different object counts per image
and an image without GT. Box coordinates are multiples of 1/4 and the map/image ratios powers of two,
so the release's float mask test and kdops' integer ranges are compared exactly at the box edges."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kdops
from kdops.nn import LGDInstructiveKnowledge, LGDLabelEncoder, lgd_descriptors

F64 = torch.float64
C, HEADS, NCLS = 16, 4, 5
IMG = (64, 96)  # padded (H, W)
STRIDES = [8, 16, 32]
SIZES = [(8, 12), (4, 6), (2, 3)]


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- inputs
def gt_lists():
    """Per image (boxes (Ni,4), labels (Ni,)): 4 objects (image borders, outside the image, zero
    width, fractional), none, 2 (one overlapping the first)."""
    b0 = torch.tensor([[0.0, 0.0, 96.0, 64.0],  # the whole image: clamped to (95, 63)
                       [100.0, 10.0, 120.0, 30.0],  # right of the image: clamped to zero width, covers nothing
                       [16.0, 16.0, 16.0, 40.0],  # zero width
                       [8.5, 4.0, 40.25, 33.0]], dtype=F64)  # fractional, edges on pixel coordinates
    b2 = torch.tensor([[32.0, 8.0, 64.0, 48.0], [40.0, 0.0, 95.75, 63.5]], dtype=F64)
    return [b0, torch.zeros(0, 4, dtype=F64), b2], [torch.tensor([0, 4, 2, 1]), torch.zeros(0, dtype=torch.int64),
                                                      torch.tensor([3, 3])]


def flat(boxes, labels):
    index = torch.cat([torch.full((len(b),), i, dtype=torch.int64) for i, b in enumerate(boxes)])
    return torch.cat(boxes), torch.cat(labels), index


def fpn(N=3, sizes=SIZES, channels=C, seed=1, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, channels, h, w, generator=g, dtype=dtype) for h, w in sizes]


_BUILT = {}


def module(**kw):
    """fp64 module with every parameter moved off its initialisation (zero biases of the attention
    would hide errors in those paths); built once per setting (2.8 M parameters), copied per test."""
    key = tuple(sorted(kw.items()))
    if key not in _BUILT:
        torch.manual_seed(len(_BUILT))
        m = LGDInstructiveKnowledge(NCLS, channels=C, num_heads=HEADS, **kw).double()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        _BUILT[key] = m
    return copy.deepcopy(_BUILT[key])


# ----------------------------------------------------------------------------- eager release (oracle)
def release_descriptors(boxes, labels, h, w, num_classes, add_context_box, context_for_empty=False):
    """``box_descriptor_encode``: a no-GT image gets one [0, 0, 1, 1] object with a zero class vector
    (``context_for_empty``: the whole-image context object instead, kdops' option); the context object
    is appended only to images with GT; all boxes clamped to [0, W-1] x [0, H-1]; 2 d - 1."""
    descs, boxlists = [], []
    whole = torch.tensor([[0.0, 0.0, w, h]], dtype=F64)
    for b, c in zip(boxes, labels):
        n = b.shape[0]
        onehot = torch.zeros(n, num_classes, dtype=F64).scatter_(1, c[:, None], 1.0)
        if n == 0:
            if context_for_empty and add_context_box:
                b = whole
            elif context_for_empty:
                b = torch.zeros(0, 4, dtype=F64)
            else:
                b = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=F64)
            onehot = torch.zeros(b.shape[0], num_classes, dtype=F64)
        elif add_context_box:
            b = torch.cat([b, whole])
            onehot = torch.cat([onehot, torch.zeros(1, num_classes, dtype=F64)])
        b = torch.stack([b[:, 0].clamp(0, w - 1), b[:, 1].clamp(0, h - 1), b[:, 2].clamp(0, w - 1),
                         b[:, 3].clamp(0, h - 1)], 1)
        boxlists.append(b)
        descs.append(2.0 * torch.cat([b / torch.tensor([w, h, w, h], dtype=F64), onehot], 1) - 1.0)
    return descs, boxlists


def release_inside_mask(boxes, img_hw, feat_hw):
    """``get_inside_gt_mask``: |pixel - centre| / extent <= 0.5 on both axes, in map coordinates
    scaled by map size / padded image size (a zero extent gives NaN or inf: never inside)."""
    (H, W), (h, w) = img_hw, feat_hw
    rh, rw = h / H, w / W
    x1, y1, x2, y2 = boxes[:, 0] * rw, boxes[:, 1] * rh, boxes[:, 2] * rw, boxes[:, 3] * rh
    centre = torch.stack([(y1 + y2) * 0.5, (x1 + x2) * 0.5], 1)
    extent = torch.stack([y2 - y1, x2 - x1], 1)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=F64), torch.arange(w, dtype=F64), indexing="ij")
    coords = torch.stack([ys, xs])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dist = (centre[:, :, None, None] - coords[None]).abs() / extent[:, :, None, None]
    return (dist <= 0.5).all(1).flatten(1).to(F64)


def _ln1(c):
    return nn.LayerNorm([c, 1], elementwise_affine=False)


class ReleaseSTN(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k
        self.conv1, self.conv2, self.conv3 = nn.Conv1d(k, 64, 1), nn.Conv1d(64, 128, 1), nn.Conv1d(128, 1024, 1)
        self.fc1, self.fc2, self.fc3 = nn.Linear(1024, 512), nn.Linear(512, 256), nn.Linear(256, k * k)
        self.bn1, self.bn2, self.bn3 = _ln1(64), _ln1(128), _ln1(1024)
        self.bn4 = nn.LayerNorm([512], elementwise_affine=False)
        self.bn5 = nn.LayerNorm([256], elementwise_affine=False)

    def forward(self, x):  # (T,k,1)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = torch.max(x, 2, keepdim=True)[0].view(-1, 1024)  # over the single point
        x = F.relu(self.bn4(self.fc1(x)))
        x = F.relu(self.bn5(self.fc2(x)))
        return self.fc3(x).view(-1, self.k, self.k)


class ReleaseLabelEncoder(nn.Module):
    def __init__(self, k, out=C):
        super().__init__()
        self.stn_desc, self.stn_feat = ReleaseSTN(k), ReleaseSTN(64)
        self.conv1, self.conv2, self.conv3 = nn.Conv1d(k, 64, 1), nn.Conv1d(64, 128, 1), nn.Conv1d(128, 1024, 1)
        self.conv4 = nn.Conv1d(1088, out, 1)
        self.bn1, self.bn2, self.bn3, self.bn4 = _ln1(64), _ln1(128), _ln1(1024), _ln1(out)

    def forward(self, descs):
        counts = [d.shape[0] for d in descs]
        x = torch.cat(descs)[:, :, None]  # (T,k,1)
        x = torch.bmm(x.permute(0, 2, 1), self.stn_desc(x)).permute(0, 2, 1)
        x = F.relu(self.bn1(self.conv1(x)))
        local = torch.bmm(x.permute(0, 2, 1), self.stn_feat(x)).permute(0, 2, 1)
        x = F.relu(self.bn2(self.conv2(local)))
        x = F.relu(self.bn3(self.conv3(x)))
        glob = [part.max(dim=0)[0] for part in x.split(counts)]  # per image, over its objects
        spread = torch.cat([g[None].repeat(n, 1, 1) for g, n in zip(glob, counts)])
        x = F.relu(self.bn4(self.conv4(torch.cat([local, spread], 1))))
        return x[:, :, 0]


class ReleaseTeacher(nn.Module):
    """``DynamicTeacher`` with INTERACT_PATTERN 'stuGuided' on one (H, W) padded batch."""

    def __init__(self, add_context_box, reduce="mean", context_for_empty=False):
        super().__init__()
        self.add_context_box, self.reduce, self.context_for_empty = add_context_box, reduce, context_for_empty
        self.label_encoder = ReleaseLabelEncoder(4 + NCLS)
        self.canoni_proj_1D = nn.Sequential(nn.Linear(C, C), nn.LayerNorm([C], elementwise_affine=False), nn.ReLU())
        self.student_proj_2D = nn.Sequential(nn.Conv2d(C, C, 3, 1, 1), nn.GroupNorm(1, C, affine=False), nn.ReLU())
        self.local_inst_proj_2D = nn.Conv2d(C, C, 3, 1, 1)
        self.global_ctx_proj_1D = nn.Linear(C, C)
        self.local_inst_proj_1D = nn.Linear(C, C)
        gn = (lambda: nn.GroupNorm(1, C, affine=False))
        self.refinement_module = nn.Sequential(nn.Conv2d(C, C, 3, 1, 1), gn(), nn.ReLU(), nn.Conv2d(C, C, 3, 1, 1),
                                               gn(), nn.ReLU(), nn.Conv2d(C, C, 3, 1, 1), gn())
        self.multi_head_attn = nn.MultiheadAttention(C, HEADS)

    def forward(self, feats, boxes, labels, img_hw, detach=False):
        descs, boxlists = release_descriptors(boxes, labels, *img_hw, NCLS, self.add_context_box,
                                              self.context_for_empty)
        counts = [len(b) for b in boxlists]
        canon = self.canoni_proj_1D(self.label_encoder(descs))[:, None]  # (T,1,C)
        feats = [f.detach() for f in feats] if detach else feats
        proj = [self.student_proj_2D(f) for f in feats]
        masks = [[release_inside_mask(b, img_hw, f.shape[-2:]) for b in boxlists] for f in proj]
        queries = []
        for f, level_masks in zip(proj, masks):  # aggregate_per_level
            rows = []
            for i, m in enumerate(level_masks):
                pooled = m @ f[i].flatten(1).T
                if self.reduce == "mean":
                    pooled = pooled / torch.maximum(m.sum(-1), torch.ones(()))[:, None]
                rows.append(pooled)
            queries.append(torch.cat(rows)[:, None])
        owner = torch.tensor([i for i, n in enumerate(counts) for _ in range(n)])
        attn_mask = owner[:, None] != owner[None, :]
        outs = [self.multi_head_attn(q, canon, canon, attn_mask=attn_mask)[0][:, 0] for q in queries]
        maps = []
        for out, level_masks, f in zip(outs, masks, proj):  # rendering
            per_img = out.split(counts)
            N, _, H, W = f.shape
            if self.add_context_box:
                inst = [self.local_inst_proj_1D(o[:-1]).T @ m[:-1] for o, m in zip(per_img, level_masks)]
                ctx = self.global_ctx_proj_1D(torch.stack([o[-1] for o in per_img]))
                x = self.local_inst_proj_2D(torch.stack(inst).reshape(N, C, H, W)) + ctx[:, :, None, None]
            else:
                inst = [self.local_inst_proj_1D(o).T @ m for o, m in zip(per_img, level_masks)]
                x = self.local_inst_proj_2D(torch.stack(inst).reshape(N, C, H, W))
            maps.append(self.refinement_module(F.relu(x)))
        return maps


def _conv1d(w):
    return w[:, :, None]


def copy_into_release(m, rel):
    """Loads kdops' LGDInstructiveKnowledge ``m`` into ReleaseTeacher ``rel``; returns the pairs
    (kdops parameter name, release parameter name) for gradient comparisons."""
    pairs = {}
    for ours, theirs in (("input_transform", "stn_desc"), ("feature_transform", "stn_feat")):
        names = ["conv1", "conv2", "conv3", "fc1", "fc2"]
        for i, name in enumerate(names):
            pairs[f"label_encoder.{ours}.layers.{i}"] = (f"label_encoder.{theirs}.{name}", i < 3)
        pairs[f"label_encoder.{ours}.out"] = (f"label_encoder.{theirs}.fc3", False)
    for ours, theirs in (("local", "conv1"), ("point1", "conv2"), ("point2", "conv3"), ("fuse", "conv4")):
        pairs[f"label_encoder.{ours}"] = (f"label_encoder.{theirs}", True)
    simple = {"label_proj.0": "canoni_proj_1D.0", "appearance.0": "student_proj_2D.0",
              "inst_proj": "local_inst_proj_1D",
              "inst_conv": "local_inst_proj_2D", "context_proj": "global_ctx_proj_1D"}
    simple.update({f"refine.{i}": f"refinement_module.{i}" for i in (0, 3, 6)})
    pairs.update({k: (v, False) for k, v in simple.items()})
    ours_sd, theirs_sd = m.state_dict(), rel.state_dict()
    names = []
    for prefix, (target, is_conv1d) in pairs.items():
        for leaf in ("weight", "bias"):
            key = f"{prefix}.{leaf}"
            if key not in ours_sd:
                continue
            value = ours_sd[key]
            theirs_sd[f"{target}.{leaf}"] = _conv1d(value) if is_conv1d and leaf == "weight" else value
            names.append((key, f"{target}.{leaf}"))
    for leaf in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
        theirs_sd[f"multi_head_attn.{leaf}"] = ours_sd[f"relation.{leaf}"]
        names.append((f"relation.{leaf}", f"multi_head_attn.{leaf}"))
    rel.load_state_dict(theirs_sd)
    covered = {a for a, _ in names}
    assert covered == {k for k, _ in m.named_parameters()}, "the mapping misses parameters"
    return names


def release_of(m, **kw):
    rel = ReleaseTeacher(m.add_context_box, **kw).double()
    return rel, copy_into_release(m, rel)


def run_both(m, rel, feats, boxes, labels, detach=False, **kw):
    fa = [f.clone().requires_grad_() for f in feats]
    fb = [f.clone().requires_grad_() for f in feats]
    ours = m(fa, *flat(boxes, labels), IMG, **kw)
    theirs = rel(fb, boxes, labels, IMG, detach=detach)
    return ours, theirs, fa, fb


# ----------------------------------------------------------------------------- the lgd box rule
@pytest.mark.parametrize("img,sizes", [(IMG, SIZES), ((40, 56), [(5, 7), (3, 4)])])
def test_lgd_rule_pool_and_paint_match_the_release_masks(img, sizes):
    """box_pool(rule="lgd", reduce="mean") = the release's masked mean (max(count, 1)) and
    box_paint(rule="lgd") = its mask-weighted painting, with boxes on the map's edges, outside
    the image, of zero width/height and covering all of it."""
    H, W = img
    boxes = torch.tensor([[0.0, 0.0, W - 1, H - 1], [0.0, 0.0, 1.0, 1.0], [W - 8.0, H - 8.0, W - 1.0, H - 1.0],
                          [W - 1.0, 0.0, W - 1.0, H - 1.0], [16.0, 8.0, 32.0, 8.0], [8.0, 8.0, 8.0, 8.0],
                          [4.0, 2.0, 24.0, 16.0], [0.0, 16.0, 8.0, 24.0]], dtype=F64)
    index = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0])
    feats = fpn(N=2, sizes=sizes, channels=3, seed=3)
    strides = [H / h for h, _ in sizes]
    pooled = kdops.box_pool(feats, boxes, index, strides, rule="lgd", image_size=img, reduce="mean")
    values = torch.randn(len(sizes), boxes.shape[0], 3, dtype=F64)
    painted = kdops.box_paint(values, boxes, index, [(2, h, w) for h, w in sizes], strides, rule="lgd",
                              image_size=img)
    for lvl, (f, (h, w)) in enumerate(zip(feats, sizes)):
        mask = release_inside_mask(boxes, img, (h, w))  # (K, h*w)
        flat_f = f.flatten(2)[index]  # (K,C,h*w)
        want = (flat_f * mask[:, None]).sum(-1) / mask.sum(-1).clamp(min=1)[:, None]
        torch.testing.assert_close(pooled[lvl], want, rtol=1e-12, atol=1e-12)
        want_paint = torch.zeros(2, 3, h * w, dtype=F64)
        want_paint.index_add_(0, index, values[lvl][:, :, None] * mask[:, None])
        torch.testing.assert_close(painted[lvl], want_paint.view(2, 3, h, w), rtol=1e-12, atol=1e-12)
    assert (release_inside_mask(boxes[4:6], img, sizes[0]).sum() == 0).item()  # zero size: nothing


# ----------------------------------------------------------------------------- label encoder
@pytest.mark.parametrize("add_context_box", [True, False])
@pytest.mark.parametrize("empty", ["dummy", "context"])
def test_descriptors_match_the_release(add_context_box, empty):
    boxes, labels = gt_lists()
    b, lab, idx = flat(boxes, labels)
    obj, desc, index, is_ctx = lgd_descriptors(b, lab, idx, 3, IMG, NCLS, add_context_box=add_context_box,
                                               empty_image_object=empty)
    want_desc, want_boxes = release_descriptors(boxes, labels, *IMG, NCLS, add_context_box, empty == "context")
    for n in range(3):
        rows = index == n
        torch.testing.assert_close(desc[rows].to(F64), want_desc[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(obj[rows].to(F64), want_boxes[n], rtol=0, atol=0)
        ctx_rows = is_ctx[rows]
        if add_context_box:  # exactly one context-role object per image, its last one
            assert ctx_rows.tolist() == [False] * (int(rows.sum()) - 1) + [True]
        else:
            assert not ctx_rows.any()
    assert (index >= 0).all() and (index <= 3).all()  # 3: the padding image of unused slots


def test_label_encoder_matches_the_release_pointnet():
    """Per-image max pooling with 3 images of 4, 1 and 2 objects: no mixing across images."""
    k = 4 + NCLS
    m = module()
    rel, _ = release_of(m)
    enc, rel = m.label_encoder, rel.label_encoder
    assert isinstance(enc, LGDLabelEncoder)
    descs = [torch.rand(n, k, dtype=F64) * 2 - 1 for n in (4, 1, 2)]
    index = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    torch.testing.assert_close(enc(torch.cat(descs), index, 3), rel(descs), rtol=1e-10, atol=1e-10)
    # objects of another image never reach this image's global feature
    moved = enc(torch.cat(descs), torch.tensor([0, 0, 0, 0, 1, 1, 1]), 3)
    assert not torch.allclose(moved[4], enc(torch.cat(descs), index, 3)[4])


# ----------------------------------------------------------------------------- the whole module
@pytest.mark.parametrize("add_context_box", [True, False])
def test_forward_and_gradients_match_the_release(add_context_box):
    """3 images with 4+context, no GT (the release's [0,0,1,1] stand-in) and 2+context objects; the
    relation adapter's cross-image mask, the per-image max pool and the rendering all in play."""
    m = module(add_context_box=add_context_box)
    rel, names = release_of(m)
    feats = fpn()
    boxes, labels = gt_lists()
    ours, theirs, fa, fb = run_both(m, rel, feats, boxes, labels)
    assert [o.shape for o in ours] == [f.shape for f in feats]
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, rtol=1e-9, atol=1e-9)
    weights = [torch.randn_like(o) for o in ours]
    sum((o * w).sum() for o, w in zip(ours, weights)).backward()
    sum((t * w).sum() for t, w in zip(theirs, weights)).backward()
    for a, b in zip(fa, fb):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-9)
    ours_p, theirs_p = dict(m.named_parameters()), dict(rel.named_parameters())
    for a, b in names:
        ga, gb = ours_p[a].grad, theirs_p[b].grad
        torch.testing.assert_close(ga, gb.reshape(ga.shape), rtol=1e-7, atol=1e-9, msg=f"{a} vs {b}")


def test_forward_matches_the_release_with_sum_pooling_and_odd_map_sizes():
    """appearance_reduce="sum" (the paper's mask pooling) and maps whose size is not image/stride
    (r = map size / padded image size, as the release); random fractional boxes."""
    sizes = [(9, 13), (5, 7)]
    m = module(appearance_reduce="sum")
    rel, _ = release_of(m, reduce="sum")
    g = torch.Generator().manual_seed(5)
    boxes, labels = [], []
    for n in (3, 2):
        xy = torch.rand(n, 2, generator=g, dtype=F64) * torch.tensor([80.0, 50.0], dtype=F64)
        wh = torch.rand(n, 2, generator=g, dtype=F64) * 40 + 1
        boxes.append(torch.cat([xy, xy + wh], 1))
        labels.append(torch.randint(0, NCLS, (n,), generator=g))
    feats = fpn(N=2, sizes=sizes, seed=7)
    ours, theirs, _, _ = run_both(m, rel, feats, boxes, labels, strides=[7.1, 13.7])
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, rtol=1e-9, atol=1e-9)


def test_context_for_images_without_gt_option_matches_its_oracle():
    m = module(empty_image_object="context")
    rel, _ = release_of(m, context_for_empty=True)
    boxes, labels = gt_lists()
    ours, theirs, _, _ = run_both(m, rel, fpn(), boxes, labels)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, rtol=1e-9, atol=1e-9)


def test_images_do_not_see_each_other():
    """Changing image 2's labels and boxes changes nothing in images 0 and 1 (attention mask,
    per-image global feature, painting)."""
    m = module()
    feats = fpn()
    boxes, labels = gt_lists()
    a = m(feats, *flat(boxes, labels), IMG)
    boxes[2] = boxes[2] + 3.0
    labels[2] = torch.tensor([0, 1])
    b = m(feats, *flat(boxes, labels), IMG)
    for x, y in zip(a, b):
        assert torch.equal(x[:2], y[:2])
        assert not torch.allclose(x[2], y[2])


@pytest.mark.parametrize("detach", [True, False])
def test_detach_appearance(detach):
    """detach_appearance (DETACH_APPEARANCE_EMBED): the student's maps get no gradient through the
    instructive features (the projection conv still trains); the values are unchanged."""
    m = module(detach_appearance=detach)
    rel, _ = release_of(m)
    boxes, labels = gt_lists()
    ours, theirs, fa, _ = run_both(m, rel, fpn(), boxes, labels, detach=detach)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, rtol=1e-9, atol=1e-9)
    sum(o.sum() for o in ours).backward()
    assert all((f.grad is None) == detach for f in fa)
    assert m.appearance[0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- edge cases
def test_no_gt_at_all_is_finite_and_matches_the_release():
    m = module()
    rel, _ = release_of(m)
    empty = [torch.zeros(0, 4, dtype=F64)] * 2
    no_labels = [torch.zeros(0, dtype=torch.int64)] * 2
    ours, theirs, fa, _ = run_both(m, rel, fpn(N=2), empty, no_labels)
    for o, t in zip(ours, theirs):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o, t, rtol=1e-9, atol=1e-9)


def test_empty_k_without_context_gives_exact_zeros():
    """K = 0, no context boxes and no stand-in object: nothing to instruct with -> exact zero maps,
    and zero (not missing) gradients for every parameter; an image without objects next to one
    with objects gets zeros too, the other image the normal result."""
    m = module(add_context_box=False, empty_image_object="context")
    feats = [f.requires_grad_() for f in fpn(N=2)]
    out = m(feats, torch.zeros(0, 4, dtype=F64), torch.zeros(0, dtype=torch.int64),
            torch.zeros(0, dtype=torch.int64), IMG)
    assert all(torch.equal(o, torch.zeros_like(o)) for o in out)
    sum(o.sum() for o in out).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p.grad)), name
    boxes, labels = gt_lists()
    out = m(fpn(), *flat(boxes, labels), IMG)
    assert all(torch.equal(o[1], torch.zeros_like(o[1])) and o[0].abs().sum() > 0 for o in out)


def test_broken_boxes_are_isolated():
    """A NaN box, an inverted one and one with an out-of-range image index cover nothing and reach
    no real image: the result equals the one without them (and strict_boxes raises)."""
    m = module()
    boxes, labels = gt_lists()
    b, lab, idx = flat(boxes, labels)
    bad = torch.tensor([[math.nan, 0.0, 8.0, 8.0], [30.0, 30.0, 10.0, 10.0], [0.0, 0.0, 16.0, 16.0]], dtype=F64)
    b2 = torch.cat([b[:2], bad, b[2:]])
    lab2 = torch.cat([lab[:2], torch.tensor([1, 2, 3]), lab[2:]])
    idx2 = torch.cat([idx[:2], torch.tensor([0, 2, 7]), idx[2:]])
    feats = fpn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = m(feats, b2, lab2, idx2, IMG)
    want = m(feats, b, lab, idx, IMG)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    strict = m
    strict.strict_boxes = True
    with pytest.raises(ValueError, match="check_boxes"):
        strict(feats, b2, lab2, idx2, IMG)


def test_strides_are_checked_and_do_not_change_the_result():
    m = module()
    boxes, labels = gt_lists()
    feats = fpn()
    a = m(feats, *flat(boxes, labels), IMG)
    b = m(feats, *flat(boxes, labels), IMG, strides=STRIDES)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="strides"):
        m(feats, *flat(boxes, labels), IMG, strides=[8, 16])


def test_float32_runs_and_keeps_its_dtype():
    m = LGDInstructiveKnowledge(NCLS, channels=C, num_heads=HEADS)
    boxes, labels = gt_lists()
    b, lab, idx = flat(boxes, labels)
    out = m(fpn(dtype=torch.float32), b.float(), lab, idx, IMG, strides=STRIDES)
    assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in out)


# ----------------------------------------------------------------------------- bad inputs
def _call(**replace):
    boxes, labels = gt_lists()
    b, lab, idx = flat(boxes, labels)
    args = dict(features=fpn(), boxes=b, labels=lab, batch_index=idx, image_size=IMG)
    args.update(replace)
    return module()(**args)


@pytest.mark.parametrize("arg,value,exc", [
    ("features", torch.zeros(3, C, 8, 12, dtype=F64), TypeError),
    ("features", [], TypeError),
    ("features", fpn(channels=8), ValueError),
    ("features", [fpn()[0], fpn(N=2)[1]], ValueError),
    ("features", [fpn()[0], fpn()[1].float()], TypeError),
    ("boxes", torch.zeros(6, 3, dtype=F64), ValueError),
    ("boxes", torch.zeros(6, 4, dtype=torch.int64), TypeError),
    ("labels", torch.zeros(6, dtype=torch.int32), TypeError),
    ("labels", torch.zeros(5, dtype=torch.int64), ValueError),
    ("labels", torch.tensor([0, 1, 2, 3, 4, NCLS]), ValueError),
    ("labels", torch.tensor([0, 1, 2, -1, 4, 0]), ValueError),
    ("batch_index", torch.zeros(6, dtype=torch.float64), TypeError),
    ("batch_index", torch.zeros(7, dtype=torch.int64), ValueError),
    ("image_size", (64.0, 96), ValueError),
    ("image_size", (64,), ValueError),
    ("strides", [8, 16, "32"], ValueError),
])
def test_bad_forward_argument_is_refused_naming_it(arg, value, exc):
    with pytest.raises(exc, match=f"`{arg}"):
        _call(**{arg: value})


@pytest.mark.parametrize("kw,exc,name", [
    (dict(num_classes=0), ValueError, "num_classes"),
    (dict(num_classes=2.0), TypeError, "num_classes"),
    (dict(channels=10, num_heads=4), ValueError, "num_heads"),
    (dict(add_context_box=1), TypeError, "add_context_box"),
    (dict(detach_appearance="no"), TypeError, "detach_appearance"),
    (dict(empty_image_object="none"), ValueError, "empty_image_object"),
    (dict(appearance_reduce="max"), ValueError, "appearance_reduce"),
])
def test_bad_constructor_argument_is_refused_naming_it(kw, exc, name):
    args = dict(num_classes=NCLS, channels=C, num_heads=HEADS)
    args.update(kw)
    with pytest.raises(exc, match=f"`{name}`"):
        LGDInstructiveKnowledge(**args)
