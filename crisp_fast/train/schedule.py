"""The learning-rate schedule (`train.lr_schedule`, `train.warmup_steps`): a
`torch.optim.lr_scheduler.LambdaLR` whose factor is a function of the step only.

For step s = 0, 1, ..., steps - 1 (the update made by optimizer step s + 1):
    warmup    s < W:  (s + 1) / W            (the first update already moves: lr / W)
    constant  1
    linear    1 - p                          p = (s - W) / (steps - W), in [0, 1)
    cosine    (1 + cos(pi * p)) / 2
so the last update's lr is small but not 0, and the schedule reaches 0 exactly at `steps`.

The checkpoint keeps the scheduler's position (JSON); its shape comes from the config, so a run
resumed with a larger `train.steps` continues the new schedule from where it was.
"""
from __future__ import annotations

import math

import torch


class LrShape:
    """The factor multiplying `train.lr` at scheduler step s (a callable object, so LambdaLR's
    state_dict holds its settings as plain numbers)."""

    def __init__(self, schedule: str, warmup_steps: int, total_steps: int):
        if schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"train.lr_schedule must be constant, linear or cosine, got {schedule!r}")
        self.schedule, self.warmup_steps, self.total_steps = schedule, warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        if self.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LrShape(schedule, warmup_steps, total_steps))


def scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict:
    """What a checkpoint keeps: how many steps the scheduler has taken (JSON-able)."""
    return {"last_epoch": int(scheduler.last_epoch), "step_count": int(getattr(scheduler, "_step_count", 0))}


def restore_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict) -> None:
    """Put the scheduler (and its optimizer's learning rates, which a loaded optimizer state
    overwrote with the saved ones) at the saved position of *this* config's schedule."""
    scheduler.last_epoch = int(state["last_epoch"])
    scheduler._step_count = int(state["step_count"])
    for group, base_lr, shape in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * shape(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
