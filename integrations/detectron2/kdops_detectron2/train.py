"""python -m kdops_detectron2.train --config-file F [--num-gpus N] [--eval-only] [--resume] [KEY VALUE ...]

detectron2's ``tools/train_net.py`` for kdops configs (``default_argument_parser``, ``add_kdops_config``
before the file, :class:`~kdops_detectron2.KDTrainer`, ``COCOEvaluator``); plain detectron2 configs
(a teacher) train with it too. The ``kdops_toy_*`` datasets are registered from ``$KDOPS_TOY_DATA``
(default ``data/kdops_toy``). Without CUDA, ``MODEL.DEVICE`` is cpu and ``--num-gpus N`` > 1 starts N
CPU processes over gloo (``torch.multiprocessing``; detectron2's ``launch`` assumes GPUs); on GPUs
detectron2's ``launch`` runs unchanged. ``--eval-only`` evaluates the student alone, with
``MODEL.WEIGHTS`` (a KDDetector checkpoint or a plain student one).

    python -m kdops_detectron2.train --config-file integrations/detectron2/configs/pkd/pkd_retinanet_toy.yaml \
        --num-gpus 2 MODEL.KD.TEACHER.WEIGHTS work_dirs/d2_retinanet_r18_toy_teacher/model_final.pth
"""
from __future__ import annotations

import importlib
import os
import socket
import sys
from typing import Callable, Optional, Sequence

import torch


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_setup(cfg, args) -> None:
    """detectron2 0.6's ``default_setup`` (logger, output dir, config.yaml, seeds, cudnn) except its
    environment report: ``collect_env_info`` calls the compiled ``detectron2._C``, which a
    pure-Python install (tools/install_detectron2.sh) lacks."""
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.logger import setup_logger

    output_dir = cfg.OUTPUT_DIR
    if comm.is_main_process() and output_dir:
        os.makedirs(output_dir, exist_ok=True)
    rank = comm.get_rank()
    setup_logger(output_dir, distributed_rank=rank, name="fvcore")
    logger = setup_logger(output_dir, distributed_rank=rank)
    setup_logger(output_dir, distributed_rank=rank, name="kdops_detectron2")
    logger.info(f"Rank of current process: {rank}. World size: {comm.get_world_size()}")
    logger.info(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, device {cfg.MODEL.DEVICE}")
    logger.info("Command line arguments: " + str(args))
    if comm.is_main_process() and output_dir:
        path = os.path.join(output_dir, "config.yaml")
        with open(path, "w") as f:
            f.write(cfg.dump())
        logger.info(f"Full config saved to {path}")
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK


def setup(args):
    """The frozen config of ``args`` (file + opts), logging and the toy datasets set up."""
    from .config import get_kd_cfg, is_kd_config, validate_kd_config
    from .data import register_toy_datasets, uses_toy_data

    cfg = get_kd_cfg(args.config_file, args.opts)
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if is_kd_config(cfg):
        validate_kd_config(cfg)
    if uses_toy_data(cfg):
        register_toy_datasets()
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    """One process's run: train (returns the final evaluation) or, with ``--eval-only``, evaluate."""
    from detectron2.modeling import build_model
    from detectron2.utils import comm

    from .config import student_cfg
    from .trainer import KDTrainer, load_student_weights

    cfg = setup(args)
    if args.eval_only:
        scfg = student_cfg(cfg)
        model = build_model(scfg)
        if cfg.MODEL.WEIGHTS:
            load_student_weights(model, cfg.MODEL.WEIGHTS)
        res = KDTrainer.test(scfg, model)
        if comm.is_main_process():
            from detectron2.evaluation import verify_results
            verify_results(cfg, res)
        return res
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def _cpu_worker(rank: int, main_func: Callable, world_size: int, dist_url: str, args: tuple) -> None:
    import torch.distributed as dist
    from detectron2.utils import comm

    dist.init_process_group("gloo", init_method=dist_url, world_size=world_size, rank=rank)
    # detectron2 reads the per-machine group for get_local_rank()/get_local_size(): all ranks (one machine)
    comm._LOCAL_PROCESS_GROUP = dist.new_group(list(range(world_size)))
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        comm.synchronize()
        dist.destroy_process_group()


def launch_cpu(main_func: Callable, num_workers: int, dist_url: str = "auto", args: tuple = ()) -> None:
    """Runs ``main_func(*args)`` in ``num_workers`` CPU processes joined by a gloo process group
    (detectron2's ``comm`` helpers work in them; ``KDTrainer`` wraps the model in DDP with
    ``device_ids=None``). ``dist_url`` "auto" picks a free local port. ``main_func`` must be
    importable by name (spawned workers unpickle it)."""
    import torch.multiprocessing as mp

    if dist_url == "auto":
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    mp.spawn(_cpu_worker, nprocs=num_workers, args=(main_func, num_workers, dist_url, args), daemon=False)


def parser():
    from detectron2.engine import default_argument_parser

    return default_argument_parser(epilog=__doc__.split("\n\n")[2] if __doc__ else None)


def cli(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    # spawned workers unpickle main by module name: use this module's importable name, not __main__
    main_func = importlib.import_module("kdops_detectron2.train").main
    if not torch.cuda.is_available():
        if args.num_machines != 1:
            raise SystemExit("kdops_detectron2.train: CPU runs are single-machine (--num-machines 1)")
        if args.num_gpus > 1:
            launch_cpu(main_func, args.num_gpus, args.dist_url, (args,))
        else:
            main_func(args)
        return 0
    from detectron2.engine import launch

    launch(main_func, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
