"""UniKD on the real mmdet stack (kdops_mmdet.UniKDAbsorbDetector -> UniKDDistillDetector): the toy
RetinaNet / Faster R-CNN teachers, the toy RetinaNet student, mmengine's Runner and CocoMetric.

Oracles: the stage-2 loss recomputed with an eager transcription of the paper's decoupled MSE from
the step's own embeddings; the checkpoints' tensors for what stage 2 loads; bitwise comparisons for
what must not train (teacher, AKEs)."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from mmdet_testing import CONFIGS, STUDENT_CFG, load_cfg, make_teacher_ckpt, make_toy_data, require_mmdet, toy_batch

require_mmdet()

from mmengine.hooks import Hook  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

UNIKD = os.path.join(CONFIGS, "unikd")
FRCNN_CFG = os.path.join(CONFIGS, "_base_", "faster_rcnn_r18_toy_teacher.py")
RETINA_TEACHER_CFG = os.path.join(CONFIGS, "_base_", "retinanet_r18_toy_teacher.py")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_unikd")
    data = make_toy_data(str(root / "data"))
    return dict(root=str(root), data_root=data["root"],
                retina=make_teacher_ckpt(str(root / "retina.pth"), RETINA_TEACHER_CFG),
                frcnn=make_teacher_ckpt(str(root / "frcnn.pth"), FRCNN_CFG))


class _Probe(Hook):
    def __init__(self, parts):
        self.parts, self.iters, self.metrics, self.start = parts, [], None, None

    def before_train(self, runner):
        m = runner.model
        self.start = {p: {k: v.clone() for k, v in getattr(m, p).state_dict().items()} for p in self.parts}

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.iters.append({k: float(v.detach()) for k, v in outputs.items()})

    def after_val_epoch(self, runner, metrics=None):
        self.metrics = dict(metrics)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run(path, toy, work, teacher_ckpt, ake_ckpt=None, parts=("teacher",)):
    if ake_ckpt is not None:
        os.environ["KDOPS_TOY_UNIKD_AKE_CKPT"] = ake_ckpt
    cfg = load_cfg(path, toy["data_root"], work, teacher_ckpt=teacher_ckpt)
    if "student" in cfg.model:
        cfg.model.student.test_cfg.score_thr = 0.0
    runner = Runner.from_cfg(cfg)
    probe = _Probe(parts)
    runner.register_hook(probe, priority="LOWEST")
    runner.train()
    return runner, probe, cfg


@pytest.mark.parametrize("absorb,inject,teacher", [
    ("unikd_absorb_retinanet_toy.py", "unikd_inject_retinanet_toy.py", "retina"),
    ("unikd_absorb_faster_rcnn_toy.py", "unikd_inject_faster_rcnn_retinanet_toy.py", "frcnn"),
])
def test_unikd_two_stages_train_validate_and_export(absorb, inject, teacher, toy, tmp_path):
    """Stage 1 trains only the AKEs (the teacher is bitwise unchanged), logs the six set losses and
    is validated as a detector; stage 2 loads exactly stage 1's AKEs, never changes them or the
    teacher, logs finite UniKD losses next to the student's, is validated on the student, and
    exports the plain student (no teacher, AKE or adaptor weights) that mmdet loads."""
    r1, p1, cfg1 = _run(os.path.join(UNIKD, absorb), toy, str(tmp_path / "absorb"), toy[teacher],
                        parts=("teacher", "content_ake", "positional_ake"))
    assert _same(p1.start["teacher"], r1.model.teacher.state_dict())
    assert not _same(p1.start["content_ake"], r1.model.content_ake.state_dict())  # the AKEs learnt
    assert not _same(p1.start["positional_ake"], r1.model.positional_ake.state_dict())
    keys = {f"loss_{k}_{n}" for k in ("ct", "pos") for n in ("cls", "bbox", "giou")}
    for it in p1.iters:
        assert keys <= set(it) and all(math.isfinite(it[k]) for k in keys)
    assert isinstance(p1.metrics.get("coco/bbox_mAP"), float)
    ake_ckpt = os.path.join(cfg1.work_dir, "iter_2.pth")

    r2, p2, cfg2 = _run(os.path.join(UNIKD, inject), toy, str(tmp_path / "inject"), toy[teacher], ake_ckpt=ake_ckpt,
                        parts=("teacher", "content_ake", "positional_ake", "adaptor"))
    m = r2.model
    assert _same(p2.start["content_ake"], r1.model.content_ake.state_dict())  # loaded: stage 1's final AKEs
    assert _same(p2.start["positional_ake"], r1.model.positional_ake.state_dict())
    for part in ("teacher", "content_ake", "positional_ake"):
        assert _same(p2.start[part], getattr(m, part).state_dict()), part
    assert not _same(p2.start["adaptor"], m.adaptor.state_dict())  # the adaptor trains with the student
    assert all(not p.requires_grad for p in m.content_ake.parameters())
    for it in p2.iters:
        kd = {"loss_unikd_content", "loss_unikd_positional"}
        assert kd <= set(it) and all(math.isfinite(it[k]) for k in kd) and "loss_cls" in it
    assert isinstance(p2.metrics.get("coco/bbox_mAP"), float)

    out = str(tmp_path / "student.pth")
    subprocess.run([sys.executable, "-m", "kdops_mmdet.export_student", os.path.join(cfg2.work_dir, "iter_2.pth"),
                    out], check=True)
    sd = torch.load(out, map_location="cpu", weights_only=False)["state_dict"]
    assert sd and not any(k.split(".")[0] in ("teacher", "adaptor", "content_ake", "positional_ake", "unikd")
                          for k in sd)
    from mmdet.apis import init_detector

    plain = init_detector(STUDENT_CFG, out, device="cpu")
    ref = m.student.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in plain.state_dict().items())


def _inject_model(toy, **overrides):
    from mmdet.utils import register_all_modules

    import kdops_mmdet  # noqa: F401
    from kdops_mmdet.registry import MODELS

    register_all_modules(init_default_scope=False)
    cfg = load_cfg(os.path.join(UNIKD, "unikd_inject_retinanet_toy.py"), toy["data_root"],
                   os.path.join(toy["root"], "w"), teacher_ckpt=toy["retina"])
    cfg.model.ake_ckpt = None
    for k, v in overrides.items():
        cfg.model[k] = v
    torch.manual_seed(0)
    return MODELS.build(cfg.model), cfg


def test_unikd_stage2_loss_is_the_papers_decoupled_mse_of_the_steps_embeddings(toy):
    """loss_unikd_* equal 10 x [mean over positive queries + mean over negative queries of the
    per-query mean squared difference] of z^S and z^T, recomputed here from the embeddings the step
    used (recorded from the extractor), with positives from the Hungarian matching (content) and the
    boxes' own assignment (positional); no gradient reaches the AKEs or the teacher."""
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner as R

    model, cfg = _inject_model(toy)
    model.train()
    init_default_scope("mmdet")
    loader_cfg = dict(cfg.train_dataloader)
    loader_cfg.update(batch_size=2, num_workers=0, persistent_workers=False)
    data = model.data_preprocessor(next(iter(R.build_dataloader(loader_cfg, seed=0))), training=True)

    record = {}
    calls = {"content": [], "positional": []}
    for kind, ake in (("content", model.content_ake), ("positional", model.positional_ake)):
        orig = ake.extract

        def extract(q, ref, feats, _orig=orig, _kind=kind):
            z = _orig(q, ref, feats)
            calls[_kind].append(z)
            return z
        ake.extract = extract
    import kdops_mmdet.unikd as U

    orig_mask = U.content_positive_mask

    def mask_spy(*a, **k):
        record["ct_mask"] = orig_mask(*a, **k)
        return record["ct_mask"]
    orig_boxes = model._positional_boxes

    def boxes_spy(*a, **k):
        record["pos"] = orig_boxes(*a, **k)
        return record["pos"]
    U.content_positive_mask, model._positional_boxes = mask_spy, boxes_spy
    try:
        losses = model.loss(data["inputs"], data["data_samples"])
    finally:
        U.content_positive_mask = orig_mask

    def decoupled(zs, zt, pos):
        d = ((zs.double() - zt.double()) ** 2).mean(-1)
        p = d[pos].mean() if pos.any() else d.new_zeros(())
        n = d[~pos].mean() if (~pos).any() else d.new_zeros(())
        return 10.0 * (p + n)

    zt_ct, zs_ct = calls["content"]  # teacher first (no grad), then the adapted student
    zt_pos, zs_pos = calls["positional"]
    pos_mask = torch.stack([a >= 0 for a in record["pos"][1]])
    assert record["ct_mask"].any() and pos_mask.any() and (~pos_mask).any()
    assert float(losses["loss_unikd_content"]) == pytest.approx(float(decoupled(zs_ct, zt_ct, record["ct_mask"])),
                                                                rel=1e-5)
    assert float(losses["loss_unikd_positional"]) == pytest.approx(float(decoupled(zs_pos, zt_pos, pos_mask)),
                                                                   rel=1e-5)
    assert not zt_ct.requires_grad and zs_ct.requires_grad
    (losses["loss_unikd_content"] + losses["loss_unikd_positional"]).backward()
    assert all(p.grad is None for p in model.content_ake.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.adaptor.parameters() if p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.neck.parameters())


@pytest.mark.parametrize("empty", [(1,), (0, 1)], ids=["one-image-without-gt", "no-gt-at-all"])
def test_unikd_images_without_gt_give_finite_losses_and_gradients(toy, empty):
    """Images without objects: stage 1 (the AKEs trained as detectors against the GT) and stage 2
    (content positives from the Hungarian matching, positional boxes assigned to no GT) keep every
    loss finite and backpropagate; with no GT at all there are no positive queries, and the decoupled
    MSE is its negative half alone (the positive half is an exact 0, not a NaN from an empty mean)."""
    from mmdet.utils import register_all_modules

    import kdops_mmdet  # noqa: F401
    from kdops_mmdet.registry import MODELS

    register_all_modules(init_default_scope=False)
    cfg = load_cfg(os.path.join(UNIKD, "unikd_absorb_retinanet_toy.py"), toy["data_root"],
                   os.path.join(toy["root"], "w_absorb"), teacher_ckpt=toy["retina"])
    torch.manual_seed(0)
    absorb = MODELS.build(cfg.model)
    absorb.train()
    data = toy_batch(absorb, cfg, empty)
    losses = absorb.loss(data["inputs"], data["data_samples"])
    total = sum(v for k, v in losses.items() if "loss" in k and torch.is_tensor(v))
    assert all(torch.isfinite(v).all() for v in losses.values() if torch.is_tensor(v)), losses
    total.backward()
    assert any(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in absorb.parameters())

    model, cfg = _inject_model(toy)
    model.train()
    data = toy_batch(model, cfg, empty)
    import kdops_mmdet.unikd as U

    seen = {}
    orig_mask = U.content_positive_mask

    def mask_spy(*a, **k):
        seen["ct_mask"] = orig_mask(*a, **k)
        return seen["ct_mask"]
    U.content_positive_mask = mask_spy
    try:
        losses = model.loss(data["inputs"], data["data_samples"])
    finally:
        U.content_positive_mask = orig_mask
    kd = losses["loss_unikd_content"] + losses["loss_unikd_positional"]
    assert all(torch.isfinite(v).all() for v in losses.values() if torch.is_tensor(v)), losses
    assert float(kd.detach()) > 0
    if len(empty) == 2:
        assert not seen["ct_mask"].any()
    else:
        assert not seen["ct_mask"][1].any()
    kd.backward()
    grads = [p.grad for p in model.adaptor.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("overrides,exc,match", [
    (dict(levels=[0, 1], teacher_levels=[0, 1, 2]), ValueError, "must pair one for one"),
    (dict(levels=[0, 9]), ValueError, "names levels \\[9\\]"),
    (dict(ake=dict(embed_dims=64)), ValueError, "ake: unknown keys \\['embed_dims'\\]"),
    (dict(num_positional=0), ValueError, "num_positional must be an int >= 1"),
    (dict(distill_losses=[dict(name="unikd", type="PKDLoss", student="neck", teacher="neck")]), ValueError,
     "'unikd' is UniKD's own"),
])
def test_unikd_bad_configs_fail_at_construction(toy, overrides, exc, match):
    with pytest.raises(exc, match=match):
        _inject_model(toy, **overrides)


def test_unikd_student_must_be_one_stage(toy):
    from mmengine.config import Config

    with pytest.raises(ValueError, match="one-stage detector"):
        _inject_model(toy, student=Config.fromfile(FRCNN_CFG).model)


# ------------------------------------------------------------------------------ offline teacher cache
def _ake_ckpt(toy, path):
    """A stage-1 checkpoint (the absorb model's state dict) without training: what stage 2 loads."""
    from mmdet.utils import register_all_modules

    import kdops_mmdet  # noqa: F401
    from kdops_mmdet.registry import MODELS

    register_all_modules(init_default_scope=False)
    cfg = load_cfg(os.path.join(UNIKD, "unikd_absorb_retinanet_toy.py"), toy["data_root"], str(path) + "_w",
                   teacher_ckpt=toy["retina"])
    torch.manual_seed(3)
    model = MODELS.build(cfg.model)
    torch.save({"state_dict": model.state_dict()}, path)
    return str(path)


def test_unikd_offline_cache_matches_online_and_refuses_mismatches(toy, tmp_path):
    """cache_teacher writes every training image under the flips it saw; offline training builds no
    teacher and trains through the Runner with CachedFlip; on the same batch (same student and
    adaptor weights, same positional boxes) the offline losses equal the online ones (a float32
    cache: bit-for-bit inputs); a cache made with other AKE weights, and an augmentation the cache
    does not hold, are refused with errors saying what to do."""
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner as R

    from kdops.cache import TeacherCache
    from kdops_mmdet.cache_teacher import cache_teacher
    from kdops_mmdet.registry import MODELS

    ake = _ake_ckpt(toy, tmp_path / "ake.pth")
    os.environ.update(KDOPS_TOY_DATA=toy["data_root"], KDOPS_TOY_TEACHER_CKPT=toy["retina"],
                      KDOPS_TOY_UNIKD_AKE_CKPT=ake)
    out = str(tmp_path / "cache")
    online_cfg = os.path.join(UNIKD, "unikd_inject_retinanet_toy.py")
    summary = cache_teacher(online_cfg, out, epochs=3, dtype="float32",
                            cfg_options=["train_dataloader.num_workers=0", "train_dataloader.batch_size=4"])
    cache = TeacherCache(out, verify="eager")
    import json

    n_images = len(json.load(open(os.path.join(toy["data_root"], "annotations", "instances_train.json")))["images"])
    assert len(cache) == summary["images"] == n_images  # every training image (none without boxes here)
    assert cache.num_entries > n_images  # 3 passes: both flips recorded for some images
    # storage: per entry exactly the stage-2 inputs (Q=P=50 queries of the teacher's C=64; float32 here)
    Q, C = 50, 64
    want = 4 * (2 * Q * C + Q * 2 + 2 * Q * C + Q * 4) + 2 * Q  # q, z (x2 kinds), references, two bool masks
    assert cache.bytes_per_image()["entry"] == want
    again = cache_teacher(online_cfg, out, epochs=3, dtype="float32",
                          cfg_options=["train_dataloader.num_workers=0", "train_dataloader.batch_size=4"])
    assert again["written"] == 0 and again["skipped"] == 3 * n_images  # the same run again: nothing redone

    os.environ["KDOPS_TOY_UNIKD_CACHE"] = out
    offline_path = os.path.join(UNIKD, "unikd_inject_retinanet_offline_toy.py")
    cfg = load_cfg(offline_path, toy["data_root"], str(tmp_path / "off"), teacher_ckpt=toy["retina"])
    runner = Runner.from_cfg(cfg)
    probe = _Probe(("content_ake",))
    runner.register_hook(probe, priority="LOWEST")
    runner.train()
    assert runner.model.teacher is None
    for it in probe.iters:
        assert math.isfinite(it["loss_unikd_content"]) and math.isfinite(it["loss_unikd_positional"])

    register = __import__("mmdet.utils", fromlist=["register_all_modules"]).register_all_modules
    register(init_default_scope=False)
    torch.manual_seed(0)
    online = MODELS.build(load_cfg(online_cfg, toy["data_root"], str(tmp_path / "on"), teacher_ckpt=toy["retina"]).model)
    offline = MODELS.build(cfg.model)
    offline.student.load_state_dict(online.student.state_dict())
    offline.adaptor.load_state_dict(online.adaptor.state_dict())
    online.train()
    offline.train()
    init_default_scope("mmdet")
    loader_cfg = dict(cfg.train_dataloader)
    loader_cfg.update(batch_size=2, num_workers=0, persistent_workers=False)
    data = next(iter(R.build_dataloader(loader_cfg, seed=1)))  # CachedFlip: a recorded flip per image
    batch = offline.data_preprocessor(data, training=True)
    know = offline.cached_knowledge(batch["data_samples"], batch["inputs"])
    boxes = know["r_pos"]
    assigned = [torch.where(m, 0, -1) for m in know["pos_mask"]]
    online._positional_boxes = lambda gt, sizes, like: (boxes, assigned)
    off_losses = offline.loss(batch["inputs"], batch["data_samples"])
    on_losses = online.loss(batch["inputs"], batch["data_samples"])
    for k in ("loss_unikd_content", "loss_unikd_positional"):
        assert float(off_losses[k]) == pytest.approx(float(on_losses[k]), rel=1e-6, abs=1e-9), k

    sample = batch["data_samples"][0].clone()
    sample.set_metainfo(dict(img_shape=(64, 64)))  # a resize the caching run never made
    with pytest.raises(KeyError, match="CachedFlip"):
        offline.cached_knowledge([sample], batch["inputs"])
    cfg.model.ake_ckpt = None  # other AKE weights: another fingerprint
    with pytest.raises(ValueError, match="fingerprint"):
        MODELS.build(cfg.model)
