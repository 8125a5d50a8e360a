"""KD efficacy benchmark (issue 16): does a student distilled with kdops beat the same student alone?

    python benchmarks/efficacy.py                       # teacher + PKD, both regimes, 4 seeds
    python benchmarks/efficacy.py --methods all --regimes low --seeds 2 --jobs 2   # every method (two teachers)
    python benchmarks/efficacy.py --methods pkd --regimes low --seeds 4
    python benchmarks/efficacy.py --quick --out /tmp/eff   # the whole pipeline in ~2-3 minutes (smoke test)

What it does, all on the CPU with mmdetection 3.3 + the kdops_mmdet plug-in:

1. Generates the deterministic synthetic set ``kdops.toy_data`` (128x128, 2000 train / 300 val, seed 0),
   cached on disk by its parameters (the generator's own manifest skips a regeneration), plus a
   low-label annotation file holding the first 500 training images.
2. Trains the teacher (``integrations/mmdet/configs/efficacy/retinanet_r18_efficacy_teacher.py``: ResNet-18
   layout, base 32, FPN 64 at strides 8/16/32, 2 head convs, 3.1 M parameters) once on all 2000 images
   and caches its checkpoint under a hash of its config files and run settings. HEAD distils a
   two-stage teacher: ``faster_rcnn_r18_efficacy_teacher.py``, trained the same way when HEAD runs.
3. For each method, regime and seed trains the student (``retinanet_r18_efficacy_student.py``: base 8,
   FPN 32, 1 head conv, 0.25 M parameters) without KD (the baseline, shared by all methods) and with
   KD. A pair shares its seed: the same student initialisation (``init_weights()`` is called under the
   seed before training, so RetinaNet's focal prior bias is set) and the same data order and flips.
   Each run is a fresh subprocess running mmengine's Runner in-process (nothing leaks between runs)
   and is cached by a hash of its settings, so an interrupted benchmark resumes where it stopped.
4. Evaluates COCO bbox mAP with mmdet's CocoMetric on the 300 validation images and writes, after
   every finished pair, ``efficacy.md`` / ``efficacy.json`` (per method and regime: baseline mAP,
   KD mAP, paired gain mean +- sd, t statistic, every seed's pair, wall times, the KD weight and why),
   ``efficacy.png`` (bar chart) and ``efficacy_curves.png`` (loss curves) under ``--out``.

The cache lives in ``$KDOPS_EFFICACY_CACHE`` or ``~/.cache/kdops/efficacy`` (``--cache-dir``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import os.path as osp
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(HERE)
CFG_DIR = osp.join(ROOT, "integrations", "mmdet", "configs")
STUDENT_CFG = osp.join(CFG_DIR, "efficacy", "retinanet_r18_efficacy_student.py")
TEACHER_CFG = osp.join(CFG_DIR, "efficacy", "retinanet_r18_efficacy_teacher.py")
FRCNN_TEACHER_CFG = osp.join(CFG_DIR, "efficacy", "faster_rcnn_r18_efficacy_teacher.py")
#: the teachers methods distil from (a method names its own; "retinanet" by default)
TEACHERS = {
    "retinanet": dict(cfg=TEACHER_CFG, label="RetinaNet R18-style (base 32, FPN 64 at strides 8/16/32, 2 head convs)"),
    "frcnn": dict(cfg=FRCNN_TEACHER_CFG, label="Faster R-CNN R18-style (base 32, FPN 32 at P2-P6, 2-FC R-CNN head "
                                               "of 256, 128 RoIs per image)"),
}
CFG_FILES = [STUDENT_CFG, TEACHER_CFG, FRCNN_TEACHER_CFG, osp.join(CFG_DIR, "_base_", "faster_rcnn_r18_toy_teacher.py"), osp.join(CFG_DIR, "_base_", "retinanet_r18_toy_student.py"),
             osp.join(CFG_DIR, "_base_", "kdops_toy_detection.py")]

# student FPN 32 channels -> teacher FPN 64, three levels (strides 8/16/32)
_CONN = dict(type="conv1x1", in_channels=32, out_channels=64)
METHODS: Dict[str, dict] = {
    "pkd": dict(
        label="PKD",
        entry=dict(name="pkd", type="PKDLoss", student="neck", teacher="neck", levels=[0, 1, 2], connector=_CONN,
                   loss_weight=1.0),
        weight="loss_weight 1.0 on the 3 FPN levels, 1x1 conv connectors 32->64",
        why=("PKD normalises each channel, so its loss is O(1) per level whatever the feature scale; weight 1 "
             "keeps it the size of the focal + L1 detection loss of this small student. mmrazor's COCO weight "
             "(6) swamps the detection loss here: measured outside this repository with the same recipe, it "
             "gave no gain (issue 16)."),
    ),
    "fgd": dict(
        label="FGD",
        entry=dict(name="fgd", type="FGDLoss", student="neck", teacher="neck", teacher_channels=64,
                   student_channels=32, num_levels=3, strides=[8, 16, 32], alpha_fgd=1e-3, beta_fgd=5e-4,
                   gamma_fgd=5e-4, lambda_fgd=5e-6, temperature=0.5, image_size="img_shape"),
        weight="the authors' RetinaNet COCO weights: alpha 1e-3, beta 5e-4, gamma 5e-4, lambda 5e-6, T 0.5",
        why=("FGD's terms are sums over pixels and channels whose weights the authors tuned for RetinaNet; "
             "they are kept as published (its own 1x1 align conv maps 32->64 channels) so the benchmark "
             "tests the method, not a retuning."),
    ),
    "fitnet": dict(
        label="FitNet",
        entry=dict(name="fitnet", type="FeatureMimicLoss", student="neck", teacher="neck", levels=[0, 1, 2],
                   connector=_CONN, normalize="numel", loss_weight=1.0),
        weight="loss_weight 1.0, MSE averaged over elements, 1x1 conv regressors 32->64 on the 3 FPN levels",
        why=("a mean squared error of raw FPN features (teacher features have O(1) magnitude after BN/FPN) is "
             "of the order of the detection loss at weight 1; no published detection setting exists."),
    ),
    "defeat": dict(
        label="DeFeat",
        entry=dict(name="defeat", type="FeatureMimicLoss", student="neck", teacher="neck", levels=[0, 1, 2],
                   connector=_CONN, mask_mode="defeat", strides=[8, 16, 32], image_size=None, fg_weight=1.0,
                   bg_weight=4.0, normalize="none", loss_weight=1 / 64),
        weight=("GT-box foreground and background each averaged over its pixels per image, background gain 4, "
                "summed over channels, loss_weight 1/64 (1/channels), 1x1 conv connectors 32->64"),
        why=("HEAD's DeFeat COCO setting (bg 4, weight 1/256 for 256 FPN channels) makes the loss a per-channel "
             "mean; 1/64 keeps that meaning for this teacher's 64 channels."),
    ),
    "bckd": dict(
        label="BCKD (RetinaNet head)",
        entry=dict(name="bckd", type="BCKDLoss", student="bbox_head", teacher="bbox_head", alpha_cls=1.0,
                   alpha_loc=4.0, beta=1.0, loss="giou"),
        weight=("the authors' weights: classification 1.0, GIoU localisation 4.0 on the decoded boxes, "
                "temperature 1; decoding read from the RetinaNet head (DeltaXYWH)"),
        why=("BCKD distils the dense head's outputs, which have the same shapes on both sides (9 anchors x 4 "
             "classes), so no connector; the authors' GFL setting needs a GFL teacher, not trained here."),
    ),
    "head": dict(
        label="HEAD (Faster R-CNN teacher)",
        teacher="frcnn",
        model=dict(type="kdops.HEADDistillDetector", featmap_strides=[8, 16, 32],
                   proposals=dict(nms_pre=1000, iou_threshold=0.7, max_per_img=300, min_bbox_size=0),
                   akd=dict(loss_weight=2.0), ckd=dict(type="mse", loss_weight=2.0)),
        hooks=[dict(type="kdops.KDScheduleHook", warmup_iters=100, losses=["akd", "ckd"])],
        weight=("the release's AKD 2.0 and CKD 2.0, warmed up over 100 iterations (the schedule's LR warm-up); "
                "assistant = the teacher's R-CNN head on the student's 3 FPN levels, 300 proposals and 128 RoIs "
                "per image"),
        why=("HEAD is for a two-stage teacher and a one-stage student, so its teacher is the toy Faster R-CNN "
             "(trained like the RetinaNet teacher); the cosine schedule has no LR drop, so CKD is never switched "
             "off here."),
    ),
    "tf_head": dict(
        label="TF-HEAD (teacher-free)",
        teacher=None,
        model=dict(
            type="kdops.TFHEADDetector", featmap_strides=[8, 16, 32],
            proposals=dict(nms_pre=1000, iou_threshold=0.7, max_per_img=300, min_bbox_size=0),
            rcnn_assistant=dict(
                type="StandardRoIHead",
                bbox_roi_extractor=dict(type="SingleRoIExtractor",
                                        roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0),
                                        out_channels=32, featmap_strides=[8, 16, 32]),
                bbox_head=dict(type="Shared2FCBBoxHead", in_channels=32, fc_out_channels=256, roi_feat_size=7,
                               num_classes=4,
                               bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4,
                                               target_stds=[0.1, 0.1, 0.2, 0.2]),
                               reg_class_agnostic=False,
                               loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                               loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
                train_cfg=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.5,
                                             min_pos_iou=0.5, match_low_quality=False, ignore_iof_thr=-1),
                               sampler=dict(type="RandomSampler", num=128, pos_fraction=0.25, neg_pos_ub=-1,
                                            add_gt_as_proposals=True),
                               pos_weight=-1, debug=False),
                test_cfg=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100)),
            dense_assistant=dict(
                type="FCOSHead", num_classes=4, in_channels=32, stacked_convs=2, feat_channels=32,
                strides=[8, 16, 32], regress_ranges=((-1, 64), (64, 128), (128, 1e8)), norm_on_bbox=True,
                centerness_on_reg=True, dcn_on_last_conv=False, center_sampling=True, conv_bias=True,
                loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=0.5),
                loss_bbox=dict(type="GIoULoss", loss_weight=0.5),
                loss_centerness=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=0.5),
                test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05,
                              nms=dict(type="nms", iou_threshold=0.5), max_per_img=100)),
            dense=dict(loss_weight=1.0), ckd=dict(loss_weight=1.3)),
        hooks=[dict(type="kdops.KDScheduleHook", warmup_iters=100, losses=["assist", "dense", "ckd"])],
        weight=("the release's weights: assistants' GT losses at 0.5 (FCOS) and 1.0 (R-CNN), dense mimic 1.0, "
                "CKD 1.3, all warmed up over 100 iterations; FCOS assistant (2 convs of 32) on the student's 3 FPN "
                "levels, R-CNN assistant (2 FC of 256) fed with the student's own 300 proposals, 128 RoIs per image"),
        why=("teacher-free: the assistants are trained from scratch with the student, so the baseline is the same "
             "student alone and the gain is what the assistants' supervision adds; the cosine schedule has no LR "
             "drop, so the mimic losses are never switched off here (the paper stops them at the first drop)."),
    ),
    "lgd": dict(
        label="LGD (teacher-free)",
        teacher=None,
        model=dict(type="kdops.LGDDetector", lgd=dict(add_context_box=True, detach_appearance=False),
                   loss_weight=1.0, distill_start_iter=250, freeze_backbone_iters=167),
        hooks=[dict(type="kdops.KDScheduleHook")],
        weight=("the release's RetinaNet setting: lambda 1, a context box per image, appearance not detached; its "
                "schedule scaled from 180k to 1500 iterations: the student's features join the distillation loss "
                "at 250 (30k), its backbone trains from 167 (20k)"),
        why=("teacher-free: the instructive knowledge is built from the labels and the student's own features, "
             "so the baseline is the same student alone and the gain is what label-guided self-distillation "
             "adds on the same labelled images."),
    ),
}
METHODS["lgd_nofreeze"] = dict(
    METHODS["lgd"],
    label="LGD, backbone not frozen",
    model=dict(METHODS["lgd"]["model"], freeze_backbone_iters=0),
    weight="as LGD, without the release's backbone freeze (its first 20k of 180k iterations)",
    why=("an ablation: the release freezes an ImageNet-initialised backbone while the LGD modules warm up; this "
         "student trains from scratch, where the freeze leaves its randomly initialised backbone behind the "
         "baseline's for 167 iterations."),
)
_UNIKD_AKE = dict(num_queries=50, num_extractor_layers=1, ffn_dims=256, num_heads=4)
METHODS["unikd"] = dict(
    label="UniKD",
    teacher="retinanet",
    # stage 1, trained once per teacher (like the teacher, on all labelled images): the AKEs absorb it
    absorb=dict(type="kdops.UniKDAbsorbDetector", levels=[0, 1, 2], ake=_UNIKD_AKE, num_positional=50,
                pos_fraction=0.5),
    absorb_optim=dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=2e-4, weight_decay=1e-4),
                      clip_grad=dict(max_norm=0.1, norm_type=2)),
    # stage 2, per seed: the student distilled through the frozen AKEs (ake_ckpt: stage 1's checkpoint)
    model=dict(type="kdops.UniKDDistillDetector", ake_ckpt=None, ake=_UNIKD_AKE, num_positional=50,
               levels=[0, 1, 2], teacher_levels=[0, 1, 2], adaptor=dict(num_layers=2, num_heads=4, ffn_dims=256),
               loss=dict(content_weight=10.0, positional_weight=10.0)),
    hooks=[dict(type="kdops.KDScheduleHook", warmup_iters=100, losses=["unikd"])],
    weight=("the toy configs' setting (configs/unikd/unikd_*_retinanet_toy.py): content and positional decoupled "
            "MSE at 10 each, warmed up over 100 iterations; 50 + 50 queries, 1 extractor layer; the AKEs absorb "
            "the teacher once (1500 iterations on its 2000 images), then stay frozen for every seed"),
    why=("the paper's weights with AKEs narrowed to the toy teacher (64 channels, 3 levels); the absorb stage is "
         "part of the method's cost and is trained once per teacher, like the teacher itself."),
)
METHODS["unikd_frcnn"] = dict(
    METHODS["unikd"],
    label="UniKD (Faster R-CNN teacher)",
    teacher="frcnn",
    absorb=dict(METHODS["unikd"]["absorb"], levels=[1, 2, 3]),
    model=dict(METHODS["unikd"]["model"], teacher_levels=[1, 2, 3]),
    weight=("as UniKD (configs/unikd/unikd_*_faster_rcnn_*toy.py): decoupled MSE at 10 + 10, 50 + 50 queries; the "
            "AKEs read the Faster R-CNN teacher's P3-P5 (32 channels), the student's P3-P5 through the adaptor"),
    why=("the heterogeneous pair: only the teacher's features are read, through queries, so its two-stage heads "
         "play no part; the teacher is HEAD's toy Faster R-CNN. Its gain is small because the AKEs, as wide as the "
         "teacher's 32-channel FPN (0.12 M parameters), absorb it poorly in 1500 iterations: 13.9 mAP as a "
         "detector on its features, against 35.0 on the 64-channel RetinaNet teacher's."),
)
SKIPPED_METHODS: Dict[str, str] = {}


def teacher_of(method: str) -> Optional[str]:
    """The TEACHERS key a method distils from (None: a teacher-free method such as TF-HEAD)."""
    return METHODS[method].get("teacher", "retinanet")


def method_config(method: str) -> dict:
    """What a method adds to the student: its loss entry, or its whole-detector settings (HEAD)."""
    m = METHODS[method]
    return m["entry"] if "entry" in m else dict(m["model"], hooks=m.get("hooks", []))
REGIMES = {
    "low": dict(label="500 labelled images (teacher saw 2000)", n_labelled=500),
    "full": dict(label="all 2000 images labelled", n_labelled=None),
}

FULL = dict(num_train=2000, num_val=300, size=128, data_seed=0, teacher_iters=2000, student_iters=1500,
            batch=16, low_n=500, warmup=100)
QUICK = dict(num_train=160, num_val=48, size=128, data_seed=0, teacher_iters=40, student_iters=30,
             batch=8, low_n=64, warmup=5)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


_WEIGHTS: Dict[str, str] = {}


def _weights_digest(ckpt: str) -> str:
    """A hash of a checkpoint's weights alone (its meta holds times and paths), memoised per path."""
    if ckpt not in _WEIGHTS:
        import torch

        sd = torch.load(ckpt, map_location="cpu", weights_only=False)
        sd = sd.get("state_dict", sd)
        h = hashlib.sha256()
        for k in sorted(sd):
            h.update(k.encode())
            h.update(sd[k].detach().contiguous().cpu().numpy().tobytes())
        _WEIGHTS[ckpt] = h.hexdigest()[:16]
    return _WEIGHTS[ckpt]


def _files_digest() -> str:
    h = hashlib.sha256()
    for p in CFG_FILES:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- data
def prepare_data(cache: str, p: dict) -> Dict[str, str]:
    from kdops import toy_data

    name = f"toy_s{p['data_seed']}_px{p['size']}_tr{p['num_train']}_va{p['num_val']}"
    root = osp.join(cache, "data", name)
    toy_data.generate(root, num_train=p["num_train"], num_val=p["num_val"], image_size=p["size"],
                      seed=p["data_seed"])
    low = osp.join(root, "annotations", f"instances_train_first{p['low_n']}.json")
    if not osp.isfile(low):
        with open(osp.join(root, "annotations", "instances_train.json")) as f:
            coco = json.load(f)
        keep = sorted(im["id"] for im in coco["images"])[: p["low_n"]]
        ks = set(keep)
        sub = dict(coco)
        sub["images"] = [im for im in coco["images"] if im["id"] in ks]
        sub["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ks]
        tmp = low + ".tmp"
        with open(tmp, "w") as f:
            json.dump(sub, f)
        os.replace(tmp, low)
    return dict(root=root, full="annotations/instances_train.json",
                low=osp.relpath(low, root))


# -------------------------------------------------------------------------------------- the worker
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_run(spec: dict) -> bool:
    """Two benchmark processes sharing a cache never train the same run at once: the second waits for
    the first's result (False), or takes over a lock whose owner died (True)."""
    lock = osp.join(spec["work_dir"], "lock")
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        except FileExistsError:
            pass
        try:
            with open(lock) as f:
                owner = int(f.read().strip() or 0)
        except (OSError, ValueError):
            owner = 0
        if owner and _alive(owner):
            while _alive(owner) and not osp.isfile(spec["result"]):
                time.sleep(5)
            if osp.isfile(spec["result"]):
                return False
        try:
            os.remove(lock)
        except FileNotFoundError:
            pass


def _worker(spec_path: str) -> None:
    """One training run (teacher or student, with or without KD) in this process: build the config,
    seed, init the weights, train, evaluate, write the result JSON next to the spec."""
    with open(spec_path) as f:
        spec = json.load(f)
    if not _lock_run(spec):
        return  # another process trained this run meanwhile: its result.json is there
    os.environ["KDOPS_TOY_DATA"] = spec["data_root"]
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # mmengine's own checkpoints (see train.py)
    import numpy as np
    import random
    import torch
    from mmengine.config import Config
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    import kdops_mmdet  # noqa: F401  (registers kdops.*)
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    torch.set_num_threads(spec.get("threads") or 1)
    seed, iters = spec["seed"], spec["iters"]
    arch = spec.get("arch", "retinanet")
    cfg = Config.fromfile(TEACHERS[arch]["cfg"] if spec["kind"] == "teacher" else STUDENT_CFG)
    cfg.work_dir = spec["work_dir"]
    cfg.experiment_name = osp.basename(spec["work_dir"])
    cfg.randomness = dict(seed=seed, deterministic=False)
    cfg.train_dataloader.batch_size = spec["batch"]
    cfg.train_dataloader.dataset.ann_file = spec["ann_file"]
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=iters)
    w = min(spec["warmup"], max(iters - 1, 1))
    cfg.param_scheduler = [
        dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=w),
        dict(type="CosineAnnealingLR", by_epoch=False, begin=w, end=iters, T_max=max(iters - w, 1), eta_min=0.0),
    ]
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=max(1, min(50, iters // 5)))
    if spec["kind"] in ("teacher", "absorb"):
        cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=iters, max_keep_ckpts=1)
    else:
        cfg.default_hooks.checkpoint = None
    kd = spec["kind"] == "student" and bool(spec.get("entry") or spec.get("model"))
    if spec["kind"] == "absorb":  # a two-stage method's first stage on the frozen teacher (UniKD)
        cfg.custom_imports = dict(imports=["kdops_mmdet"], allow_failed_imports=False)
        cfg.model = dict(spec["model"], teacher_cfg=TEACHERS[spec.get("teacher_arch", "retinanet")]["cfg"],
                         teacher_ckpt=spec["teacher_ckpt"])
        cfg.optim_wrapper = spec["optim"]
    if kd:
        cfg.custom_imports = dict(imports=["kdops_mmdet"], allow_failed_imports=False)
        if spec.get("model") and "teacher_ckpt" not in spec:  # a teacher-free method (TF-HEAD)
            cfg.model = dict(spec["model"], student=cfg.model)
            cfg.custom_hooks = list(spec.get("hooks") or [])
        elif spec.get("model"):
            teacher_cfg = TEACHERS[spec["teacher_arch"]]["cfg"]  # a whole-method detector (HEAD) with its own settings and schedule hooks
            cfg.model = dict(spec["model"], student=cfg.model, teacher_cfg=teacher_cfg,
                             teacher_ckpt=spec["teacher_ckpt"])
            if spec.get("ake_ckpt"):  # UniKD's second stage: the first stage's checkpoint
                cfg.model["ake_ckpt"] = spec["ake_ckpt"]
            cfg.custom_hooks = list(spec.get("hooks") or [])
        else:
            teacher_cfg = TEACHERS[spec.get("teacher_arch", "retinanet")]["cfg"]
            cfg.model = dict(type="kdops.DistillDetector", student=cfg.model, teacher_cfg=teacher_cfg,
                             teacher_ckpt=spec["teacher_ckpt"], distill_losses=[spec["entry"]])

    curve: List[dict] = []
    val_metrics: Dict[str, float] = {}

    class _Record(Hook):
        priority = "LOWEST"

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if outputs:
                curve.append({k: round(float(v), 5) for k, v in outputs.items()})

        def after_val_epoch(self, runner, metrics=None):
            val_metrics.update({k: float(v) for k, v in (metrics or {}).items()})

    def seed_all():
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    t0 = time.perf_counter()
    runner = Runner.from_cfg(cfg)
    runner.register_hook(_Record())
    # the student's initialisation is a function of the seed alone: the same with and without KD (the
    # teacher built inside DistillDetector consumed random numbers). init_weights() sets the focal-loss
    # prior bias of RetinaHead; the Runner's own init_weights() then skips the initialised modules.
    model = runner.model
    seed_all()
    (model.student if kd else model).init_weights()
    seed_all()  # the data order (InfiniteSampler seed, flips) follows from here
    runner.train()
    train_s = time.perf_counter() - t0
    if not val_metrics:
        val_metrics.update({k: float(v) for k, v in runner.val_loop.run().items()})
    metrics = val_metrics
    ckpt = osp.join(spec["work_dir"], f"iter_{iters}.pth") if spec["kind"] in ("teacher", "absorb") else None
    res = dict(mAP=100.0 * metrics["coco/bbox_mAP"], mAP50=100.0 * metrics["coco/bbox_mAP_50"], metrics=metrics,
               wall_s=round(time.perf_counter() - t0, 1), train_s=round(train_s, 1), curve=curve, ckpt=ckpt,
               params_m=round(sum(p.numel() for p in (model.student if kd else model).parameters()
                                  if spec["kind"] != "absorb" or p.requires_grad) / 1e6, 4))
    with open(spec["result"] + ".tmp", "w") as f:
        json.dump(res, f)
    os.replace(spec["result"] + ".tmp", spec["result"])
    try:
        os.remove(osp.join(spec["work_dir"], "lock"))
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------- runs
class Bench:
    def __init__(self, args, p: dict):
        self.args, self.p = args, p
        self.cache = osp.abspath(args.cache_dir)
        os.makedirs(self.cache, exist_ok=True)
        self.data = prepare_data(self.cache, p)
        self.digest = _files_digest()

    def _run(self, spec: dict, tag: str) -> dict:
        key = _hash({k: v for k, v in spec.items()})
        d = osp.join(self.cache, "runs", f"{tag}-{key}")
        res_path = osp.join(d, "result.json")
        stored = self._stored(spec, tag)
        if osp.isfile(res_path):
            with open(res_path) as f:
                res = json.load(f)
            res["cached"] = True
            self._store(spec, tag, res)
            return res
        if stored is not None and spec["kind"] not in ("teacher", "absorb"):  # their checkpoints are not stored
            return dict(stored, cached=True)
        if self.args.report_only:
            return None
        os.makedirs(d, exist_ok=True)
        spec = dict(spec, work_dir=d, result=res_path, threads=self.args.threads)
        with open(osp.join(d, "spec.json"), "w") as f:
            json.dump(spec, f, indent=1)
        log = osp.join(d, "stdout.log")
        self._say(f"[efficacy] {tag} ...")
        t0 = time.perf_counter()
        with open(log, "w") as f:
            th = str(self.args.threads or 1)
            env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=th, MKL_NUM_THREADS=th)
            rc = subprocess.call([sys.executable, osp.abspath(__file__), "_worker", osp.join(d, "spec.json")],
                                 stdout=f, stderr=subprocess.STDOUT, env=env, cwd=d)
        if rc != 0 or not osp.isfile(res_path):
            with open(log) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"efficacy: run {tag} failed (rc {rc}); log {log}:\n{tail}")
        with open(res_path) as f:
            res = json.load(f)
        res["cached"] = False
        self._store(spec, tag, res)
        self._say(f"[efficacy] {tag}: mAP {res['mAP']:.1f} in {time.perf_counter() - t0:.0f} s")
        return res

    # ------------------------------------------------------------------ the committed run store
    # Runs outlive the cache (which a fresh machine does not have) in --store, a folder of small JSON
    # files meant to be committed: one per run, named by a key that leaves out this machine's paths and
    # holds what decides the result -- the run's settings, the CPU model and, for a KD run, a hash of the
    # teacher's weights. A later session re-trains the teacher (its checkpoint is not stored); if the
    # weights come out the same, every stored KD run of that teacher is reused, else they are retrained.
    def _store_key(self, spec: dict) -> Optional[str]:
        if not self.args.store:
            return None
        canon = {k: v for k, v in spec.items() if k not in ("data_root", "teacher_ckpt", "ake_ckpt", "work_dir",
                                                             "result", "threads")}
        canon["ann_file"] = osp.basename(spec.get("ann_file", ""))
        canon["cpu"] = _cpu_name()
        if spec.get("teacher_ckpt"):
            canon["teacher_weights"] = _weights_digest(spec["teacher_ckpt"])
        if spec.get("ake_ckpt"):
            canon["ake_weights"] = _weights_digest(spec["ake_ckpt"])
        return _hash(canon)

    def _stored(self, spec: dict, tag: str) -> Optional[dict]:
        key = self._store_key(spec)
        path = key and osp.join(self.args.store, f"{tag}-{key}.json")
        if not path or not osp.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def _store(self, spec: dict, tag: str, res: dict) -> None:
        key = self._store_key(spec)
        if not key:
            return
        os.makedirs(self.args.store, exist_ok=True)
        path = osp.join(self.args.store, f"{tag}-{key}.json")
        if osp.isfile(path):
            return
        keep = {k: v for k, v in res.items() if k not in ("cached", "ckpt")}
        curve = keep.get("curve") or []
        if len(curve) > CURVE_POINTS:
            step = -(-len(curve) // CURVE_POINTS)
            keep["curve"] = curve[::step] + ([curve[-1]] if (len(curve) - 1) % step else [])
        with open(path + ".tmp", "w") as f:
            json.dump(dict(keep, tag=tag, cpu=_cpu_name()), f)
        os.replace(path + ".tmp", path)

    def _say(self, msg: str) -> None:
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    def _common(self) -> dict:
        p = self.p
        return dict(data_root=self.data["root"], batch=p["batch"], warmup=p["warmup"], cfg_digest=self.digest,
                    data=dict(num_train=p["num_train"], num_val=p["num_val"], size=p["size"], seed=p["data_seed"]))

    def teacher(self, arch: str = "retinanet") -> dict:
        spec = dict(self._common(), kind="teacher", seed=0, iters=self.p["teacher_iters"], ann_file=self.data["full"])
        if arch != "retinanet":  # the RetinaNet teacher's spec (and so its cache key) is unchanged
            spec["arch"] = arch
        res = self._run(spec, "teacher" if arch == "retinanet" else f"teacher-{arch}")
        if res is None:
            raise SystemExit("efficacy: --report-only but the teacher of these settings is not in the cache")
        if not osp.isfile(res["ckpt"]):
            raise RuntimeError(f"efficacy: the cached teacher checkpoint {res['ckpt']} is gone: delete its run dir")
        return res

    def absorb(self, method: str, teacher: dict, required: bool = True) -> Optional[dict]:
        """A two-stage method's first stage (UniKD: the AKEs absorb the teacher), trained once per teacher
        on the teacher's images and cached like it; its checkpoint feeds every seed's second stage."""
        m = METHODS[method]
        spec = dict(self._common(), kind="absorb", seed=0, iters=self.p["student_iters"], ann_file=self.data["full"],
                    model=m["absorb"], optim=m["absorb_optim"], teacher_ckpt=teacher["ckpt"])
        if m["teacher"] != "retinanet":  # the RetinaNet pair's spec (and so its cache key) is unchanged
            spec["teacher_arch"] = m["teacher"]
        res = self._run(spec, f"absorb-{method}")
        if res is None and not required:
            return None
        if res is None:
            raise SystemExit(f"efficacy: --report-only but {method}'s first stage is not in the cache")
        if not osp.isfile(res["ckpt"]):
            raise RuntimeError(f"efficacy: the cached {method} stage-1 checkpoint {res['ckpt']} is gone: delete its "
                               f"run dir")
        return res

    def student(self, regime: str, seed: int, method: Optional[str], teacher: dict) -> dict:
        spec = dict(self._common(), kind="student", seed=seed, iters=self.p["student_iters"],
                    ann_file=self.data["low" if REGIMES[regime]["n_labelled"] else "full"])
        if method:
            m = METHODS[method]
            if "model" in m and m["teacher"] is None:  # teacher-free (TF-HEAD)
                spec.update(model=m["model"], hooks=m.get("hooks", []))
            elif "model" in m:
                spec.update(model=m["model"], hooks=m.get("hooks", []), teacher_arch=m["teacher"],
                            teacher_ckpt=teacher["ckpt"])
                if "absorb" in m:  # UniKD: the first stage's settings identify the AKEs (with the teacher's
                    # weights) in the run store; its checkpoint path does not
                    spec["absorb"] = dict(model=m["absorb"], optim=m["absorb_optim"], iters=self.p["student_iters"])
                    stage1 = self.absorb(method, teacher, required=not self.args.report_only)
                    if stage1 is not None:
                        spec["ake_ckpt"] = stage1["ckpt"]
            else:
                spec.update(entry=m["entry"], teacher_ckpt=teacher["ckpt"])
        return self._run(spec, f"{regime}-{method or 'baseline'}-s{seed}")


# -------------------------------------------------------------------------------------------- report
def paired_stats(base: List[float], kd: List[float]) -> dict:
    d = [k - b for b, k in zip(base, kd)]
    n = len(d)

    def ms(x):
        m = sum(x) / len(x)
        sd = math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1)) if len(x) > 1 else None
        return m, sd

    bm, bsd = ms(base)
    km, ksd = ms(kd)
    gm, gsd = ms(d)
    t = gm / (gsd / math.sqrt(n)) if (gsd is not None and gsd > 0) else None
    return dict(n=n, baseline_mean=bm, baseline_sd=bsd, kd_mean=km, kd_sd=ksd, gain_mean=gm, gain_sd=gsd, t=t,
                seeds_positive=sum(v > 0 for v in d))


def _cpu_name() -> str:
    from kdops.bench.report import cpu_model

    return cpu_model()


def _regime_label(regime: str, meta: dict) -> str:
    if regime == "low":
        return f"{meta['low_n']} labelled images (teacher saw {meta['num_train']})"
    return f"all {meta['num_train']} images labelled"


def _pm(m, sd, nd=1):
    return f"{m:.{nd}f}" + (f" ± {sd:.{nd}f}" if sd is not None else "")


CURVE_POINTS = 100  # loss-curve points kept per run in the committed JSON (the chart uses every iteration)


def _thin_curves(doc: dict) -> dict:
    """A copy of the report with every ``*_curve`` list cut to about CURVE_POINTS evenly spaced
    points (the last one kept): the per-iteration curves of every run would make the JSON MBs."""
    import copy

    doc = copy.deepcopy(doc)
    for r in doc.get("results", []):
        for s in r.get("seeds", []):
            for k, v in list(s.items()):
                if k.endswith("_curve") and isinstance(v, list) and len(v) > CURVE_POINTS:
                    step = -(-len(v) // CURVE_POINTS)
                    s[k] = v[::step] + ([v[-1]] if (len(v) - 1) % step else [])
    return doc


def _teacher_line(arch: str, t: dict, meta: dict) -> str:
    users = [METHODS[m]["label"] for m in meta.get("methods", METHODS) if m in METHODS and teacher_of(m) == arch]
    return (f"Teacher ({', '.join(users) or arch}): {TEACHERS[arch]['label']}, {t.get('params_m')} M params, "
            f"{meta['teacher_iters']} iterations on {meta['num_train']} images: **{t['mAP']:.1f} mAP** "
            f"(mAP50 {t['mAP50']:.1f}), trained in {t['wall_s']:.0f} s.")


def write_report(out: str, prefix: str, meta: dict, teachers: Dict[str, dict], rows: List[dict]) -> None:
    os.makedirs(out, exist_ok=True)
    for r in rows:
        r["stats"] = paired_stats([s["baseline_mAP"] for s in r["seeds"]], [s["kd_mAP"] for s in r["seeds"]])
    brief = {a: dict(mAP=t["mAP"], mAP50=t["mAP50"], wall_s=t["wall_s"], params_m=t.get("params_m"))
             for a, t in teachers.items()}
    doc = dict(meta=meta, teacher=brief.get("retinanet") or next(iter(brief.values()), None), teachers=brief,
               skipped=SKIPPED_METHODS, results=rows)
    with open(osp.join(out, prefix + ".json"), "w") as f:
        json.dump(_thin_curves(doc), f, indent=1)
    L = [f"# KD efficacy on kdops.toy_data ({meta['mode']} mode)", "",
         f"{meta['date']} · {meta['host']} · torch {meta['torch']} · mmdet {meta['mmdet']} · "
         f"`python benchmarks/efficacy.py {meta['argv']}`", "",
         " ".join(_teacher_line(a, t, meta) for a, t in teachers.items()) + " "
         f"Student: base 8, FPN 32, 1 head conv, {meta['student_iters']} iterations, AdamW lr 2e-3 wd 0.05, "
         f"warm-up + cosine, clip 10, batch {meta['batch']}, flip. COCO bbox mAP (mmdet CocoMetric) on "
         f"{meta['num_val']} val images. Gain = KD − baseline of the same seed (same init, same data order); "
         f"t = mean / (sd/√n).", "",
         "| regime | method | baseline mAP | KD mAP | paired gain | t | seeds > 0 | KD run wall (mean) |",
         "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["stats"]
        t = f"{s['t']:.2f}" if s["t"] is not None else "–"
        wall = sum(x["kd_wall_s"] for x in r["seeds"]) / len(r["seeds"])
        L.append(f"| {_regime_label(r['regime'], meta)} | {r['label']} | {_pm(s['baseline_mean'], s['baseline_sd'])} | "
                 f"{_pm(s['kd_mean'], s['kd_sd'])} | **{s['gain_mean']:+.1f}**"
                 f"{' ± %.1f' % s['gain_sd'] if s['gain_sd'] is not None else ''} | {t} | "
                 f"{s['seeds_positive']}/{s['n']} | {wall:.0f} s |")
    L += ["", "Every seed's pair (baseline → KD mAP; wall time of each run's training + evaluation):", ""]
    for r in rows:
        pairs = ", ".join(f"s{x['seed']}: {x['baseline_mAP']:.1f} → {x['kd_mAP']:.1f} "
                          f"({x['baseline_wall_s']:.0f} s / {x['kd_wall_s']:.0f} s)" for x in r["seeds"])
        L.append(f"- {r['regime']} / {r['label']}: {pairs}")
    L += ["", "Weights and why:", ""]
    for m in dict.fromkeys(r["method"] for r in rows):
        L.append(f"- **{METHODS[m]['label']}**: {METHODS[m]['weight']}. {METHODS[m]['why']}")
    for m, why in SKIPPED_METHODS.items():
        L.append(f"- **{m.upper()}** (not run): {why}")
    L += ["", f"Wall times were measured on {meta['host_note']}.", "",
          f"![bar chart]({prefix}.png) ![loss curves]({prefix}_curves.png)", ""]
    with open(osp.join(out, prefix + ".md"), "w") as f:
        f.write("\n".join(L))
    try:
        _plots(out, prefix, rows)
    except Exception as e:  # plots are a convenience: the tables are the result
        print(f"[efficacy] plots skipped: {e!r}", flush=True)


def _plots(out: str, prefix: str, rows: List[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows) + 2), 4))
    xs = range(len(rows))
    for off, key, lab, col in ((-0.2, "baseline", "student alone", "#999999"), (0.2, "kd", "student + KD", "#d62728")):
        m = [r["stats"][key + "_mean"] for r in rows]
        e = [r["stats"][key + "_sd"] or 0 for r in rows]
        ax.bar([x + off for x in xs], m, 0.4, yerr=e, capsize=3, label=lab, color=col)
        for x, r in zip(xs, rows):
            ax.scatter([x + off] * len(r["seeds"]), [s[key + "_mAP"] for s in r["seeds"]], s=8, color="k", zorder=3)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{r['label']}\n{r['regime']} ({r['stats']['gain_mean']:+.1f})" for r in rows])
    ax.set_ylabel("COCO bbox mAP")
    ax.set_title("KD efficacy on kdops.toy_data (mean ± sd over paired seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(osp.join(out, prefix + ".png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.4), squeeze=False)
    for ax, r in zip(axes[0], rows):
        for key, col in (("baseline", "#777777"), ("kd", "#d62728")):
            for i, s in enumerate(r["seeds"]):
                c = s[key + "_curve"]
                det = [sum(v for k, v in it.items() if k in ("loss_cls", "loss_bbox")) for it in c]
                ax.plot(_smooth(det), color=col, lw=0.8, alpha=0.8,
                        label=f"{'KD' if key == 'kd' else 'alone'}: detection loss" if i == 0 else None)
                kdl = [sum(v for k, v in it.items() if k.startswith("loss_") and k not in ("loss_cls", "loss_bbox"))
                       for it in c]
                if key == "kd" and any(kdl):
                    ax.plot(_smooth(kdl), color="#1f77b4", lw=0.8, alpha=0.8,
                            label=f"KD loss ({r['method']})" if i == 0 else None)
        ax.set_title(f"{r['label']} / {r['regime']}")
        ax.set_xlabel("iteration")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(osp.join(out, prefix + "_curves.png"), dpi=100)
    plt.close(fig)


def _smooth(x: List[float], k: int = 25) -> List[float]:
    out, acc = [], 0.0
    for i, v in enumerate(x):
        acc += v
        if i >= k:
            acc -= x[i - k]
        out.append(acc / min(i + 1, k))
    return out


class _Scheduler:
    """``jobs`` threads, each running one subprocess at a time: a thread takes the first task in priority
    order whose inputs are ready (KD runs wait for the teacher; baselines need nothing)."""

    def __init__(self, bench: Bench, tasks: List[tuple], jobs: int) -> None:
        import threading
        from concurrent.futures import Future

        self.bench, self.pending = bench, list(tasks)
        self.futs = {t: Future() for t in tasks}
        self.cv = threading.Condition()
        self.closed = False
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(jobs)]
        for th in self.threads:
            th.start()

    def future(self, task):
        return self.futs[task]

    def _teacher(self, t):
        """The future of the teacher a KD task needs."""
        return self.futs[("teacher", teacher_of(t[2]))]

    def _ready(self, t) -> bool:
        if t[0] == "teacher" or t[2] is None or teacher_of(t[2]) is None:
            return True
        ft = self._teacher(t)
        return ft.done() and ft.exception() is None

    def _loop(self) -> None:
        while True:
            with self.cv:
                while True:
                    if self.closed or not self.pending:
                        return
                    task = next((t for t in self.pending if self._ready(t)), None)
                    if task is not None:
                        self.pending.remove(task)
                        break
                    # a KD task whose teacher is done but not ready: the teacher failed, the task cannot run
                    failed = [t for t in self.pending if t[0] != "teacher" and t[2] is not None
                              and teacher_of(t[2]) is not None and self._teacher(t).done()]
                    for t in failed:
                        self.futs[t].set_exception(RuntimeError(f"efficacy: the {teacher_of(t[2])} teacher run "
                                                                f"failed"))
                        self.pending.remove(t)
                    if not failed:
                        self.cv.wait(5.0)
            fut = self.futs[task]
            try:
                if task[0] == "teacher":
                    fut.set_result(self.bench.teacher(task[1]))
                else:
                    regime, seed, m = task
                    teacher = self._teacher(task).result() if m and teacher_of(m) else None
                    fut.set_result(self.bench.student(regime, seed, m, teacher))
            except BaseException as e:  # noqa: BLE001  (reported by whoever waits on the future)
                fut.set_exception(e)
            with self.cv:
                self.cv.notify_all()

    def close(self) -> None:
        with self.cv:
            self.closed = True
            for t in self.pending:
                self.futs[t].cancel()
            self.cv.notify_all()
        for th in self.threads:
            th.join()


def _row(m: str, regime: str) -> dict:
    return dict(method=m, label=METHODS[m]["label"], regime=regime, weight=METHODS[m]["weight"],
                why=METHODS[m]["why"], entry=method_config(m), seeds=[])


def _pair(seed: int, b: dict, k: dict) -> dict:
    return dict(seed=seed, baseline_mAP=b["mAP"], kd_mAP=k["mAP"], gain=k["mAP"] - b["mAP"], baseline_mAP50=b["mAP50"],
                kd_mAP50=k["mAP50"], baseline_wall_s=b["wall_s"], kd_wall_s=k["wall_s"], baseline_curve=b["curve"],
                kd_curve=k["curve"])


def _report_from_cache(bench: Bench, args, meta: dict, methods: List[str], n_seeds: int, prefix: str) -> dict:
    teachers = {a: bench.teacher(a) for a in dict.fromkeys(teacher_of(m) for m in methods) if a}
    rows = []
    for m in methods:
        for regime in args.regimes:
            row = _row(m, regime)
            for seed in range(n_seeds):
                b = bench.student(regime, seed, None, None)
                k = bench.student(regime, seed, m, teachers.get(teacher_of(m)))
                if b is not None and k is not None:
                    row["seeds"].append(_pair(seed, b, k))
            if row["seeds"]:
                rows.append(row)
    meta["report_only"] = True
    if rows:
        write_report(args.out, prefix, meta, teachers, rows)
    for r in rows:
        s = r["stats"]
        print(f"{r['regime']:5s} {r['label']:7s} baseline {_pm(s['baseline_mean'], s['baseline_sd'])}  "
              f"KD {_pm(s['kd_mean'], s['kd_sd'])}  gain {s['gain_mean']:+.1f}  t {s['t']}  "
              f"{s['seeds_positive']}/{s['n']} seeds > 0", flush=True)
    return dict(meta=meta, teachers=teachers, rows=rows)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="benchmarks/efficacy.py", description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=None, choices=sorted(METHODS) + sorted(SKIPPED_METHODS) + ["all"],
                    help="default: pkd (the issue's default run); 'all': " + " ".join(METHODS)
                         + (f" ({' '.join(SKIPPED_METHODS)}: skipped with its reason)" if SKIPPED_METHODS else ""))
    ap.add_argument("--regimes", nargs="+", default=["low", "full"], choices=sorted(REGIMES))
    ap.add_argument("--seeds", type=int, default=None, help="paired seeds per method and regime (default 4; quick 1)")
    ap.add_argument("--quick", action="store_true", help="1 seed, PKD, tiny data, few iterations: a smoke test")
    ap.add_argument("--student-iters", type=int, default=None)
    ap.add_argument("--teacher-iters", type=int, default=None)
    ap.add_argument("--out", default=osp.join(ROOT, "bench-results"),
                    help="results folder (default: %(default)s, untracked; pass benchmarks/results/<machine> to update "
                         "the committed results)")
    ap.add_argument("--prefix", default=None, help="file name prefix (default efficacy, quick: efficacy_quick)")
    ap.add_argument("--cache-dir", default=os.environ.get("KDOPS_EFFICACY_CACHE",
                                                          osp.join(osp.expanduser("~"), ".cache", "kdops", "efficacy")))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per run (default 1: on a shared CPU, 2 OpenMP threads per run were 2-5x "
                         "slower than 1)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="runs in parallel (default: the CPU count // --threads, at most 4; baselines need no "
                         "teacher, so a second job trains them while the teacher trains)")
    ap.add_argument("--store", default=None,
                    help="a folder of per-run result files to commit (e.g. benchmarks/results/<machine>/"
                         "efficacy_runs): runs found there are not trained again, on any machine of the same CPU "
                         "model whose teacher comes out with the same weights")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: write the report from the runs already in the cache (pairs missing a "
                         "run are left out)")
    ap.add_argument("--host-note", default=None, help="a sentence on the machine, for the report")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    if args.student_iters:
        p["student_iters"] = args.student_iters
    if args.teacher_iters:
        p["teacher_iters"] = args.teacher_iters
    methods = list(METHODS) if args.methods == ["all"] else (args.methods or ["pkd"])
    skipped = [m for m in methods if m in SKIPPED_METHODS]
    for m in skipped:
        print(f"[efficacy] {m}: skipped: {SKIPPED_METHODS[m]}", flush=True)
    methods = [m for m in methods if m in METHODS]
    n_seeds = args.seeds or (1 if args.quick else 4)
    prefix = args.prefix or ("efficacy_quick" if args.quick else "efficacy")
    import torch
    import mmdet

    meta = dict(mode="quick" if args.quick else "full", date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                host=f"{_cpu_name()}, {os.cpu_count()} cores",
                torch=torch.__version__, mmdet=mmdet.__version__,
                argv=" ".join(sys.argv[1:] if argv is None else argv), methods=methods, regimes=args.regimes,
                seeds=n_seeds, **p,
                host_note=args.host_note or f"{os.cpu_count()} CPU cores (shared with other jobs: wall times are "
                                            f"upper bounds)")
    bench = Bench(args, p)
    t0 = time.perf_counter()
    if args.report_only:
        return _report_from_cache(bench, args, meta, methods, n_seeds, prefix)
    plan = [(m, regime, seed) for m in methods for regime in args.regimes for seed in range(n_seeds)]
    # in priority order: the teachers, then each baseline just before its first KD run
    tasks: List[tuple] = [("teacher", a) for a in dict.fromkeys(teacher_of(m) for m in methods) if a]
    for m, regime, seed in plan:
        if (regime, seed, None) not in tasks:
            tasks.append((regime, seed, None))
        tasks.append((regime, seed, m))
    jobs = args.jobs if args.jobs else min(4, max(1, (os.cpu_count() or 1) // max(1, args.threads)))
    print(f"[efficacy] {jobs} run(s) in parallel, {args.threads} torch thread(s) each", flush=True)
    sched = _Scheduler(bench, tasks, max(1, jobs))
    futs = {t: sched.future(t) for t in tasks if t[0] != "teacher"}
    teachers: Dict[str, dict] = {}
    rows: List[dict] = []
    try:
        for m in methods:
            for regime in args.regimes:
                row = _row(m, regime)
                rows.append(row)
                for seed in range(n_seeds):
                    a = teacher_of(m)
                    if a and a not in teachers:
                        teachers[a] = sched.future(("teacher", a)).result()
                        bench._say(f"[efficacy] {a} teacher: {teachers[a]['mAP']:.1f} mAP "
                                   f"({'cached' if teachers[a]['cached'] else 'trained'})")
                    b = futs[(regime, seed, None)].result()
                    k = futs[(regime, seed, m)].result()
                    row["seeds"].append(dict(seed=seed, baseline_mAP=b["mAP"], kd_mAP=k["mAP"],
                                             gain=k["mAP"] - b["mAP"], baseline_mAP50=b["mAP50"],
                                             kd_mAP50=k["mAP50"], baseline_wall_s=b["wall_s"], kd_wall_s=k["wall_s"],
                                             baseline_curve=b["curve"], kd_curve=k["curve"]))
                    meta["elapsed_s"] = round(time.perf_counter() - t0, 1)
                    write_report(args.out, prefix, meta, teachers, rows)
                    bench._say(f"[efficacy] {regime}/{m} s{seed}: {b['mAP']:.1f} -> {k['mAP']:.1f} "
                               f"({k['mAP'] - b['mAP']:+.1f})")
    finally:
        sched.close()
    for r in rows:
        s = r["stats"]
        print(f"{r['regime']:5s} {r['label']:7s} baseline {_pm(s['baseline_mean'], s['baseline_sd'])}  "
              f"KD {_pm(s['kd_mean'], s['kd_sd'])}  gain {s['gain_mean']:+.1f}  t {s['t']}  "
              f"{s['seeds_positive']}/{s['n']} seeds > 0", flush=True)
    return dict(meta=meta, teachers=teachers, rows=rows)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_worker":
        _worker(sys.argv[2])
    else:
        main()
