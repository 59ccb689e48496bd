"""The Method contract: what the training loop and the driver may assume about any method.

A method is a plug-in (DESIGN.md): ``methods/<name>_settings.py`` registers its settings, view spec
and checkpoint-shape keys (torch-free, :class:`~ray_ssl.config.MethodPlugin`); ``methods/<name>.py``
holds the :class:`Method` below, with its parameter groups and freeze rules, the hook before every
checkpoint, and its :class:`MethodDriver` (driver-side set-up, tear-down and final evaluation).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ray_ssl.config import Config, OptimConfig, ViewConfig, training_views

Batch = dict[str, torch.Tensor]

# Parameters without weight decay (DINOv2 get_params_groups_with_decay: biases, norms and
# LayerScale "gamma"; plus the learned tokens and position embedding, timm's no_weight_decay()).
NO_DECAY_SUFFIXES = (
    ".bias",
    "cls_token",
    "pos_embed",
    "mask_token",
    "reg_token",
    "register_tokens",
)
NO_DECAY_SUBSTRINGS = ("norm", "gamma")
PATCH_EMBED_KEY = "patch_embed"


def dinov2_no_decay(name: str, param: torch.Tensor) -> bool:
    """DINOv2's rule: biases, norms, LayerScale and the learned tokens take no weight decay."""
    return name.endswith(NO_DECAY_SUFFIXES) or any(s in name for s in NO_DECAY_SUBSTRINGS)


def decay_param_groups(
    module: nn.Module,
    optim: OptimConfig,
    frozen_until: Callable[[str], int],
    no_decay: Callable[[str, torch.Tensor], bool] = dinov2_no_decay,
) -> list[dict[str, Any]]:
    """Trainable parameters of ``module`` in groups of equal (lr_mult, wd_mult, frozen_until).

    Each group dict holds ``params``, ``names``, ``lr_mult``, ``wd_mult`` and ``frozen_until``
    (the step before which its learning rate is 0; 0 = never frozen). The patch embedding's
    learning rate is scaled by ``optim.patch_embed_lr_mult`` (DINOv2).
    """
    groups: dict[tuple[float, float, int], dict[str, Any]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult = optim.patch_embed_lr_mult if PATCH_EMBED_KEY in name else 1.0
        key = (lr_mult, 0.0 if no_decay(name, param) else 1.0, frozen_until(name))
        group = groups.setdefault(
            key,
            {
                "params": [],
                "names": [],
                "lr_mult": key[0],
                "wd_mult": key[1],
                "frozen_until": key[2],
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise ValueError("the method has no trainable parameters (requires_grad=True)")
    return list(groups.values())


class MethodDriver:
    """The driver-side part of a method, around one training run.

    ``prepare`` completes the config from the run's inputs before the run is planned; ``setup``
    starts what must outlive the Train workers (after Ray is up); ``evaluate`` runs the method's
    final evaluation on the trained model; ``teardown`` releases what ``setup`` started, always.
    """

    def __init__(self, config: Config) -> None:
        self.config = config

    def prepare(self, config: Config) -> Config:
        """``config`` completed from the run's inputs (e.g. the shard count); default: as is."""
        return config

    def extra_cpus(self) -> float:
        """Logical CPUs the method's own actors need beside the Train workers (local Ray)."""
        return 0.0

    def setup(self) -> None:
        """Start driver-owned resources (called once Ray is initialised)."""

    def evaluate(self, load_trained: Callable[[], Method]) -> dict[str, float]:
        """Final evaluation; ``load_trained()`` returns the method with the final weights."""
        return {}

    def teardown(self) -> None:
        """Release what :meth:`setup` started; called even when training failed."""


class Method(nn.Module, ABC):
    """A self-supervised method as the training loop sees it.

    The loop knows nothing method-specific and a method knows nothing about Ray Train:
    the loop calls ``forward`` under the DeepSpeed engine, steps the optimizer, then calls
    ``after_step``; before writing a checkpoint it calls ``before_checkpoint`` on every rank.
    Parameters that must not be optimized (an EMA teacher) have ``requires_grad=False``.
    """

    driver_class: type[MethodDriver] = MethodDriver

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self._views = training_views(config)  # a view setting it cannot honour fails here

    @property
    def view_spec(self) -> ViewConfig:
        """What the data pipeline must produce for this method (the plug-in's ``view_spec``)."""
        return self._views

    @abstractmethod
    def forward(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """Return ``{"loss": scalar tensor, **scalar metrics}`` for one batch."""

    def after_step(self, step: int) -> None:  # noqa: B027
        """Updates that follow the optimizer step (EMA teacher, memory bank)."""

    @abstractmethod
    def backbone(self) -> nn.Module:
        """The network that evaluation and export use."""

    def frozen_until(self, name: str) -> int:
        """The step before which parameter ``name`` is not trained (a freeze rule); 0 = never."""
        return 0

    def no_weight_decay(self, name: str, param: torch.Tensor) -> bool:
        """Whether parameter ``name`` is exempt from weight decay (default: DINOv2's rule)."""
        return dinov2_no_decay(name, param)

    def param_groups(self, optim: OptimConfig) -> list[dict[str, Any]]:
        """Optimizer parameter groups (see :func:`decay_param_groups`) with the freeze rules."""
        return decay_param_groups(self, optim, self.frozen_until, self.no_weight_decay)

    def before_checkpoint(self, step: int) -> None:  # noqa: B027
        """Called on every rank before a checkpoint of ``step`` completed steps is written."""

    def save_extra_state(self, directory: str, step: int) -> None:  # noqa: B027
        """Write state that lives outside the module (e.g. a memory bank) beside a checkpoint.

        Called on rank 0 only, with the local directory that becomes the checkpoint.
        """

    def load_extra_state(self, directory: str) -> None:  # noqa: B027
        """Restore what :meth:`save_extra_state` wrote; called on every rank at resume."""
