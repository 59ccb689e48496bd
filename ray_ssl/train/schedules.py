"""Per-step schedules of the optimizer (learning rate, weight decay): pure functions of the step.

The shapes are DINOv2's ``CosineScheduler`` (arXiv 2304.07193, ``dinov2/utils/utils.py``):
an optional linear warm-up (``numpy.linspace(start, base, warmup_steps)``, both ends included)
followed by a half cosine from ``base`` to ``final`` over the remaining steps; at or past
``total_steps`` the value is ``final``. Being closed-form, a schedule needs no state, so a resumed
run gets the same value at the same step. Schedules of a method's own (an EMA teacher's momentum)
and its freeze rules (parameter groups whose learning rate is 0 for a while) live with the method.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from ray_ssl.config import Config, OptimConfig


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
    """Peak learning rate at ``global_batch``: ``base_lr * sqrt(batch / reference)`` (DINOv2
    sqrt_wrt_1024) or ``base_lr * batch / reference`` (SimCLR, VICReg: lr x batch / 256)."""
    ratio = global_batch / optim.lr_reference_batch
    return optim.base_lr * (math.sqrt(ratio) if optim.lr_scaling == "sqrt" else ratio)


@dataclass(frozen=True)
class StepValues:
    """What the optimizer needs at one step."""

    lr: float
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
    lr_milestone_steps: tuple[int, ...] = ()
    lr_gamma: float = 1.0
    constant_lr: bool = False  # the peak lr after the warm-up (optim.lr_schedule=constant)

    @classmethod
    def from_config(cls, config: Config, steps_per_epoch: int) -> TrainSchedules:
        """Schedules of ``config`` where one epoch is ``steps_per_epoch`` optimizer steps."""
        o = config.optim
        total = config.train.epochs * steps_per_epoch
        return cls(
            peak_lr=scaled_lr(o, config.data.batch_size),
            min_lr=o.min_lr,
            warmup_steps=min(o.warmup_epochs * steps_per_epoch, total),
            total_steps=total,
            weight_decay=o.weight_decay,
            weight_decay_end=o.weight_decay_end,
            lr_milestone_steps=tuple(e * steps_per_epoch for e in o.lr_milestones),
            lr_gamma=o.lr_gamma,
            constant_lr=o.lr_schedule == "constant",
        )

    def lr(self, step: int) -> float:
        if self.lr_milestone_steps or self.constant_lr:
            if step < self.warmup_steps:
                return linear_warmup(step, self.peak_lr, self.warmup_steps)
            milestones = list(self.lr_milestone_steps)  # none: the constant peak
            return step_decay_schedule(step, self.peak_lr, milestones, self.lr_gamma)
        return cosine_schedule(step, self.peak_lr, self.min_lr, self.total_steps, self.warmup_steps)

    def at(self, step: int) -> StepValues:
        return StepValues(
            lr=self.lr(step),
            weight_decay=cosine_schedule(
                step, self.weight_decay, self.weight_decay_end, self.total_steps
            ),
        )
