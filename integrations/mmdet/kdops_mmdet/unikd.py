"""UniKD on mmdetection 3.x (Lao et al., "UniKD: Universal Knowledge Distillation for Mimicking
Homogeneous or Heterogeneous Object Detectors", ICCV 2023). No code was released; the method's
pieces are ``kdops.nn`` (:class:`~kdops.nn.AdaptiveKnowledgeExtractor`, :class:`~kdops.nn.UniKDAdaptor`)
and ``kdops.losses`` (:class:`~kdops.losses.UniKDMatchingLoss`, :class:`~kdops.losses.UniKDLoss`,
:func:`~kdops.losses.sample_positional_boxes`, :func:`~kdops.losses.content_positive_mask`). This
module only wires them to mmdet models and data samples.

Two stages, two configs per pair (``configs/unikd/``):

1. **Absorb** (:class:`UniKDAbsorbDetector`): the teacher is frozen; a content AKE (learnt queries)
   and a positional AKE (boxes jittered around the GT, and background boxes) are trained on the
   teacher's FPN as DETR-style detectors (Hungarian matching for content queries, the boxes' own
   assignment for positional ones). Validation evaluates the content AKE as a detector on the
   teacher's features: how much of the teacher it has absorbed.
2. **Inject** (:class:`UniKDDistillDetector`): the AKEs are loaded from stage 1's checkpoint and
   frozen; queries always come from the teacher's features; the extractors run on the teacher's
   maps (z^T) and on the student's maps through a trained adaptor (z^S); the student learns from
   ``loss_unikd_content`` + ``loss_unikd_positional`` (the decoupled embedding MSE, weight 10 each) on top of its
   own detection losses. The adaptor is dropped at export, as connectors are.

Any teacher whose ``extract_feat`` gives FPN levels works (RetinaNet, Faster R-CNN, ...): only its
features are read, which is what makes UniKD heterogeneous. The student must be a one-stage
detector (its head's ``loss`` is called on its own features).
"""
from __future__ import annotations

import json
import os.path as osp
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from mmdet.datasets.transforms import RandomFlip
from mmdet.models.detectors import BaseDetector, SingleStageDetector
from mmdet.models.utils import unpack_gt_instances
from mmdet.structures.bbox import get_box_tensor
from mmengine.logging import print_log
from mmengine.structures import InstanceData

from kdops.losses import (
    UniKDLoss, UniKDMatchingLoss, content_positive_mask, sample_positional_boxes, xyxy_to_normalized_cxcywh,
)
from kdops.nn import AdaptiveKnowledgeExtractor, UniKDAdaptor

from .distiller import DistillDetector, load_teacher, model_config
from .registry import MODELS, TRANSFORMS

_AKE_KEYS = ("num_heads", "num_points", "ffn_dims", "num_queries", "num_extractor_layers", "dropout")


def _check_levels(owner: str, name: str, levels, available: int) -> List[int]:
    if levels is None:
        return list(range(available))
    if not (isinstance(levels, (list, tuple)) and levels and all(isinstance(i, int) for i in levels)):
        raise ValueError(f"{owner}: `{name}` must be a non-empty list of FPN level indices, got {levels!r}")
    bad = [i for i in levels if not 0 <= i < available]
    if bad:
        raise ValueError(f"{owner}: `{name}` {list(levels)} names levels {bad} that the model's neck does not give "
                         f"(it gives {available})")
    return list(levels)


def _probe_feats(model: nn.Module, size: int = 128) -> List[torch.Tensor]:
    """The FPN levels ``extract_feat`` gives for a small batch (their count and channels)."""
    div = max(int(getattr(model.data_preprocessor, "pad_size_divisor", 1)), 1)
    size = -(-max(size, div) // div) * div
    device = next(model.parameters()).device
    mode = model.training
    model.eval()
    try:
        with torch.no_grad():
            feats = model.extract_feat(torch.zeros(1, 3, size, size, device=device))
    finally:
        model.train(mode)
    return list(feats) if isinstance(feats, (list, tuple)) else [feats]


def _ake_settings(owner: str, ake: Optional[dict]) -> dict:
    ake = dict(ake or {})
    unknown = set(ake) - set(_AKE_KEYS)
    if unknown:
        raise ValueError(f"{owner}: ake: unknown keys {sorted(unknown)}; allowed: {list(_AKE_KEYS)} (embed_dims, "
                         f"num_levels and num_classes are read from the teacher)")
    return ake


def _gt_lists(samples, device):
    gts, _ignore, metas = unpack_gt_instances(samples)
    boxes = [get_box_tensor(g.bboxes).to(device=device, dtype=torch.float32) for g in gts]
    labels = [g.labels.to(device=device, dtype=torch.int64) for g in gts]
    sizes = [tuple(float(v) for v in m["img_shape"][:2]) for m in metas]
    return boxes, labels, sizes, metas


class _UniKDParts:
    """The two AKEs and the positional box sampling shared by both stages."""

    owner = "kdops.UniKD"

    def _build_akes(self, channels: int, num_levels: int, num_classes: int, ake: Optional[dict],
                    num_positional: int, pos_fraction: float) -> None:
        settings = dict(_ake_settings(self.owner, ake), embed_dims=channels, num_levels=num_levels,
                        num_classes=num_classes)
        self.content_ake = AdaptiveKnowledgeExtractor("content", **settings)
        self.positional_ake = AdaptiveKnowledgeExtractor("positional", **settings)
        if not isinstance(num_positional, int) or num_positional < 1:
            raise ValueError(f"{self.owner}: num_positional must be an int >= 1, got {num_positional!r}")
        if not 0.0 <= float(pos_fraction) <= 1.0:
            raise ValueError(f"{self.owner}: pos_fraction must be in [0, 1], got {pos_fraction!r}")
        self.num_positional, self.pos_fraction = num_positional, float(pos_fraction)

    def _positional_boxes(self, gt_boxes, sizes, like: torch.Tensor):
        """Per image ``num_positional`` boxes around the GT (IoU > 0.6) and on the background (IoU <
        0.4), normalised (cx, cy, w, h), and each one's GT index (-1: negative)."""
        boxes, assigned = [], []
        for g, (h, w) in zip(gt_boxes, sizes):
            b, a = sample_positional_boxes(g.to("cpu", torch.float64), (h, w), num=self.num_positional,
                                           pos_fraction=self.pos_fraction)
            boxes.append(xyxy_to_normalized_cxcywh(b, (h, w)).to(device=like.device, dtype=like.dtype))
            assigned.append(a.to(like.device))
        return torch.stack(boxes), assigned


@MODELS.register_module()
class UniKDAbsorbDetector(_UniKDParts, BaseDetector):
    """UniKD stage 1 (absorb): the frozen teacher's FPN is read by a content and a positional
    Adaptive Knowledge Extractor trained as DETR-style detectors (:class:`kdops.losses.UniKDMatchingLoss`:
    focal 2, L1 5, GIoU 2; Hungarian matching for the content queries, the sampled boxes' own GT for
    the positional ones). Losses: ``loss_ct_{cls,bbox,giou}`` and ``loss_pos_{cls,bbox,giou}``.
    Only the AKEs train; the checkpoint's ``content_ake.*`` / ``positional_ake.*`` are what stage 2
    loads. ``predict`` runs the content AKE as a detector on the teacher's features (top 100
    query-class pairs per image), so the validation mAP says how much of the teacher it absorbed.

    Args:
        teacher_cfg: the teacher's config (path or dict); teacher_ckpt: its checkpoint.
        levels: the teacher's FPN levels the AKEs read (default: all).
        ake: AdaptiveKnowledgeExtractor settings (``num_queries`` 200, ``num_extractor_layers`` 2,
            ``ffn_dims`` 1024, ``num_heads`` 8, ``num_points`` 4, ``dropout`` 0); the embedding
            width is the teacher's FPN channels, the classes its head's.
        num_positional: positional queries per image (200); pos_fraction: their share around the GT (0.5).
        matching: UniKDMatchingLoss settings (cls_weight, l1_weight, giou_weight, focal_alpha, focal_gamma).
        num_classes: the dataset's classes (default: read from the teacher's head).
    """

    owner = "kdops.UniKDAbsorbDetector"

    def __init__(self, teacher_cfg, teacher_ckpt: Optional[str], levels: Optional[Sequence[int]] = None,
                 ake: Optional[dict] = None, num_positional: int = 200, pos_fraction: float = 0.5,
                 matching: Optional[dict] = None, num_classes: Optional[int] = None, teacher_strict: bool = True,
                 data_preprocessor=None, init_cfg=None) -> None:
        if data_preprocessor is not None:
            raise ValueError(f"{self.owner}: the teacher's data_preprocessor is used; set it in model.teacher_cfg")
        super().__init__(data_preprocessor=None, init_cfg=init_cfg)
        self.teacher = MODELS.build(model_config(teacher_cfg, "model.teacher_cfg"))
        self.data_preprocessor = self.teacher.data_preprocessor
        load_teacher(self.teacher, teacher_ckpt, teacher_strict)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        feats = _probe_feats(self.teacher)
        self.levels = _check_levels(self.owner, "levels", levels, len(feats))
        channels = {feats[i].shape[1] for i in self.levels}
        if len(channels) != 1:
            raise ValueError(f"{self.owner}: the teacher's levels {self.levels} have different channels {channels}")
        self.num_classes = _num_classes(self.owner, self.teacher, num_classes)
        self._build_akes(channels.pop(), len(self.levels), self.num_classes, ake, num_positional, pos_fraction)
        self.matching = UniKDMatchingLoss(num_classes=self.num_classes, **dict(matching or {}))

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def _teacher_feats(self, inputs) -> List[torch.Tensor]:
        with torch.no_grad():
            feats = self.teacher.extract_feat(inputs)
        return [feats[i] for i in self.levels]

    def loss(self, batch_inputs: torch.Tensor, batch_data_samples) -> dict:
        feats = self._teacher_feats(batch_inputs)
        gt_boxes, gt_labels, sizes, _ = _gt_lists(batch_data_samples, feats[0].device)
        losses = {}
        _q, ref, z = self.content_ake(feats)
        logits, boxes = self.content_ake.predict(z, ref)
        for k, v in self.matching(logits, boxes, gt_boxes, gt_labels, sizes).items():
            losses[k.replace("loss_", "loss_ct_")] = v
        pos_boxes, assigned = self._positional_boxes(gt_boxes, sizes, feats[0])
        _q, ref, z = self.positional_ake(feats, pos_boxes)
        logits, boxes = self.positional_ake.predict(z, ref)
        for k, v in self.matching(logits, boxes, gt_boxes, gt_labels, sizes, assigned_gt=assigned).items():
            losses[k.replace("loss_", "loss_pos_")] = v
        return losses

    def predict(self, batch_inputs, batch_data_samples, rescale: bool = True):
        feats = self._teacher_feats(batch_inputs)
        _q, ref, z = self.content_ake(feats)
        logits, boxes = self.content_ake.predict(z, ref)
        for n, sample in enumerate(batch_data_samples):
            h, w = sample.metainfo["img_shape"][:2]
            scores, idx = logits[n].sigmoid().flatten().topk(min(100, logits[n].numel()))
            q, labels = idx // self.num_classes, idx % self.num_classes
            cx, cy, bw, bh = boxes[n, q].unbind(-1)
            xyxy = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
            if rescale and "scale_factor" in sample.metainfo:
                sx, sy = sample.metainfo["scale_factor"][:2]
                xyxy = xyxy / xyxy.new_tensor([sx, sy, sx, sy])
            sample.pred_instances = InstanceData(bboxes=xyxy, scores=scores, labels=labels)
        return batch_data_samples

    def _forward(self, batch_inputs, batch_data_samples=None):
        feats = self._teacher_feats(batch_inputs)
        _q, ref, z = self.content_ake(feats)
        return self.content_ake.predict(z, ref)

    def extract_feat(self, batch_inputs):
        return self._teacher_feats(batch_inputs)


def _num_classes(owner: str, teacher: nn.Module, given: Optional[int]) -> int:
    if given is not None:
        if not isinstance(given, int) or given < 1:
            raise ValueError(f"{owner}: num_classes must be an int >= 1, got {given!r}")
        return given
    for path in ("bbox_head", "roi_head.bbox_head"):
        m = teacher
        for part in path.split("."):
            m = getattr(m, part, None)
        if m is not None and getattr(m, "num_classes", None):
            return int(m.num_classes)
    raise ValueError(f"{owner}: cannot read the number of classes from the teacher ({type(teacher).__name__}); "
                     f"set num_classes")


#: what stage 2 reads from the teacher side, per image (a cache entry; stacked per batch online)
KNOWLEDGE = ("q_ct", "r_ct", "z_ct", "ct_mask", "q_pos", "r_pos", "z_pos", "pos_mask")
META_FILE = "unikd.json"


def augmentation_record(meta: dict) -> dict:
    """What a cached entry depends on besides the image: its flip and geometry (a data sample's
    metainfo after the pipeline). The offline pipeline replays the flip (:class:`CachedFlip`); a
    resize that came out differently finds no entry (an error naming the recorded ones)."""
    flip = bool(meta.get("flip", False))
    sf = meta.get("scale_factor", (1.0, 1.0))
    return {"flip": flip, "flip_direction": meta.get("flip_direction") if flip else None,
            "img_shape": [int(v) for v in meta["img_shape"][:2]], "scale_factor": [float(v) for v in sf[:2]]}


def image_key(meta: dict) -> str:
    """A cached image's key: its file name (unique in COCO and kdops.toy_data)."""
    path = meta.get("img_path")
    if not path:
        raise ValueError("kdops.UniKD: a data sample has no img_path: the teacher cache keys images by file name")
    return osp.basename(str(path))


def cached_entries(cache, root: str, samples, owner: str) -> list:
    """Each sample's teacher entry from a :class:`kdops.cache.TeacherCache`, by image file name and
    augmentation; a missing one is a KeyError saying how to replay the cached augmentations."""
    per_image = []
    for sample in samples:
        key, aug = image_key(sample.metainfo), augmentation_record(sample.metainfo)
        try:
            per_image.append(cache.get(key, aug))
        except KeyError as e:
            raise KeyError(f"{owner}: the teacher cache {root} has no entry for {key} under {aug}: "
                           f"{e.args[0] if e.args else ''}. Replay the cached augmentations in the training "
                           f"pipeline (type='kdops.CachedFlip' instead of RandomFlip) and keep the caching run's "
                           f"resize") from None
    return per_image


def _file_digest(path: Optional[str]) -> str:
    import hashlib

    if path is None:
        return "none"
    if "://" in str(path) or not osp.isfile(path):
        return f"url:{path}"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@MODELS.register_module()
class UniKDDistillDetector(_UniKDParts, DistillDetector):
    """UniKD stage 2 (inject): a one-stage student learns from the teacher through the frozen
    stage-1 AKEs. Per step, with the teacher's FPN :math:`F^T` and the student's :math:`F^S`:

    - content: :math:`(q, r) = f(F^T)`, :math:`z^T = f_e(q, r; F^T)`, :math:`z^S = f_e(q, r; \\phi(F^S))`,
      positives = the queries the Hungarian matching of the AKE's prediction on :math:`z^T` pairs
      with a GT (:func:`kdops.losses.content_positive_mask`);
    - positional: boxes sampled around the GT and on the background, :math:`(q, b) = f_{pos}(F^T, b)`,
      :math:`z^T, z^S` as above, positives = the boxes around a GT;
    - ``loss_unikd_content`` + ``loss_unikd_positional`` (:class:`kdops.losses.UniKDLoss`, λ1 = λ2 = 10),
      scaled by ``kd_scale['unikd']`` (KDScheduleHook), next to the student's own losses and any
      ``distill_losses`` entries (online only).

    φ is :class:`kdops.nn.UniKDAdaptor` (1x1 conv per level to the teacher's width, then 2 deformable
    self-attention layers), trained with the student and dropped at export. The AKEs never train:
    they have no gradient and stay in eval mode.

    **Offline** (``teacher_cache=DIR``, written by ``python -m kdops_mmdet.cache_teacher CONFIG --out
    DIR``): everything on the teacher's side above (q, r, z^T, the positive masks, the positional
    boxes) is read from the cache per image and augmentation; the teacher is never built and the AKEs'
    query generators never run (their extractors still do, on the student's maps). The training
    pipeline must replay the cached augmentations (:class:`CachedFlip` in place of ``RandomFlip``);
    an image or augmentation the cache does not hold is an error, and so is a cache made with another
    teacher, checkpoint, AKE checkpoint or setting (its fingerprint).

    Args:
        student, teacher_cfg, teacher_ckpt, distill_losses: as for :class:`DistillDetector`.
        ake_ckpt: stage 1's checkpoint (its ``content_ake.*`` / ``positional_ake.*``); None only in
            tests (random AKEs, with a warning).
        ake, num_positional, pos_fraction, num_classes: as in stage 1 (must match its checkpoint).
        levels / teacher_levels: the student's / teacher's FPN levels paired one for one (default:
            all, which must then be as many).
        adaptor: UniKDAdaptor settings (``num_layers`` 2, ``num_heads``, ``num_points``, ``ffn_dims``).
        loss: UniKDLoss settings (``content_weight``, ``positional_weight``: 10, 10).
        matching: the matching cost of the content positives (as stage 1's).
        teacher_cache: a cache directory to train from (offline), or None (online).
    """

    owner = "kdops.UniKDDistillDetector"
    teacher_optional = True  # offline: the teacher's side comes from the cache

    def __init__(self, student, teacher_cfg, teacher_ckpt: Optional[str], ake_ckpt: Optional[str],
                 ake: Optional[dict] = None, num_positional: int = 200, pos_fraction: float = 0.5,
                 levels: Optional[Sequence[int]] = None, teacher_levels: Optional[Sequence[int]] = None,
                 adaptor: Optional[dict] = None, loss: Optional[dict] = None, matching: Optional[dict] = None,
                 num_classes: Optional[int] = None, distill_losses: Sequence[dict] = (),
                 teacher_cache: Optional[str] = None, **kwargs) -> None:
        for entry in distill_losses or ():
            if isinstance(entry, dict) and entry.get("name") == "unikd":
                raise ValueError(f"{self.owner}: distill_losses entry name 'unikd' is UniKD's own; rename the entry")
        self.teacher_cache_dir = teacher_cache
        meta = self._cache_meta(teacher_cache) if teacher_cache is not None else None
        if meta is not None and distill_losses:
            raise ValueError(f"{self.owner}: distill_losses need the teacher itself; train online (teacher_cache=None) "
                             f"to combine UniKD with other losses")
        super().__init__(student, None if meta is not None else teacher_cfg, teacher_ckpt,
                         distill_losses=distill_losses, **kwargs)
        if not isinstance(self.student, SingleStageDetector):
            raise ValueError(f"{self.owner}: the student must be a one-stage detector (RetinaNet, ATSS, GFL, FCOS), "
                             f"got {type(self.student).__name__}")
        s_feats = _probe_feats(self.student)
        self.levels = _check_levels(self.owner, "levels", levels, len(s_feats))
        if meta is None:
            t_feats = _probe_feats(self.teacher)
            self.teacher_levels = _check_levels(self.owner, "teacher_levels", teacher_levels, len(t_feats))
            channels = {t_feats[i].shape[1] for i in self.teacher_levels}
            if len(channels) != 1:
                raise ValueError(f"{self.owner}: the teacher's levels {self.teacher_levels} have different channels "
                                 f"{channels}")
            c_t = channels.pop()
            self.num_classes = _num_classes(self.owner, self.teacher, num_classes)
        else:
            self.teacher_levels = list(meta["teacher_levels"])
            if teacher_levels is not None and list(teacher_levels) != self.teacher_levels:
                raise ValueError(f"{self.owner}: teacher_levels {list(teacher_levels)} but the cache was made with "
                                 f"{self.teacher_levels}")
            c_t, self.num_classes = int(meta["channels"]), int(meta["num_classes"])
        if len(self.levels) != len(self.teacher_levels):
            raise ValueError(f"{self.owner}: levels {self.levels} and teacher_levels {self.teacher_levels} must pair "
                             f"one for one (the student gives {len(s_feats)} levels)")
        self._build_akes(c_t, len(self.teacher_levels), self.num_classes, ake, num_positional, pos_fraction)
        self._load_akes(ake_ckpt)
        for m in (self.content_ake, self.positional_ake):
            m.requires_grad_(False)
            m.eval()
        self.adaptor = UniKDAdaptor([s_feats[i].shape[1] for i in self.levels], embed_dims=c_t,
                                    num_levels=len(self.levels), **dict(adaptor or {}))
        self.unikd = UniKDLoss(**dict(loss or {}))
        self.matching_cfg = dict(matching or {})
        self.kd_scale["unikd"] = 1.0
        self.fingerprint = self._fingerprint(teacher_cfg, teacher_ckpt, ake_ckpt)
        self._cache = None
        if meta is not None:
            from kdops.cache import TeacherCache

            self._cache = TeacherCache(teacher_cache, fingerprint=self.fingerprint, verify="lazy")

    # ------------------------------------------------------------ construction
    def _cache_meta(self, root: str) -> dict:
        path = osp.join(str(root), META_FILE)
        if not osp.isfile(path):
            raise FileNotFoundError(f"{self.owner}: teacher_cache={root!r} holds no {META_FILE}: make it with "
                                    f"`python -m kdops_mmdet.cache_teacher CONFIG --out {root}`")
        with open(path) as f:
            return json.load(f)

    def _fingerprint(self, teacher_cfg, teacher_ckpt, ake_ckpt) -> str:
        """A hash of what the teacher's side depends on: the teacher's config and weights, the AKEs'
        weights and settings, the levels and the positional sampling."""
        import hashlib

        cfg = model_config(teacher_cfg, "model.teacher_cfg")
        doc = dict(teacher=cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg),
                   teacher_weights=_file_digest(teacher_ckpt), ake_weights=_file_digest(ake_ckpt),
                   ake={k: getattr(self.content_ake, k) for k in ("embed_dims", "num_levels", "num_queries",
                                                                  "num_classes")},
                   ake_layers=len(self.content_ake.extractor), teacher_levels=self.teacher_levels,
                   num_positional=self.num_positional, pos_fraction=self.pos_fraction, matching=self.matching_cfg)
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def cache_meta(self) -> dict:
        """The sidecar a cache carries (read back in offline mode instead of probing the teacher)."""
        return dict(channels=self.content_ake.embed_dims, num_classes=self.num_classes,
                    teacher_levels=self.teacher_levels, fingerprint=self.fingerprint)

    def _load_akes(self, ckpt: Optional[str]) -> None:
        if ckpt is None:
            print_log(f"{self.owner}: model.ake_ckpt is None: the AKEs keep their random initialisation (only "
                      "useful for tests); stage 2 needs stage 1's checkpoint", logger="current", level=30)
            return
        if not isinstance(ckpt, str) or not osp.isfile(ckpt):
            raise FileNotFoundError(f"{self.owner}: model.ake_ckpt: no checkpoint file at {ckpt!r}; train stage 1 "
                                    f"(a unikd_absorb_* config) and pass its checkpoint")
        # a checkpoint stage 1's Runner wrote (a pickle with its message hub, as mmengine's own: load only
        # checkpoints you trust); it also holds the teacher: only the AKEs are read
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        state = state.get("state_dict", state)
        for name in ("content_ake", "positional_ake"):
            part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            if not part:
                raise ValueError(f"{self.owner}: {ckpt} holds no {name}.* weights: is it the checkpoint of a "
                                 f"kdops.UniKDAbsorbDetector run?")
            try:
                getattr(self, name).load_state_dict(part, strict=True)
            except RuntimeError as e:
                raise ValueError(f"{self.owner}: {ckpt}: its {name} does not fit this model's (the `ake`, levels "
                                 f"and teacher must be stage 1's): {str(e).splitlines()[0]}") from None
            getattr(self, name).is_init = True  # what mmengine's init_weights checks: keep the loaded weights

    def train(self, mode: bool = True):
        super().train(mode)
        self.content_ake.eval()
        self.positional_ake.eval()
        return self

    # ---------------------------------------------------------------- training
    def loss(self, batch_inputs: torch.Tensor, batch_data_samples) -> dict:
        self.teacher_taps.start()
        self.student_taps.start()
        try:
            if self._cache is None:
                with torch.no_grad():
                    t_all = self.teacher.extract_feat(batch_inputs)
                know = self.teacher_knowledge([t_all[i] for i in self.teacher_levels], batch_data_samples)
            else:
                know = self.cached_knowledge(batch_data_samples, batch_inputs)
            s_all = self.student.extract_feat(batch_inputs)
            losses = self.student.bbox_head.loss(s_all, batch_data_samples)
            losses.update(self._unikd_losses(know, [s_all[i] for i in self.levels]))
            self._add_entry_losses(losses, batch_data_samples)
        finally:
            self.student_taps.stop()
            self.teacher_taps.stop()
        return losses

    @torch.no_grad()
    def teacher_knowledge(self, t_feats: List[torch.Tensor], samples) -> Dict[str, torch.Tensor]:
        """The teacher's side of a batch (what a cache entry holds per image): the content queries and
        reference points, z^T and the Hungarian positives; the positional boxes, their queries, z^T and
        positives."""
        gt_boxes, gt_labels, sizes, _ = _gt_lists(samples, t_feats[0].device)
        ct, pos = self.content_ake, self.positional_ake
        q_ct, r_ct = ct.generate(t_feats)
        z_ct = ct.extract(q_ct, r_ct, t_feats)
        ct_mask = content_positive_mask(*ct.predict(z_ct, r_ct), gt_boxes, gt_labels, sizes, **self.matching_cfg)
        boxes, assigned = self._positional_boxes(gt_boxes, sizes, t_feats[0])
        q_pos, r_pos = pos.generate(t_feats, boxes)
        z_pos = pos.extract(q_pos, r_pos, t_feats)
        return dict(q_ct=q_ct, r_ct=r_ct, z_ct=z_ct, ct_mask=ct_mask, q_pos=q_pos, r_pos=r_pos, z_pos=z_pos,
                    pos_mask=torch.stack([a >= 0 for a in assigned]))

    def cached_knowledge(self, samples, like: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The batch's teacher side from the cache (offline), by image file name and augmentation."""
        per_image = cached_entries(self._cache, self.teacher_cache_dir, samples, self.owner)
        out = {}
        for name in KNOWLEDGE:
            t = torch.stack([e[name] for e in per_image]).to(like.device)
            out[name] = t if t.dtype == torch.bool else t.to(like.dtype)
        return out

    def _unikd_losses(self, know: Dict[str, torch.Tensor], s_feats) -> Dict[str, torch.Tensor]:
        adapted = self.adaptor(s_feats)
        z_ct_s = self.content_ake.extract(know["q_ct"], know["r_ct"], adapted)
        z_pos_s = self.positional_ake.extract(know["q_pos"], know["r_pos"], adapted)
        out = self.unikd(z_ct_s, know["z_ct"], know["ct_mask"], z_pos_s, know["z_pos"], know["pos_mask"])
        scale = self.kd_scale["unikd"]
        return {"loss_unikd_" + k[len("loss_"):]: v * scale for k, v in out.items()}


@TRANSFORMS.register_module()
class CachedFlip(RandomFlip):
    """``RandomFlip`` that replays a flip the teacher cache holds for the image (UniKD offline):
    one of the image's recorded augmentations, drawn at random, instead of a fresh coin toss, so
    every training sample has its teacher entry. An image the cache does not hold is an error.

    Args:
        cache: the teacher cache directory (``model.teacher_cache``).
        direction: the flip direction the caching run used ('horizontal').
    """

    def __init__(self, cache: str, direction: str = "horizontal", prob: float = 0.5) -> None:
        super().__init__(prob=prob, direction=direction)
        self.cache_dir = cache
        self._teacher_cache = None

    def transform(self, results: dict) -> dict:
        if self._teacher_cache is None:  # opened in each data-loader worker; checksums are checked by the model
            from kdops.cache import TeacherCache

            self._teacher_cache = TeacherCache(self.cache_dir, verify="none")
        key = osp.basename(str(results["img_path"]))
        try:
            rec = self._teacher_cache.sample_augmentation(key, np.random)
        except KeyError:
            raise KeyError(f"kdops.CachedFlip: the teacher cache {self.cache_dir} holds no entry for image {key}: "
                           f"cache the whole training set (python -m kdops_mmdet.cache_teacher)") from None
        results["flip"] = bool(rec.get("flip"))
        results["flip_direction"] = rec.get("flip_direction") if results["flip"] else None
        if results["flip"]:
            self._flip(results)  # RandomFlip's own flip of the image, boxes, masks and maps
        return results
