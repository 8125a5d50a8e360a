r"""LGD's label-guided modules (Zhang et al., "LGD: Label-Guided Self-Distillation for Object
Detection", AAAI 2022), framework-free, following the authors' release (megvii-research/LGD,
``models/customized_detectors/dynamic_teacher``).

LGD needs no pretrained teacher. Its "instructive knowledge" is a set of FPN-shaped maps built
from the labels and the student's own features, which the student then distils
(:class:`kdops.losses.LGDLoss`):

1. **Label encoder** (:class:`LGDLabelEncoder`): per object a descriptor -- the box clamped to the
   padded image and divided by its size, then the one-hot class, all rescaled from [0, 1] to
   [-1, 1] (:func:`lgd_descriptors`) -- through a PointNet: an input transform net, a shared MLP
   k -> 64, a feature transform net, 64 -> 128 -> 1024, the per-image max over objects (global
   feature), and the fusion (64 local + 1024 global) -> 256. LayerNorm without affine after every
   layer, as the release (its ``LayerNorm([c, 1])`` over one point).
2. **Label projection**: Linear + LayerNorm (no affine) + ReLU.
3. **Appearance encoder**: per level Conv3x3 + GroupNorm(1 group, no affine) + ReLU on the student's
   FPN map (shared across levels), then each object's mean over its box
   (:func:`kdops.box_pool` with ``rule="lgd"``, ``reduce="mean"``: the release divides by
   max(count, 1); the paper writes a sum).
4. **Inter-object relation adapter**: ``nn.MultiheadAttention`` (8 heads) per level with the
   appearance embeddings as queries and the label embeddings as keys and values ("stuGuided"), an
   object attending only to the objects of its own image.
5. **Intra-object knowledge mapper**: the attended object embeddings through a Linear, painted on
   each level inside their boxes (:func:`kdops.box_paint`, ``rule="lgd"``: a sum where boxes
   overlap), a Conv3x3, plus the image's context embedding (its context object's row through a
   Linear, broadcast) when context boxes are on, ReLU; then (Conv3x3, GN1, ReLU) x 2 + Conv3x3, GN1
   -> the instructive features, one per level, shaped like the student's.

Choices where the release is silent or differs from the paper (and what we did):

- Context object: with ``add_context_box`` (the release's RetinaNet/FCOS default) each image gets a
  whole-image object with the zero class vector. The release adds it only to images with GT and
  gives an image without GT one dummy object [0, 0, 1, 1] with the zero class instead; here every
  image gets its context object, so an image without GT has exactly that one (the same role, no
  dummy box). Without context boxes an image without GT simply has no objects (its instructive
  maps come from the convolutions' biases alone).
- The transform nets have no identity shortcut (the release removed it, with no orthogonality
  regulariser). Their "max pool" is over a single point in the release (each object is encoded
  alone), so it is omitted here; the only pooling across objects is the per-image global feature.
- Conv1d with kernel 1 on one point is a Linear: Linear layers are used (same function, different
  state_dict keys than the release; its checkpoints are training-time only).
- Boxes that cover nothing because they are broken (batch index out of range, inverted extent,
  NaN/inf) are counted by :func:`kdops.check_boxes` (warning, or ``strict_boxes=True`` to raise) and
  then isolated: they are moved to a padding image of their own, with a zeroed descriptor, so they
  never reach a real image's attention, pooling, painting or global feature, and produce no NaN.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops._validation import check_flag, check_levels, check_number, check_tensor
from ..ops.box_pool import box_paint, box_pool
from ..ops.box_ranges import check_boxes

__all__ = ["LGDInstructiveKnowledge", "LGDLabelEncoder", "lgd_descriptors"]

Size = Tuple[int, int]


def _ln(c: int) -> nn.LayerNorm:
    return nn.LayerNorm(c, elementwise_affine=False)


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(1, c, affine=False)


def _image_size(op: str, image_size) -> Size:
    if (not isinstance(image_size, (list, tuple)) or len(image_size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size)):
        raise ValueError(f"{op}: `image_size` must be the padded batch size (height, width) as two positive ints, "
                         f"got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def lgd_descriptors(boxes: torch.Tensor, labels: torch.Tensor, batch_index: torch.Tensor, num_images: int,
                    image_size: Size, num_classes: int, add_context_box: bool = True
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""LGD's object descriptors (the label encoder's input) and the boxes its masks use.

    Each GT box is clamped to the padded image, :math:`x \in [0, W-1]`, :math:`y \in [0, H-1]`
    (the release's ``clamp_x1y1x2y2``); its descriptor is
    :math:`2\,[x_1/W, y_1/H, x_2/W, y_2/H, \mathrm{onehot}(c)] - 1` (k = 4 + num_classes). With
    ``add_context_box`` one context object per image follows the GT rows: the whole image
    [0, 0, W, H] (clamped like the others), class vector zero, as the release's
    ``box_descriptor_encode``.

    Args:
        boxes: (K,4) xyxy GT boxes in padded-image pixels (floating).
        labels: (K,) int64 classes in [0, num_classes).
        batch_index: (K,) int64 image of each box, in [0, num_images).
        num_images: N, the batch size.
        image_size: the padded batch size (H, W) (mmdet ``batch_input_shape``, detectron2
            ``ImageList.tensor.shape[-2:]``).
        num_classes: number of foreground classes.
        add_context_box: append the N context objects.

    Returns:
        ``(boxes, descriptors, batch_index, is_context)``: (T,4) clamped boxes, (T,k) float32
        descriptors, (T,) int64 images, (T,) bool, T = K (+ N); context rows last, image order.
    """
    h, w = image_size
    dev = boxes.device
    b = boxes.float()
    b = torch.stack([b[:, 0].clamp(0, w - 1), b[:, 1].clamp(0, h - 1), b[:, 2].clamp(0, w - 1),
                     b[:, 3].clamp(0, h - 1)], dim=1)
    onehot = (labels[:, None] == torch.arange(num_classes, device=dev)[None, :]).float()
    index = batch_index
    is_ctx = torch.zeros(b.shape[0], dtype=torch.bool, device=dev)
    if add_context_box and num_images > 0:
        ctx = torch.tensor([[0.0, 0.0, min(w, w - 1), min(h, h - 1)]], device=dev).expand(num_images, 4)
        b = torch.cat([b, ctx])
        onehot = torch.cat([onehot, onehot.new_zeros(num_images, num_classes)])
        index = torch.cat([index, torch.arange(num_images, dtype=torch.int64, device=dev)])
        is_ctx = torch.cat([is_ctx, torch.ones(num_images, dtype=torch.bool, device=dev)])
    scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=dev)
    desc = torch.cat([b / scale, onehot], dim=1) * 2.0 - 1.0
    return b, desc, index, is_ctx


class _TransformNet(nn.Module):
    """PointNet's transform net on one point per object: k -> 64 -> 128 -> 1024 -> 512 -> 256 -> k x k,
    LayerNorm (no affine) + ReLU after every layer but the last; no identity shortcut (the release's)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        dims = [k, 64, 128, 1024, 512, 256]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList(_ln(b) for b in dims[1:])
        self.out = nn.Linear(256, k * k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin, norm in zip(self.layers, self.norms):
            x = F.relu(norm(lin(x)))
        return self.out(x).view(-1, self.k, self.k)


class LGDLabelEncoder(nn.Module):
    r"""LGD's label encoder: a PointNet over each image's object descriptors (module docstring, step 1).

    For descriptors :math:`d_t` (T,k): :math:`x_t = d_t A(d_t)`, :math:`h_t = \rho(\mathrm{LN}(W_1 x_t))`
    (64), :math:`\ell_t = h_t B(h_t)` (the local feature), :math:`g_t = \rho(\mathrm{LN}(W_3\,
    \rho(\mathrm{LN}(W_2 \ell_t))))` (1024), :math:`G_n = \max_{t \in n} g_t` per image, and the
    output :math:`\rho(\mathrm{LN}(W_4 [\ell_t, G_{n(t)}]))` (``channels``); A and B are transform
    nets, :math:`\rho` = ReLU, LN without affine.

    Args:
        in_dim: descriptor length k (4 + number of classes).
        channels: output width (256, the FPN channels).
    """

    def __init__(self, in_dim: int, channels: int = 256) -> None:
        super().__init__()
        check_number("LGDLabelEncoder", "in_dim", in_dim, low=5, integer=True)
        check_number("LGDLabelEncoder", "channels", channels, low=1, integer=True)
        self.in_dim, self.channels = int(in_dim), int(channels)
        self.input_transform = _TransformNet(self.in_dim)
        self.feature_transform = _TransformNet(64)
        self.local = nn.Linear(self.in_dim, 64)
        self.local_norm = _ln(64)
        self.point1 = nn.Linear(64, 128)
        self.point1_norm = _ln(128)
        self.point2 = nn.Linear(128, 1024)
        self.point2_norm = _ln(1024)
        self.fuse = nn.Linear(64 + 1024, self.channels)
        self.fuse_norm = _ln(self.channels)

    def forward(self, descriptors: torch.Tensor, batch_index: torch.Tensor, num_images: int) -> torch.Tensor:
        """descriptors (T,k) float, batch_index (T,) int64 in [0, num_images) -> (T, channels)."""
        op = "LGDLabelEncoder"
        check_tensor(op, "descriptors", descriptors, ndim=2, what="(T,k) object descriptors")
        if descriptors.shape[1] != self.in_dim:
            raise ValueError(f"{op}: `descriptors` must have {self.in_dim} columns (4 + classes), got "
                             f"{tuple(descriptors.shape)}")
        check_tensor(op, "batch_index", batch_index, ndim=1, dtypes=(torch.int64,), like=descriptors,
                     shape=(descriptors.shape[0],), what="(T,) image of each object")
        n = check_number(op, "num_images", num_images, low=0, integer=True)
        x = torch.bmm(descriptors[:, None, :], self.input_transform(descriptors))[:, 0]
        h = F.relu(self.local_norm(self.local(x)))
        local = torch.bmm(h[:, None, :], self.feature_transform(h))[:, 0]
        g = F.relu(self.point1_norm(self.point1(local)))
        g = F.relu(self.point2_norm(self.point2(g)))
        glob = g.new_zeros(int(n), g.shape[1]).scatter_reduce(
            0, batch_index[:, None].expand(-1, g.shape[1]), g, reduce="amax", include_self=False)
        return F.relu(self.fuse_norm(self.fuse(torch.cat([local, glob[batch_index]], dim=1))))


class LGDInstructiveKnowledge(nn.Module):
    r"""LGD's implicit teacher: labels + the student's FPN features -> instructive FPN features.

    Steps 1-5 of the module docstring (the release's ``DynamicTeacher``). Trained with the student
    (through the student's own head on its output, the ``*_tea`` losses); discarded at inference.

    Args:
        num_classes: foreground classes of the detector.
        channels: the student's FPN channels (256 in the release).
        num_heads: attention heads of the relation adapter (8).
        add_context_box: one whole-image context object per image whose embedding is broadcast
            onto the image's maps (the release's ``ADD_CONTEXT_BOX``: True for its RetinaNet/FCOS
            configs, False for Faster R-CNN).
        detach_appearance: pool the appearance from detached student features, so the ``*_tea``
            losses do not reach the student (``DETACH_APPEARANCE_EMBED``: True for the release's
            Faster R-CNN configs and RetinaNet 1x, False for RetinaNet/FCOS 2x).
        strict_boxes: raise on broken GT boxes instead of warning (:func:`kdops.check_boxes`).
    """

    def __init__(self, num_classes: int, channels: int = 256, num_heads: int = 8, add_context_box: bool = True,
                 detach_appearance: bool = False, strict_boxes: bool = False) -> None:
        super().__init__()
        op = "LGDInstructiveKnowledge"
        self.num_classes = check_number(op, "num_classes", num_classes, low=1, integer=True)
        self.channels = check_number(op, "channels", channels, low=1, integer=True)
        check_number(op, "num_heads", num_heads, low=1, integer=True)
        if self.channels % num_heads:
            raise ValueError(f"{op}: `channels` ({channels}) must be divisible by `num_heads` ({num_heads})")
        self.add_context_box = check_flag(op, "add_context_box", add_context_box)
        self.detach_appearance = check_flag(op, "detach_appearance", detach_appearance)
        self.strict_boxes = check_flag(op, "strict_boxes", strict_boxes)
        c = self.channels
        self.label_encoder = LGDLabelEncoder(4 + self.num_classes, c)
        self.label_proj = nn.Sequential(nn.Linear(c, c), _ln(c), nn.ReLU())
        self.appearance = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), _gn(c), nn.ReLU())
        self.relation = nn.MultiheadAttention(c, int(num_heads))
        self.inst_proj = nn.Linear(c, c)
        self.inst_conv = nn.Conv2d(c, c, 3, 1, 1)
        self.context_proj = nn.Linear(c, c) if self.add_context_box else None
        self.refine = nn.Sequential(
            nn.Conv2d(c, c, 3, 1, 1), _gn(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, 1, 1), _gn(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, 1, 1), _gn(c))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, channels={self.channels}, add_context_box={self.add_context_box}, "
                f"detach_appearance={self.detach_appearance}")

    def objects(self, boxes: torch.Tensor, labels: torch.Tensor, batch_index: torch.Tensor, num_images: int,
                image_size: Size):
        """The objects the modules see: :func:`lgd_descriptors` with broken boxes moved to a padding
        image ``num_images`` (zero descriptor, empty box). Returns (boxes, descriptors, batch_index,
        is_context)."""
        valid = (batch_index >= 0) & (batch_index < num_images) & torch.isfinite(boxes).all(1) \
            & (boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])
        safe = torch.where(valid[:, None], boxes.float(), boxes.new_zeros(()).float())
        index = torch.where(valid, batch_index, torch.full_like(batch_index, num_images))
        b, desc, index, is_ctx = lgd_descriptors(safe, labels, index, num_images, image_size, self.num_classes,
                                                 self.add_context_box)
        if valid.numel():
            keep = torch.cat([valid, valid.new_ones(b.shape[0] - valid.shape[0])])
            desc = desc * keep[:, None]
            b = b * keep[:, None]
        return b, desc, index, is_ctx

    def forward(self, features: Sequence[torch.Tensor], boxes: torch.Tensor, labels: torch.Tensor,
                batch_index: torch.Tensor, image_size: Size) -> List[torch.Tensor]:
        """Instructive features for one batch.

        Args:
            features: the student's FPN maps, L tensors (N, channels, H_l, W_l).
            boxes: (K,4) xyxy GT boxes in padded-image pixels; labels: (K,) int64 in [0, num_classes);
                batch_index: (K,) int64 image of each box. K = 0 is valid.
            image_size: the padded batch size (H, W) the boxes live in.

        Returns:
            L maps shaped like ``features`` (the instructive knowledge).
        """
        op = "LGDInstructiveKnowledge"
        if isinstance(features, torch.Tensor) or not isinstance(features, (list, tuple)) or not features:
            raise TypeError(f"{op}: `features` must be a non-empty list of (N,C,H,W) FPN maps, got "
                            f"{type(features).__name__}")
        first = check_levels(op, "features", list(features), True)
        n, c = int(first.shape[0]), int(first.shape[1])
        if c != self.channels:
            raise ValueError(f"{op}: `features` have {c} channels but the module was built for {self.channels}")
        check_tensor(op, "boxes", boxes, ndim=2, like=first, what="(K,4) xyxy in padded-image pixels")
        if boxes.shape[1] != 4:
            raise ValueError(f"{op}: `boxes` must have shape (K,4) xyxy, got {tuple(boxes.shape)}")
        k = boxes.shape[0]
        check_tensor(op, "labels", labels, ndim=1, dtypes=(torch.int64,), like=first, shape=(k,),
                     what="(K,) class of each box")
        check_tensor(op, "batch_index", batch_index, ndim=1, dtypes=(torch.int64,), like=first, shape=(k,),
                     what="(K,) image of each box")
        h_img, w_img = _image_size(op, image_size)
        check_boxes(boxes, batch_index, n, strict=self.strict_boxes)
        if labels.device.type == "cpu" and k and not torch.compiler.is_compiling():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"{op}: `labels` must lie in [0, {self.num_classes}), got values in [{lo}, {hi}]")

        # the objects: GT (+ one context object per image), broken boxes in a padding image n
        obj_boxes, desc, index, is_ctx = self.objects(boxes, labels, batch_index, n, (h_img, w_img))
        t = obj_boxes.shape[0]
        sizes = [tuple(f.shape[-2:]) for f in features]
        strides = [h_img / hh for hh, _ in sizes]  # unused by rule="lgd" with image_size; the ops want them
        dtype = first.dtype
        if t == 0:  # no objects and no context boxes: the maps come from the biases alone
            inst = [self.inst_conv(f.new_zeros(f.shape)) for f in features]
            return [self.refine(F.relu(m)) for m in inst]

        label_embed = self.label_proj(self.label_encoder(desc.to(dtype), index, n + 1))  # (T,C)
        src = [f.detach() for f in features] if self.detach_appearance else list(features)
        app = [self.appearance(f) for f in src]
        pooled = box_pool(app, obj_boxes.to(dtype), index, strides, rule="lgd", image_size=(h_img, w_img),
                          reduce="mean")  # (L,T,C)
        mask = index[:, None] != index[None, :]  # (T,T), True = may not attend
        kv = label_embed[:, None, :]
        attended = [self.relation(q[:, None, :], kv, kv, attn_mask=mask, need_weights=False)[0][:, 0]
                    for q in pooled.unbind(0)]  # L x (T,C)
        keep = (~is_ctx).to(dtype)[:, None]
        values = torch.stack([self.inst_proj(a) * keep for a in attended])  # context rows paint nothing
        maps = box_paint(values, obj_boxes.to(dtype), index, [(n, hh, ww) for hh, ww in sizes], strides,
                         rule="lgd", image_size=(h_img, w_img))
        if isinstance(maps, torch.Tensor):
            maps = [maps]
        out = []
        for m, a in zip(maps, attended):
            x = self.inst_conv(m)
            if self.add_context_box:
                ctx = self.context_proj(a[-n:]) if n else a.new_zeros(0, self.channels)  # the n context rows
                x = x + ctx[:, :, None, None]
            out.append(self.refine(F.relu(x)))
        return out
