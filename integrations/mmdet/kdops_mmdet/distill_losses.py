"""Loss entries: one config dict -> a kdops loss, its taps, its connectors, and how to call it.

Translation only: taps and mmdet structures (``DetDataSample``, head targets) become the
tensors a ``kdops.losses`` module takes. No loss formula lives here.

Entry keys (everything else goes to the loss's constructor)::

    dict(name='pkd',             # logged as loss_pkd; [A-Za-z0-9_]
         type='PKDLoss',         # a class of kdops.losses
         student='neck', teacher='neck',     # taps, see kdops_mmdet.taps
         levels=[0, 1, 2, 3],    # optional: the levels of a multi-level tap to use
         teacher_levels=[1, 2, 3, 4],  # optional: the teacher's, when its FPN starts at another stride
         connector=dict(type='conv1x1', in_channels=32, out_channels=64),  # optional, one per level
         gt_boxes=None,          # pass GT boxes (auto: when the loss takes `boxes` and has `strides`)
         image_size='img_shape', # metainfo key giving each box's image size (GT-box losses)
         loss_weight=6)
"""
from __future__ import annotations

import copy
import inspect
import re
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

import kdops.losses

from .connectors import build_connector
from .taps import describe

_ENTRY_KEYS = ("name", "type", "student", "teacher", "levels", "teacher_levels", "connector", "gt_boxes",
               "image_size", "targets")
_RESIZING = ("PKDLoss",)  # losses that resize a level whose spatial size differs (mmrazor's behaviour)
_ALIGNS_CHANNELS = ("FGDLoss",)  # losses with their own student->teacher channel adapter (FGD's `align`)
_IMAGE_SIZE_PER_IMAGE = ("FGDLoss",)  # image_size as N (h, w) rows, one per image (else one per box)


def registered_losses() -> Dict[str, type]:
    out = {}
    for name in getattr(kdops.losses, "__all__", dir(kdops.losses)):
        obj = getattr(kdops.losses, name, None)
        if inspect.isclass(obj) and issubclass(obj, nn.Module):
            out[name] = obj
    return out


def _levels(x):
    return (list(x), True) if isinstance(x, (list, tuple)) else ([x], False)


class LossEntry:
    """One configured distillation loss. ``kind`` is "feature" (student/teacher feature taps) or
    "dense_head" (BCKD: head outputs of both models plus the student head's training targets)."""

    def __init__(self, cfg: dict, index: int) -> None:
        cfg = copy.deepcopy(dict(cfg))
        where = f"distill_losses[{index}]"
        self.name = cfg.get("name")
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_]+", self.name):
            raise ValueError(f"kdops_mmdet: {where} needs a `name` of letters, digits and '_' (logged as "
                             f"loss_<name>), got {self.name!r}")
        where = f"distill_losses[{index}] ({self.name!r})"
        self.where = where
        losses = registered_losses()
        self.type = cfg.get("type")
        if self.type not in losses:
            raise ValueError(f"kdops_mmdet: {where}: unknown loss type {self.type!r}; registered kdops losses: "
                             f"{', '.join(sorted(losses))}")
        self.kind = "dense_head" if self.type == "BCKDLoss" else "feature"
        default_tap = "bbox_head" if self.kind == "dense_head" else None
        self.student_tap = cfg.get("student", default_tap)
        self.teacher_tap = cfg.get("teacher", default_tap)
        if not self.student_tap or not self.teacher_tap:
            raise ValueError(f"kdops_mmdet: {where}: give the `student` and `teacher` taps (e.g. student='neck', "
                             f"teacher='neck')")
        self.targets_tap = cfg.get("targets", "bbox_head.get_targets()") if self.kind == "dense_head" else None
        self.levels: Optional[List[int]] = cfg.get("levels")
        self.teacher_levels: Optional[List[int]] = cfg.get("teacher_levels", self.levels)
        for key in ("levels", "teacher_levels"):
            v = cfg.get(key)
            if v is not None and not (isinstance(v, (list, tuple)) and v and all(isinstance(i, int) for i in v)):
                raise ValueError(f"kdops_mmdet: {where}: `{key}` must be a non-empty list of level indices, got {v!r}")
        if cfg.get("teacher_levels") is not None and self.levels is None:
            raise ValueError(f"kdops_mmdet: {where}: `teacher_levels` needs `levels` (the student's levels they pair "
                             f"with, one for one)")
        if self.levels is not None and len(self.teacher_levels) != len(self.levels):
            raise ValueError(f"kdops_mmdet: {where}: levels={self.levels} and teacher_levels={self.teacher_levels} "
                             f"must pair one for one")
        self.connector_cfg = cfg.get("connector")
        self.image_size_key = cfg.get("image_size", "img_shape")
        kwargs = {k: v for k, v in cfg.items() if k not in _ENTRY_KEYS}
        self.kwargs = kwargs
        self.loss: nn.Module = self._build(kwargs)
        params = inspect.signature(self.loss.forward).parameters
        takes_boxes = "boxes" in params
        needs_boxes = takes_boxes and params["boxes"].default is inspect.Parameter.empty
        gt = cfg.get("gt_boxes")
        if gt is None:  # a loss whose forward requires boxes, or one given strides to build masks with
            gt = needs_boxes or (takes_boxes and getattr(self.loss, "strides", None) is not None)
        self.gt_boxes = bool(gt)
        self.per_image_size = self.type in _IMAGE_SIZE_PER_IMAGE
        if self.gt_boxes and not takes_boxes:
            raise ValueError(f"kdops_mmdet: {where}: gt_boxes=True but {self.type}.forward takes no `boxes`")

    def _build(self, kwargs: dict) -> nn.Module:
        try:
            return registered_losses()[self.type](**kwargs)
        except TypeError as e:
            raise ValueError(f"kdops_mmdet: {self.where}: bad arguments for {self.type}: {e}") from None

    # ------------------------------------------------------------- dense heads
    def bind_heads(self, student_head: nn.Module, teacher_head: nn.Module) -> None:
        """A dense-head loss (BCKD) decodes boxes as the student's head does: its decoder, GFL's
        reg_max, the prior strides and DeltaXYWH's means/stds are read from the head (both heads
        must agree). A value also given in the entry must equal the head's: a silently different
        decoding would distil boxes the head never predicts."""
        if self.kind != "dense_head":
            return
        s = head_decoding(student_head, f"{self.where}: student tap {self.student_tap!r}")
        t = head_decoding(teacher_head, f"{self.where}: teacher tap {self.teacher_tap!r}")
        if s != t:
            raise ValueError(f"kdops_mmdet: {self.where}: the student's and the teacher's heads decode boxes "
                             f"differently (student {s}, teacher {t}); BCKD compares boxes both decode from the "
                             f"same priors, so the two heads need the same box coder and settings")
        for key, head_value in s.items():
            if key not in self.kwargs:
                continue
            given = self.kwargs[key]
            same = (given == head_value if isinstance(head_value, str) else
                    _floats(given)[:len(head_value)] == head_value if key == "strides" else
                    _floats(given) == _floats(head_value))
            if not same:
                raise ValueError(f"kdops_mmdet: {self.where}: {key}={given!r} but the student's head "
                                 f"({type(student_head).__name__}) uses {key}={head_value!r}; drop `{key}` from the "
                                 f"entry (it is read from the head) or make the head's config agree")
        self.loss = self._build({**s, **self.kwargs})

    # ------------------------------------------------------------------ taps
    def student_taps(self) -> List[str]:
        if self.kind == "dense_head":  # anchor heads take their anchors from get_anchors()
            return [self.student_tap, self.targets_tap, "bbox_head.get_anchors()"]
        return [self.student_tap]

    def teacher_taps(self) -> List[str]:
        return [self.teacher_tap]

    def pick(self, value, tap: str, teacher: bool = False):
        """The configured levels of a tapped value (a tensor or a list of levels): ``levels`` on the
        student's side, ``teacher_levels`` (default: ``levels``) on the teacher's."""
        levels, key = (self.teacher_levels, "teacher_levels") if teacher else (self.levels, "levels")
        if levels is None or self.kind != "feature":
            return value
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"kdops_mmdet: {self.where}: `{key}` given but tap {tap!r} is a single "
                             f"{describe(value)}, not a list of levels")
        try:
            return [value[i] for i in levels]
        except IndexError:
            raise ValueError(f"kdops_mmdet: {self.where}: {key}={levels} but tap {tap!r} has "
                             f"{len(value)} levels") from None

    # ------------------------------------------------------------ connectors
    def build_connectors(self, student_value) -> Optional[nn.Module]:
        if self.connector_cfg is None:
            return None
        if self.kind != "feature":
            raise ValueError(f"kdops_mmdet: {self.where}: connectors apply to feature losses, not to {self.type}")
        feats, _ = _levels(student_value)
        return nn.ModuleList(build_connector(self.connector_cfg, f"{self.where} level {i}")
                             for i in range(len(feats)))

    def connect(self, connectors: Optional[nn.Module], student_value):
        if connectors is None:
            return student_value
        feats, seq = _levels(student_value)
        out = []
        for i, (conn, f) in enumerate(zip(connectors, feats)):
            try:
                out.append(conn(f))
            except RuntimeError as e:
                raise ValueError(f"kdops_mmdet: {self.where}: the connector of level {i} "
                                 f"({self.connector_cfg}) cannot take the student's {describe(f)} from tap "
                                 f"{self.student_tap!r}: {str(e).splitlines()[0]}") from None
        return out if seq else out[0]

    def check_shapes(self, s_value, t_value) -> None:
        """Student (after its connector) and teacher must agree level by level."""
        if self.kind != "feature":
            return
        S, s_seq = _levels(s_value)
        T, t_seq = _levels(t_value)
        if len(S) != len(T):
            raise ValueError(f"kdops_mmdet: {self.where}: student tap {self.student_tap!r} gives {len(S)} levels, "
                             f"teacher tap {self.teacher_tap!r} gives {len(T)}; use `levels=` to pick matching ones")
        for i, (s, t) in enumerate(zip(S, T)):
            if not (isinstance(s, torch.Tensor) and isinstance(t, torch.Tensor)):
                raise ValueError(f"kdops_mmdet: {self.where}: level {i} is not a tensor on both sides "
                                 f"(student {describe(s)}, teacher {describe(t)})")
            spatial_ok = self.type in _RESIZING or s.shape[2:] == t.shape[2:]
            channels_ok = self.type in _ALIGNS_CHANNELS or s.shape[1] == t.shape[1]
            if s.dim() != t.dim() or not channels_ok or not spatial_ok:
                hint = ""
                if s.dim() == t.dim() and s.shape[1] != t.shape[1]:
                    kind = "conv1x1" if s.dim() == 4 else "linear"
                    keys = ("in_channels", "out_channels") if s.dim() == 4 else ("in_features", "out_features")
                    hint = (f"; add a connector to the entry, e.g. connector=dict(type='{kind}', "
                            f"{keys[0]}={s.shape[1]}, {keys[1]}={t.shape[1]})")
                got = "student (after its connector)" if self.connector_cfg else "student"
                raise ValueError(f"kdops_mmdet: {self.where}: level {i}: the {got} tap {self.student_tap!r} has "
                                 f"shape {tuple(s.shape)} but the teacher tap {self.teacher_tap!r} has shape "
                                 f"{tuple(t.shape)}{hint}")

    # ------------------------------------------------------------------ call
    def __call__(self, student_taps, teacher_taps, connectors, data_samples) -> Dict[str, torch.Tensor]:
        if self.kind == "dense_head":
            out = self._dense_head(student_taps, teacher_taps)
        else:
            s = self.connect(connectors, self.pick(student_taps.get(self.student_tap), self.student_tap))
            t = self.pick(teacher_taps.get(self.teacher_tap), self.teacher_tap, teacher=True)
            self.check_shapes(s, t)
            kwargs = gt_boxes(data_samples, _levels(s)[0][0].device, self.image_size_key,
                              self.per_image_size) if self.gt_boxes else {}
            out = self.loss(s, t, **kwargs)
        return self._named(out)

    def _named(self, out) -> Dict[str, torch.Tensor]:
        if isinstance(out, torch.Tensor):
            return {f"loss_{self.name}": out}
        named = {}
        for k, v in out.items():
            k = k[5:] if k.startswith("loss_") else k
            k = k[len(self.name) + 1:] if k.startswith(self.name + "_") else k
            named[f"loss_{self.name}_{k}"] = v
        return named

    def _dense_head(self, student_taps, teacher_taps):
        """BCKD: the head outputs of both models + the student head's targets (as its loss_by_feat has them)."""
        s_out = student_taps.get(self.student_tap)
        t_out = teacher_taps.get(self.teacher_tap)
        targets = student_taps.get(self.targets_tap)
        first = targets[0][0] if len(targets) >= 5 and isinstance(targets[0], (list, tuple)) and targets[0] else None
        if isinstance(first, torch.Tensor) and first.is_floating_point() and first.shape[-1] == 4:
            # GFL / ATSS: (anchors per level (N,A,4), labels, label_weights, bbox_targets, bbox_weights, avg)
            anchors, _, label_weights, _, _, avg_factor = targets[:6]
            priors = [a.reshape(-1, 4) for a in anchors]
        elif isinstance(first, torch.Tensor) and not first.is_floating_point():
            # AnchorHead (RetinaNet): (labels, label_weights, bbox_targets, bbox_weights, avg, ...); the
            # anchors from get_anchors(), per image and level, stacked as the levels' (n, h, w, a) order
            _, label_weights, _, _, avg_factor = targets[:5]
            anchor_list = student_taps.get("bbox_head.get_anchors()")[0]
            priors = [torch.cat([img[lvl] for img in anchor_list]) for lvl in range(len(anchor_list[0]))]
        else:
            raise ValueError(f"kdops_mmdet: {self.where}: tap {self.targets_tap!r} returned {describe(targets)}; "
                             f"expected a dense head's get_targets() tuple (GFL/ATSS: anchors first; "
                             f"AnchorHead: labels first)")
        from mmdet.utils import reduce_mean

        # the number of positives averaged over ranks, floored at 1, as the authors' LDHead does
        avg = reduce_mean(torch.as_tensor(avg_factor, dtype=torch.float, device=s_out[0][0].device)).clamp(min=1.0)
        weight = [w.reshape(-1) for w in label_weights]
        return self.loss(s_out[0], t_out[0], s_out[1], t_out[1], priors, weight=weight, avg_factor=avg)


def gt_boxes(data_samples, device, image_size_key: Optional[str] = "img_shape",
             per_image: bool = False) -> Dict[str, Any]:
    """GT boxes of a batch as kdops takes them: boxes (K,4) xyxy in input pixels, batch_index (K,),
    and the image sizes from each sample's metainfo (``image_size_key``, e.g. the unpadded
    ``img_shape`` FGD uses): one (h, w) row per box (K,2), or per image (N,2) with ``per_image``.
    An image without boxes contributes no rows."""
    from mmdet.structures.bbox import get_box_tensor

    boxes, index, sizes = [], [], []
    for i, ds in enumerate(data_samples):
        gt = ds.get("gt_instances", None)
        b = get_box_tensor(gt.bboxes) if gt is not None and "bboxes" in gt else torch.zeros((0, 4))
        b = b.to(device=device, dtype=torch.float32).reshape(-1, 4)
        boxes.append(b)
        index.append(torch.full((b.shape[0],), i, dtype=torch.int64, device=device))
        if image_size_key is not None:
            h, w = ds.metainfo[image_size_key][:2]
            row = torch.tensor([[float(h), float(w)]], device=device)
            sizes.append(row if per_image else row.expand(b.shape[0], 2))
    out = dict(boxes=torch.cat(boxes) if boxes else torch.zeros((0, 4), device=device),
               batch_index=torch.cat(index) if index else torch.zeros((0,), dtype=torch.int64, device=device))
    if image_size_key is not None:
        out["image_size"] = torch.cat(sizes) if sizes else torch.zeros((0, 2), device=device)
    return out


def _floats(x):
    return tuple(float(v) for v in x) if isinstance(x, (list, tuple)) else float(x)


def head_decoding(head: nn.Module, where: str) -> Dict[str, Any]:
    """How a dense head turns its regression output into boxes, as BCKDLoss arguments."""
    name = type(head).__name__
    strides = getattr(getattr(head, "prior_generator", None), "strides", None)
    strides = tuple(float(st[0] if isinstance(st, (tuple, list)) else st) for st in strides) if strides else None
    coder = getattr(head, "bbox_coder", None)
    coder_name = type(coder).__name__
    if hasattr(head, "integral") and hasattr(head, "reg_max"):  # GFL: distributions over reg_max+1 bins
        return dict(decoder="gfl", reg_max=int(head.reg_max), strides=strides)
    if coder_name == "DeltaXYWHBBoxCoder":  # RetinaNet, ATSS, ...
        if getattr(coder, "add_ctr_clamp", False):
            raise ValueError(f"kdops_mmdet: {where}: {name}'s DeltaXYWHBBoxCoder has add_ctr_clamp=True, which "
                             f"kdops.bckd_loc_loss does not implement")
        return dict(decoder="delta_xywh", means=_floats(list(coder.means)), stds=_floats(list(coder.stds)))
    raise ValueError(f"kdops_mmdet: {where}: cannot tell how {name} (box coder {coder_name}) decodes boxes; BCKD "
                     f"supports GFL heads (decoder 'gfl') and DeltaXYWHBBoxCoder heads such as RetinaNet and ATSS "
                     f"(decoder 'delta_xywh')")


def build_entries(cfgs: Sequence[dict]) -> List[LossEntry]:
    if isinstance(cfgs, dict):
        raise ValueError("kdops_mmdet: `distill_losses` is a list of dicts, each with a `name`")
    entries = [LossEntry(c, i) for i, c in enumerate(cfgs or [])]
    names = [e.name for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"kdops_mmdet: distill_losses: names must be unique, repeated: {dup}")
    return entries
