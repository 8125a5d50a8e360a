"""Helpers shared by the detectron2 plug-in tests."""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
PLUGIN = os.path.join(ROOT, "integrations", "detectron2")

#: what every test run overrides: 2 iterations, batch 2, no loader workers, no checkpoint in between
TINY = ["SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.CHECKPOINT_PERIOD", "100000", "SOLVER.WARMUP_ITERS", "1"]


def subprocess_env(**extra):
    """The environment for `python -m kdops_detectron2...` in a subprocess: this checkout first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PLUGIN, ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def train_batch(cfg, n=2):
    """``n`` mapped training inputs (DatasetMapper, as the train loader gives them), fixed order."""
    from detectron2.data import DatasetCatalog, DatasetMapper

    mapper = DatasetMapper(cfg, is_train=True)
    dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:n]
    torch.manual_seed(0)
    return [mapper(dict(d)) for d in dicts]


def val_batch(cfg, n=2):
    from detectron2.data import DatasetCatalog, DatasetMapper

    mapper = DatasetMapper(cfg, is_train=False)
    return [mapper(dict(d)) for d in DatasetCatalog.get(cfg.DATASETS.TEST[0])[:n]]


def state_equal(a, b):
    """Names whose tensors differ (bitwise) between two state dicts, or that one lacks."""
    bad = sorted(set(a) ^ set(b))
    bad += [k for k in a if k in b and not torch.equal(a[k].cpu(), b[k].cpu())]
    return bad
