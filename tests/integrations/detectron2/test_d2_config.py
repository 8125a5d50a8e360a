"""MODEL.KD's keys and the errors of bad configs: an unknown key fails with detectron2's own error
naming it, a teacher section with a teacher-free method and a missing teacher checkpoint are clear
errors, and the train tool's --help works."""
import subprocess
import sys

import pytest

pytest.importorskip("detectron2")
import torch  # noqa: E402

from d2_testing import subprocess_env  # noqa: E402


def test_defaults_and_taps():
    from kdops_detectron2 import DEFAULT_TAPS, get_kd_cfg
    from kdops_detectron2.config import resolve_taps

    cfg = get_kd_cfg()
    kd = cfg.MODEL.KD
    assert kd.STUDENT_META_ARCHITECTURE == "RetinaNet" and kd.METHOD == "pkd" and kd.LOSS_WEIGHT == 1.0
    assert kd.TEACHER.CONFIG_FILE == "" and list(kd.TEACHER.OPTS) == [] and kd.TEACHER.WEIGHTS == ""
    assert kd.WARMUP_ITERS == 0 and kd.STOP_AT_FIRST_LR_DROP is False and kd.CONNECTOR == "auto"
    assert (kd.FGD.ALPHA, kd.FGD.BETA, kd.FGD.GAMMA, kd.FGD.LAMBDA, kd.FGD.TEMPERATURE) == (1e-3, 5e-4, 5e-4, 5e-6, 0.5)
    assert (kd.DEFEAT.FG_WEIGHT, kd.DEFEAT.BG_WEIGHT) == (1.0, 4.0)
    assert resolve_taps(cfg) == ["p3", "p4", "p5", "p6", "p7"]
    cfg.MODEL.KD.STUDENT_META_ARCHITECTURE = "GeneralizedRCNN"
    assert resolve_taps(cfg) == DEFAULT_TAPS["GeneralizedRCNN"] == ["p2", "p3", "p4", "p5", "p6"]


def test_unknown_kd_key_is_detectron2s_error(tmp_path):
    from kdops_detectron2 import get_kd_cfg

    # yacs' own errors: an AssertionError from merge_from_list (command-line opts), a KeyError from a file
    with pytest.raises(AssertionError, match=r"Non-existent key: MODEL\.KD\.LOSS_WIEGHT"):
        get_kd_cfg(opts=["MODEL.KD.LOSS_WIEGHT", "2.0"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  KD:\n    FGD:\n      ALPHA_FGD: 0.1\n")
    with pytest.raises(KeyError, match=r"Non-existent config key: MODEL\.KD\.FGD\.ALPHA_FGD"):
        get_kd_cfg(str(bad))


def test_teacher_section_with_teacher_free_method_is_an_error(d2_toy_data):
    from detectron2.modeling import build_model

    from kdops_detectron2 import METHODS, KDMethod, register_method, validate_kd_config
    from kdops_detectron2.configs import toy_cfg

    @register_method("test_teacher_free")
    class TeacherFree(KDMethod):
        needs_teacher = False

        def forward(self, ctx):
            return {}

    try:
        cfg = toy_cfg("pkd", d2_toy_data["root"], "teacher.pth", ["MODEL.KD.METHOD", "test_teacher_free"])
        with pytest.raises(ValueError, match=r"'test_teacher_free' is teacher-free.*MODEL\.KD\.TEACHER"):
            validate_kd_config(cfg)
        with pytest.raises(ValueError, match="teacher-free"):
            build_model(cfg)
    finally:
        METHODS.pop("test_teacher_free", None)


def test_other_bad_kd_configs(d2_toy_data):
    from kdops_detectron2 import validate_kd_config
    from kdops_detectron2.configs import toy_cfg

    cases = [(["MODEL.KD.METHOD", "nope"], r"MODEL\.KD\.METHOD must be one of the registered methods"),
             (["MODEL.KD.STUDENT_META_ARCHITECTURE", "FCOS"], r"STUDENT_META_ARCHITECTURE must be one of"),
             (["MODEL.KD.TEACHER.WEIGHTS", ""], r"'pkd' distils a teacher: set MODEL\.KD\.TEACHER\.WEIGHTS"),
             (["MODEL.KD.CONNECTOR", "mlp"], r"MODEL\.KD\.CONNECTOR must be one of")]
    for opts, msg in cases:
        cfg = toy_cfg("pkd", d2_toy_data["root"], "teacher.pth", opts)
        with pytest.raises(ValueError, match=msg):
            validate_kd_config(cfg)


def test_missing_teacher_weights_or_config_file(d2_toy_data, tmp_path):
    from detectron2.modeling import build_model

    from kdops_detectron2.configs import toy_cfg

    missing = str(tmp_path / "no_such_teacher.pth")
    with pytest.raises(FileNotFoundError, match=r"MODEL\.KD\.TEACHER\.WEIGHTS: teacher checkpoint .*no_such_teacher"):
        build_model(toy_cfg("pkd", d2_toy_data["root"], missing))
    cfg = toy_cfg("pkd", d2_toy_data["root"], missing, ["MODEL.KD.TEACHER.CONFIG_FILE", "no/such/teacher.yaml"])
    with pytest.raises(FileNotFoundError, match=r"MODEL\.KD\.TEACHER\.CONFIG_FILE: config file 'no/such/teacher"):
        build_model(cfg)


def test_teacher_checkpoint_that_does_not_fit_is_refused(d2_toy_data, d2_teacher_weights, tmp_path):
    """A teacher checkpoint missing a parameter (or with one of another shape) would leave part of the
    teacher random: an error naming the key, not a log line."""
    import torch
    from detectron2.modeling import build_model

    from kdops_detectron2.configs import toy_cfg

    ckpt = torch.load(d2_teacher_weights, map_location="cpu", weights_only=False)
    dropped = next(k for k in ckpt["model"] if k.endswith("weight"))
    del ckpt["model"][dropped]
    bad = str(tmp_path / "partial_teacher.pth")
    torch.save(ckpt, bad)
    with pytest.raises(ValueError, match=r"MODEL\.KD\.TEACHER\.WEIGHTS .* 1 missing"):
        build_model(toy_cfg("pkd", d2_toy_data["root"], bad))
    build_model(toy_cfg("pkd", d2_toy_data["root"], d2_teacher_weights))  # the whole checkpoint loads


def test_taps_missing_on_a_backbone(d2_toy_data, d2_teacher_weights):
    from detectron2.modeling import build_model

    from kdops_detectron2.configs import toy_cfg

    cfg = toy_cfg("pkd", d2_toy_data["root"], d2_teacher_weights, ["MODEL.KD.TAPS", "['p2', 'p3']"])
    with pytest.raises(ValueError, match=r"MODEL\.KD\.TAPS: the student's backbone has no level \['p2'\]"):
        build_model(cfg)


def test_train_help():
    out = subprocess.run([sys.executable, "-m", "kdops_detectron2.train", "--help"], env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--config-file" in out.stdout and "--num-gpus" in out.stdout and "--eval-only" in out.stdout
    out = subprocess.run([sys.executable, "-m", "kdops_detectron2.export_student", "--help"], env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--weights" in out.stdout and "--out" in out.stdout, out.stderr


@pytest.mark.parametrize("method", ["pkd", "fgd", "fitnet", "defeat"])
def test_coco_configs_parse_with_their_teacher(method):
    from kdops_detectron2 import get_kd_cfg, teacher_cfg, validate_kd_config
    from kdops_detectron2.config import resolve_taps
    from kdops_detectron2.configs import config_path

    cfg = get_kd_cfg(config_path(f"{method}/{method}_retinanet_r101_retinanet_r50_1x_coco.yaml"))
    validate_kd_config(cfg)
    assert cfg.MODEL.META_ARCHITECTURE == "KDDetector" and cfg.MODEL.KD.METHOD == method
    assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.SOLVER.MAX_ITER == 90000 and cfg.DATASETS.TRAIN == ("coco_2017_train",)
    assert resolve_taps(cfg) == (["p3", "p4", "p5", "p6"] if method == "pkd" else ["p3", "p4", "p5", "p6", "p7"])
    t = teacher_cfg(cfg)
    assert t.MODEL.META_ARCHITECTURE == "RetinaNet" and t.MODEL.RESNETS.DEPTH == 101
    assert cfg.MODEL.KD.TEACHER.WEIGHTS.endswith("retinanet_R_101_FPN_3x/190397697/model_final_971ab9.pkl")
