"""The learning rate at each step (``train.lr_schedule``).

The rate is a function of the global step and the run's length alone, never of a stateful
scheduler, so a run resumed from any checkpoint follows the same curve as the uninterrupted one,
whatever the world size. The trainer sets it on the optimizer before every step.
"""

from __future__ import annotations

import math
from typing import Any

from elcrec_dist.config import TrainConfig


def learning_rate(train: TrainConfig, *, step: int, total_steps: int) -> float:
    """The rate of global step ``step`` (0-based) in a run of ``total_steps`` steps.

    ``constant``: ``train.lr``. ``cosine``: ``lr_min + (lr - lr_min) * (1 + cos(pi * s)) / 2``
    with ``s = step / (total_steps - 1)`` clipped to [0, 1]: ``lr`` at the first step,
    ``lr_min`` at the last, the mean of the two half-way.
    """
    if train.lr_schedule == "constant":
        return train.lr
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    progress = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
    return train.lr_min + (train.lr - train.lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: Any, lr: float) -> None:
    """Every parameter group of ``optimizer`` (the torch optimizer that applies the update)
    steps with ``lr`` from now on."""
    for group in optimizer.param_groups:
        group["lr"] = lr
