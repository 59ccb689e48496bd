"""Schedules against an independent reconstruction of DINOv2's CosineScheduler arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ray_ssl.config import ConfigError, load_config
from ray_ssl.methods.franca import teacher_momentum, teacher_temperature
from ray_ssl.train.schedules import TrainSchedules, cosine_schedule, scaled_lr, step_decay_schedule


def dinov2_cosine_array(
    base: float, final: float, total: int, warmup: int = 0, start: float = 0.0
) -> np.ndarray:
    """DINOv2 ``CosineScheduler.schedule`` (dinov2/utils/utils.py), built the way DINOv2 does."""
    warmup_schedule = np.linspace(start, base, warmup)
    iters = np.arange(total - warmup)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, cosine))


@pytest.mark.parametrize(
    ("base", "final", "total", "warmup", "start"),
    [
        (4e-3, 1e-6, 100, 10, 0.0),
        (0.04, 0.2, 57, 0, 0.0),
        (0.994, 1.0, 30, 0, 0.0),
        (1.0, 0.5, 12, 1, 0.3),
        (2e-4, 1e-6, 40, 39, 0.0),
    ],
)
def test_cosine_schedule_matches_dinov2(
    base: float, final: float, total: int, warmup: int, start: float
) -> None:
    expected = dinov2_cosine_array(base, final, total, warmup, start)
    got = np.array([cosine_schedule(s, base, final, total, warmup, start) for s in range(total)])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    # Past the end the value stays final (DINOv2 __getitem__).
    assert cosine_schedule(total + 5, base, final, total, warmup, start) == final


def test_teacher_schedules_of_franca_follow_the_same_closed_forms() -> None:
    total, warm = 50, 20
    for step in range(total + 3):
        assert teacher_momentum(step, total, 0.994, 1.0) == pytest.approx(
            cosine_schedule(step, 0.994, 1.0, total), abs=1e-12
        )
        assert teacher_temperature(step, warm, 0.04, 0.07) == pytest.approx(
            cosine_schedule(step, 0.07, 0.07, warm, warm, 0.04), abs=1e-12
        )


def test_lr_scaling_rule_and_train_schedules_from_config() -> None:
    config = load_config(
        "local",
        [
            "data.batch_size=256",
            "optim.base_lr=0.004",
            "optim.warmup_epochs=2",
            "train.epochs=5",
        ],
    )
    assert scaled_lr(config.optim, 256) == pytest.approx(0.004 * math.sqrt(256 / 1024))
    schedules = TrainSchedules.from_config(config, steps_per_epoch=10)
    assert (schedules.total_steps, schedules.warmup_steps) == (50, 20)
    expected_lr = dinov2_cosine_array(0.002, config.optim.min_lr, 50, 20)
    expected_wd = dinov2_cosine_array(config.optim.weight_decay, config.optim.weight_decay_end, 50)
    for step in range(50):
        values = schedules.at(step)
        assert values.lr == pytest.approx(expected_lr[step], rel=1e-12, abs=1e-15)
        assert values.weight_decay == pytest.approx(expected_wd[step], rel=1e-12)


def test_linear_lr_scaling_rule() -> None:
    config = load_config("local", ["optim.lr_scaling=linear", "optim.lr_reference_batch=256"])
    assert scaled_lr(config.optim, 2048) == pytest.approx(config.optim.base_lr * 8)


def test_step_decay_for_instdisc() -> None:
    assert step_decay_schedule(0, 0.03, [120, 160], 0.1) == 0.03
    assert step_decay_schedule(119, 0.03, [120, 160], 0.1) == 0.03
    assert step_decay_schedule(120, 0.03, [120, 160], 0.1) == pytest.approx(0.003)
    assert step_decay_schedule(200, 0.03, [160, 120], 0.1) == pytest.approx(0.0003)
    config = load_config(
        "local", ["optim.lr_milestones=[3, 4]", "train.epochs=5", "optim.warmup_epochs=1"]
    )
    schedules = TrainSchedules.from_config(config, steps_per_epoch=10)
    peak = schedules.peak_lr
    assert schedules.lr(0) == 0.0 and schedules.lr(9) == pytest.approx(peak)
    assert schedules.lr(29) == pytest.approx(peak)
    assert schedules.lr(30) == pytest.approx(peak * 0.1)
    assert schedules.lr(45) == pytest.approx(peak * 0.01)


def test_constant_lr_after_warmup() -> None:
    """``optim.lr_schedule=constant`` (lemniscate cifar.py): the peak from the end of the warm-up
    to the last step, whatever min_lr says; with milestones too it is a config error."""
    config = load_config(
        "local", ["optim.lr_schedule=constant", "train.epochs=3", "optim.warmup_epochs=1"]
    )
    schedules = TrainSchedules.from_config(config, steps_per_epoch=10)
    peak = schedules.peak_lr
    assert schedules.lr(0) == 0.0 and schedules.lr(9) == pytest.approx(peak)
    assert [schedules.lr(s) for s in (10, 20, 29, 30)] == [peak] * 4
    with pytest.raises(ConfigError, match="optim.lr_schedule=constant and optim.lr_milestones"):
        load_config("local", ["optim.lr_schedule=constant", "optim.lr_milestones=[2]"])


def test_negative_step_is_an_error() -> None:
    with pytest.raises(ValueError, match="step must be >= 0"):
        cosine_schedule(-1, 1.0, 0.0, 10)
