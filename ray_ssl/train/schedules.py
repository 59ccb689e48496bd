"""Per-step schedules of the optimizer (learning rate, weight decay): pure functions of the step.

The shapes are DINOv2's ``CosineScheduler`` (arXiv 2304.07193, ``dinov2/utils/utils.py``):
an optional linear warm-up (``numpy.linspace(start, base, warmup_steps)``, both ends included)
followed by a half cosine from ``base`` to ``final`` over the remaining steps; at or past
``total_steps`` the value is ``final``. Being closed-form, a schedule needs no state, so a resumed
run gets the same value at the same step. The teacher's momentum and temperature schedules are
the method's own (``ray_ssl.methods.franca``); ``tests/test_schedules.py`` checks that they follow
:func:`cosine_schedule`.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from ray_ssl.config import Config, OptimConfig

LR_REFERENCE_RULE = "sqrt"  # DINOv2 scaling_rule sqrt_wrt_1024


def cosine_schedule(
    step: int,
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> float:
    """Value at ``step``: linear warm-up to ``base``, then a cosine from ``base`` to ``final``."""
    if step < 0:
        raise ValueError(f"schedule step must be >= 0, got {step}")
    if step >= total_steps:
        return final
    warmup_steps = min(warmup_steps, total_steps)
    if step < warmup_steps:
        return linear_warmup(step, base, warmup_steps, warmup_start)
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


def linear_warmup(step: int, base: float, warmup_steps: int, start: float = 0.0) -> float:
    """Step ``step`` (< ``warmup_steps``) of ``numpy.linspace(start, base, warmup_steps)``."""
    if warmup_steps <= 1:
        return start
    return start + (base - start) * step / (warmup_steps - 1)


def step_decay_schedule(step: int, base: float, milestones: list[int], gamma: float) -> float:
    """``base * gamma ** (number of milestones <= step)`` (InstDisc's step decay, sec. 4)."""
    return base * gamma ** bisect.bisect_right(sorted(milestones), step)


def scaled_lr(optim: OptimConfig, global_batch: int) -> float:
    """Peak learning rate: ``base_lr * sqrt(global_batch / reference)`` (DINOv2 sqrt_wrt_1024)."""
    return optim.base_lr * math.sqrt(global_batch / optim.lr_reference_batch)


@dataclass(frozen=True)
class StepValues:
    """What the optimizer needs at one step."""

    lr: float
    last_layer_lr: float
    weight_decay: float


@dataclass(frozen=True)
class TrainSchedules:
    """The run's schedules, fixed by the config and the run length in steps."""

    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    weight_decay: float
    weight_decay_end: float
    freeze_last_layer_steps: int
    lr_milestone_steps: tuple[int, ...] = ()
    lr_gamma: float = 1.0

    @classmethod
    def from_config(cls, config: Config, steps_per_epoch: int) -> TrainSchedules:
        """Schedules of ``config`` where one epoch is ``steps_per_epoch`` optimizer steps."""
        o, f = config.optim, config.franca
        total = config.train.epochs * steps_per_epoch
        freeze_epochs = f.freeze_last_layer_epochs if config.train.method == "franca" else 0
        return cls(
            peak_lr=scaled_lr(o, config.data.batch_size),
            min_lr=o.min_lr,
            warmup_steps=min(o.warmup_epochs * steps_per_epoch, total),
            total_steps=total,
            weight_decay=o.weight_decay,
            weight_decay_end=o.weight_decay_end,
            freeze_last_layer_steps=freeze_epochs * steps_per_epoch,
            lr_milestone_steps=tuple(e * steps_per_epoch for e in o.lr_milestones),
            lr_gamma=o.lr_gamma,
        )

    def lr(self, step: int) -> float:
        if self.lr_milestone_steps:
            if step < self.warmup_steps:
                return linear_warmup(step, self.peak_lr, self.warmup_steps)
            milestones = list(self.lr_milestone_steps)
            return step_decay_schedule(step, self.peak_lr, milestones, self.lr_gamma)
        return cosine_schedule(step, self.peak_lr, self.min_lr, self.total_steps, self.warmup_steps)

    def at(self, step: int) -> StepValues:
        lr = self.lr(step)
        return StepValues(
            lr=lr,
            # DINOv2 freezes the head's last layer for the first epoch(s) by zeroing its lr.
            last_layer_lr=0.0 if step < self.freeze_last_layer_steps else lr,
            weight_decay=cosine_schedule(
                step, self.weight_decay, self.weight_decay_end, self.total_steps
            ),
        )
