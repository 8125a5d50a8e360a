"""2-process gloo DDP on CPU through kdops_detectron2.train's launcher: 2 iterations of the PKD toy
config, identical parameters on both ranks afterwards (and changed by training)."""
import pytest

pytest.importorskip("detectron2")
import torch  # noqa: E402

from d2_testing import TINY  # noqa: E402


def test_two_process_gloo_ddp_keeps_ranks_identical(d2_toy_data, d2_teacher_weights, tmp_path, monkeypatch):
    from kdops_detectron2.configs import config_path
    from kdops_detectron2.train import launch_cpu, parser

    import d2_ddp_probe

    monkeypatch.setenv("KDOPS_TOY_DATA", d2_toy_data["root"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = parser().parse_args(["--config-file", config_path("pkd/pkd_retinanet_toy.yaml"), "--num-gpus", "2",
                                "MODEL.KD.TEACHER.WEIGHTS", d2_teacher_weights, "OUTPUT_DIR", str(tmp_path / "out"),
                                "DATASETS.TEST", "()", "MODEL.KD.WARMUP_ITERS", "2"] + TINY)
    launch_cpu(d2_ddp_probe.train_and_dump, 2, "auto", (args, str(tmp_path)))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["world"] == r1["world"] == 2 and (r0["local_rank"], r1["local_rank"]) == (0, 1)
    assert r0["iter"] == r1["iter"] == 2  # trainer.iter ends at MAX_ITER
    assert [v for v, _ in r0["kd_factor"]] == [0.5, 1.0]
    assert len(r0["loss_pkd"]) == 2
    assert set(r0["after"]) == set(r1["after"]) and any(k.startswith("method.connectors") for k in r0["after"])
    differ = [k for k in r0["after"] if not torch.equal(r0["after"][k], r1["after"][k])]
    assert not differ, differ[:5]
    assert any(not torch.equal(r0["before"][k], r0["after"][k]) for k in r0["after"])
