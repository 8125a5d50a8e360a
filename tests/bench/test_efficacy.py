"""The KD efficacy benchmark (benchmarks/efficacy.py, issue 16): its statistics, and its --quick mode as a
smoke test of the whole pipeline (toy data, teacher, paired students with and without PKD in both regimes,
CocoMetric, report files, the run cache). About 1.5-3 minutes on 2 CPU cores; skipped without mmdet."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _efficacy():
    spec = importlib.util.spec_from_file_location("kdops_efficacy_bench", os.path.join(ROOT, "benchmarks", "efficacy.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paired_stats():
    E = _efficacy()
    s = E.paired_stats([20.0, 25.0, 22.0, 30.0], [33.0, 36.0, 38.0, 38.0])
    d = [13.0, 11.0, 16.0, 8.0]
    m = sum(d) / 4
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / 3)
    assert s["n"] == 4 and s["seeds_positive"] == 4
    assert s["gain_mean"] == pytest.approx(m) and s["gain_sd"] == pytest.approx(sd)
    assert s["t"] == pytest.approx(m / (sd / 2.0))
    assert s["baseline_mean"] == pytest.approx(24.25) and s["kd_mean"] == pytest.approx(36.25)
    one = E.paired_stats([10.0], [12.0])  # one seed: no spread, no t
    assert one["gain_mean"] == pytest.approx(2.0) and one["gain_sd"] is None and one["t"] is None


def test_every_plugin_loss_is_benchmarked_or_skipped_with_a_reason():
    E = _efficacy()
    configs = os.path.join(ROOT, "integrations", "mmdet", "configs")
    shipped = {d for d in os.listdir(configs) if d not in ("_base_", "efficacy")}
    assert shipped <= set(E.METHODS) | set(E.SKIPPED_METHODS)
    for m in E.METHODS.values():
        assert m["weight"] and m["why"]


def test_quick_mode_runs_the_whole_pipeline(tmp_path):
    pytest.importorskip("mmdet")
    pytest.importorskip("mmcv")
    E = _efficacy()
    out, cache, store = tmp_path / "out", tmp_path / "cache", tmp_path / "store"
    argv = ["--quick", "--jobs", "2", "--out", str(out), "--cache-dir", str(cache), "--store", str(store)]
    E.main(argv)
    for f in ("efficacy_quick.md", "efficacy_quick.json", "efficacy_quick.png", "efficacy_quick_curves.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    doc = json.loads((out / "efficacy_quick.json").read_text())
    assert 0.0 <= doc["teacher"]["mAP"] <= 100.0
    assert [(r["method"], r["regime"]) for r in doc["results"]] == [("pkd", "low"), ("pkd", "full")]
    for r in doc["results"]:
        assert r["weight"] and r["why"] and r["stats"]["n"] == 1
        (pair,) = r["seeds"]
        assert 0.0 <= pair["baseline_mAP"] <= 100.0 and 0.0 <= pair["kd_mAP"] <= 100.0
        assert pair["gain"] == pytest.approx(pair["kd_mAP"] - pair["baseline_mAP"])
        assert len(pair["baseline_curve"]) == len(pair["kd_curve"]) == E.QUICK["student_iters"]
        assert "loss_pkd" in pair["kd_curve"][0] and "loss_pkd" not in pair["baseline_curve"][0]
        # the pair shares its initialisation and data: the detection losses agree at the first iteration
        # (KD changes the weights only from the first optimiser step on)
        b0, k0 = pair["baseline_curve"][0], pair["kd_curve"][0]
        assert k0["loss_cls"] == pytest.approx(b0["loss_cls"], rel=1e-4)
        assert k0["loss_bbox"] == pytest.approx(b0["loss_bbox"], rel=1e-4)
    md = (out / "efficacy_quick.md").read_text()
    assert "PKD" in md and "paired gain" in md
    # a second run finds every training run in the cache and reports the same numbers
    E.main(argv)
    again = json.loads((out / "efficacy_quick.json").read_text())
    assert [s["kd_mAP"] for r in again["results"] for s in r["seeds"]] == \
        [s["kd_mAP"] for r in doc["results"] for s in r["seeds"]]
    # a fresh machine (empty cache) with the committed store: the teacher is trained again; the baselines
    # come from the store, and the KD runs too exactly when the new teacher has the same weights
    assert {p.name.split("-s")[0] for p in store.iterdir()} >= {"low-baseline", "low-pkd", "full-baseline",
                                                                 "full-pkd"}
    cache2 = tmp_path / "cache2"
    E.main(argv[:argv.index("--cache-dir") + 1] + [str(cache2)] + argv[argv.index("--cache-dir") + 2:])
    runs2 = os.listdir(cache2 / "runs")
    assert not any("baseline" in r for r in runs2)
    teachers = [os.path.join(c, "runs", r, f"iter_{E.QUICK['teacher_iters']}.pth") for c in (cache, cache2)
                for r in os.listdir(os.path.join(c, "runs")) if r.startswith("teacher-")]
    same = E._weights_digest(teachers[0]) == E._weights_digest(teachers[1])
    assert any("pkd" in r for r in runs2) == (not same)
    third = json.loads((out / "efficacy_quick.json").read_text())
    assert [s["baseline_mAP"] for r in third["results"] for s in r["seeds"]] == \
        [s["baseline_mAP"] for r in doc["results"] for s in r["seeds"]]


def test_every_method_builds_on_the_efficacy_student_and_its_teacher():
    """Each method's settings build the distiller the benchmark trains (efficacy student, the method's own
    teacher config, no checkpoint): shapes, connectors and HEAD's assistant are checked at construction."""
    pytest.importorskip("mmdet")
    E = _efficacy()
    from mmengine.config import Config
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    import kdops_mmdet  # noqa: F401

    register_all_modules(init_default_scope=True)
    for name in E.METHODS:
        student = Config.fromfile(E.STUDENT_CFG).model
        cfg = E.method_config(name)
        if E.teacher_of(name) is None:  # teacher-free (TF-HEAD): the assistants train with the student
            model_cfg = {k: v for k, v in cfg.items() if k != "hooks"}
            model_cfg.update(student=student)
        elif "model" in E.METHODS[name]:  # a whole-method detector (HEAD)
            model_cfg = {k: v for k, v in cfg.items() if k != "hooks"}
            model_cfg.update(student=student, teacher_cfg=E.TEACHERS[E.teacher_of(name)]["cfg"], teacher_ckpt=None)
        else:
            model_cfg = dict(type="kdops.DistillDetector", student=student,
                             teacher_cfg=E.TEACHERS[E.teacher_of(name)]["cfg"], teacher_ckpt=None,
                             distill_losses=[cfg])
        model = MODELS.build(model_cfg)
        if name in ("head", "tf_head"):
            assert model.assistant.bbox_roi_extractor.featmap_strides == [8, 16, 32]
            if name == "tf_head":
                assert [int(s[0] if isinstance(s, (tuple, list)) else s)
                        for s in model.dense_assistant.strides] == [8, 16, 32]
        elif name in ("unikd", "unikd_frcnn"):  # stage 2 as benchmarked, and stage 1 (the AKEs on the teacher)
            assert model.levels == [0, 1, 2] and model.kd_scale == {"unikd": 1.0}
            assert model.teacher_levels == ([0, 1, 2] if name == "unikd" else [1, 2, 3])  # strides 8/16/32
            absorb = MODELS.build(dict(E.METHODS[name]["absorb"], teacher_cfg=E.TEACHERS[E.teacher_of(name)]["cfg"],
                                       teacher_ckpt=None))
            assert absorb.levels == model.teacher_levels
            assert sum(p.numel() for p in absorb.parameters() if p.requires_grad) > 0
        elif name in ("lgd", "lgd_nofreeze"):
            assert model.lgd.channels == 32 and model.lgd.num_classes == 4
            assert (model.distill_start_iter, model.freeze_backbone_iters) == (250, 167 if name == "lgd" else 0)
        else:
            assert [e.name for e in model.entries] == [cfg["name"]]
