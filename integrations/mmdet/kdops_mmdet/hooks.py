"""KDScheduleHook: the KD losses' weight as a pure function of the iteration.

    custom_hooks = [dict(type='kdops.KDScheduleHook', warmup_iters=500, stop_at_first_lr_milestone=True)]

scale(it) = 0 from the stop iteration on; (it + 1) / warmup_iters during the warm-up; 1 otherwise.
The stop iteration is ``stop_iter`` or the first milestone of the run's ``MultiStepLR`` (epochs
times the epoch length for an epoch-based scheduler, iterations otherwise), whichever comes first.
While the scale is 0 the losses are still computed and multiplied by 0, so the connectors stay in
the graph: DDP neither hangs nor needs ``find_unused_parameters``. Resuming recomputes the scale
from the iteration, so there is no hook state to save. Models with schedules of their own
(``kdops.LGDDetector``) also get the iteration itself, through their ``set_iteration``.
"""
from __future__ import annotations

from typing import Optional, Sequence

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from .registry import HOOKS


def kd_scale_at(iteration: int, warmup_iters: int = 0, stop_iter: Optional[int] = None) -> float:
    """The KD weight factor at a 0-based iteration."""
    if stop_iter is not None and iteration >= stop_iter:
        return 0.0
    if warmup_iters > 0 and iteration < warmup_iters:
        return (iteration + 1) / warmup_iters
    return 1.0


def first_lr_milestone_iter(param_schedulers, iters_per_epoch: int) -> Optional[int]:
    """The iteration of the first LR drop of any MultiStepLR in the run's schedulers, or None."""
    from mmengine.optim.scheduler import MultiStepLR

    if isinstance(param_schedulers, dict):
        scheds = [s for group in param_schedulers.values() for s in group]
    else:
        scheds = list(param_schedulers or [])
    found = []
    for s in scheds:
        if isinstance(s, MultiStepLR) and len(s.milestones):
            first = min(s.milestones)
            found.append(first * iters_per_epoch if s.by_epoch else first)
    return min(found) if found else None


@HOOKS.register_module()
class KDScheduleHook(Hook):
    """Linear warm-up of the KD losses and a stop at an iteration or at the first LR drop.

    Args:
        warmup_iters: iterations of linear warm-up (0: none).
        stop_iter: the first iteration with KD off (None: never, unless the milestone says so).
        stop_at_first_lr_milestone: also stop at the first milestone of a ``MultiStepLR``.
        losses: names of the entries this hook schedules (default: all).
    """

    priority = "NORMAL"

    def __init__(self, warmup_iters: int = 0, stop_iter: Optional[int] = None,
                 stop_at_first_lr_milestone: bool = False, losses: Optional[Sequence[str]] = None) -> None:
        if warmup_iters < 0 or (stop_iter is not None and stop_iter < 0):
            raise ValueError("KDScheduleHook: warmup_iters and stop_iter must be >= 0")
        self.warmup_iters = int(warmup_iters)
        self.stop_iter = stop_iter
        self.stop_at_first_lr_milestone = stop_at_first_lr_milestone
        self.losses = list(losses) if losses is not None else None
        self._stop: Optional[int] = stop_iter

    def before_train(self, runner) -> None:
        self._stop = self.stop_iter
        if self.stop_at_first_lr_milestone:
            milestone = first_lr_milestone_iter(runner.param_schedulers, len(runner.train_dataloader))
            if milestone is None:
                runner.logger.warning("KDScheduleHook: stop_at_first_lr_milestone but the run has no MultiStepLR")
            else:
                self._stop = milestone if self._stop is None else min(self._stop, milestone)
        runner.logger.info(f"KDScheduleHook: warm-up {self.warmup_iters} iterations, KD off from iteration "
                           f"{self._stop}")

    def scale_at(self, iteration: int) -> float:
        return kd_scale_at(iteration, self.warmup_iters, self._stop)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if not hasattr(model, "set_kd_scale"):
            raise TypeError(f"KDScheduleHook needs a kdops.DistillDetector, got {type(model).__name__}")
        if hasattr(model, "set_iteration"):  # models with their own iteration schedule (LGD)
            model.set_iteration(runner.iter)
        scale = self.scale_at(runner.iter)
        model.set_kd_scale(scale if self.losses is None else {k: scale for k in self.losses})
