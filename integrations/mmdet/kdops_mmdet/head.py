"""HEAD on mmdet 3.x: a two-stage teacher distilled into a one-stage student through an assistant
R-CNN head (Wang et al., "HEAD: HEtero-Assists Distillation for Heterogeneous Object Detectors",
ECCV 2022; authors' code github.com/LutingWang/HEAD on mmdet 2.20).

    model = dict(
        type='kdops.HEADDistillDetector',
        student={{_base_.model}},                                   # a RetinaNet or an FCOS (one-stage)
        teacher_cfg='mmdet::faster_rcnn/faster-rcnn_r50_fpn_ms-3x_coco.py',
        teacher_ckpt='https://download.openmmlab.com/.../faster_rcnn_r50_fpn_mstrain_3x_coco_...pth',
        akd=dict(loss_weight=2.0),          # the release's weight per layer (the paper's lambda^A: 5.0)
        ckd=dict(loss_weight=2.0))          # type='contrastive' for G-DetKD's InfoNCE variant
    custom_hooks = [
        dict(type='kdops.KDScheduleHook', warmup_iters=2000, losses=['akd']),
        dict(type='kdops.KDScheduleHook', warmup_iters=2000, stop_at_first_lr_milestone=True, losses=['ckd'])]

One training step (the release's ``CrossStageHEAD`` written for mmdet 3.x):

1. The teacher's features, under ``no_grad`` (frozen, eval mode, as in :class:`DistillDetector`).
2. The student's own forward and losses; the outputs of its head's last classification conv
   (``bbox_head.cls_convs[-1]``, after its ReLU) are recorded per level.
3. Proposals from the student's head (:func:`kdops.losses.head_proposals`: max over classes as
   objectness, top ``nms_pre`` per level, the head's own DeltaXYWH decoding, NMS 0.7 per level,
   ``max_per_img``), each with its source [level, image, y, x, anchor]. An FCOS student follows the
   release's ``FCOSRPNHead``: the same max and top-k, each candidate's score times its centerness,
   distance decoding (times the stride where the head normalises it), one NMS over all levels.
4. The **assistant** -- a copy of the teacher's ``roi_head`` (RoIAlign, ``Shared2FCBBoxHead``) on
   the student's first ``len(featmap_strides)`` FPN levels, initialised from the teacher's RoI head
   (``weight_transfer``) -- assigns and samples the proposals with the teacher's ``train_cfg.rcnn``
   (GT boxes added as proposals, marked by source level -1) and trains on the GT losses
   (``loss_assist_cls``, ``loss_assist_bbox``; ``assist_acc`` is logged, not summed).
5. The teacher's R-CNN head runs on the *same* sampled RoIs (``no_grad``).
6. ``loss_akd`` (:class:`kdops.losses.HEADAKDLoss`): the assistant's ``shared_fcs[0]`` and
   ``shared_fcs[-1]`` outputs (before their ReLU), through one Linear each, mimic the teacher's.
7. ``loss_ckd`` (:class:`kdops.losses.HEADCKDLoss`): the student's cls-conv feature at each
   non-GT RoI's source pixel (:func:`kdops.gather_level_features`), through a Linear, mimics the
   teacher's ``shared_fcs[-1]`` feature of that RoI.

``loss_akd`` and ``loss_ckd`` are scaled by :class:`KDScheduleHook` (names ``akd``, ``ckd``). The
paper stops CKD at the first learning-rate drop (Table 6) and the release does not: the shipped
configs follow the paper (``stop_at_first_lr_milestone=True`` on ``ckd``); drop that flag for the
release's behaviour. Export keeps ``student.*`` only: no assistant, adapter or teacher weights.

Host synchronisation: with ``sync_free=True`` (the default) the whole distillation part --
proposals (:func:`kdops.nms_mask`), the assistant's assignment and sampling
(:func:`kdops.losses.head_sample_rois`: mmdet's ``MaxIoUAssigner`` + ``RandomSampler`` in fixed
shapes, the same assignment and sampling law), its R-CNN GT loss (mmdet's own ``loss_cls`` and
``loss_bbox`` modules on masked, fixed-size batches), the teacher's R-CNN head, AKD and CKD --
never reads the device: each image keeps ``num`` RoI slots (512), empty slots are masked out of
every loss. ``sync_free=False`` runs mmdet's assigner, sampler and ``bbox_loss`` instead (the
release's path; data-dependent sizes, several host reads per image).
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from mmdet.models.detectors import BaseDetector, SingleStageDetector, TwoStageDetector
from mmdet.models.utils import unpack_gt_instances
from mmdet.structures.bbox import bbox2roi, get_box_tensor
from mmengine.config import ConfigDict
from mmengine.logging import print_log
from mmengine.structures import InstanceData

from kdops.losses import (
    HEADAKDLoss, HEADCKDLoss, HEADContrastiveCKDLoss, HEADDenseLoss, HEADRoISamples, head_gt_sources, head_pad_gt,
    head_proposals, head_rcnn_loss, head_sample_rois,
)

from .distill_losses import head_decoding
from .distiller import DistillDetector, StudentInference, model_config
from .registry import MODELS
from .roi_extractor import use_fused_extractor

_OWNER = "kdops.HEADDistillDetector"
#: the release's RPN settings for the student-as-RPN (mmdet's Faster R-CNN ``train_cfg.rpn_proposal``)
PROPOSAL_DEFAULTS = dict(nms_pre=2000, iou_threshold=0.7, max_per_img=1000, min_bbox_size=0.0)


class _Recorder:
    """Forward hooks that append a module's output on each call, only while recording."""

    def __init__(self, modules: Dict[str, nn.Module]) -> None:
        self.out: Dict[str, List[torch.Tensor]] = {k: [] for k in modules}
        self.on = False
        self._handles = [m.register_forward_hook(self._hook(k)) for k, m in modules.items()]

    def _hook(self, key):
        def hook(module, args, output):
            if self.on:
                self.out[key].append(output)
        return hook

    def __enter__(self):
        for v in self.out.values():
            v.clear()
        self.on = True
        return self

    def __exit__(self, *exc):
        self.on = False
        return False

    def take(self) -> Dict[str, List[torch.Tensor]]:
        out = {k: list(v) for k, v in self.out.items()}
        for v in self.out.values():
            v.clear()
        return out


def _shared_fcs(roi_head: nn.Module, role: str, owner: str = _OWNER) -> nn.ModuleList:
    fcs = getattr(getattr(roi_head, "bbox_head", None), "shared_fcs", None)
    if not isinstance(fcs, nn.ModuleList) or len(fcs) == 0:
        raise ValueError(f"{owner}: the {role}'s roi_head.bbox_head has no shared_fcs (got "
                         f"{type(getattr(roi_head, 'bbox_head', None)).__name__}); HEAD distils the shared FC "
                         f"layers of a ConvFCBBoxHead such as Shared2FCBBoxHead (Faster R-CNN's)")
    return fcs


class _StudentAsRPN:
    """What HEAD and TF-HEAD share: a one-stage student (anchor or FCOS) whose head serves as the RPN of an
    R-CNN assistant (``self.assistant``), the proposals' sources carried through the sampler, and
    the per-loss schedule factors (``self.kd_scale``). Needs ``self.student``."""

    owner = _OWNER

    def _check_student(self) -> None:
        s = self.student
        head = getattr(s, "bbox_head", None)
        if not isinstance(s, SingleStageDetector) or head is None:
            raise ValueError(f"{self.owner}: the student must be a one-stage detector (RetinaNet-like), got "
                             f"{type(s).__name__}")
        convs = getattr(head, "cls_convs", None)
        if not isinstance(convs, nn.ModuleList) or len(convs) == 0:
            raise ValueError(f"{self.owner}: the student's head ({type(head).__name__}) has no classification conv "
                             f"tower (bbox_head.cls_convs, e.g. RetinaHead stacked_convs >= 1): CKD reads its last "
                             f"conv's output")
        if not hasattr(head, "prior_generator") or getattr(head.prior_generator, "num_base_priors", None) is None:
            raise ValueError(f"{self.owner}: the student's head ({type(head).__name__}) has no prior_generator")
        if type(getattr(head, "bbox_coder", None)).__name__ == "DistancePointBBoxCoder" and hasattr(
                head, "conv_centerness"):  # FCOS: points, distances, centerness (the release's FCOSRPNHead)
            self.decoding = dict(decoder="distance")
            return
        try:
            self.decoding = head_decoding(head, "model.student.bbox_head")
        except ValueError:
            self.decoding = dict(decoder=type(getattr(head, "bbox_coder", None)).__name__)
        if self.decoding["decoder"] != "delta_xywh":
            raise ValueError(f"{self.owner}: the student's head ({type(head).__name__}) decodes boxes with "
                             f"{self.decoding['decoder']!r}; HEAD's proposals need an anchor head with a "
                             f"DeltaXYWHBBoxCoder (RetinaNet, ATSS) or an FCOS head")

    def _student_strides(self) -> List[int]:
        return [int(st[0] if isinstance(st, (tuple, list)) else st)
                for st in self.student.bbox_head.prior_generator.strides]

    def _check_strides(self, strides) -> List[int]:
        if (not isinstance(strides, (list, tuple)) or not strides
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in strides)):
            raise ValueError(f"{self.owner}: featmap_strides must be a non-empty list of positive ints, got "
                             f"{strides!r}")
        head_strides = self._student_strides()
        if list(strides) != head_strides[:len(strides)]:
            raise ValueError(f"{self.owner}: featmap_strides {list(strides)} must be the first strides of the "
                             f"student's levels {head_strides} (the assistant pools from the student's first FPN "
                             f"levels)")
        return list(strides)

    def _check_proposals(self, proposals: Optional[dict]) -> dict:
        unknown = set(proposals or {}) - set(PROPOSAL_DEFAULTS)
        if unknown:
            raise ValueError(f"{self.owner}: proposals: unknown keys {sorted(unknown)}; valid: "
                             f"{sorted(PROPOSAL_DEFAULTS)}")
        return {**PROPOSAL_DEFAULTS, **(proposals or {})}

    def _student_channels(self) -> int:
        head = self.student.bbox_head
        c = getattr(head, "in_channels", None)
        if not isinstance(c, int):
            raise ValueError(f"{self.owner}: cannot read the student's FPN channels from its head "
                             f"({type(head).__name__}.in_channels = {c!r})")
        return c

    def _student_feat_channels(self) -> int:
        return int(getattr(self.student.bbox_head, "feat_channels", None) or self._student_channels())

    def _assistant_cfg(self, roi_head: dict, train_cfg: Optional[dict], test_cfg: Optional[dict]) -> ConfigDict:
        """An R-CNN head config moved onto the student's first FPN levels."""
        cfg = ConfigDict(copy.deepcopy(dict(roi_head)))
        if train_cfg is None:
            raise ValueError(f"{self.owner}: the R-CNN assistant needs a train_cfg (its assigner and sampler)")
        channels = self._student_channels()
        cfg.bbox_roi_extractor.featmap_strides = list(self.featmap_strides)
        cfg.bbox_roi_extractor.out_channels = channels
        cfg.bbox_head.in_channels = channels
        cfg.update(train_cfg=train_cfg, test_cfg=test_cfg)
        if getattr(self, "fused_roi_align", False):
            use_fused_extractor(cfg)
        if cfg.get("mask_head") is not None:
            cfg.mask_head = None
            cfg.mask_roi_extractor = None
            print_log(f"{self.owner}: the mask head is not part of the assistant (HEAD distils boxes)",
                      logger="current", level=30)
        return cfg

    def _sync_free_cfg(self) -> dict:
        """The assistant's assigner/sampler settings for :func:`kdops.losses.head_sample_rois`, and
        a check that its R-CNN loss can run on masked slots (else a ValueError naming the fix)."""
        a = self.assistant
        assigner, sampler, head = a.bbox_assigner, a.bbox_sampler, a.bbox_head
        hint = "; set sync_free=False to use mmdet's assigner, sampler and bbox_loss"
        if type(assigner).__name__ != "MaxIoUAssigner" or type(sampler).__name__ != "RandomSampler":
            raise ValueError(f"{self.owner}: sync_free=True computes Faster R-CNN's MaxIoUAssigner + RandomSampler; "
                             f"the assistant's train_cfg has {type(assigner).__name__} + {type(sampler).__name__}{hint}")
        iou_calc = getattr(assigner, "iou_calculator", None)
        if (type(iou_calc).__name__ != "BboxOverlaps2D" or getattr(iou_calc, "scale", 1.0) != 1.0
                or getattr(iou_calc, "dtype", None) is not None):
            raise ValueError(f"{self.owner}: sync_free=True needs the assigner's plain BboxOverlaps2D IoU (scale 1, "
                             f"no dtype cast), got {iou_calc!r}{hint}")
        if assigner.ignore_iof_thr > 0:
            raise ValueError(f"{self.owner}: sync_free=True does not implement ignored GT boxes (assigner "
                             f"ignore_iof_thr = {assigner.ignore_iof_thr}){hint}")
        if assigner.match_low_quality and not assigner.gt_max_assign_all:
            raise ValueError(f"{self.owner}: sync_free=True implements match_low_quality with gt_max_assign_all=True "
                             f"only{hint}")
        if getattr(head, "reg_decoded_bbox", False) or getattr(head, "custom_cls_channels", False):
            raise ValueError(f"{self.owner}: sync_free=True needs a bbox head regressing encoded deltas with a plain "
                             f"softmax classifier (reg_decoded_bbox=False, no custom_cls_channels){hint}")
        if type(head.loss_bbox).__name__ not in ("L1Loss", "SmoothL1Loss", "MSELoss", "BalancedL1Loss"):
            raise ValueError(f"{self.owner}: sync_free=True supports element-wise box losses (L1Loss, SmoothL1Loss, "
                             f"MSELoss, BalancedL1Loss), got {type(head.loss_bbox).__name__}{hint}")
        if type(head.loss_cls).__name__ != "CrossEntropyLoss" or head.loss_cls.use_sigmoid:
            raise ValueError(f"{self.owner}: sync_free=True supports a softmax CrossEntropyLoss classifier, got "
                             f"{type(head.loss_cls).__name__}{hint}")
        return dict(num_classes=int(head.num_classes), num=int(sampler.num), pos_fraction=float(sampler.pos_fraction),
                    neg_pos_ub=float(sampler.neg_pos_ub), add_gt_as_proposals=bool(sampler.add_gt_as_proposals),
                    pos_iou_thr=float(assigner.pos_iou_thr), neg_iou_thr=assigner.neg_iou_thr,
                    min_pos_iou=float(assigner.min_pos_iou), match_low_quality=bool(assigner.match_low_quality))

    def set_kd_scale(self, scale) -> None:
        """The schedule's factor on each named loss (KDScheduleHook calls this before every iteration)."""
        if isinstance(scale, dict):
            unknown = set(scale) - set(self.kd_scale)
            if unknown:
                raise ValueError(f"{self.owner}: KDScheduleHook losses {sorted(unknown)} do not exist; this "
                                 f"model's are {sorted(self.kd_scale)}")
            self.kd_scale.update({k: float(v) for k, v in scale.items()})
        else:
            self.kd_scale = {k: float(scale) for k in self.kd_scale}

    def proposals(self, cls_scores, bbox_preds, metas, centernesses=None, padded: bool = False):
        """The student head as an RPN (:func:`kdops.losses.head_proposals`) with its own priors and
        coder: anchors and DeltaXYWH, or (FCOS) points, distances and the centerness as score factor."""
        head = self.student.bbox_head
        sizes = [c.shape[-2:] for c in cls_scores]
        shapes = [tuple(m["img_shape"][:2]) for m in metas]
        cls = [c.detach() for c in cls_scores]
        if self.decoding["decoder"] == "distance":
            points = head.prior_generator.grid_priors(sizes, dtype=bbox_preds[0].dtype, device=cls[0].device,
                                                      with_stride=True)
            # FCOSHead.forward_single leaves normalised distances (units of the stride) in training
            scaled = bool(getattr(head, "norm_on_bbox", False)) and head.training
            regs = [b.detach() * float(st) if scaled else b.detach()
                    for b, st in zip(bbox_preds, self._student_strides())]
            if centernesses is None:
                raise ValueError(f"{self.owner}: the FCOS student's head returned no centerness")
            return head_proposals(cls, regs, points, "distance", score_factors=[c.detach() for c in centernesses],
                                  nms_across_levels=True, img_shape=shapes, padded=padded, **self.proposal_cfg)
        priors = head.prior_generator.grid_priors(sizes, device=cls[0].device)
        return head_proposals(cls, [b.detach() for b in bbox_preds], priors, "delta_xywh", means=self.decoding["means"],
                              stds=self.decoding["stds"], img_shape=shapes, padded=padded, **self.proposal_cfg)

    def _sample(self, x, props, gts, gts_ignore):
        """mmdet's StandardRoIHead assignment and sampling, keeping each sampled RoI's source row."""
        a = self.assistant
        sampling, sources = [], []
        add_gt = bool(getattr(a.bbox_sampler, "add_gt_as_proposals", False))
        for i, gt in enumerate(gts):
            rpn = InstanceData(priors=props.boxes[i], scores=props.scores[i])
            assign = a.bbox_assigner.assign(rpn, gt, gts_ignore[i])
            res = a.bbox_sampler.sample(assign, rpn, gt, feats=[lvl[i][None] for lvl in x])
            src = props.sources[i]
            if add_gt and len(gt.bboxes) > 0:
                g = head_gt_sources([0] * i + [len(gt.bboxes)], device=src.device)  # [-1, i, -1, -1, g]
                src = torch.cat([g, src])
            sampling.append(res)
            sources.append(src[torch.cat([res.pos_inds, res.neg_inds])])
        return sampling, torch.cat(sources)

    def _assistant_step(self, s_feats, outs, gts, gts_ignore, metas, losses: dict, scale: float):
        """Proposals from the student's head outputs ``outs`` (cls_scores, bbox_preds[, centernesses]),
        the assistant's sampling and GT loss (into ``losses`` as loss_assist_*, times ``scale``);
        returns (rois (R,5), valid rows (R,) bool or None, sources (R,5), the assistant's recorded
        shared_fcs outputs)."""
        x = tuple(s_feats[:len(self.featmap_strides)])
        ctr = outs[2] if len(outs) > 2 else None
        if self.sync_free:
            props = self.proposals(outs[0], outs[1], metas, ctr, padded=True)
            gt_b, gt_l, gt_v = head_pad_gt([get_box_tensor(g.bboxes).to(props.boxes.dtype) for g in gts],
                                           [g.labels for g in gts])
            samples = head_sample_rois(props.boxes, props.valid, props.sources, gt_b, gt_l, gt_v,
                                       **self._sampling_cfg)
            with self._assist_rec:
                res = self.assistant._bbox_forward(x, samples.rois)
            res = self._masked_rcnn_loss(res["cls_score"], res["bbox_pred"], samples)
            rois, valid, sources = samples.rois, samples.valid, samples.sources
        else:
            props = self.proposals(outs[0], outs[1], metas, ctr)
            sampling, sources = self._sample(x, props, gts, gts_ignore)
            with self._assist_rec:
                res = self.assistant.bbox_loss(x, sampling)["loss_bbox"]
            rois, valid = bbox2roi([r.priors for r in sampling]), None
        for k, v in res.items():
            if k.startswith("loss_"):
                losses["loss_assist_" + k[len("loss_"):]] = v * scale
            else:
                losses["assist_" + k] = v
        return rois, valid, sources, self._assist_rec.take()

    def _masked_rcnn_loss(self, cls_score: torch.Tensor, bbox_pred: torch.Tensor, s: HEADRoISamples) -> dict:
        """mmdet's ``BBoxHead.loss`` on the fixed slots (:func:`kdops.losses.head_rcnn_loss` with the
        assistant head's own ``loss_cls``, ``loss_bbox`` and box coder)."""
        head = self.assistant.bbox_head
        return head_rcnn_loss(cls_score, bbox_pred, s, loss_cls=head.loss_cls, loss_bbox=head.loss_bbox,
                              encode=head.bbox_coder.encode, class_agnostic=bool(head.reg_class_agnostic))


@MODELS.register_module()
class HEADDistillDetector(_StudentAsRPN, DistillDetector):
    """HEAD: a one-stage student, a frozen two-stage teacher and an assistant R-CNN head (see the
    module docstring for the step and the papers' and release's settings).

    Args:
        student: a one-stage detector with a ``bbox_head.cls_convs`` tower: an anchor head with a
            ``DeltaXYWHBBoxCoder`` (RetinaNet, ATSS) or an FCOS head (the paper's Table 4 pairs);
            config dict or path.
        teacher_cfg, teacher_ckpt, teacher_strict, check_preprocessor, probe_size: as in
            :class:`DistillDetector`; the teacher must be a two-stage detector with a
            ``roi_head.bbox_head.shared_fcs`` (Faster R-CNN).
        featmap_strides: the strides of the student FPN levels the assistant pools from (the
            release: P3-P6, ``[8, 16, 32, 64]``); they must be the first levels of the student's
            prior generator.
        weight_transfer: initialise the assistant from the teacher's ``roi_head`` (the release;
            needs equal FPN channels on both sides). False: the assistant's own initialisation.
        proposals: :func:`kdops.losses.head_proposals` settings (``nms_pre``, ``iou_threshold``,
            ``max_per_img``, ``min_bbox_size``); defaults are the release's.
        akd: :class:`kdops.losses.HEADAKDLoss` settings (``loss_weight``: 2.0 released, 5.0 paper).
        ckd: ``type='mse'`` (:class:`kdops.losses.HEADCKDLoss`: ``loss_weight`` 2.0,
            ``num_anchors`` for per-anchor adapters, ``bias``) or ``type='contrastive'``
            (:class:`kdops.losses.HEADContrastiveCKDLoss` and its settings); None (the default):
            the release's MSE CKD of weight 2.0; False: no CKD (AKD only).
        distill_losses: other kdops loss entries to add to HEAD's (as for
            :class:`DistillDetector`, e.g. PKD on the necks): feature taps only -- the teacher is a
            two-stage detector, so dense-head entries (BCKD) have no teacher head to read. Their
            names must not be ``akd`` or ``ckd`` (those are HEAD's own ``kd_scale`` names).
        fused_roi_align: pool the RoI features of the assistant *and* of the teacher's R-CNN head
            with ``kdops.FusedRoIExtractor`` (:func:`kdops.roi_align`: mmdet's SingleRoIExtractor
            over mmcv's RoIAlign, the same values, one kernel for every level) wherever their
            extractor is a ``SingleRoIExtractor`` over an average ``RoIAlign`` (default True);
            False keeps mmdet's extractor.
        sync_free: True (default): proposals, assistant sampling and GT loss in fixed shapes with
            no host synchronisation (see the module docstring; the same assignment, the sampling
            law of mmdet's RandomSampler, the same loss values); False: mmdet's assigner, sampler
            and ``bbox_loss`` (the release's path, bitwise mmdet's random draws).
    """

    def __init__(self, student, teacher_cfg, teacher_ckpt: Optional[str], featmap_strides: Sequence[int] = (8, 16, 32,
                                                                                                         64),
                 weight_transfer: bool = True, proposals: Optional[dict] = None, akd: Optional[dict] = None,
                 ckd: Union[dict, None, bool] = None, distill_losses: Sequence[dict] = (), fused_roi_align: bool = True,
                 sync_free: bool = True, **kwargs) -> None:
        for entry in distill_losses or ():
            name = entry.get("name") if isinstance(entry, dict) else None
            if name in ("akd", "ckd"):
                raise ValueError(f"{_OWNER}: distill_losses entry name {name!r} is HEAD's own loss; rename the entry")
        proposal_cfg = self._check_proposals(proposals)
        for name, flag in (("weight_transfer", weight_transfer), ("fused_roi_align", fused_roi_align),
                           ("sync_free", sync_free)):
            if not isinstance(flag, bool):
                raise TypeError(f"{_OWNER}: {name} must be True or False, got {flag!r}")
        # the teacher's RCNN settings are read before the (possibly large) models are built
        teacher_model_cfg = model_config(teacher_cfg, "model.teacher_cfg")
        for key in ("roi_head",):
            if key not in teacher_model_cfg:
                raise ValueError(f"{_OWNER}: the teacher ({teacher_model_cfg.get('type')}) has no `{key}`: HEAD's "
                                 f"assistant is a copy of a two-stage teacher's R-CNN head (e.g. Faster R-CNN)")
        if fused_roi_align:  # the teacher's RoI features through kdops.roi_align too (same values, faster)
            use_fused_extractor(teacher_model_cfg.roi_head)
        super().__init__(student, teacher_model_cfg, teacher_ckpt, distill_losses=distill_losses, **kwargs)
        self._check_pair()
        self.featmap_strides = self._check_strides(featmap_strides)
        self.proposal_cfg = proposal_cfg
        self.fused_roi_align = fused_roi_align
        self.assistant = MODELS.build(self._assistant_cfg(teacher_model_cfg.roi_head,
                                                          (teacher_model_cfg.get("train_cfg") or {}).get("rcnn"),
                                                          (teacher_model_cfg.get("test_cfg") or {}).get("rcnn")))
        self.sync_free = sync_free
        self._sampling_cfg = self._sync_free_cfg() if sync_free else None
        if weight_transfer:
            self._transfer_weights()
        t_fcs = _shared_fcs(self.teacher.roi_head, "teacher")
        a_fcs = _shared_fcs(self.assistant, "assistant")
        self._layers = (0, len(t_fcs) - 1) if len(t_fcs) > 1 else (0,)
        akd = dict(akd or {})
        self.akd = HEADAKDLoss(in_channels=[a_fcs[i].out_features for i in self._layers],
                               out_channels=[t_fcs[i].out_features for i in self._layers],
                               num_layers=len(self._layers), **akd)
        self.ckd = self._build_ckd(ckd, t_fcs[-1].out_features)
        self.kd_scale.update({"akd": 1.0, **({"ckd": 1.0} if self.ckd is not None else {})})
        self._student_rec = _Recorder({"cls": self.student.bbox_head.cls_convs[-1]})
        self._assist_rec = _Recorder({str(i): a_fcs[i] for i in self._layers})
        self._teacher_rec = _Recorder({str(i): t_fcs[i] for i in self._layers})

    # ------------------------------------------------------------ construction
    def _check_pair(self) -> None:
        if not isinstance(self.teacher, TwoStageDetector) or not getattr(self.teacher, "with_roi_head", False):
            raise ValueError(f"{_OWNER}: the teacher must be a two-stage detector with an R-CNN head (Faster "
                             f"R-CNN), got {type(self.teacher).__name__}")
        self._check_student()

    def _transfer_weights(self) -> None:
        src = self.teacher.roi_head.state_dict()
        dst = self.assistant.state_dict()
        bad = [f"{k}: teacher {tuple(src[k].shape)} vs assistant {tuple(v.shape)}" for k, v in dst.items()
               if k in src and src[k].shape != v.shape]
        missing = sorted(set(dst) - set(src))
        if bad or missing:
            raise ValueError(f"{_OWNER}: weight_transfer needs the assistant to have the teacher's roi_head shapes "
                             f"(equal FPN channels on both sides); differing: {bad or 'none'}; missing in the "
                             f"teacher: {missing or 'none'}. Use equal FPN channels (the release: 256 and 256) or "
                             f"set weight_transfer=False")
        self.assistant.load_state_dict({k: src[k].detach().clone() for k in dst})
        self.assistant._is_init = True  # the Runner's init_weights must not re-initialise it

    def _build_ckd(self, ckd, teacher_channels: int) -> Optional[nn.Module]:
        if ckd is False:
            return None
        if ckd is None:
            ckd = {}
        if not isinstance(ckd, dict):
            raise TypeError(f"{_OWNER}: ckd must be a dict (type='mse' or 'contrastive', plus the loss's settings), "
                            f"None (the release's MSE CKD) or False (no CKD), got {type(ckd).__name__}")
        ckd = dict(ckd)
        kind = ckd.pop("type", "mse")
        cls = {"mse": HEADCKDLoss, "contrastive": HEADContrastiveCKDLoss}.get(kind)
        if cls is None:
            raise ValueError(f"{_OWNER}: ckd.type must be 'mse' or 'contrastive', got {kind!r}")
        return cls(in_channels=self._student_feat_channels(), out_channels=teacher_channels, **ckd)

    # ---------------------------------------------------------------- training
    def loss(self, batch_inputs: torch.Tensor, batch_data_samples) -> dict:
        self.teacher_taps.start()  # the distill_losses entries' taps (none without entries)
        self.student_taps.start()
        try:
            losses = self._head_loss(batch_inputs, batch_data_samples)
            self._add_entry_losses(losses, batch_data_samples)
        finally:
            self.student_taps.stop()
            self.teacher_taps.stop()
        return losses

    def _head_loss(self, batch_inputs: torch.Tensor, batch_data_samples) -> dict:
        s, t = self.student, self.teacher
        gts, gts_ignore, metas = unpack_gt_instances(batch_data_samples)
        with torch.no_grad():
            t_feats = t.extract_feat(batch_inputs)
        s_feats = s.extract_feat(batch_inputs)
        with self._student_rec:
            outs = s.bbox_head(s_feats)
        cls_feats = self._student_rec.take()["cls"]
        losses = s.bbox_head.loss_by_feat(*outs, gts, metas, gts_ignore)
        losses.update(self.distill_part(t_feats, s_feats, outs, cls_feats, gts, gts_ignore, metas))
        return losses

    def distill_part(self, t_feats, s_feats, outs, cls_feats, gts, gts_ignore, metas) -> dict:
        """HEAD's part of a step, after the student's own forward and losses: proposals from the
        student's head outputs ``outs``, the assistant's sampling, R-CNN forward and GT loss, the
        teacher's R-CNN head on the same RoIs, AKD and CKD (``cls_feats``: the student head's last
        cls conv outputs per level). Returns the losses (loss_assist_*, assist_acc, loss_akd,
        loss_ckd). With ``sync_free`` nothing here reads the device."""
        t = self.teacher
        losses: dict = {}
        rois, valid, sources, a_out = self._assistant_step(s_feats, outs, gts, gts_ignore, metas, losses, 1.0)
        with torch.no_grad(), self._teacher_rec:
            t.roi_head._bbox_forward(t_feats, rois)
        t_out = self._teacher_rec.take()
        keys = [str(i) for i in self._layers]
        losses["loss_akd"] = self.akd([a_out[k][0] for k in keys], [t_out[k][0] for k in keys],
                                      valid) * self.kd_scale["akd"]
        if self.ckd is not None:
            t_last = t_out[keys[-1]][0]
            if isinstance(self.ckd, HEADContrastiveCKDLoss):
                ckd = self.ckd(cls_feats, sources, t_last, rois[:, 1:])
            else:
                ckd = self.ckd(cls_feats, sources, t_last)
            losses["loss_ckd"] = ckd * self.kd_scale["ckd"]
        return losses


@MODELS.register_module()
class TFHEADDetector(_StudentAsRPN, StudentInference, BaseDetector):
    """TF-HEAD, teacher-free HEAD (Wang et al., ECCV 2022): a one-stage student and two assistants
    trained from scratch with it -- a dense head (FCOS) on all the student's FPN levels and an R-CNN
    head on its first levels fed with the student's own proposals -- whose detached features the
    student mimics. The release's ``configs/kd/fcos_retina_faster_r18_head.py`` (FCOS student with
    RetinaNet and Faster R-CNN assistants) written for the paper's RetinaNet student:

    - ``loss_dense_*``: the dense assistant's GT losses; ``loss_assist_*``: the R-CNN assistant's
      (sampled with its ``train_cfg``, GT boxes added as proposals); both scaled by ``assist``;
    - ``loss_dense_mimic`` (:class:`kdops.losses.HEADDenseLoss`): the student's last cls conv through
      a 1x1 conv vs the dense assistant's last cls conv (detached), MSE per level summed, weight 1.0,
      scaled by ``dense``;
    - ``loss_ckd`` (:class:`kdops.losses.HEADCKDLoss`): the student's last cls conv at each non-GT RoI's
      source pixel through a Linear vs the R-CNN assistant's ``shared_fcs[-1]`` (detached), weight
      1.3, scaled by ``ckd``.

    The release warms the assistants' GT losses and both mimic losses up over 2000 iterations and stops
    the mimic losses at the first LR drop (``EarlyStopScheduler`` at 8 epochs): KDScheduleHooks on
    ``assist`` and on ``dense``/``ckd`` (see the shipped configs). Validation, test and export use the
    student alone (``student.*``).

    Args:
        student: a one-stage anchor detector (as for :class:`HEADDistillDetector`).
        rcnn_assistant: an R-CNN head config (``StandardRoIHead`` with a ``Shared2FCBBoxHead``) and its
            ``train_cfg`` (assigner, sampler) and ``test_cfg``; its extractor and head channels are set
            to the student's FPN channels and its strides to ``featmap_strides``.
        dense_assistant: a dense head config (``FCOSHead``) with its ``train_cfg``/``test_cfg``; its
            ``in_channels`` is set to the student's FPN channels; its ``strides`` must be the student's.
        featmap_strides, proposals: as for :class:`HEADDistillDetector`.
        dense: :class:`kdops.losses.HEADDenseLoss` settings (``loss_weight`` 1.0).
        ckd: :class:`kdops.losses.HEADCKDLoss` settings (``loss_weight`` 1.3).
        fused_roi_align: the R-CNN assistant's RoI features through ``kdops.FusedRoIExtractor``
            (as for :class:`HEADDistillDetector`; default True).
        sync_free: as for :class:`HEADDistillDetector` (default True).
    """

    owner = "kdops.TFHEADDetector"

    def __init__(self, student, rcnn_assistant: dict, dense_assistant: dict,
                 featmap_strides: Sequence[int] = (8, 16, 32, 64), proposals: Optional[dict] = None,
                 dense: Optional[dict] = None, ckd: Optional[dict] = None, fused_roi_align: bool = True,
                 sync_free: bool = True, data_preprocessor=None, init_cfg=None) -> None:
        if data_preprocessor is not None:
            raise ValueError(f"{self.owner}: the student's data_preprocessor is used; set it in model.student")
        for name, cfg in (("rcnn_assistant", rcnn_assistant), ("dense_assistant", dense_assistant)):
            if not isinstance(cfg, dict) or "type" not in cfg:
                raise TypeError(f"{self.owner}: {name} must be a head config dict with a `type`, got {cfg!r}")
        proposal_cfg = self._check_proposals(proposals)
        for name, flag in (("fused_roi_align", fused_roi_align), ("sync_free", sync_free)):
            if not isinstance(flag, bool):
                raise TypeError(f"{self.owner}: {name} must be True or False, got {flag!r}")
        super().__init__(data_preprocessor=None, init_cfg=init_cfg)
        self.fused_roi_align = fused_roi_align
        self.student = MODELS.build(model_config(student, "model.student"))
        self.data_preprocessor = self.student.data_preprocessor
        self._check_student()
        self.featmap_strides = self._check_strides(featmap_strides)
        self.proposal_cfg = proposal_cfg
        rcnn = dict(rcnn_assistant)
        self.assistant = MODELS.build(self._assistant_cfg({k: v for k, v in rcnn.items()
                                                           if k not in ("train_cfg", "test_cfg")},
                                                          rcnn.get("train_cfg"), rcnn.get("test_cfg")))
        self.sync_free = sync_free
        self._sampling_cfg = self._sync_free_cfg() if sync_free else None
        dcfg = ConfigDict(copy.deepcopy(dict(dense_assistant)))
        dcfg.in_channels = self._student_channels()
        strides = [int(st[0] if isinstance(st, (tuple, list)) else st) for st in dcfg.get("strides", [])]
        if strides != self._student_strides():
            raise ValueError(f"{self.owner}: dense_assistant.strides {strides} must be the student's levels "
                             f"{self._student_strides()} (it runs on every student FPN level)")
        self.dense_assistant = MODELS.build(dcfg)
        d_convs = getattr(self.dense_assistant, "cls_convs", None)
        if not isinstance(d_convs, nn.ModuleList) or len(d_convs) == 0:
            raise ValueError(f"{self.owner}: the dense assistant ({type(self.dense_assistant).__name__}) has no "
                             f"classification conv tower (cls_convs) to mimic")
        fcs = _shared_fcs(self.assistant, "R-CNN assistant", self.owner)
        c_s = self._student_feat_channels()
        self.dense_mimic = HEADDenseLoss(in_channels=c_s, out_channels=int(self.dense_assistant.feat_channels),
                                         **{"loss_weight": 1.0, **dict(dense or {})})
        self.ckd = HEADCKDLoss(in_channels=c_s, out_channels=fcs[-1].out_features,
                               **{"loss_weight": 1.3, **dict(ckd or {})})
        self.kd_scale = {"assist": 1.0, "dense": 1.0, "ckd": 1.0}
        self._student_rec = _Recorder({"cls": self.student.bbox_head.cls_convs[-1]})
        self._dense_rec = _Recorder({"cls": d_convs[-1]})
        self._assist_rec = _Recorder({"last": fcs[-1]})

    def loss(self, batch_inputs: torch.Tensor, batch_data_samples) -> dict:
        s = self.student
        gts, gts_ignore, metas = unpack_gt_instances(batch_data_samples)
        s_feats = s.extract_feat(batch_inputs)
        with self._student_rec:
            outs = s.bbox_head(s_feats)
        cls_feats = self._student_rec.take()["cls"]
        losses = s.bbox_head.loss_by_feat(*outs, gts, metas, gts_ignore)
        scale = self.kd_scale
        with self._dense_rec:
            d_outs = self.dense_assistant(s_feats)
        d_feats = self._dense_rec.take()["cls"]
        for k, v in self.dense_assistant.loss_by_feat(*d_outs, gts, metas, gts_ignore).items():
            losses["loss_dense_" + k[len("loss_"):] if k.startswith("loss_") else "dense_" + k] = v * scale["assist"]
        _, _, sources, a_out = self._assistant_step(s_feats, outs, gts, gts_ignore, metas, losses, scale["assist"])
        losses["loss_dense_mimic"] = self.dense_mimic(cls_feats, d_feats) * scale["dense"]
        losses["loss_ckd"] = self.ckd(cls_feats, sources, a_out["last"][0]) * scale["ckd"]
        return losses
