"""Helpers of the mmdet plug-in tests: the skip, toy data, a teacher checkpoint, toy configs."""
from __future__ import annotations

import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
PLUGIN = os.path.join(ROOT, "integrations", "mmdet")
CONFIGS = os.path.join(PLUGIN, "configs")
STUDENT_CFG = os.path.join(CONFIGS, "_base_", "retinanet_r18_toy_student.py")
TEACHER_CFG = os.path.join(CONFIGS, "_base_", "retinanet_r18_toy_teacher.py")
PKD_TOY_CFG = os.path.join(CONFIGS, "pkd", "pkd_retinanet_toy.py")


def require_mmdet() -> None:
    """Skip the calling test module when the real mmdet stack is not importable."""
    try:
        import mmcv.ops  # noqa: F401  (mmdet needs mmcv's compiled ops at import time)
        import mmdet  # noqa: F401
        import mmengine  # noqa: F401
        import pycocotools  # noqa: F401
    except Exception as e:  # ImportError, or an mmcv without its _ext
        pytest.skip(f"the mmdet stack is not importable ({type(e).__name__}: {e}); install it with "
                    f"`bash tools/install_mmdet.sh .venv/bin/python`", allow_module_level=True)


def make_toy_data(root: str, num_train: int = 16, num_val: int = 8) -> dict:
    from kdops.toy_data import generate

    return generate(root, num_train=num_train, num_val=num_val, image_size=128, seed=0)


def load_cfg(path: str, data_root: str, work_dir: str, teacher_ckpt: str = None, iters: int = 2,
             val_interval: int = None):
    """A toy config sized for tests: batch 2, no worker processes, ``iters`` iterations, log every one."""
    from mmengine.config import Config

    os.environ["KDOPS_TOY_DATA"] = data_root
    if teacher_ckpt is not None:
        os.environ["KDOPS_TOY_TEACHER_CKPT"] = teacher_ckpt
    cfg = Config.fromfile(path)
    cfg.work_dir = work_dir
    for key, bs in (("train_dataloader", 2), ("val_dataloader", 4), ("test_dataloader", 4)):
        cfg[key].batch_size = bs
        cfg[key].num_workers = 0
        cfg[key].persistent_workers = False
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=val_interval or iters)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=iters)
    cfg.log_processor = dict(type="LogProcessor", window_size=1, by_epoch=False)
    cfg.randomness = dict(seed=0)
    cfg.env_cfg.dist_cfg = dict(backend="gloo")
    return cfg


def make_teacher_ckpt(path: str, config: str = TEACHER_CFG) -> str:
    """A teacher checkpoint of the toy teacher config: its own init, then non-default BN statistics
    (so that any BN update or re-initialisation during distillation would show)."""
    from mmengine.config import Config
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    torch.manual_seed(1)
    model = MODELS.build(Config.fromfile(config).model)
    model.init_weights()
    g = torch.Generator().manual_seed(2)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
        elif name.endswith("running_var"):
            buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
    torch.save({"meta": {}, "state_dict": model.state_dict()}, path)
    return path


def pkd_eager(student_levels, teacher_levels, loss_weight: float) -> torch.Tensor:
    """mmrazor's PKDLoss, transcribed: per channel over (N,H,W), (x - mean) / (unbiased std + 1e-6);
    MSE / 2 per level, summed, times the weight (student resized to the teacher's size if heights differ)."""
    import torch.nn.functional as F

    def norm(x):
        N, C, H, W = x.shape
        x = x.permute(1, 0, 2, 3).reshape(C, -1)
        mean, std = x.mean(dim=-1, keepdim=True), x.std(dim=-1, keepdim=True)
        return ((x - mean) / (std + 1e-6)).reshape(C, N, H, W).permute(1, 0, 2, 3)

    total = 0.0
    for s, t in zip(student_levels, teacher_levels):
        s, t = s.double(), t.double()
        if s.shape[2] != t.shape[2]:
            s = F.interpolate(s, t.shape[2:], mode="bilinear")
        total = total + F.mse_loss(norm(s), norm(t)) / 2
    return total * loss_weight


def toy_batch(model, cfg, empty=(), n: int = 2) -> dict:
    """A preprocessed training batch of ``n`` images from ``cfg``'s train loader (seed 0); the images
    whose indices are in ``empty`` lose all their GT (same fields, no rows)."""
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    init_default_scope("mmdet")
    loader_cfg = dict(cfg.train_dataloader)
    loader_cfg.update(batch_size=n, num_workers=0, persistent_workers=False)
    data = model.data_preprocessor(next(iter(Runner.build_dataloader(loader_cfg, seed=0))), training=True)
    for i in empty:
        gt = data["data_samples"][i].gt_instances
        data["data_samples"][i].gt_instances = gt[gt.labels < -1]
    return data
