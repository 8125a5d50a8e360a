"""Every public loss and module checks its arguments (constructor and forward) before any work:
TypeError for a wrong kind, ValueError for a wrong value, naming the class and the argument.
And empty inputs (an empty level, an empty batch) give exact zeros with zero gradients."""
import importlib
import math

import pytest
import torch

from kdops.losses import BCKDLoss, FeatureMimicLoss, PKDLoss, fgd_attention
from kdops.nn import MSDeformAttn

F64 = torch.float64
NAN, INF = math.nan, math.inf


# ----------------------------------------------------------------------------- inputs
def fpn(sizes=((6, 8), (3, 4)), N=2, C=3, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, C, h, w, generator=g, dtype=dtype) for h, w in sizes]


S2, T2 = fpn(seed=0), fpn(seed=1)  # two levels, N=2, C=3
S1, T1 = S2[0], T2[0]  # a single level (2,3,6,8)
MASK1 = torch.rand(2, 6, 8, dtype=F64)
MASKS2 = [torch.rand(2, 6, 8, dtype=F64), torch.rand(2, 3, 4, dtype=F64)]
BOXES = torch.tensor([[0.0, 0.0, 20.0, 16.0], [8.0, 4.0, 30.0, 40.0]], dtype=F64)
BI = torch.tensor([0, 1])
FGD = dict(strides=[8, 16])


def fm_boxes(*masks, loss_kw=FGD, **kw):
    """FeatureMimicLoss(**loss_kw)(S2, T2, *masks, boxes=BOXES, batch_index=BI, **kw)."""
    return FeatureMimicLoss(**loss_kw)(S2, T2, *masks, **{"boxes": BOXES, "batch_index": BI, **kw})


def bckd_inputs(sizes=((4, 5), (2, 3)), N=2, K=3, R=4, seed=0):
    """GFL head outputs (N,K,H,W), (N,4(R+1),H,W) and per-level points (H*W,2), like LDHead."""
    g = torch.Generator().manual_seed(seed)
    cs = [torch.randn(N, K, h, w, generator=g, dtype=F64) for h, w in sizes]
    ct = [torch.randn(N, K, h, w, generator=g, dtype=F64) for h, w in sizes]
    rs = [torch.randn(N, 4 * (R + 1), h, w, generator=g, dtype=F64) for h, w in sizes]
    rt = [torch.randn(N, 4 * (R + 1), h, w, generator=g, dtype=F64) for h, w in sizes]
    pr = []
    for (h, w), s in zip(sizes, (8, 16)):
        yy, xx = torch.meshgrid(torch.arange(h, dtype=F64) * s, torch.arange(w, dtype=F64) * s, indexing="ij")
        pr.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1))
    return cs, ct, rs, rt, pr


B = bckd_inputs()
BCKD = dict(reg_max=4, strides=[8, 16])


def bckd(*replace, **kw):
    """BCKDLoss(**BCKD)(*B) with positional arguments replaced: bckd((index, value), ...)."""
    args = list(B)
    for i, v in replace:
        args[i] = v
    return BCKDLoss(**BCKD)(*args, **kw)


LEVELS = [(6, 9), (3, 5), (2, 3), (1, 2)]


def msda_inputs(bs=3, nq=7, C=16):
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor(LEVELS)
    sizes = shapes[:, 0] * shapes[:, 1]
    S = int(sizes.sum())
    return dict(query=torch.randn(nq, bs, C, generator=g), value=torch.randn(S, bs, C, generator=g),
                query_pos=torch.randn(nq, bs, C, generator=g), reference_points=torch.rand(bs, nq, 4, 2, generator=g),
                spatial_shapes=shapes, level_start_index=torch.cumsum(sizes, 0) - sizes,
                key_padding_mask=torch.zeros(bs, S, dtype=torch.bool))


X = msda_inputs()


def msda(**replace):
    m = MSDeformAttn(embed_dims=16, num_heads=2, num_levels=4, num_points=2, dropout=0.0)
    return m(**{**X, **replace})


# ----------------------------------------------------------------------------- bad arguments
# (owner in the message, argument named in it, exception type, call)
P = pytest.param
CASES = [
    # PKDLoss: constructor
    P("PKDLoss", "loss_weight", TypeError, lambda: PKDLoss(loss_weight="1"), id="pkd-weight-str"),
    P("PKDLoss", "loss_weight", TypeError, lambda: PKDLoss(loss_weight=True), id="pkd-weight-bool"),
    P("PKDLoss", "loss_weight", TypeError, lambda: PKDLoss(loss_weight=None), id="pkd-weight-none"),
    P("PKDLoss", "loss_weight", ValueError, lambda: PKDLoss(loss_weight=NAN), id="pkd-weight-nan"),
    P("PKDLoss", "loss_weight", ValueError, lambda: PKDLoss(loss_weight=INF), id="pkd-weight-inf"),
    P("PKDLoss", "loss_weight", ValueError, lambda: PKDLoss(loss_weight=-1.0), id="pkd-weight-negative"),
    P("PKDLoss", "resize_stu", TypeError, lambda: PKDLoss(resize_stu=1), id="pkd-resize-int"),
    P("PKDLoss", "resize_stu", TypeError, lambda: PKDLoss(resize_stu="no"), id="pkd-resize-str"),
    # PKDLoss: forward
    P("PKDLoss", "preds_T", ValueError, lambda: PKDLoss()(S2, T1), id="pkd-list-tensor-swap"),
    P("PKDLoss", "preds_T", ValueError, lambda: PKDLoss()(S1, T2), id="pkd-tensor-list-swap"),
    P("PKDLoss", "preds_T", ValueError, lambda: PKDLoss()(S2, T2[:1]), id="pkd-level-count"),
    P("PKDLoss", "preds_S", ValueError, lambda: PKDLoss()([], []), id="pkd-empty-sequence"),
    P("PKDLoss", "preds_S", TypeError, lambda: PKDLoss()(None, T1), id="pkd-student-none"),
    P("PKDLoss", "preds_S", TypeError, lambda: PKDLoss()({"p3": S1}, T1), id="pkd-student-dict"),
    P("PKDLoss", "preds_S[1]", TypeError, lambda: PKDLoss()([S1, 1.0], T2), id="pkd-level-not-tensor"),
    P("PKDLoss", "preds_S", ValueError, lambda: PKDLoss()(S1[0], T1[0]), id="pkd-3d"),
    P("PKDLoss", "preds_T[1]", ValueError, lambda: PKDLoss()(S2, [T2[0], T2[1][..., 0]]), id="pkd-3d-level"),
    P("PKDLoss", "preds_S", TypeError, lambda: PKDLoss()(S1.long(), T1.long()), id="pkd-int-dtype"),
    P("PKDLoss", "preds_T", TypeError, lambda: PKDLoss()(S1, T1.float()), id="pkd-dtype-mismatch"),
    P("PKDLoss", "preds_T", ValueError, lambda: PKDLoss()(S1, T1[:, :2]), id="pkd-channel-mismatch"),
    P("PKDLoss", "preds_T[0]", ValueError, lambda: PKDLoss()(S2, [T2[0][:1], T2[1]]), id="pkd-batch-mismatch"),
    # FeatureMimicLoss: constructor
    P("FeatureMimicLoss", "fg_weight", TypeError, lambda: FeatureMimicLoss(fg_weight="1"), id="fm-fg-str"),
    P("FeatureMimicLoss", "fg_weight", TypeError, lambda: FeatureMimicLoss(fg_weight=True), id="fm-fg-bool"),
    P("FeatureMimicLoss", "fg_weight", ValueError, lambda: FeatureMimicLoss(fg_weight=NAN), id="fm-fg-nan"),
    P("FeatureMimicLoss", "fg_weight", ValueError, lambda: FeatureMimicLoss(fg_weight=-1e-3), id="fm-fg-negative"),
    P("FeatureMimicLoss", "bg_weight", ValueError, lambda: FeatureMimicLoss(bg_weight=INF), id="fm-bg-inf"),
    P("FeatureMimicLoss", "bg_weight", TypeError, lambda: FeatureMimicLoss(bg_weight=None), id="fm-bg-none"),
    P("FeatureMimicLoss", "attention", TypeError, lambda: FeatureMimicLoss(attention=1), id="fm-attention-int"),
    P("FeatureMimicLoss", "temperature", ValueError, lambda: FeatureMimicLoss(temperature=0.0), id="fm-temp-zero"),
    P("FeatureMimicLoss", "temperature", ValueError, lambda: FeatureMimicLoss(temperature=-0.5), id="fm-temp-neg"),
    P("FeatureMimicLoss", "temperature", ValueError, lambda: FeatureMimicLoss(temperature=NAN), id="fm-temp-nan"),
    P("FeatureMimicLoss", "temperature", TypeError, lambda: FeatureMimicLoss(temperature=True), id="fm-temp-bool"),
    P("FeatureMimicLoss", "normalize", ValueError, lambda: FeatureMimicLoss(normalize="mean"), id="fm-normalize"),
    P("FeatureMimicLoss", "normalize", ValueError, lambda: FeatureMimicLoss(normalize=None), id="fm-normalize-none"),
    P("FeatureMimicLoss", "loss_weight", ValueError, lambda: FeatureMimicLoss(loss_weight=-2), id="fm-weight-neg"),
    P("FeatureMimicLoss", "loss_weight", ValueError, lambda: FeatureMimicLoss(loss_weight=INF), id="fm-weight-inf"),
    P("FeatureMimicLoss", "strides", TypeError, lambda: FeatureMimicLoss(strides="8"), id="fm-strides-str"),
    P("FeatureMimicLoss", "strides", TypeError, lambda: FeatureMimicLoss(strides=True), id="fm-strides-bool"),
    P("FeatureMimicLoss", "strides", ValueError, lambda: FeatureMimicLoss(strides=[]), id="fm-strides-empty"),
    P("FeatureMimicLoss", "strides", ValueError, lambda: FeatureMimicLoss(strides=-8), id="fm-strides-neg"),
    P("FeatureMimicLoss", "strides[1]", ValueError, lambda: FeatureMimicLoss(strides=[8, 0]), id="fm-strides-zero"),
    P("FeatureMimicLoss", "strides[1]", ValueError, lambda: FeatureMimicLoss(strides=[8, INF]), id="fm-strides-inf"),
    P("FeatureMimicLoss", "strides[1]", TypeError, lambda: FeatureMimicLoss(strides=(8, True)),
      id="fm-strides-bool-item"),
    P("FeatureMimicLoss", "mask_mode", ValueError, lambda: FeatureMimicLoss(mask_mode="soft"), id="fm-mask-mode"),
    P("FeatureMimicLoss", "mask_rule", ValueError, lambda: FeatureMimicLoss(mask_rule="corner"), id="fm-mask-rule"),
    # FeatureMimicLoss: forward
    P("FeatureMimicLoss", "teacher", ValueError, lambda: FeatureMimicLoss()(S2, T1), id="fm-list-tensor-swap"),
    P("FeatureMimicLoss", "teacher", ValueError, lambda: FeatureMimicLoss()(S1, T2), id="fm-tensor-list-swap"),
    P("FeatureMimicLoss", "teacher", ValueError, lambda: FeatureMimicLoss()(S2, T2[:1]), id="fm-level-count"),
    P("FeatureMimicLoss", "student", ValueError, lambda: FeatureMimicLoss()((), ()), id="fm-empty-sequence"),
    P("FeatureMimicLoss", "student", TypeError, lambda: FeatureMimicLoss()("s", T1), id="fm-student-str"),
    P("FeatureMimicLoss", "student", ValueError, lambda: FeatureMimicLoss()(S1[0], T1[0]), id="fm-3d"),
    P("FeatureMimicLoss", "teacher[1]", ValueError, lambda: FeatureMimicLoss()(S2, [T2[0], T2[0]]), id="fm-shape"),
    P("FeatureMimicLoss", "teacher", TypeError, lambda: FeatureMimicLoss()(S1, T1.float()), id="fm-dtype-mismatch"),
    P("FeatureMimicLoss", "fg_mask", ValueError, lambda: FeatureMimicLoss()(S1, T1, MASK1[:, :5]), id="fm-mask-shape"),
    P("FeatureMimicLoss", "fg_mask", ValueError, lambda: FeatureMimicLoss()(S1, T1, MASK1[:, None]), id="fm-mask-4d"),
    P("FeatureMimicLoss", "fg_mask", ValueError, lambda: FeatureMimicLoss()(S1, T1, MASK1[:1]), id="fm-mask-batch"),
    P("FeatureMimicLoss", "fg_mask", TypeError, lambda: FeatureMimicLoss()(S1, T1, MASK1.long()), id="fm-mask-int"),
    P("FeatureMimicLoss", "fg_mask", TypeError, lambda: FeatureMimicLoss()(S1, T1, [MASK1]), id="fm-mask-list-single"),
    P("FeatureMimicLoss", "fg_mask", ValueError, lambda: FeatureMimicLoss()(S2, T2, MASKS2[:1]), id="fm-mask-count"),
    P("FeatureMimicLoss", "fg_mask[1]", ValueError, lambda: FeatureMimicLoss()(S2, T2, [MASKS2[0], MASKS2[0]]),
      id="fm-mask-level-shape"),
    P("FeatureMimicLoss", "bg_mask", ValueError, lambda: FeatureMimicLoss()(S1, T1, None, MASK1), id="fm-bg-alone"),
    P("FeatureMimicLoss", "bg_mask[1]", ValueError, lambda: FeatureMimicLoss()(S2, T2, MASKS2, [MASKS2[0]] * 2),
      id="fm-bg-level-shape"),
    P("FeatureMimicLoss", "strides", ValueError, lambda: fm_boxes(loss_kw=dict(strides=8)),
      id="fm-one-stride-two-levels"),
    P("FeatureMimicLoss", "strides", ValueError, lambda: fm_boxes(loss_kw=dict(strides=[8])),
      id="fm-stride-count-short"),
    P("FeatureMimicLoss", "strides", ValueError,
      lambda: fm_boxes(loss_kw=dict(strides=[8, 16, 32])), id="fm-stride-count-long"),
    P("FeatureMimicLoss", "strides", ValueError, lambda: fm_boxes(loss_kw={}),
      id="fm-boxes-no-strides"),
    P("FeatureMimicLoss", "boxes", ValueError, lambda: fm_boxes(MASKS2),
      id="fm-boxes-and-masks"),
    P("FeatureMimicLoss", "boxes", ValueError, lambda: fm_boxes(boxes=BOXES[:, :3]),
      id="fm-boxes-k3"),
    P("FeatureMimicLoss", "boxes", ValueError, lambda: fm_boxes(boxes=BOXES[0]),
      id="fm-boxes-1d"),
    P("FeatureMimicLoss", "boxes", TypeError, lambda: fm_boxes(boxes=BOXES.long()),
      id="fm-boxes-int"),
    P("FeatureMimicLoss", "boxes", TypeError, lambda: fm_boxes(boxes=[[0, 0, 8, 8]]),
      id="fm-boxes-list"),
    P("FeatureMimicLoss", "batch_index", ValueError, lambda: fm_boxes(batch_index=None),
      id="fm-no-batch-index"),
    P("FeatureMimicLoss", "batch_index", TypeError,
      lambda: fm_boxes(batch_index=BI.int()), id="fm-batch-index-int32"),
    P("FeatureMimicLoss", "batch_index", TypeError,
      lambda: fm_boxes(batch_index=BI.double()), id="fm-batch-index-float"),
    P("FeatureMimicLoss", "batch_index", ValueError,
      lambda: fm_boxes(batch_index=torch.tensor([0, 1, 1])), id="fm-batch-index-K"),
    P("FeatureMimicLoss", "batch_index", ValueError,
      lambda: fm_boxes(batch_index=BI[:, None]), id="fm-batch-index-2d"),
    P("FeatureMimicLoss", "image_size", ValueError,
      lambda: fm_boxes(image_size=(800,)), id="fm-image-size-1"),
    P("FeatureMimicLoss", "image_size[0]", ValueError,
      lambda: fm_boxes(image_size=(0, 64)), id="fm-image-size-0"),
    P("FeatureMimicLoss", "image_size[1]", ValueError,
      lambda: fm_boxes(image_size=(48, NAN)), id="fm-image-size-nan"),
    P("FeatureMimicLoss", "image_size", TypeError,
      lambda: fm_boxes(image_size="48x64"), id="fm-image-size-str"),
    P("FeatureMimicLoss", "image_size", ValueError,
      lambda: fm_boxes(image_size=torch.ones(2, 3)),
      id="fm-image-size-tensor-shape"),
    P("FeatureMimicLoss", "batch_index", ValueError, lambda: FeatureMimicLoss()(S1, T1, batch_index=BI),
      id="fm-batch-index-without-boxes"),
    P("FeatureMimicLoss", "image_size", ValueError, lambda: FeatureMimicLoss()(S1, T1, image_size=(48, 64)),
      id="fm-image-size-without-boxes"),
    # fgd_attention
    P("fgd_attention", "feat", ValueError, lambda: fgd_attention(T1[0]), id="att-3d"),
    P("fgd_attention", "feat", TypeError, lambda: fgd_attention(T2), id="att-list"),
    P("fgd_attention", "temperature", ValueError, lambda: fgd_attention(T1, 0.0), id="att-temp-zero"),
    P("fgd_attention", "temperature", TypeError, lambda: fgd_attention(T1, "0.5"), id="att-temp-str"),
    # BCKDLoss: constructor
    P("BCKDLoss", "alpha_cls", ValueError, lambda: BCKDLoss(alpha_cls=-1.0), id="bckd-alpha-cls-neg"),
    P("BCKDLoss", "alpha_cls", TypeError, lambda: BCKDLoss(alpha_cls=True), id="bckd-alpha-cls-bool"),
    P("BCKDLoss", "alpha_loc", ValueError, lambda: BCKDLoss(alpha_loc=NAN), id="bckd-alpha-loc-nan"),
    P("BCKDLoss", "alpha_loc", TypeError, lambda: BCKDLoss(alpha_loc="4"), id="bckd-alpha-loc-str"),
    P("BCKDLoss", "beta", ValueError, lambda: BCKDLoss(beta=0.0), id="bckd-beta-zero"),
    P("BCKDLoss", "beta", ValueError, lambda: BCKDLoss(beta=INF), id="bckd-beta-inf"),
    P("BCKDLoss", "beta", TypeError, lambda: BCKDLoss(beta=None), id="bckd-beta-none"),
    P("BCKDLoss", "decoder", ValueError, lambda: BCKDLoss(decoder="yolo"), id="bckd-decoder"),
    P("BCKDLoss", "loss", ValueError, lambda: BCKDLoss(loss="l1"), id="bckd-loss"),
    P("BCKDLoss", "reg_max", ValueError, lambda: BCKDLoss(reg_max=-1), id="bckd-reg-max-neg"),
    P("BCKDLoss", "reg_max", TypeError, lambda: BCKDLoss(reg_max=4.0), id="bckd-reg-max-float"),
    P("BCKDLoss", "reg_max", TypeError, lambda: BCKDLoss(reg_max=True), id="bckd-reg-max-bool"),
    P("BCKDLoss", "strides", TypeError, lambda: BCKDLoss(strides="8"), id="bckd-strides-str"),
    P("BCKDLoss", "strides", ValueError, lambda: BCKDLoss(strides=()), id="bckd-strides-empty"),
    P("BCKDLoss", "strides[1]", ValueError, lambda: BCKDLoss(strides=(8, -16)), id="bckd-strides-neg"),
    P("BCKDLoss", "strides", ValueError, lambda: BCKDLoss(strides=None), id="bckd-gfl-needs-strides"),
    P("BCKDLoss", "strides", ValueError, lambda: BCKDLoss(strides=torch.ones(2, 2)), id="bckd-strides-2d-tensor"),
    P("BCKDLoss", "means", ValueError, lambda: BCKDLoss(means=(0.0, 0.0, 0.0)), id="bckd-means-3"),
    P("BCKDLoss", "means", TypeError, lambda: BCKDLoss(means=0.0), id="bckd-means-number"),
    P("BCKDLoss", "means[3]", ValueError, lambda: BCKDLoss(means=(0.0, 0.0, 0.0, NAN)), id="bckd-means-nan"),
    P("BCKDLoss", "stds[3]", ValueError, lambda: BCKDLoss(stds=(1.0, 1.0, 1.0, 0.0)), id="bckd-stds-zero"),
    P("BCKDLoss", "stds", ValueError, lambda: BCKDLoss(stds=(1.0,) * 5), id="bckd-stds-5"),
    P("BCKDLoss", "wh_ratio_clip", ValueError, lambda: BCKDLoss(wh_ratio_clip=0.0), id="bckd-wh-zero"),
    P("BCKDLoss", "wh_ratio_clip", ValueError, lambda: BCKDLoss(wh_ratio_clip=2.0), id="bckd-wh-big"),
    P("BCKDLoss", "wh_ratio_clip", TypeError, lambda: BCKDLoss(wh_ratio_clip=None), id="bckd-wh-none"),
    # BCKDLoss: forward
    P("BCKDLoss", "teacher_logits", ValueError, lambda: bckd((1, B[1][0])), id="bckd-list-tensor-swap"),
    P("BCKDLoss", "teacher_logits", ValueError,
      lambda: BCKDLoss(**BCKD)(B[0][0], B[1], B[2][0], B[3][0], B[4][0]), id="bckd-tensor-list-swap"),
    P("BCKDLoss", "priors", ValueError, lambda: bckd((4, B[4][:1])), id="bckd-level-count"),
    P("BCKDLoss", "student_logits", ValueError, lambda: BCKDLoss(**BCKD)([], [], [], [], []), id="bckd-empty-seq"),
    P("BCKDLoss", "student_logits", TypeError, lambda: bckd((0, None)), id="bckd-logits-none"),
    P("BCKDLoss", "student_reg[0]", ValueError, lambda: bckd((2, [B[2][0][0], B[2][1]])), id="bckd-reg-3d"),
    P("BCKDLoss", "teacher_logits[1]", ValueError, lambda: bckd((1, [B[1][0], B[1][1][:1]])), id="bckd-teacher-shape"),
    P("BCKDLoss", "teacher_reg[0]", TypeError, lambda: bckd((3, [B[3][0].float(), B[3][1]])), id="bckd-teacher-dtype"),
    P("BCKDLoss", "priors[0]", ValueError, lambda: bckd((4, [B[4][0][None], B[4][1]])), id="bckd-priors-3d"),
    P("BCKDLoss", "student_logits[0]", TypeError, lambda: bckd((0, [B[0][0].long(), B[0][1]])), id="bckd-logits-int"),
    P("BCKDLoss", "weight", ValueError, lambda: bckd(weight=[torch.ones(40, dtype=F64)]), id="bckd-weight-count"),
    P("BCKDLoss", "weight[1]", TypeError, lambda: bckd(weight=[torch.ones(40, dtype=F64), torch.ones(12).long()]),
      id="bckd-weight-int"),
    P("bckd_loc_loss", "weight[0]", ValueError,  # the anchor arithmetic is the op's check
      lambda: bckd(weight=[torch.ones(41, dtype=F64), torch.ones(12, dtype=F64)]), id="bckd-weight-anchors"),
    P("BCKDLoss", "avg_factor", TypeError, lambda: bckd(avg_factor="7"), id="bckd-avg-str"),
    P("BCKDLoss", "avg_factor", TypeError, lambda: bckd(avg_factor=True), id="bckd-avg-bool"),
    P("BCKDLoss", "avg_factor", ValueError, lambda: bckd(avg_factor=NAN), id="bckd-avg-nan"),
    P("BCKDLoss", "avg_factor", ValueError, lambda: bckd(avg_factor=-1.0), id="bckd-avg-neg"),
    P("BCKDLoss", "avg_factor", ValueError, lambda: bckd(avg_factor=torch.ones(2)), id="bckd-avg-tensor-shape"),
    P("BCKDLoss", "strides", ValueError, lambda: BCKDLoss(reg_max=4, strides=[8])(*B), id="bckd-strides-short"),
    P("BCKDLoss", "strides", ValueError, lambda: BCKDLoss(reg_max=4, strides=torch.ones(52))(*B),
      id="bckd-tensor-strides-levels"),
    # MSDeformAttn: constructor
    P("MSDeformAttn", "num_heads", ValueError, lambda: MSDeformAttn(num_heads=0), id="msda-heads-zero"),
    P("MSDeformAttn", "num_heads", TypeError, lambda: MSDeformAttn(num_heads=True), id="msda-heads-bool"),
    P("MSDeformAttn", "num_heads", TypeError, lambda: MSDeformAttn(num_heads=8.0), id="msda-heads-float"),
    P("MSDeformAttn", "embed_dims", ValueError, lambda: MSDeformAttn(embed_dims=0), id="msda-dims-zero"),
    P("MSDeformAttn", "embed_dims", TypeError, lambda: MSDeformAttn(embed_dims="256"), id="msda-dims-str"),
    P("MSDeformAttn", "embed_dims", ValueError, lambda: MSDeformAttn(embed_dims=30, num_heads=8), id="msda-divisible"),
    P("MSDeformAttn", "num_levels", ValueError, lambda: MSDeformAttn(num_levels=0), id="msda-levels-zero"),
    P("MSDeformAttn", "num_points", ValueError, lambda: MSDeformAttn(num_points=-1), id="msda-points-neg"),
    P("MSDeformAttn", "im2col_step", ValueError, lambda: MSDeformAttn(im2col_step=0), id="msda-im2col-zero"),
    P("MSDeformAttn", "dropout", ValueError, lambda: MSDeformAttn(dropout=1.5), id="msda-dropout-big"),
    P("MSDeformAttn", "dropout", ValueError, lambda: MSDeformAttn(dropout=NAN), id="msda-dropout-nan"),
    P("MSDeformAttn", "dropout", TypeError, lambda: MSDeformAttn(dropout="0.1"), id="msda-dropout-str"),
    P("MSDeformAttn", "batch_first", TypeError, lambda: MSDeformAttn(batch_first=1), id="msda-batch-first-int"),
    P("MSDeformAttn", "value_proj_ratio", ValueError, lambda: MSDeformAttn(value_proj_ratio=0.0), id="msda-ratio-zero"),
    P("MSDeformAttn", "value_proj_ratio", ValueError, lambda: MSDeformAttn(value_proj_ratio=INF), id="msda-ratio-inf"),
    P("MSDeformAttn", "value_proj_ratio", ValueError,
      lambda: MSDeformAttn(embed_dims=32, num_heads=4, value_proj_ratio=0.3), id="msda-ratio-not-multiple"),
    P("MSDeformAttn", "norm_cfg", TypeError, lambda: MSDeformAttn(norm_cfg="LN"), id="msda-norm-cfg"),
    # MSDeformAttn: forward
    P("MSDeformAttn", "query", TypeError, lambda: msda(query=X["query"].tolist()), id="msda-query-list"),
    P("MSDeformAttn", "query", ValueError, lambda: msda(query=X["query"][0]), id="msda-query-2d"),
    P("MSDeformAttn", "query", ValueError, lambda: msda(query=X["query"][..., :8]), id="msda-query-dims"),
    P("MSDeformAttn", "query", TypeError, lambda: msda(query=X["query"].long()), id="msda-query-int"),
    P("MSDeformAttn", "value", ValueError, lambda: msda(value=X["value"][:, :2]), id="msda-value-batch"),
    P("MSDeformAttn", "value", ValueError, lambda: msda(value=X["value"][..., :8]), id="msda-value-dims"),
    P("MSDeformAttn", "value", ValueError, lambda: msda(value=X["value"][:-1]), id="msda-value-rows"),
    P("MSDeformAttn", "identity", ValueError, lambda: msda(identity=X["query"][:3]), id="msda-identity"),
    P("MSDeformAttn", "query_pos", ValueError, lambda: msda(query_pos=X["query_pos"][:, :2]), id="msda-query-pos"),
    P("MSDeformAttn", "key_padding_mask", TypeError, lambda: msda(key_padding_mask=X["key_padding_mask"].float()),
      id="msda-mask-float"),
    P("MSDeformAttn", "key_padding_mask", ValueError, lambda: msda(key_padding_mask=X["key_padding_mask"][:, 1:]),
      id="msda-mask-shape"),
    P("MSDeformAttn", "reference_points", ValueError, lambda: msda(reference_points=None), id="msda-ref-none"),
    P("MSDeformAttn", "reference_points", ValueError, lambda: msda(reference_points=X["reference_points"][0]),
      id="msda-ref-3d"),
    P("MSDeformAttn", "reference_points", ValueError, lambda: msda(reference_points=torch.rand(3, 7, 4, 3)),
      id="msda-ref-last-dim"),
    P("MSDeformAttn", "reference_points", ValueError, lambda: msda(reference_points=X["reference_points"][:, :, :3]),
      id="msda-ref-levels"),
    P("MSDeformAttn", "spatial_shapes", ValueError, lambda: msda(spatial_shapes=None), id="msda-shapes-none"),
    P("MSDeformAttn", "spatial_shapes", TypeError, lambda: msda(spatial_shapes=X["spatial_shapes"].int()),
      id="msda-shapes-int32"),
    P("MSDeformAttn", "spatial_shapes", TypeError, lambda: msda(spatial_shapes=LEVELS), id="msda-shapes-list"),
    P("MSDeformAttn", "spatial_shapes", ValueError, lambda: msda(spatial_shapes=X["spatial_shapes"][:3]),
      id="msda-shapes-levels"),
    P("MSDeformAttn", "level_start_index", ValueError, lambda: msda(level_start_index=X["level_start_index"][:, None]),
      id="msda-starts-2d"),
    P("MSDeformAttn", "level_start_index", TypeError, lambda: msda(level_start_index=X["level_start_index"].float()),
      id="msda-starts-float"),
]


@pytest.mark.parametrize("owner, arg, exc, call", CASES)
def test_bad_argument_is_refused_naming_it(owner, arg, exc, call):
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert type(info.value) is exc, f"{type(info.value).__name__}: {msg}"
    assert owner in msg, msg
    assert f"`{arg}`" in msg, msg


# The kdops ops each loss / module calls: with them replaced by a bomb, every bad argument above is
# still reported the same way -- the checks come before any work.
WORK = {"kdops.losses.pkd": ("pcc_mse",), "kdops.losses.feature_mimic": ("masked_mse", "box_masks"),
        "kdops.losses.bckd": ("bckd_cls_loss", "bckd_loc_loss"), "kdops.nn.ms_deform_attn": ("ms_deform_attn",)}


@pytest.mark.parametrize("owner, arg, exc, call", CASES)
def test_bad_argument_is_refused_before_any_work(monkeypatch, owner, arg, exc, call):
    if owner.startswith("bckd_"):
        pytest.skip("checked by the op itself (the anchor arithmetic)")

    def boom(*args, **kwargs):
        raise AssertionError("an op ran before the arguments were checked")

    for module, names in WORK.items():
        for name in names:
            monkeypatch.setattr(importlib.import_module(module), name, boom)
    with pytest.raises(exc, match=f"`{arg}".replace("[", r"\[").replace("]", r"\]")):
        call()


# ----------------------------------------------------------------------------- empty inputs: exact zeros
EMPTY_SHAPES = {"batch": (0, 3, 6, 8), "channels": (2, 0, 6, 8), "height": (2, 3, 0, 8), "width": (2, 3, 6, 0)}


def leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=F64).requires_grad_() for s in shapes]


def assert_exact_zero(loss, *tensors):
    assert loss.dtype == F64 and loss.dim() == 0
    assert torch.equal(loss.detach(), torch.zeros((), dtype=F64)), loss
    loss.backward()
    for x in tensors:
        assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x)), x.grad


@pytest.mark.parametrize("empty", sorted(EMPTY_SHAPES))
@pytest.mark.parametrize("levels", [1, 2])
def test_pkd_empty_gives_exact_zero(empty, levels):
    shape = EMPTY_SHAPES[empty]
    s, t = leaves(shape, shape)
    args = ([s] * levels, [t] * levels) if levels == 2 else (s, t)
    assert_exact_zero(PKDLoss(loss_weight=3.0)(*args), s, t)


def test_pkd_empty_level_next_to_a_full_one_adds_nothing():
    s0, t0 = leaves((2, 3, 6, 8), (2, 3, 6, 8))
    s1, t1 = leaves((2, 3, 0, 4), (2, 3, 5, 4), seed=1)  # empty student, teacher to resize from: nothing
    alone = PKDLoss()(s0, t0)
    both = PKDLoss()([s0, s1], [t0, t1])
    assert torch.equal(both, alone)
    both.backward()
    assert torch.equal(s1.grad, torch.zeros_like(s1)) and torch.equal(t1.grad, torch.zeros_like(t1))


@pytest.mark.parametrize("empty", sorted(EMPTY_SHAPES))
@pytest.mark.parametrize("normalize", ["none", "batch", "numel", "mask"])
@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("masks", ["none", "fg", "fg+bg"])
def test_feature_mimic_empty_gives_exact_zero(empty, normalize, attention, masks):
    shape = EMPTY_SHAPES[empty]
    s, t = leaves(shape, shape)
    N, _, H, W = shape
    fg = torch.rand(N, H, W, dtype=F64) if masks != "none" else None
    bg = torch.rand(N, H, W, dtype=F64) if masks == "fg+bg" else None
    loss_fn = FeatureMimicLoss(fg_weight=2.0, bg_weight=0.5, attention=attention, normalize=normalize)
    assert_exact_zero(loss_fn(s, t, fg, bg), s, t)


@pytest.mark.parametrize("empty", sorted(EMPTY_SHAPES))
@pytest.mark.parametrize("mode", ["fgd", "binary"])
def test_feature_mimic_empty_from_boxes_gives_exact_zero(empty, mode):
    shape = EMPTY_SHAPES[empty]
    s, t = leaves(shape, shape)
    loss_fn = FeatureMimicLoss(fg_weight=1e-3, bg_weight=5e-4, attention=True, strides=8, mask_mode=mode)
    assert_exact_zero(loss_fn(s, t, boxes=BOXES, batch_index=BI, image_size=(48, 64)), s, t)
    s2, t2 = leaves(shape, shape)  # and without any box
    assert_exact_zero(loss_fn(s2, t2, boxes=BOXES[:0], batch_index=BI[:0]), s2, t2)


@pytest.mark.parametrize("attention", [False, True])
def test_feature_mimic_empty_level_next_to_a_full_one_adds_nothing(attention):
    s0, t0 = leaves((2, 3, 6, 8), (2, 3, 6, 8))
    s1, t1 = leaves((2, 3, 0, 4), (2, 3, 0, 4), seed=1)
    fn = FeatureMimicLoss(attention=attention, normalize="mask", fg_weight=2.0)
    both = fn([s0, s1], [t0, t1], [torch.ones(2, 6, 8, dtype=F64), torch.ones(2, 0, 4, dtype=F64)])
    assert torch.equal(both, fn(s0, t0, torch.ones(2, 6, 8, dtype=F64)))
    both.backward()
    assert torch.equal(s1.grad, torch.zeros_like(s1))
    assert not s0.grad.isnan().any()


@pytest.mark.parametrize("empty", sorted(EMPTY_SHAPES))
def test_fgd_attention_on_an_empty_map_is_finite(empty):
    N, C, H, W = EMPTY_SHAPES[empty]
    sa, ca = fgd_attention(torch.randn(N, C, H, W, dtype=F64))
    assert sa.shape == (N, H, W) and ca.shape == (N, C)
    # the mean over an empty dimension counts as 0: the other attention is uniform, never NaN
    torch.testing.assert_close(sa, torch.ones_like(sa), rtol=0, atol=1e-15)
    torch.testing.assert_close(ca, torch.ones_like(ca), rtol=0, atol=1e-15)


def bckd_empty(N, sizes, K=3, R=4):
    g = torch.Generator().manual_seed(0)
    mk = lambda c, h, w, grad=True: torch.randn(N, c, h, w, generator=g, dtype=F64).requires_grad_(grad)  # noqa: E731
    cs, ct = [mk(K, h, w) for h, w in sizes], [mk(K, h, w, False) for h, w in sizes]
    rs, rt = [mk(4 * (R + 1), h, w) for h, w in sizes], [mk(4 * (R + 1), h, w, False) for h, w in sizes]
    pr = [torch.zeros(h * w, 2, dtype=F64) for h, w in sizes]
    return cs, ct, rs, rt, pr


@pytest.mark.parametrize("case", ["batch", "height", "width", "all-levels"])
@pytest.mark.parametrize("avg_factor", [None, 0.0, 5.0])
def test_bckd_empty_gives_exact_zero(case, avg_factor):
    N, sizes = {"batch": (0, [(4, 5), (2, 3)]), "height": (2, [(0, 5)]), "width": (2, [(4, 0)]),
                "all-levels": (2, [(0, 5), (3, 0)])}[case]
    cs, ct, rs, rt, pr = bckd_empty(N, sizes)
    out = BCKDLoss(reg_max=4, strides=[8, 16])(cs, ct, rs, rt, pr, avg_factor=avg_factor)
    assert set(out) == {"loss_bckd_cls", "loss_bckd_loc"}
    assert_exact_zero(out["loss_bckd_cls"] + out["loss_bckd_loc"], *cs, *rs)
