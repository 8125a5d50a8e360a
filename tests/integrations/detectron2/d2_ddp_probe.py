"""Worker of test_d2_ddp.py: one rank of `kdops_detectron2.train`'s CPU launcher. Trains with
KDTrainer (as the train tool's main does) and saves its trainable parameters before and after."""
import os

import torch


def train_and_dump(args, out_dir):
    from detectron2.utils import comm
    from torch.nn.parallel import DistributedDataParallel

    from kdops_detectron2.train import setup
    from kdops_detectron2.trainer import KDTrainer, unwrap

    torch.set_num_threads(1)
    cfg = setup(args)
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    assert isinstance(trainer.model, DistributedDataParallel) and trainer.model.device_ids is None
    model = unwrap(trainer.model)

    def params():
        return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    before = params()
    trainer.train()
    torch.save({"before": before, "after": params(), "iter": trainer.iter, "world": comm.get_world_size(),
                "local_rank": comm.get_local_rank(), "kd_factor": trainer.storage.history("kd_factor").values(),
                "loss_pkd": trainer.storage.histories()["loss_pkd"].values() if comm.is_main_process() else None},
               os.path.join(out_dir, f"rank{comm.get_rank()}.pt"))
