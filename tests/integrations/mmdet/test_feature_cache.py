"""The offline teacher cache serving kdops.DistillDetector's feature losses (kdops_mmdet.feature_cache):
the toy RetinaNet teacher and student, mmengine's Runner, PKD.

Oracles: the online model's own loss on the same batch (a float32 cache gives the teacher's maps bit
for bit); the teacher's maps recomputed in the test for the cached entries and the GT-box foreground
rows; the byte count from the shapes."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from mmdet_testing import CONFIGS, load_cfg, make_teacher_ckpt, make_toy_data, require_mmdet

require_mmdet()

from mmengine.runner import Runner  # noqa: E402

PKD_TOY = os.path.join(CONFIGS, "pkd", "pkd_retinanet_toy.py")
PKD_OFFLINE = os.path.join(CONFIGS, "pkd", "pkd_retinanet_offline_toy.py")
TEACHER_CFG = os.path.join(CONFIGS, "_base_", "retinanet_r18_toy_teacher.py")
OPTS = ["train_dataloader.num_workers=0", "train_dataloader.batch_size=4"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_feature_cache")
    data = make_toy_data(str(root / "data"))
    return dict(root=str(root), data_root=data["root"], teacher=make_teacher_ckpt(str(root / "t.pth"), TEACHER_CFG))


def _build(cfg_model):
    from mmdet.utils import register_all_modules

    import kdops_mmdet  # noqa: F401
    from kdops_mmdet.registry import MODELS

    register_all_modules(init_default_scope=False)
    return MODELS.build(cfg_model)


def _batch(cfg, model, seed=1):
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner as R

    init_default_scope("mmdet")
    loader_cfg = dict(cfg.train_dataloader)
    loader_cfg.update(batch_size=2, num_workers=0, persistent_workers=False)
    data = next(iter(R.build_dataloader(loader_cfg, seed=seed)))
    return model.data_preprocessor(data, training=True)


def test_feature_cache_trains_pkd_offline_with_the_online_loss(toy, tmp_path):
    """cache_teacher writes the teacher's FPN maps per training image and flip; offline training builds no
    teacher and trains through the Runner; on the same batch the offline PKD loss equals the online one;
    a re-run writes nothing; a cache of another teacher, a head entry and a foreground cache are refused."""
    from kdops.cache import TeacherCache
    from kdops_mmdet.cache_teacher import cache_teacher
    from kdops_mmdet.feature_cache import FEATURE_META

    os.environ.update(KDOPS_TOY_DATA=toy["data_root"], KDOPS_TOY_TEACHER_CKPT=toy["teacher"])
    out = str(tmp_path / "cache")
    summary = cache_teacher(PKD_TOY, out, epochs=2, dtype="float32", cfg_options=OPTS)
    n_images = len(json.load(open(os.path.join(toy["data_root"], "annotations", "instances_train.json")))["images"])
    cache = TeacherCache(out, verify="eager")
    assert len(cache) == summary["images"] == n_images
    meta = json.load(open(os.path.join(out, FEATURE_META)))
    levels = meta["layout"]["neck"]["levels"]
    assert [lv["stride"] for lv in levels] == [8.0, 16.0, 32.0, 64.0, 128.0]
    assert {lv["channels"] for lv in levels} == {64}
    # one entry: the 5 levels of a 128x128 image, 64 channels, float32
    assert cache.bytes_per_image()["entry"] == 4 * 64 * sum(math.ceil(128 / s) ** 2 for s in (8, 16, 32, 64, 128))
    again = cache_teacher(PKD_TOY, out, epochs=2, dtype="float32", cfg_options=OPTS)
    assert again["written"] == 0

    os.environ["KDOPS_TOY_FEATURE_CACHE"] = out
    cfg = load_cfg(PKD_OFFLINE, toy["data_root"], str(tmp_path / "off"), teacher_ckpt=toy["teacher"])
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.model.teacher is None

    torch.manual_seed(0)
    online = _build(load_cfg(PKD_TOY, toy["data_root"], str(tmp_path / "on"), teacher_ckpt=toy["teacher"]).model)
    offline = _build(cfg.model)
    assert offline.teacher is None
    offline.student.load_state_dict(online.student.state_dict())
    offline.connectors.load_state_dict(online.connectors.state_dict())
    online.train()
    offline.train()
    batch = _batch(cfg, offline)  # CachedFlip: a recorded flip per image
    off = offline.loss(batch["inputs"], batch["data_samples"])
    on = online.loss(batch["inputs"], batch["data_samples"])
    assert float(off["loss_pkd"]) > 0
    assert float(off["loss_pkd"]) == pytest.approx(float(on["loss_pkd"]), rel=1e-6)
    # the cached maps are the teacher's own, cut to the image
    with torch.no_grad():
        t = online.teacher.extract_feat(batch["inputs"])
    from kdops_mmdet.unikd import augmentation_record, image_key

    s0 = batch["data_samples"][0].metainfo
    entry = cache.get(image_key(s0), augmentation_record(s0))
    for lvl in range(5):
        assert torch.equal(entry[f"neck#{lvl}"], t[lvl][0])

    # refusals: another teacher's weights (fingerprint), a dense-head entry, a foreground cache
    ck = torch.load(toy["teacher"], map_location="cpu", weights_only=False)
    first = next(iter(ck["state_dict"]))
    ck["state_dict"][first] = ck["state_dict"][first] + 1
    other = str(tmp_path / "other.pth")
    torch.save(ck, other)
    bad = load_cfg(PKD_OFFLINE, toy["data_root"], str(tmp_path / "x"), teacher_ckpt=other)
    with pytest.raises(ValueError, match="fingerprint"):
        _build(bad.model)
    head = load_cfg(PKD_OFFLINE, toy["data_root"], str(tmp_path / "y"), teacher_ckpt=toy["teacher"])
    head.model.distill_losses = [dict(name="bckd", type="BCKDLoss", student="bbox_head", teacher="bbox_head")]
    with pytest.raises(ValueError, match="read the teacher's head"):
        _build(head.model)
    fg = str(tmp_path / "fg")
    cache_teacher(PKD_TOY, fg, epochs=1, dtype="float32", cfg_options=OPTS, foreground=True)
    fgc = load_cfg(PKD_OFFLINE, toy["data_root"], str(tmp_path / "z"), teacher_ckpt=toy["teacher"])
    fgc.model.teacher_cache = fg
    with pytest.raises(ValueError, match="foreground rows only"):
        _build(fgc.model)


def test_foreground_cache_holds_the_gt_box_rows_and_is_smaller(toy, tmp_path):
    """--foreground keeps, per level, exactly the rows whose pixel centre lies in a GT box (checked
    against a loop over pixels and boxes) with the teacher's values there."""
    from kdops.cache import TeacherCache
    from kdops_mmdet.cache_teacher import cache_teacher
    from kdops_mmdet.unikd import augmentation_record, image_key

    os.environ.update(KDOPS_TOY_DATA=toy["data_root"], KDOPS_TOY_TEACHER_CKPT=toy["teacher"])
    fg = str(tmp_path / "fg")
    full = str(tmp_path / "full")
    cache_teacher(PKD_TOY, fg, epochs=1, dtype="float32", cfg_options=OPTS, foreground=True)
    cache_teacher(PKD_TOY, full, epochs=1, dtype="float32", cfg_options=OPTS)
    c_fg, c_full = TeacherCache(fg, verify="eager"), TeacherCache(full, verify="eager")
    assert c_fg.bytes_per_image()["entry"] < c_full.bytes_per_image()["entry"] / 2
    # benchmarks/cache_storage.py predicts both from the annotations alone (one entry per image here)
    import importlib.util

    spec = importlib.util.spec_from_file_location("cache_storage", os.path.join(
        os.path.dirname(CONFIGS), "..", "..", "benchmarks", "cache_storage.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ann = json.load(open(os.path.join(toy["data_root"], "annotations", "instances_train.json")))
    pred = mod.storage(ann, "fixed:128x128", 64, (8, 16, 32, 64, 128), 50, value_bytes=4)
    assert c_fg.bytes_per_image()["entries"] == pred["images"]
    assert c_full.bytes_per_image()["entry"] == pytest.approx(pred["full"], rel=1e-12)
    assert c_fg.bytes_per_image()["entry"] == pytest.approx(pred["foreground"], rel=1e-12)

    cfg = load_cfg(PKD_TOY, toy["data_root"], str(tmp_path / "w"), teacher_ckpt=toy["teacher"])
    model = _build(cfg.model)
    model.train()
    batch = _batch(cfg, model, seed=0)
    with torch.no_grad():
        t = model.teacher.extract_feat(batch["inputs"])
    checked = 0
    for n, s in enumerate(batch["data_samples"]):
        meta = s.metainfo
        try:
            e_fg = c_fg.get(image_key(meta), augmentation_record(meta))
        except KeyError:  # a flip the one caching pass did not draw for this image
            continue
        boxes = s.gt_instances.bboxes
        boxes = getattr(boxes, "tensor", boxes).tolist()
        for lvl, stride in enumerate((8, 16, 32, 64, 128)):
            h = w = math.ceil(128 / stride)
            want = [y * w + x for y in range(h) for x in range(w)
                    if any(b[0] <= (x + 0.5) * stride <= b[2] and b[1] <= (y + 0.5) * stride <= b[3] for b in boxes)]
            idx = e_fg[f"neck#{lvl}.idx"]
            assert idx.tolist() == want
            rows = t[lvl][n].reshape(64, -1)[:, idx.long()].t()
            assert torch.equal(e_fg[f"neck#{lvl}.val"], rows)
            checked += 1
    assert checked > 0
