"""The method a config asks for (``train.method``)."""

from __future__ import annotations

from ray_ssl.config import Config
from ray_ssl.methods.base import Method


def build_method(config: Config, steps_per_epoch: int, total_steps: int) -> Method:
    """A fresh method for ``config``; schedules inside it run over ``total_steps`` steps."""
    if config.train.method == "franca":
        from ray_ssl.methods.franca import FrancaMethod

        return FrancaMethod(config, steps_per_epoch, total_steps)
    if config.train.method == "instdisc":
        from ray_ssl.methods.instdisc import InstDiscMethod

        return InstDiscMethod(config, steps_per_epoch, total_steps)
    raise ValueError(f"unknown train.method '{config.train.method}'; choose franca or instdisc")
