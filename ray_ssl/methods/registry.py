"""The methods registry's torch side: a registered method's :class:`Method` class and driver.

The registry itself is :func:`ray_ssl.config.method_plugins` (each ``methods/<name>_settings.py``
registers a :class:`~ray_ssl.config.MethodPlugin`, torch-free); this module imports a plug-in's
implementation when a run needs it, as solo-learn's ``METHODS`` dict maps names to classes.
"""

from __future__ import annotations

import importlib

from ray_ssl.config import Config, method_plugin
from ray_ssl.methods.base import Method, MethodDriver


def method_class(name: str) -> type[Method]:
    """The :class:`Method` subclass of registered method ``name``."""
    module, _, attribute = method_plugin(name).implementation.partition(":")
    cls = getattr(importlib.import_module(module), attribute)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"method {name!r}: {module}:{attribute} is not a Method subclass")
    return cls


def build_method(config: Config, steps_per_epoch: int, total_steps: int) -> Method:
    """A fresh method for ``config``; schedules inside it run over ``total_steps`` steps."""
    return method_class(config.train.method)(config, steps_per_epoch, total_steps)


def method_driver(config: Config) -> MethodDriver:
    """The driver-side part of ``config``'s method for one run."""
    return method_class(config.train.method).driver_class(config)
