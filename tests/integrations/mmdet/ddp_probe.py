"""Imported (custom_imports) by the DDP test's config: each rank writes what it ended with."""
import json
import os

import torch
import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class DumpRankStateHook(Hook):
    priority = "LOWEST"

    def __init__(self):
        self.log = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        self.log.append(dict(iter=runner.iter, scale=dict(model.kd_scale),
                             outputs={k: float(v) for k, v in outputs.items()}))

    def after_run(self, runner):
        rank = dist.get_rank() if dist.is_initialized() else 0
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        buffers = {k: v.detach().clone() for k, v in model.named_buffers() if k.startswith("teacher.")}
        torch.save(dict(params=params, teacher_buffers=buffers, wrapped=type(runner.model).__name__),
                   os.path.join(runner.work_dir, f"rank{rank}.pt"))
        with open(os.path.join(runner.work_dir, f"rank{rank}.json"), "w") as f:
            json.dump(self.log, f)
