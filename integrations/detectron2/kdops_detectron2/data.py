"""The synthetic ``kdops.toy_data`` set as detectron2 datasets ``kdops_toy_train`` / ``kdops_toy_val``.

    python -m kdops.toy_data data/kdops_toy          # writes it (or finds it up to date)
    register_toy_datasets("data/kdops_toy")          # the train tool does this for toy configs

The root is the argument, else ``$KDOPS_TOY_DATA``, else ``data/kdops_toy``.
"""
from __future__ import annotations

import os
from typing import Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

TOY_DATASETS = ("kdops_toy_train", "kdops_toy_val")


def toy_data_root(root: Optional[str] = None) -> str:
    return os.path.abspath(root or os.environ.get("KDOPS_TOY_DATA") or os.path.join("data", "kdops_toy"))


def register_toy_datasets(root: Optional[str] = None) -> str:
    """Registers (or re-points) ``kdops_toy_train`` and ``kdops_toy_val`` at ``root``; returns the root."""
    root = toy_data_root(root)
    for name, split in zip(TOY_DATASETS, ("train", "val")):
        ann = os.path.join(root, "annotations", f"instances_{split}.json")
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("json_file") == ann:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, ann, os.path.join(root, split))
    return root


def uses_toy_data(cfg) -> bool:
    return any(n in TOY_DATASETS for n in tuple(cfg.DATASETS.TRAIN) + tuple(cfg.DATASETS.TEST))
