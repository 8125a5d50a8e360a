"""python -m kdops_mmdet.train CONFIG [--work-dir DIR] [--cfg-options k=v ...] [--launcher none|pytorch] [--resume]

mmdet's tools/train.py (same arguments, same behaviour), which also trains these configs; in
addition, on a machine without CUDA, ``--launcher pytorch`` (under ``torchrun``) runs DDP over gloo:
the process group is created before the Runner is built (mmengine's own init would call
``torch.cuda.set_device``), ``env_cfg.dist_cfg.backend`` is set to gloo and the model is wrapped with
``device_ids=None`` (a CPU module refuses device ids). On GPUs nothing changes (NCCL, mmengine's init).

    torchrun --nproc_per_node 2 -m kdops_mmdet.train CONFIG --launcher pytorch
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
from typing import Optional, Sequence


def parse_args(argv: Optional[Sequence[str]] = None):
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(prog="python -m kdops_mmdet.train", description="Train a detector (mmdet)")
    parser.add_argument("config", help="train config file path")
    parser.add_argument("--work-dir", help="the dir to save logs and models")
    parser.add_argument("--amp", action="store_true", default=False, help="automatic mixed precision")
    parser.add_argument("--auto-scale-lr", action="store_true", help="scale the LR by the batch size")
    parser.add_argument("--resume", nargs="?", type=str, const="auto",
                        help="resume from this checkpoint, or (no value) from the latest in the work dir")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override settings of the config, key=value (mmdet's syntax)")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none", help="job launcher")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


def _cpu_distributed(cfg) -> None:
    """gloo DDP on CPU: process group first, then the Runner (which then skips its own init)."""
    import torch.distributed as dist

    if cfg.launcher != "pytorch":
        raise ValueError(f"kdops_mmdet.train: without CUDA only --launcher pytorch is supported, got {cfg.launcher}")
    env_cfg = cfg.setdefault("env_cfg", {})
    env_cfg.setdefault("dist_cfg", {})["backend"] = "gloo"
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    wrapper = dict(cfg.get("model_wrapper_cfg") or {})
    wrapper.setdefault("type", "MMDistributedDataParallel")
    wrapper.setdefault("broadcast_buffers", False)
    wrapper.setdefault("find_unused_parameters", cfg.get("find_unused_parameters", False))
    wrapper["device_ids"] = None
    cfg.model_wrapper_cfg = wrapper


def build_runner(cfg):
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    return Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)


def main(argv: Optional[Sequence[str]] = None):
    args = parse_args(argv)
    # mmengine 0.10.7 loads checkpoints with a bare torch.load; since torch 2.6 that means
    # weights_only=True, which refuses the message hub (numpy, HistoryBuffer) of the Runner's own
    # checkpoints (--resume, load_from). These are the user's own files: load them as mmengine expects.
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import torch
    from mmengine.config import Config

    import kdops_mmdet  # noqa: F401  (registers kdops.*; configs also custom_import it)
    from mmdet.utils import setup_cache_size_limit_of_dynamo

    setup_cache_size_limit_of_dynamo()
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir", None) is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    if args.amp:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.loss_scale = "dynamic"
    if args.auto_scale_lr:
        if "auto_scale_lr" in cfg and "enable" in cfg.auto_scale_lr and "base_batch_size" in cfg.auto_scale_lr:
            cfg.auto_scale_lr.enable = True
        else:
            raise RuntimeError('Can not find "auto_scale_lr" or "auto_scale_lr.enable" or '
                               '"auto_scale_lr.base_batch_size" in your configuration file.')
    if args.resume == "auto":
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    if cfg.launcher != "none" and not torch.cuda.is_available():
        _cpu_distributed(cfg)
    runner = build_runner(cfg)
    runner.train()
    return runner


if __name__ == "__main__":
    main()
    sys.exit(0)
