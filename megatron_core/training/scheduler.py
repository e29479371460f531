"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math
from typing import Any

import torch


class WarmupCosineScheduler:
    """Sets the optimizer's learning rate before every update.

    The update with index ``i`` (0-based) uses::

        i <  warmup_iters:                 max_lr * (i + 1) / warmup_iters
        warmup_iters <= i < decay_iters:   min_lr + (max_lr - min_lr) * (1 + cos(pi * t)) / 2,
                                           t = (i - warmup_iters) / (decay_iters - warmup_iters)
        i >= decay_iters:                  min_lr

    Args:
        optimizer: its param groups' ``lr`` is overwritten (a group's ``lr_mult`` scales it).
        max_lr: peak learning rate, reached at the end of warmup.
        min_lr: floor after the decay.
        warmup_iters: updates of linear warmup.
        decay_iters: update index where the cosine reaches ``min_lr`` (usually the run length).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_lr: float, min_lr: float, warmup_iters: int,
                 decay_iters: int) -> None:
        if not 0 <= min_lr <= max_lr:
            raise ValueError(f"WarmupCosineScheduler: need 0 <= min_lr ({min_lr}) <= max_lr ({max_lr})")
        if warmup_iters < 0 or decay_iters < warmup_iters:
            raise ValueError(f"WarmupCosineScheduler: need 0 <= warmup_iters ({warmup_iters}) <= "
                             f"decay_iters ({decay_iters}); set decay_iters to the number of training updates")
        self.optimizer = optimizer
        self.max_lr, self.min_lr = max_lr, min_lr
        self.warmup_iters, self.decay_iters = warmup_iters, decay_iters
        self.num_updates = 0
        self._apply()

    def lr_at(self, update: int) -> float:
        """The learning rate of update ``update`` (0-based)."""
        if update < self.warmup_iters:
            return self.max_lr * (update + 1) / self.warmup_iters
        if update >= self.decay_iters:
            return self.min_lr
        progress = (update - self.warmup_iters) / (self.decay_iters - self.warmup_iters)
        return self.min_lr + (self.max_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    @property
    def current_lr(self) -> float:
        """The learning rate the next update will use."""
        return self.lr_at(self.num_updates)

    def _apply(self) -> None:
        lr = self.current_lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)

    def step(self) -> None:
        """Advance past one update and set the next update's learning rate."""
        self.num_updates += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"max_lr": self.max_lr, "min_lr": self.min_lr, "warmup_iters": self.warmup_iters,
                "decay_iters": self.decay_iters, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position in the schedule (the schedule itself comes from the current settings)."""
        self.num_updates = int(state["num_updates"])
        self._apply()
