"""KDDetector's training step on one toy batch: PKD's logged loss equals an eager transcription of
mmrazor's PKDLoss on the tapped features; the schedule factor scales it and keeps it in the graph at
0; the teacher sees its own normalisation and stays in eval mode; a teacher-free method registered
from outside runs the student's own head on extra features (the hook LGD uses)."""
import pytest

pytest.importorskip("detectron2")
import torch  # noqa: E402

from detectron2.utils.events import EventStorage  # noqa: E402

from d2_testing import train_batch  # noqa: E402


def pkd_eager(student, teacher, weight):
    """mmrazor's PKDLoss: per channel over (N,H,W), (x - mean) / (unbiased std + 1e-6), MSE / 2,
    summed over levels, times the weight."""
    total = 0.0
    for s, t in zip(student, teacher):
        def norm(x):
            c = x.shape[1]
            flat = x.transpose(0, 1).reshape(c, -1).double()
            mean = flat.mean(1, keepdim=True)
            std = flat.std(1, keepdim=True)  # unbiased
            return (flat - mean) / (std + 1e-6)
        total = total + ((norm(s) - norm(t)) ** 2).mean() / 2
    return total * weight


@pytest.fixture
def kd_model(d2_toy_data, d2_teacher_weights):
    def build(method, opts=()):
        from detectron2.modeling import build_model

        from kdops_detectron2.configs import toy_cfg

        torch.manual_seed(0)
        cfg = toy_cfg(method, d2_toy_data["root"], d2_teacher_weights, list(opts))
        model = build_model(cfg)
        model.train()
        return cfg, model
    with EventStorage(0):  # RetinaNet's losses log num_pos_anchors
        yield build


def test_pkd_loss_equals_eager_formula_on_tapped_features(kd_model):
    cfg, model = kd_model("pkd")
    taps = ["p3", "p4", "p5", "p6"]
    assert list(cfg.MODEL.KD.TAPS) == taps and cfg.MODEL.KD.LOSS_WEIGHT == 10.0
    seen = {}
    model.student.backbone.register_forward_hook(lambda m, i, o: seen.__setitem__("s", o))
    model.teacher.backbone.register_forward_hook(lambda m, i, o: seen.__setitem__("t", (i[0], o)))
    batch = train_batch(cfg)
    losses = model(batch)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_pkd"}
    t_in, t_out = seen["t"]
    # the teacher saw the raw images with its own mean/std (here equal to the student's), same padding
    raw = batch[0]["image"].float()
    exp = (raw - model.teacher.pixel_mean.cpu()) / model.teacher.pixel_std.cpu()
    h, w = raw.shape[1:]
    assert torch.equal(t_in[0, :, :h, :w], exp)
    with torch.no_grad():
        s = [model.method.connectors[t](seen["s"][t]) for t in taps]
        expected = pkd_eager(s, [t_out[t] for t in taps], 10.0)
    assert losses["loss_pkd"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert not model.teacher.training
    # 0.5 halves it; at 0 it is 0 and still in the graph: the connectors get (zero) gradients
    model.set_kd_scale(0.0)
    zero = model(batch)["loss_pkd"]
    assert zero.item() == 0.0 and zero.requires_grad
    zero.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.method.connectors.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())


def test_schedule_factor_and_first_lr_drop(d2_toy_data):
    from kdops_detectron2 import KDScheduleHook, kd_scale_at
    from kdops_detectron2.configs import toy_cfg

    assert [kd_scale_at(i, 4, 6) for i in range(8)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.0, 0.0]
    cfg = toy_cfg("pkd", d2_toy_data["root"], "unused.pth", ["MODEL.KD.WARMUP_ITERS", "2",
                                                               "MODEL.KD.STOP_AT_FIRST_LR_DROP", "True",
                                                               "SOLVER.STEPS", "(7, 9)", "SOLVER.MAX_ITER", "10"])
    hook = KDScheduleHook.from_cfg(cfg)
    assert [hook.scale_at(i) for i in (0, 1, 2, 6, 7, 9)] == [0.5, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_teacher_gets_its_own_normalisation_and_channel_order(kd_model, d2_teacher_weights, tmp_path):
    # a teacher config with other pixel statistics and RGB input
    from kdops_detectron2.configs import config_path

    tfile = tmp_path / "teacher_rgb.yaml"
    tfile.write_text(f'_BASE_: "{config_path("toy/retinanet_r18_toy_teacher.yaml")}"\n'
                     "MODEL:\n  PIXEL_MEAN: [120.0, 110.0, 100.0]\n"
                     'INPUT:\n  FORMAT: "RGB"\n')
    cfg, model = kd_model("fitnet", ["MODEL.KD.TEACHER.CONFIG_FILE", str(tfile),  # + the std through TEACHER.OPTS
                                     "MODEL.KD.TEACHER.OPTS", "['MODEL.PIXEL_STD', '[50.0, 60.0, 70.0]']"])
    seen = {}
    model.teacher.backbone.register_forward_hook(lambda m, i, o: seen.__setitem__("t", i[0]))
    batch = train_batch(cfg)
    model(batch)
    raw = batch[1]["image"].float().flip(0)  # BGR -> RGB
    mean = torch.tensor([120.0, 110.0, 100.0]).view(3, 1, 1)
    std = torch.tensor([50.0, 60.0, 70.0]).view(3, 1, 1)
    h, w = raw.shape[1:]
    assert torch.allclose(seen["t"][1, :, :h, :w], (raw - mean) / std)


def test_teacher_free_method_runs_the_students_head_on_extra_features(d2_toy_data, kd_model):
    """The interface LGD plugs into: needs_teacher = False, ctx.head_losses(features, suffix)."""
    from detectron2.modeling import build_model

    from kdops_detectron2 import METHODS, KDMethod, register_method
    from kdops_detectron2.configs import toy_cfg

    @register_method("test_self_hint")
    class SelfHint(KDMethod):
        needs_teacher = False

        def __init__(self, cfg, student, student_shapes, teacher_shapes=None):
            super().__init__(cfg, student, student_shapes, teacher_shapes)
            assert teacher_shapes is None
            self.scale = torch.nn.Parameter(torch.ones(()))

        def scheduled(self, key):
            return key == "loss_self_hint"

        def forward(self, ctx):
            assert ctx.teacher_features is None and ctx.boxes.shape == (ctx.labels.shape[0], 4)
            assert ctx.batch_index.dtype == torch.int64 and ctx.padded_size == tuple(ctx.images.tensor.shape[-2:])
            extra = {k: v.detach() * self.scale for k, v in ctx.features.items()}
            losses = ctx.head_losses(extra, suffix="_tea")
            losses["loss_self_hint"] = sum((ctx.features[t] - extra[t].detach()).pow(2).mean() for t in self.taps)
            return losses

    try:
        cfg = toy_cfg("pkd", d2_toy_data["root"], opts=["MODEL.KD.METHOD", "test_self_hint",
                                                          "MODEL.KD.TEACHER.CONFIG_FILE", "",
                                                          "MODEL.KD.TEACHER.WEIGHTS", ""])
        torch.manual_seed(0)
        model = build_model(cfg)
        assert model.teacher is None
        model.train()
        batch = train_batch(cfg)
        model.set_kd_scale(0.0)
        losses = model(batch)
        assert set(losses) == {"loss_cls", "loss_box_reg", "loss_cls_tea", "loss_box_reg_tea", "loss_self_hint"}
        assert losses["loss_self_hint"].item() == 0.0  # scheduled: times the factor 0
        assert losses["loss_cls_tea"].item() > 0  # not scheduled
        sum(losses.values()).backward()
        assert model.method.scale.grad is not None and model.method.scale.grad.abs().item() > 0
    finally:
        METHODS.pop("test_self_hint", None)
