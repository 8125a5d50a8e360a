"""2-process DDP over gloo through the real launcher: torchrun -> kdops_mmdet.train --launcher pytorch."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import torch

from mmdet_testing import HERE, PKD_TOY_CFG, PLUGIN, make_teacher_ckpt, make_toy_data, require_mmdet

require_mmdet()

_CFG = """
_base_ = [{base!r}]
custom_imports = dict(imports=['kdops_mmdet', 'ddp_probe'], allow_failed_imports=False)
# KD stops at the first LR drop: iteration 1 of 3
custom_hooks = [dict(type='kdops.KDScheduleHook', stop_at_first_lr_milestone=True), dict(type='DumpRankStateHook')]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=3, val_interval=3)
param_scheduler = [dict(type='MultiStepLR', begin=0, end=3, by_epoch=False, milestones=[1], gamma=0.1)]
train_dataloader = dict(batch_size=2, num_workers=0)
val_dataloader = dict(batch_size=4, num_workers=0)
test_dataloader = dict(batch_size=4, num_workers=0)
default_hooks = dict(logger=dict(type='LoggerHook', interval=1),
                     checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=3))
log_processor = dict(window_size=1)
randomness = dict(seed=0)
"""


def test_two_process_gloo_ddp_kd_switched_off(tmp_path):
    data = make_toy_data(str(tmp_path / "data"))
    ckpt = make_teacher_ckpt(str(tmp_path / "teacher.pth"))
    cfg = tmp_path / "pkd_ddp.py"
    cfg.write_text(_CFG.format(base=PKD_TOY_CFG))
    work = tmp_path / "work"
    env = dict(os.environ, KDOPS_TOY_DATA=data["root"], KDOPS_TOY_TEACHER_CKPT=ckpt, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([HERE, PLUGIN, os.environ.get("PYTHONPATH", "")]))
    with socket.socket() as sock:  # a free port, so parallel runs do not collide
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "kdops_mmdet.train", str(cfg), "--launcher", "pytorch", "--work-dir", str(work)]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    ranks = [torch.load(work / f"rank{r}.pt", map_location="cpu", weights_only=True) for r in (0, 1)]
    assert ranks[0]["wrapped"] == "MMDistributedDataParallel"
    assert set(ranks[0]["params"]) == set(ranks[1]["params"])
    for k, v in ranks[0]["params"].items():
        assert torch.equal(v, ranks[1]["params"][k]), k
    for k, v in ranks[0]["teacher_buffers"].items():
        assert torch.equal(v, ranks[1]["teacher_buffers"][k]), k
    for r in (0, 1):
        log = json.loads((work / f"rank{r}.json").read_text())
        assert [e["scale"]["pkd"] for e in log] == [1.0, 0.0, 0.0]
        assert all(math.isfinite(v) for e in log for v in e["outputs"].values())
        assert log[0]["outputs"]["loss_pkd"] > 0 and log[1]["outputs"]["loss_pkd"] == 0.0
