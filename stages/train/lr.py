"""The learning-rate schedule: diffusers' `get_scheduler` (the convention of diffusers' training
scripts), stepped once per optimizer step and saved in train_state.pt so a resume continues it.

Clock: optimizer step s (1-based) runs at lr x lambda(s - 1), as in diffusers' scripts, where
`lr_scheduler.step()` follows `optimizer.step()`. With a warm-up of W steps lambda rises as s/W
(so the first step runs at lr 0); linear and cosine then fall to 0 at the run's last step.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LambdaLR


def diffusers_name(schedule: str, warmup: int) -> str:
    """Our schedule name -> get_scheduler's (its "constant" ignores a warm-up)."""
    if schedule == "constant":
        return "constant_with_warmup" if warmup > 0 else "constant"
    return schedule


def build_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup: int, steps: int) -> LambdaLR:
    """A fresh schedule over `steps` optimizer steps (the optimizer's lr is the peak)."""
    return get_scheduler(
        diffusers_name(schedule, warmup), optimizer, num_warmup_steps=warmup, num_training_steps=steps
    )


def match_groups(scheduler: LambdaLR, optimizer: torch.optim.Optimizer) -> None:
    """Keep one lambda and base lr per param group after the projector group left the optimizer
    (it is the last group, and every group follows the same schedule)."""
    n = len(optimizer.param_groups)
    scheduler.base_lrs = scheduler.base_lrs[:n]
    scheduler.lr_lambdas = scheduler.lr_lambdas[:n]
    scheduler._last_lr = scheduler._last_lr[:n]


def restore_lr_scheduler(scheduler: LambdaLR, saved: dict[str, Any] | None, step: int, lr: float) -> None:
    """Continue the schedule of a resumed run at `step` (saved state; an older checkpoint without
    one continues from its step). `lr` may change on resume: it becomes the new peak."""
    if saved is not None:
        scheduler.load_state_dict(saved)
        match_groups(scheduler, scheduler.optimizer)
    scheduler.last_epoch = step
    scheduler.base_lrs = [lr] * len(scheduler.optimizer.param_groups)
    for group, lam, base in zip(
        scheduler.optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs, strict=True
    ):
        group["lr"] = base * lam(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
