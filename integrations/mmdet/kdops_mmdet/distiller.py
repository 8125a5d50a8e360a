"""DistillDetector: a student mmdet detector, a frozen teacher, connectors and kdops losses.

    model = dict(
        type='kdops.DistillDetector',
        student=dict(type='RetinaNet', ...),              # or a config path
        teacher_cfg='mmdet::retinanet/retinanet_x101-64x4d_fpn_1x_coco.py',  # path, mmdet:: path or dict
        teacher_ckpt='retinanet_x101_64x4d_fpn_1x_coco.pth',
        distill_losses=[dict(name='pkd', type='PKDLoss', student='neck', teacher='neck', loss_weight=6)])

- ``loss()`` = the student's own losses + one ``loss_<name>`` per entry (scaled by the
  KDScheduleHook's factor, 0 while disabled but still in the graph).
- ``predict`` / ``_forward`` / validation / test: the student alone, with its own data preprocessor
  (which is this model's data preprocessor).
- The teacher is built and its checkpoint loaded when this model is constructed, then it is marked
  initialised, so the Runner's ``init_weights`` (run after construction) never overwrites it and never
  fetches the teacher's ImageNet backbone the checkpoint replaces. It stays in eval mode (also after
  ``model.train()``), has no gradients, and runs under ``no_grad``.
- Taps are checked, connectors built (one per tapped level) and student/teacher shapes compared on a
  small probe input at construction, so bad configs fail before training starts.
- ``state_dict``: ``student.*``, ``teacher.*``, ``connectors.*`` (plus ``distill_losses.*`` for losses
  with parameters); ``python -m kdops_mmdet.export_student`` keeps ``student.*`` only.
"""
from __future__ import annotations

import copy
import os.path as osp
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from mmdet.models.dense_heads.base_dense_head import BaseDenseHead
from mmdet.models.detectors import BaseDetector, SingleStageDetector
from mmdet.models.utils import unpack_gt_instances
from mmdet.structures import DetDataSample
from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log
from mmengine.runner import load_checkpoint

from .distill_losses import build_entries
from .registry import MODELS
from .taps import TapSet, parse_tap, resolve_module

_FEATURE_ROOTS = {"backbone", "neck"}


def model_config(cfg: Union[str, dict, ConfigDict], key: str) -> ConfigDict:
    """A detector's model config from a config file path, an ``mmdet::`` path or a dict."""
    if isinstance(cfg, str):
        if "::" in cfg:
            from mmengine.hub import get_config

            full = get_config(cfg)
        else:
            if not osp.isfile(cfg):
                raise FileNotFoundError(f"kdops_mmdet: {key}: no config file at {cfg!r}")
            full = Config.fromfile(cfg)
        if "model" not in full:
            raise ValueError(f"kdops_mmdet: {key}: config {cfg!r} has no `model`")
        return ConfigDict(copy.deepcopy(full["model"]))
    if isinstance(cfg, dict):
        cfg = copy.deepcopy(cfg)
        if "type" not in cfg and "model" in cfg:
            cfg = cfg["model"]
        return ConfigDict(cfg)
    raise TypeError(f"kdops_mmdet: {key} must be a config path, an 'mmdet::' path or a model dict, got "
                    f"{type(cfg).__name__}")


def _preprocess_settings(dp: nn.Module) -> Dict[str, object]:
    norm = bool(getattr(dp, "_enable_normalize", False))
    return dict(
        mean=[round(float(v), 4) for v in dp.mean.flatten()] if norm else None,
        std=[round(float(v), 4) for v in dp.std.flatten()] if norm else None,
        channel_conversion=bool(getattr(dp, "_channel_conversion", False)),
        pad_size_divisor=int(getattr(dp, "pad_size_divisor", 1)),
    )


class StudentInference:
    """Validation, test, export and ``extract_feat`` of a KD detector: its ``student`` alone."""

    def predict(self, batch_inputs, batch_data_samples, rescale: bool = True):
        return self.student.predict(batch_inputs, batch_data_samples, rescale=rescale)

    def _forward(self, batch_inputs, batch_data_samples=None):
        return self.student._forward(batch_inputs, batch_data_samples)

    def extract_feat(self, batch_inputs):
        return self.student.extract_feat(batch_inputs)


@MODELS.register_module()
class DistillDetector(StudentInference, BaseDetector):
    """Knowledge distillation of an mmdet detector (see the module docstring).

    Args:
        student: the student's model config (dict) or a config path.
        teacher_cfg: the teacher's config path, ``mmdet::`` path, or model dict.
        teacher_ckpt: the teacher's checkpoint (path or URL). ``None`` only on purpose: the teacher
            then keeps its random initialisation (a warning says so).
        distill_losses: list of loss entries (see :mod:`kdops_mmdet.distill_losses`).
        teacher_strict: load the teacher checkpoint strictly (every key must match).
        check_preprocessor: refuse a teacher whose data preprocessor (mean, std, BGR/RGB conversion,
            pad divisor) differs from the student's: the teacher sees the student's batch as is, so a
            different normalisation would feed it inputs it was not trained on.
        probe_size: side of the probe image used at construction to check taps and shapes.
        teacher_cache: train offline from a feature cache written by ``python -m
            kdops_mmdet.cache_teacher`` with this config (see :mod:`kdops_mmdet.feature_cache`): the
            teacher is never built, its tapped maps are read per image and augmentation (use
            ``kdops.CachedFlip`` in place of ``RandomFlip``). Feature entries only; ``teacher_cfg`` and
            ``teacher_ckpt`` stay given: the cache's fingerprint is checked against them.
    """

    def __init__(self, student, teacher_cfg, teacher_ckpt: Optional[str], distill_losses: Sequence[dict] = (),
                 teacher_strict: bool = True, check_preprocessor: bool = True, probe_size: int = 128,
                 teacher_cache: Optional[str] = None, data_preprocessor=None, init_cfg=None) -> None:
        if data_preprocessor is not None:
            raise ValueError("kdops_mmdet: DistillDetector uses the student's data_preprocessor; set it in "
                             "model.student, not in model")
        super().__init__(data_preprocessor=None, init_cfg=init_cfg)
        self.entries = build_entries(distill_losses)  # config errors first: before any model is built
        if teacher_cfg is None and self.entries:
            raise ValueError("kdops_mmdet: distill_losses need a teacher to tap; this model has none (model.teacher_cfg "
                             "is None: its teacher's outputs come from a cache)")
        if teacher_cfg is None and not getattr(type(self), "teacher_optional", False):
            raise ValueError(f"kdops_mmdet: {type(self).__name__} needs model.teacher_cfg (the teacher's config)")
        offline = self._check_offline(teacher_cache, teacher_cfg)
        self.student = MODELS.build(model_config(student, "model.student"))
        self.data_preprocessor = self.student.data_preprocessor
        self.teacher = (None if teacher_cfg is None or offline is not None
                        else MODELS.build(model_config(teacher_cfg, "model.teacher_cfg")))
        if self.teacher is not None:
            if check_preprocessor:
                self._check_preprocessors()
            self._load_teacher(teacher_ckpt, teacher_strict)
            self.teacher.requires_grad_(False)
            self.teacher.eval()
        for e in self.entries:  # dense-head losses decode boxes as the student's head does
            if e.kind == "dense_head":
                e.bind_heads(resolve_module(self.student, parse_tap(e.student_tap)[0], "student"),
                             resolve_module(self.teacher, parse_tap(e.teacher_tap)[0], "teacher"))

        self.distill_losses = nn.ModuleDict({e.name: e.loss for e in self.entries})
        self.kd_scale: Dict[str, float] = {e.name: 1.0 for e in self.entries}
        s_taps = [t for e in self.entries for t in e.student_taps()]
        t_taps = [t for e in self.entries for t in e.teacher_taps()]
        self.student_taps = TapSet(self.student, s_taps, "student")
        self._feature_cache = None
        if offline is None:
            self.teacher_taps = TapSet(self.teacher, t_taps, "teacher")
        else:
            self._open_cache(teacher_cache, offline, teacher_cfg, teacher_ckpt, t_taps)
        self.connectors = nn.ModuleDict()
        self._probe(probe_size)

    # ------------------------------------------------------------ construction
    def _check_offline(self, teacher_cache: Optional[str], teacher_cfg) -> Optional[dict]:
        """The feature cache's sidecar in offline mode (checked before any model is built), else None."""
        if teacher_cache is None:
            return None
        from .feature_cache import read_meta

        if type(self).loss is not DistillDetector.loss:
            raise ValueError(f"kdops_mmdet: {type(self).__name__} does not train from a feature cache "
                             f"(model.teacher_cache serves kdops.DistillDetector's feature losses)")
        if teacher_cfg is None:
            raise ValueError("kdops_mmdet: model.teacher_cache needs model.teacher_cfg and teacher_ckpt too: the "
                             "cache's fingerprint is checked against them")
        bad = [e.name for e in self.entries if e.kind != "feature"]
        if bad:
            raise ValueError(f"kdops_mmdet: distill_losses {bad} read the teacher's head, which a feature cache "
                             f"does not hold; train them online (model.teacher_cache=None)")
        meta = read_meta(teacher_cache)
        if meta.get("foreground"):
            raise ValueError(f"kdops_mmdet: teacher_cache={teacher_cache!r} holds foreground rows only (made with "
                             f"--foreground for the storage comparison); the feature losses read the background "
                             f"too: cache without --foreground")
        return meta

    def _open_cache(self, root: str, meta: dict, teacher_cfg, teacher_ckpt, t_taps) -> None:
        from kdops.cache import TeacherCache

        from .feature_cache import CachedTaps, feature_fingerprint, tap_key

        self.fingerprint = feature_fingerprint(teacher_cfg, teacher_ckpt, [tap_key(t) for t in t_taps])
        missing = sorted({tap_key(t) for t in t_taps} - set(meta.get("layout", {})))
        if missing:
            raise ValueError(f"kdops_mmdet: teacher_cache={root!r} holds the teacher taps "
                             f"{sorted(meta.get('layout', {}))}, not {missing}: re-make it with this config")
        self._feature_cache = TeacherCache(root, fingerprint=self.fingerprint, verify="lazy")
        self.teacher_cache_dir = root
        self._cache_layout = {k: meta["layout"][k] for k in {tap_key(t) for t in t_taps}}
        self.teacher_taps = CachedTaps(sorted(self._cache_layout))

    def _cached_records(self, inputs: torch.Tensor, samples) -> dict:
        """The teacher taps' values for this batch from the feature cache (offline)."""
        from .feature_cache import batch_records
        from .unikd import cached_entries

        per_image = cached_entries(self._feature_cache, self.teacher_cache_dir, samples, "kdops_mmdet")
        return batch_records(per_image, self._cache_layout, inputs.shape[-2:], inputs)

    def _check_preprocessors(self) -> None:
        s = _preprocess_settings(self.student.data_preprocessor)
        t = _preprocess_settings(self.teacher.data_preprocessor)
        bad = [k for k in s if k != "pad_size_divisor" and s[k] != t[k]]
        if s["pad_size_divisor"] % max(t["pad_size_divisor"], 1):
            bad.append("pad_size_divisor")
        if bad:
            rows = "; ".join(f"{k}: student {s[k]} vs teacher {t[k]}" for k in bad)
            raise ValueError(f"kdops_mmdet: the teacher's data_preprocessor differs from the student's ({rows}). "
                             f"The teacher receives the student's preprocessed batch, so it would see inputs "
                             f"normalised differently from its training. Make the two data_preprocessor configs "
                             f"agree (the student's pad_size_divisor must be a multiple of the teacher's), or "
                             f"pass check_preprocessor=False if this is intended")

    def _load_teacher(self, ckpt: Optional[str], strict: bool) -> None:
        load_teacher(self.teacher, ckpt, strict)

    def _probe(self, size: int) -> None:
        """Run both models once on a small input: taps exist and fire, connectors fit, shapes agree."""
        if not self.entries:
            return
        div = max(int(getattr(self.student.data_preprocessor, "pad_size_divisor", 1)), 1)
        size = -(-max(size, div) // div) * div
        device = next(self.student.parameters()).device
        gen = torch.Generator().manual_seed(0)
        inputs = torch.randn(2, 3, size, size, generator=gen).to(device)  # 2: BN/GN statistics need >1 value
        meta = dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size),
                    batch_input_shape=(size, size), scale_factor=(1.0, 1.0), img_id=0)
        samples = [DetDataSample(metainfo=meta), DetDataSample(metainfo=meta)]
        modes = (self.student.training, self.teacher is not None and self.teacher.training)
        self.student.eval()
        try:
            with torch.no_grad():
                self.teacher_taps.start()
                self.student_taps.start()
                if self._feature_cache is not None:  # offline: zeros of the cached maps' shapes
                    self.teacher_taps.fill(_zero_records(self._cache_layout, (size, size), inputs))
                else:
                    _tap_forward(self.teacher, self._paths(self.teacher_taps), inputs, samples)
                _tap_forward(self.student, self._paths(self.student_taps, features_only=True), inputs, samples)
                for e in self.entries:
                    if e.kind != "feature":
                        continue
                    s = e.pick(self.student_taps.get(e.student_tap), e.student_tap)
                    t = e.pick(self.teacher_taps.get(e.teacher_tap), e.teacher_tap, teacher=True)
                    conn = e.build_connectors(s)
                    if conn is not None:
                        conn.to(device)
                        conn.eval()
                        self.connectors[e.name] = conn
                    e.check_shapes(e.connect(conn, s), t)
                    # the loss itself once (no GT boxes): its own argument checks fail here, not in training
                    loss_mode = e.loss.training
                    e.loss.eval()
                    try:
                        e(self.student_taps, self.teacher_taps, conn, samples)
                    finally:
                        e.loss.train(loss_mode)
        finally:
            self.student_taps.stop()
            self.teacher_taps.stop()
            self.student.train(modes[0])
            self.connectors.train(modes[0])
            if self.teacher is not None:
                self.teacher.eval()

    @staticmethod
    def _paths(taps: TapSet, features_only: bool = False) -> List[str]:
        return [p for p, is_call in taps.paths.values() if not (features_only and is_call)]

    # ---------------------------------------------------------------- modes
    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: BN statistics and dropout stay as the checkpoint has them
        return self

    def set_kd_scale(self, scale: Union[float, Dict[str, float]]) -> None:
        """The schedule's factor on each KD loss (KDScheduleHook calls this before every iteration)."""
        if isinstance(scale, dict):
            self.kd_scale.update({k: float(v) for k, v in scale.items()})
        else:
            self.kd_scale = {k: float(scale) for k in self.kd_scale}

    def loss(self, batch_inputs: torch.Tensor, batch_data_samples) -> dict:
        self.teacher_taps.start()
        self.student_taps.start()
        try:
            if self._feature_cache is not None:
                self.teacher_taps.fill(self._cached_records(batch_inputs, batch_data_samples))
            else:
                with torch.no_grad():
                    _tap_forward(self.teacher, self._paths(self.teacher_taps), batch_inputs, batch_data_samples)
            losses = self._student_loss(batch_inputs, batch_data_samples)
            self._add_entry_losses(losses, batch_data_samples)
        finally:
            self.student_taps.stop()
            self.teacher_taps.stop()
        return losses

    def _add_entry_losses(self, losses: dict, batch_data_samples) -> None:
        """The distill_losses entries' terms from the tapped features (taps still started), each
        scaled by its schedule factor, added to ``losses``."""
        for e in self.entries:
            conn = self.connectors[e.name] if e.name in self.connectors else None
            scale = self.kd_scale[e.name]
            for k, v in e(self.student_taps, self.teacher_taps, conn, batch_data_samples).items():
                if k in losses:
                    raise ValueError(f"kdops_mmdet: distill loss key {k!r} collides with a student loss")
                losses[k] = v * scale  # 0 while disabled: still in the graph (DDP, connectors)

    def _student_loss(self, inputs, samples) -> dict:
        s = self.student
        head_tapped = any(p.split(".")[0] == "bbox_head" for p in self._paths(self.student_taps))
        if (head_tapped and isinstance(s, SingleStageDetector) and type(s).loss is SingleStageDetector.loss
                and isinstance(s.bbox_head, BaseDenseHead) and type(s.bbox_head).loss is BaseDenseHead.loss):
            # mmdet's own path (SingleStageDetector.loss -> BaseDenseHead.loss), written out so the head
            # is called through __call__ here, whatever later mmdet versions do inside head.loss
            x = s.extract_feat(inputs)
            outs = s.bbox_head(x)
            gts, gts_ignore, metas = unpack_gt_instances(samples)
            return s.bbox_head.loss_by_feat(*outs, gts, metas, gts_ignore)
        return s.loss(inputs, samples)


def load_teacher(teacher: nn.Module, ckpt: Optional[str], strict: bool = True, key: str = "model.teacher_ckpt") -> None:
    """Loads a teacher checkpoint (a path or URL) and marks the teacher initialised, so the Runner's
    init_weights leaves it alone; None keeps the random initialisation (tests), with a warning."""
    if ckpt is None:
        print_log(f"kdops_mmdet: {key} is None: the teacher keeps its random initialisation "
                  "(only useful for tests)", logger="current", level=30)
        return
    if not isinstance(ckpt, str):
        raise TypeError(f"kdops_mmdet: {key} must be a path or URL, got {type(ckpt).__name__}")
    if "://" not in ckpt and not osp.isfile(ckpt):
        raise FileNotFoundError(f"kdops_mmdet: {key}: no checkpoint file at {ckpt!r} (set "
                                f"{key}, e.g. --cfg-options {key}=PATH)")
    load_checkpoint(teacher, ckpt, map_location="cpu", strict=strict, logger="current")
    teacher._is_init = True  # the Runner's init_weights must not re-initialise it


def _zero_records(layout: dict, hw, like: torch.Tensor) -> dict:
    """Teacher tap values of the cached shapes (zeros) for a probe of ``hw`` pixels."""
    from .feature_cache import batch_records

    n = like.shape[0]
    blank = []
    for _ in range(n):
        entry = {}
        for key, spec in layout.items():
            for lvl, ls in enumerate(spec["levels"]):
                entry[f"{key}#{lvl}"] = like.new_zeros((ls["channels"], 0, 0))
        blank.append(entry)
    return batch_records(blank, layout, hw, like)


def _tap_forward(model: nn.Module, paths: Sequence[str], inputs, samples) -> None:
    """Run as much of ``model`` as its taps need: features, then the dense head called explicitly
    (mmdet's ``_forward`` calls ``bbox_head.forward`` directly, bypassing hooks), else the full
    tensor-mode forward."""
    roots = {parse_tap(p)[0].split(".")[0] for p in paths}
    if not roots:
        return
    if roots <= _FEATURE_ROOTS and hasattr(model, "extract_feat"):
        model.extract_feat(inputs)
    elif (roots <= _FEATURE_ROOTS | {"bbox_head"} and hasattr(model, "extract_feat")
          and isinstance(getattr(model, "bbox_head", None), BaseDenseHead)):
        model.bbox_head(model.extract_feat(inputs))
    else:
        model._forward(inputs, samples)
