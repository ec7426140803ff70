"""Learning-rate schedules as pure functions of the global step.

Why pure functions: a promoted LAG winner, resumed at another DP degree, must follow the *same*
schedule "as if it had never stopped"; evaluating lr(step) from the step alone guarantees that,
and DeepSpeed only has to remember the step (``LambdaLR.last_epoch``).

Example (paper UL2, appendix A.2)::

    lr = lr_at(ScheduleConfig(kind="cosine", warmup_steps=10_000, decay_steps=400_000,
                              final_lr=1e-3), peak_lr=1e-2, step=300_000)
"""

from __future__ import annotations

import math

import torch

from lag_ds.train.config import ScheduleConfig


def lr_at(schedule: ScheduleConfig, *, peak_lr: float, step: int) -> float:
    """Learning rate used for the optimizer update that produces step ``step + 1``."""
    if schedule.warmup_steps and step < schedule.warmup_steps:
        return peak_lr * (step + 1) / schedule.warmup_steps
    if schedule.kind == "constant":
        return peak_lr
    progress = min(1.0, (step - schedule.warmup_steps) / (schedule.decay_steps - schedule.warmup_steps))
    return schedule.final_lr + 0.5 * (peak_lr - schedule.final_lr) * (1.0 + math.cos(math.pi * progress))


def lambda_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, *, peak_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` whose factor is ``lr_at(step) / peak_lr``; DeepSpeed steps and checkpoints it."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(schedule, peak_lr=peak_lr, step=step) / peak_lr
    )
