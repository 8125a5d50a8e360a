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
   (:func:`kdops.box_pool` with ``rule="lgd"``, ``reduce="mean"``).
4. **Inter-object relation adapter**: ``nn.MultiheadAttention`` (8 heads), per level, with the
   appearance embeddings of that level as queries and the label embeddings as keys and values
   (the release's ``INTERACT_PATTERN: 'stuGuided'``, that of all its configs), an object attending
   only to the objects of its own image. Levels are not mixed: each level has its own queries,
   attention output and maps (one attention call, the levels as its batch).
5. **Intra-object knowledge mapper**: the attended object embeddings through a Linear, painted on
   each level inside their boxes (:func:`kdops.box_paint`, ``rule="lgd"``: a sum where boxes
   overlap), a Conv3x3, plus the image's context embedding (its context object's row through a
   Linear, broadcast) when context boxes are on, ReLU; then (Conv3x3, GN1, ReLU) x 2 + Conv3x3, GN1
   -> the instructive features, one per level, shaped like the student's.

Release vs paper, and the choices made here (defaults: the release):

- Appearance pooling: the release divides each box's sum by max(pixel count, 1); the paper writes
  a sum. ``appearance_reduce="mean"`` (default) / ``"sum"``.
- Context object (``add_context_box``, ``ADD_CONTEXT_BOX``: on in the release's RetinaNet/FCOS
  configs, off in most Faster/Mask R-CNN ones): a whole-image box [0, 0, W, H] (clamped like every
  box) with the zero class vector, appended to every image *that has GT*. An image without GT gets
  instead one stand-in object, the box [0, 0, 1, 1] (padded-image pixels) with the zero class
  vector; with context boxes on it takes the context object's place (its row becomes the image's
  context embedding), without them it is painted like an object (it covers pixel (0, 0) of every
  level). ``empty_image_object="dummy"`` (default) does exactly that; ``"context"`` gives an
  image without GT its whole-image context object instead (nothing without context boxes: such
  an image then gets exact-zero instructive maps, as does every image when K = 0).
- The transform nets have no identity shortcut (the release removed it, with no orthogonality
  regulariser). Their "max pool" is over a single point in the release (each object is encoded
  alone), so it is omitted here; the only pooling across objects is the per-image global feature.
- Conv1d with kernel 1 on one point is a Linear: Linear layers are used (same function; a release
  Conv1d weight (out, in, 1) is ``weight[..., 0]`` here: ``conv1/2/3/4`` -> ``local``, ``point1``,
  ``point2``, ``fuse``; ``stn_desc``/``stn_feat`` -> ``input_transform``/``feature_transform``
  with ``conv1..3, fc1, fc2`` -> ``layers.0..4`` and ``fc3`` -> ``out``).
- Boxes that cover nothing because they are broken (batch index out of range, inverted extent,
  NaN/inf) are counted by :func:`kdops.check_boxes` (warning, or ``strict_boxes=True`` to raise) and
  then isolated: they are moved to a padding image of their own, with a zeroed descriptor, so they
  never reach a real image's attention, pooling, painting or global feature, and produce no NaN.
  (The release has no batch index; its mask test makes an inverted box cover whole rows/columns.)
- Not in the released configs, so not here: the "labelGuided"/"student_fill"/"teacher_fill"
  interaction patterns and segmentation-mask labels (``LOAD_LABELMAP``).

Training schedule (the release's ``train.py``; the integrations apply it, see
:class:`kdops.losses.LGDLoss`): the distillation loss detaches the student's side for the first
iterations (``detach_student=True``), and the student's backbone (not its FPN) gets no gradient
before ``PRE_FREEZE_STUDENT_BACKBONE_ITERS``. These modules are trained by the student's detection
losses computed on their output through the student's own head (the ``*_tea`` losses).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._device import constant
from ..ops._registry import host_readable
from ..ops._validation import check_choice, check_flag, check_levels, check_number, check_tensor, per_level_numbers
from ..ops.box_pool import box_paint, box_pool
from ..ops.box_ranges import check_boxes

__all__ = ["LGDInstructiveKnowledge", "LGDLabelEncoder", "lgd_descriptors"]

Size = Tuple[int, int]
EMPTY_IMAGE_OBJECTS = ("dummy", "context")
_DUMMY_BOX = (0.0, 0.0, 1.0, 1.0)  # the release's stand-in object of an image without GT


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
                    image_size: Size, num_classes: int, add_context_box: bool = True,
                    empty_image_object: str = "dummy"
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""LGD's objects: the label encoder's descriptors and the boxes the masks use (Zhang et al.,
    AAAI 2022; the release's ``box_descriptor_encode``).

    Each box is clamped to the padded image, :math:`x \in [0, W-1]`, :math:`y \in [0, H-1]` (the
    release's ``clamp_x1y1x2y2``); its descriptor is
    :math:`2\,[x_1/W, y_1/H, x_2/W, y_2/H, \mathrm{onehot}(c)] - 1` (k = 4 + num_classes).

    Rows: the K GT objects in input order, then -- with ``add_context_box`` or
    ``empty_image_object="dummy"`` -- one slot per image n (rows K + n), class vector zero:

    - ``add_context_box``: the slot is image n's context-role object: the whole image [0, 0, W, H]
      if n has GT (or ``empty_image_object="context"``), else the release's stand-in box
      [0, 0, 1, 1];
    - no context boxes, ``"dummy"``: the stand-in box, in image n if n has no GT, else parked in the
      padding image ``num_images`` (unused);
    - no context boxes, ``"context"``: no slots (T = K).

    The row layout depends on shapes only, so no value is read on the host. Broken GT rows (image
    index outside [0, num_images), inverted extent, NaN/inf) go to the padding image with a zero box
    and a zero descriptor, and do not count as that image's GT.

    Args:
        boxes: (K,4) xyxy GT boxes in padded-image pixels (floating).
        labels: (K,) int64 classes in [0, num_classes) (others give a zero class vector).
        batch_index: (K,) int64 image of each box.
        num_images: N, the batch size.
        image_size: the padded batch size (H, W) (mmdet ``batch_input_shape``, detectron2
            ``ImageList.tensor.shape[-2:]``).
        num_classes: number of foreground classes.
        add_context_box: the release's ``ADD_CONTEXT_BOX``.
        empty_image_object: "dummy" (the release) or "context", see above.

    Returns:
        ``(boxes, descriptors, batch_index, is_context)``: (T,4) clamped boxes and (T,k)
        descriptors (float64 for float64 boxes, else float32), (T,) int64 images (the padding image
        is ``num_images``), (T,) bool rows in the context role.
    """
    op = "kdops.nn.lgd_descriptors"
    check_tensor(op, "boxes", boxes, ndim=2, what="(K,4) xyxy in padded-image pixels")
    if boxes.shape[1] != 4:
        raise ValueError(f"{op}: `boxes` must have shape (K,4) xyxy, got {tuple(boxes.shape)}")
    for name, x in (("labels", labels), ("batch_index", batch_index)):
        check_tensor(op, name, x, ndim=1, dtypes=(torch.int64,), like=boxes, shape=(boxes.shape[0],), what="(K,)")
    n = check_number(op, "num_images", num_images, low=0, integer=True)
    check_number(op, "num_classes", num_classes, low=1, integer=True)
    h, w = _image_size(op, image_size)
    check_flag(op, "add_context_box", add_context_box)
    check_choice(op, "empty_image_object", empty_image_object, EMPTY_IMAGE_OBJECTS)
    dev = boxes.device
    dt = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    k = boxes.shape[0]
    valid = ((batch_index >= 0) & (batch_index < n) & torch.isfinite(boxes).all(1)
             & (boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1]))
    b = torch.where(valid[:, None], boxes.to(dt), boxes.new_zeros((), dtype=dt))
    index = torch.where(valid, batch_index, torch.full_like(batch_index, n))
    onehot = ((labels[:, None] == torch.arange(num_classes, device=dev)[None, :]) & valid[:, None]).to(dt)
    slots = add_context_box or empty_image_object == "dummy"
    if slots and n > 0:
        has_gt = torch.zeros(n + 1, dtype=torch.bool, device=dev).index_fill(0, index, True)[:n]
        whole = constant([0.0, 0.0, float(w), float(h)], like=boxes, dtype=dt)
        dummy = constant(list(_DUMMY_BOX), like=boxes, dtype=dt)
        images = torch.arange(n, dtype=torch.int64, device=dev)
        if add_context_box:
            use_whole = has_gt if empty_image_object == "dummy" else torch.ones_like(has_gt)
            slot_boxes = torch.where(use_whole[:, None], whole, dummy)
            slot_index = images
        else:
            slot_boxes = dummy.expand(n, 4)
            slot_index = torch.where(has_gt, torch.full_like(images, n), images)
        b = torch.cat([b, slot_boxes])
        index = torch.cat([index, slot_index])
        onehot = torch.cat([onehot, onehot.new_zeros(n, num_classes)])
    b = torch.stack([b[:, 0].clamp(0, w - 1), b[:, 1].clamp(0, h - 1), b[:, 2].clamp(0, w - 1),
                     b[:, 3].clamp(0, h - 1)], dim=1)
    scale = constant([float(w), float(h), float(w), float(h)], like=boxes, dtype=dt)
    desc = torch.cat([b / scale, onehot], dim=1) * 2.0 - 1.0
    keep = torch.cat([valid, valid.new_ones(b.shape[0] - k)])
    desc = desc * keep[:, None]
    b = b * keep[:, None]
    is_ctx = torch.zeros(b.shape[0], dtype=torch.bool, device=dev)
    if add_context_box:
        is_ctx[k:] = True
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
    nets, :math:`\rho` = ReLU, LN without affine. The per-image max is one ``scatter_reduce`` over
    the image index (no loop over images, no host read).

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
        """LGD's label encoder (Zhang et al., AAAI 2022).

        Args:
            descriptors: (T,k) object descriptors (:func:`lgd_descriptors`).
            batch_index: (T,) int64 image of each object, in [0, num_images) (objects of one image
                share the global feature, and only they).
            num_images: the number of images (rows of the per-image max).

        Returns:
            (T, channels) label embeddings.
        """
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

    Steps 1-5 of the module docstring (the release's ``DynamicTeacher``). With :math:`e_t` the
    label embeddings, :math:`a^l_t` the appearance embeddings on level l,
    :math:`o^l = \mathrm{MHA}(q = a^l, k = v = e)` restricted to each image's objects:

    .. math::
        T_l = \mathrm{Refine}\Big(\rho\big(G * \textstyle\sum_{t \notin \mathrm{ctx}} m^l_t\,
        (W_i o^l_t + b_i) + W_c o^l_{\mathrm{ctx}(n)} + b_c\big)\Big)

    (:math:`m^l_t` the box mask of rule "lgd", G a Conv3x3, the context term only with
    ``add_context_box``). Trained with the student (through the student's own head on its output,
    the ``*_tea`` losses); discarded at inference.

    Args:
        num_classes: foreground classes of the detector.
        channels: the student's FPN channels (256 in the release).
        num_heads: attention heads of the relation adapter (8).
        add_context_box: one whole-image context object per image whose embedding is broadcast
            onto the image's maps (the release's ``ADD_CONTEXT_BOX``: True for its RetinaNet/FCOS
            configs, False for most Faster R-CNN ones).
        detach_appearance: pool the appearance from detached student features, so the ``*_tea``
            losses do not reach the student (``DETACH_APPEARANCE_EMBED``: True for the release's
            Faster R-CNN configs and RetinaNet 1x, False for RetinaNet/FCOS 2x). The appearance
            conv itself still trains.
        empty_image_object: what an image without GT contributes: "dummy" (the release: a
            [0, 0, 1, 1] box with the zero class vector, standing in for the context object) or
            "context" (its whole-image context object; nothing without context boxes).
        appearance_reduce: "mean" (the release: each box's sum / max(pixel count, 1)) or "sum"
            (the paper's mask pooling).
        strict_boxes: raise on broken GT boxes instead of warning (:func:`kdops.check_boxes`).
    """

    def __init__(self, num_classes: int, channels: int = 256, num_heads: int = 8, add_context_box: bool = True,
                 detach_appearance: bool = False, empty_image_object: str = "dummy",
                 appearance_reduce: str = "mean", strict_boxes: bool = False) -> None:
        super().__init__()
        op = "LGDInstructiveKnowledge"
        self.num_classes = check_number(op, "num_classes", num_classes, low=1, integer=True)
        self.channels = check_number(op, "channels", channels, low=1, integer=True)
        check_number(op, "num_heads", num_heads, low=1, integer=True)
        if self.channels % num_heads:
            raise ValueError(f"{op}: `channels` ({channels}) must be divisible by `num_heads` ({num_heads})")
        self.add_context_box = check_flag(op, "add_context_box", add_context_box)
        self.detach_appearance = check_flag(op, "detach_appearance", detach_appearance)
        self.empty_image_object = check_choice(op, "empty_image_object", empty_image_object, EMPTY_IMAGE_OBJECTS)
        self.appearance_reduce = check_choice(op, "appearance_reduce", appearance_reduce, ("mean", "sum"))
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
                f"detach_appearance={self.detach_appearance}, empty_image_object={self.empty_image_object!r}, "
                f"appearance_reduce={self.appearance_reduce!r}")

    def objects(self, boxes: torch.Tensor, labels: torch.Tensor, batch_index: torch.Tensor, num_images: int,
                image_size: Size):
        """The objects the modules see: :func:`lgd_descriptors` with this module's settings.
        Returns (boxes, descriptors, batch_index, is_context)."""
        return lgd_descriptors(boxes, labels, batch_index, num_images, image_size, self.num_classes,
                               self.add_context_box, self.empty_image_object)

    def forward(self, features: Sequence[torch.Tensor], boxes: torch.Tensor, labels: torch.Tensor,
                batch_index: torch.Tensor, image_size: Size,
                strides: Optional[Sequence[float]] = None) -> List[torch.Tensor]:
        """Instructive features for one batch (LGD, Zhang et al., AAAI 2022).

        Args:
            features: the student's FPN maps, L tensors (N, channels, H_l, W_l) (one dtype and
                device).
            boxes: (K,4) xyxy GT boxes in padded-image pixels (floating); labels: (K,) int64 in
                [0, num_classes); batch_index: (K,) int64 image of each box. K = 0 is valid; boxes
                outside the image are clamped to it, zero-size ones cover nothing (the release's rule).
            image_size: the padded batch size (H, W) the boxes live in (ints). The box masks scale
                by map size / image size per axis (rule "lgd" of :func:`kdops.box_ranges`), as the
                release does, so a level whose size is not image/stride is handled like there.
            strides: optional, one positive number per level; checked, then unused (the masks
                come from ``image_size``).

        Returns:
            L maps shaped like ``features`` (the instructive knowledge), in their dtype.
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
        sizes = [tuple(f.shape[-2:]) for f in features]
        if strides is not None:
            per_level_numbers(op, "strides", strides, len(sizes), True)
        check_boxes(boxes, batch_index, n, strict=self.strict_boxes)
        if k and host_readable(labels):
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"{op}: `labels` must lie in [0, {self.num_classes}), got values in [{lo}, {hi}]")

        # objects: K GT rows, then the per-image slots (context / stand-in); padding image n
        obj_boxes, desc, index, _ = self.objects(boxes, labels, batch_index, n, (h_img, w_img))
        t = obj_boxes.shape[0]
        dtype = first.dtype
        # the ops want strides; with image_size the "lgd" rule does not use them
        st = [h_img / max(hh, 1) for hh, _ in sizes]

        label_embed = self.label_proj(self.label_encoder(desc.to(dtype), index, n + 1))  # (T,C)
        src = [f.detach() for f in features] if self.detach_appearance else list(features)
        app = [self.appearance(f) for f in src]
        pooled = box_pool(app, obj_boxes, index, st, rule="lgd", image_size=(h_img, w_img),
                          reduce=self.appearance_reduce)  # (L,T,C)
        # one attention call, levels as the batch: query (T,L,C), keys/values the labels (T,L,C)
        levels = len(features)
        kv = label_embed[:, None, :].expand(t, levels, c)
        blocked = index[:, None] != index[None, :]  # (T,T): an object attends to its own image only
        attended = self.relation(pooled.transpose(0, 1), kv, kv, attn_mask=blocked,
                                 need_weights=False)[0].transpose(0, 1)  # (L,T,C)
        painted_rows = k if self.add_context_box else t  # context rows are broadcast, not painted
        maps = box_paint(self.inst_proj(attended[:, :painted_rows]), obj_boxes[:painted_rows],
                         index[:painted_rows], [(n, hh, ww) for hh, ww in sizes], st, rule="lgd",
                         image_size=(h_img, w_img))
        ctx = self.context_proj(attended[:, k:k + n]) if self.add_context_box else None  # (L,N,C)
        empty = None
        if not self.add_context_box and self.empty_image_object == "context":
            # images without any object: exact-zero knowledge (the release never has such images)
            has_obj = torch.zeros(n + 1, dtype=dtype, device=first.device).index_fill(0, index, 1.0)[:n]
            empty = has_obj[:, None, None, None]
        out = []
        for lvl, m in enumerate(maps):
            x = self.inst_conv(m)
            if ctx is not None:
                x = x + ctx[lvl][:, :, None, None]
            x = self.refine(F.relu(x))
            out.append(x * empty if empty is not None else x)
        return out
