"""HEAD on mmdet 3.x: a two-stage teacher distilled into a one-stage student through an assistant
R-CNN head (Wang et al., "HEAD: HEtero-Assists Distillation for Heterogeneous Object Detectors",
ECCV 2022; authors' code github.com/LutingWang/HEAD on mmdet 2.20).

    model = dict(
        type='kdops.HEADDistillDetector',
        student={{_base_.model}},                                   # a RetinaNet (one-stage, anchors)
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
   ``max_per_img``), each with its source [level, image, y, x, anchor].
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

Proposal selection and the R-CNN sampler read the device (data-dependent sizes), as in mmdet's
own two-stage detectors; the CKD gather itself does not.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from mmdet.models.detectors import SingleStageDetector, TwoStageDetector
from mmdet.models.utils import unpack_gt_instances
from mmdet.structures.bbox import bbox2roi
from mmengine.config import ConfigDict
from mmengine.logging import print_log
from mmengine.structures import InstanceData

from kdops.losses import HEADAKDLoss, HEADCKDLoss, HEADContrastiveCKDLoss, head_gt_sources, head_proposals

from .distill_losses import head_decoding
from .distiller import DistillDetector, model_config
from .registry import MODELS

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


def _shared_fcs(roi_head: nn.Module, role: str) -> nn.ModuleList:
    fcs = getattr(getattr(roi_head, "bbox_head", None), "shared_fcs", None)
    if not isinstance(fcs, nn.ModuleList) or len(fcs) == 0:
        raise ValueError(f"{_OWNER}: the {role}'s roi_head.bbox_head has no shared_fcs (got "
                         f"{type(getattr(roi_head, 'bbox_head', None)).__name__}); HEAD distils the shared FC "
                         f"layers of a ConvFCBBoxHead such as Shared2FCBBoxHead (Faster R-CNN's)")
    return fcs


@MODELS.register_module()
class HEADDistillDetector(DistillDetector):
    """HEAD: a one-stage student, a frozen two-stage teacher and an assistant R-CNN head (see the
    module docstring for the step and the papers' and release's settings).

    Args:
        student: a one-stage anchor-based detector (RetinaNet-like: ``bbox_head.cls_convs``, a
            ``prior_generator`` and a ``DeltaXYWHBBoxCoder``); config dict or path.
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
            (:class:`kdops.losses.HEADContrastiveCKDLoss` and its settings), or None for no CKD.
        distill_losses: must be empty (HEAD's own losses are configured by ``akd`` / ``ckd``).
    """

    def __init__(self, student, teacher_cfg, teacher_ckpt: Optional[str], featmap_strides: Sequence[int] = (8, 16, 32,
                                                                                                         64),
                 weight_transfer: bool = True, proposals: Optional[dict] = None, akd: Optional[dict] = None,
                 ckd: Optional[dict] = None, distill_losses: Sequence[dict] = (), **kwargs) -> None:
        if distill_losses:
            raise ValueError(f"{_OWNER}: distill_losses must be empty: HEAD's losses are set by `akd` and `ckd` "
                             f"(combining HEAD with other kdops losses is not supported yet)")
        unknown = set(proposals or {}) - set(PROPOSAL_DEFAULTS)
        if unknown:
            raise ValueError(f"{_OWNER}: proposals: unknown keys {sorted(unknown)}; valid: "
                             f"{sorted(PROPOSAL_DEFAULTS)}")
        if not isinstance(weight_transfer, bool):
            raise TypeError(f"{_OWNER}: weight_transfer must be True or False, got {weight_transfer!r}")
        # the teacher's RCNN settings are read before the (possibly large) models are built
        teacher_model_cfg = model_config(teacher_cfg, "model.teacher_cfg")
        for key in ("roi_head",):
            if key not in teacher_model_cfg:
                raise ValueError(f"{_OWNER}: the teacher ({teacher_model_cfg.get('type')}) has no `{key}`: HEAD's "
                                 f"assistant is a copy of a two-stage teacher's R-CNN head (e.g. Faster R-CNN)")
        super().__init__(student, teacher_model_cfg, teacher_ckpt, distill_losses=(), **kwargs)
        self._check_pair()
        self.featmap_strides = self._check_strides(featmap_strides)
        self.proposal_cfg = {**PROPOSAL_DEFAULTS, **(proposals or {})}
        self.decoding = head_decoding(self.student.bbox_head, "model.student.bbox_head")
        if self.decoding["decoder"] != "delta_xywh":
            raise ValueError(f"{_OWNER}: the student's head ({type(self.student.bbox_head).__name__}) decodes boxes "
                             f"with {self.decoding['decoder']!r}; HEAD's proposals need an anchor head with a "
                             f"DeltaXYWHBBoxCoder (RetinaNet, ATSS)")
        self.assistant = self._build_assistant(teacher_model_cfg)
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
        self.kd_scale = {"akd": 1.0, **({"ckd": 1.0} if self.ckd is not None else {})}
        self._student_rec = _Recorder({"cls": self.student.bbox_head.cls_convs[-1]})
        self._assist_rec = _Recorder({str(i): a_fcs[i] for i in self._layers})
        self._teacher_rec = _Recorder({str(i): t_fcs[i] for i in self._layers})

    # ------------------------------------------------------------ construction
    def _check_pair(self) -> None:
        if not isinstance(self.teacher, TwoStageDetector) or not getattr(self.teacher, "with_roi_head", False):
            raise ValueError(f"{_OWNER}: the teacher must be a two-stage detector with an R-CNN head (Faster "
                             f"R-CNN), got {type(self.teacher).__name__}")
        s = self.student
        head = getattr(s, "bbox_head", None)
        if not isinstance(s, SingleStageDetector) or head is None:
            raise ValueError(f"{_OWNER}: the student must be a one-stage detector (RetinaNet-like), got "
                             f"{type(s).__name__}")
        convs = getattr(head, "cls_convs", None)
        if not isinstance(convs, nn.ModuleList) or len(convs) == 0:
            raise ValueError(f"{_OWNER}: the student's head ({type(head).__name__}) has no classification conv tower "
                             f"(bbox_head.cls_convs, e.g. RetinaHead stacked_convs >= 1): CKD reads its last "
                             f"conv's output")
        if not hasattr(head, "prior_generator") or getattr(head.prior_generator, "num_base_priors", None) is None:
            raise ValueError(f"{_OWNER}: the student's head ({type(head).__name__}) has no anchor prior_generator")

    def _check_strides(self, strides) -> List[int]:
        if (not isinstance(strides, (list, tuple)) or not strides
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in strides)):
            raise ValueError(f"{_OWNER}: featmap_strides must be a non-empty list of positive ints, got {strides!r}")
        head_strides = [int(st[0] if isinstance(st, (tuple, list)) else st)
                        for st in self.student.bbox_head.prior_generator.strides]
        if list(strides) != head_strides[:len(strides)]:
            raise ValueError(f"{_OWNER}: featmap_strides {list(strides)} must be the first strides of the student's "
                             f"levels {head_strides} (the assistant pools from the student's first FPN levels)")
        return list(strides)

    def _build_assistant(self, teacher_model_cfg: ConfigDict) -> nn.Module:
        cfg = copy.deepcopy(teacher_model_cfg.roi_head)
        train_cfg = (teacher_model_cfg.get("train_cfg") or {}).get("rcnn")
        test_cfg = (teacher_model_cfg.get("test_cfg") or {}).get("rcnn")
        if train_cfg is None:
            raise ValueError(f"{_OWNER}: the teacher config has no train_cfg.rcnn (the assigner and sampler the "
                             f"assistant trains with)")
        channels = self._student_channels()
        cfg.bbox_roi_extractor.featmap_strides = list(self.featmap_strides)
        cfg.bbox_roi_extractor.out_channels = channels
        cfg.bbox_head.in_channels = channels
        cfg.update(train_cfg=train_cfg, test_cfg=test_cfg)
        if cfg.get("mask_head") is not None:
            cfg.mask_head = None
            cfg.mask_roi_extractor = None
            print_log(f"{_OWNER}: the teacher's mask head is not part of the assistant (HEAD distils boxes)",
                      logger="current", level=30)
        return MODELS.build(cfg)

    def _student_channels(self) -> int:
        head = self.student.bbox_head
        c = getattr(head, "in_channels", None)
        if not isinstance(c, int):
            raise ValueError(f"{_OWNER}: cannot read the student's FPN channels from its head "
                             f"({type(head).__name__}.in_channels = {c!r})")
        return c

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

    def _build_ckd(self, ckd: Optional[dict], teacher_channels: int) -> Optional[nn.Module]:
        if ckd is None:
            return None
        if not isinstance(ckd, dict):
            raise TypeError(f"{_OWNER}: ckd must be a dict (type='mse' or 'contrastive', plus the loss's settings) "
                            f"or None, got {type(ckd).__name__}")
        ckd = dict(ckd)
        kind = ckd.pop("type", "mse")
        cls = {"mse": HEADCKDLoss, "contrastive": HEADContrastiveCKDLoss}.get(kind)
        if cls is None:
            raise ValueError(f"{_OWNER}: ckd.type must be 'mse' or 'contrastive', got {kind!r}")
        head = self.student.bbox_head
        channels = getattr(head, "feat_channels", None) or self._student_channels()
        return cls(in_channels=int(channels), out_channels=teacher_channels, **ckd)

    def set_kd_scale(self, scale) -> None:
        if isinstance(scale, dict):
            unknown = set(scale) - set(self.kd_scale)
            if unknown:
                raise ValueError(f"{_OWNER}: KDScheduleHook losses {sorted(unknown)} do not exist; HEAD's are "
                                 f"{sorted(self.kd_scale)}")
        super().set_kd_scale(scale)

    # ---------------------------------------------------------------- training
    def loss(self, batch_inputs: torch.Tensor, batch_data_samples) -> dict:
        s, t = self.student, self.teacher
        gts, gts_ignore, metas = unpack_gt_instances(batch_data_samples)
        with torch.no_grad():
            t_feats = t.extract_feat(batch_inputs)
        s_feats = s.extract_feat(batch_inputs)
        with self._student_rec:
            cls_scores, bbox_preds = s.bbox_head(s_feats)
        cls_feats = self._student_rec.take()["cls"]
        losses = s.bbox_head.loss_by_feat(cls_scores, bbox_preds, gts, metas, gts_ignore)

        props = self.proposals(cls_scores, bbox_preds, metas)
        x = tuple(s_feats[:len(self.featmap_strides)])
        sampling, sources = self._sample(x, props, gts, gts_ignore)
        with self._assist_rec:
            res = self.assistant.bbox_loss(x, sampling)
        a_out = self._assist_rec.take()
        for k, v in res["loss_bbox"].items():
            losses[("loss_assist_" + k[len("loss_"):]) if k.startswith("loss_") else "assist_" + k] = v
        rois = bbox2roi([r.priors for r in sampling])
        with torch.no_grad(), self._teacher_rec:
            t.roi_head._bbox_forward(t_feats, rois)
        t_out = self._teacher_rec.take()
        keys = [str(i) for i in self._layers]
        losses["loss_akd"] = self.akd([a_out[k][0] for k in keys], [t_out[k][0] for k in keys]) * self.kd_scale["akd"]
        if self.ckd is not None:
            t_last = t_out[keys[-1]][0]
            if isinstance(self.ckd, HEADContrastiveCKDLoss):
                ckd = self.ckd(cls_feats, sources, t_last, rois[:, 1:])
            else:
                ckd = self.ckd(cls_feats, sources, t_last)
            losses["loss_ckd"] = ckd * self.kd_scale["ckd"]
        return losses

    def proposals(self, cls_scores, bbox_preds, metas):
        """The student head as an RPN (:func:`kdops.losses.head_proposals`) with its own anchors and coder."""
        head = self.student.bbox_head
        priors = head.prior_generator.grid_priors([c.shape[-2:] for c in cls_scores], device=cls_scores[0].device)
        return head_proposals([c.detach() for c in cls_scores], [b.detach() for b in bbox_preds], priors,
                              "delta_xywh", means=self.decoding["means"], stds=self.decoding["stds"],
                              img_shape=[tuple(m["img_shape"][:2]) for m in metas], **self.proposal_cfg)

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
