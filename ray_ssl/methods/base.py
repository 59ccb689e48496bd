"""The Method contract: what the training loop may assume about any self-supervised method."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from ray_ssl.config import ViewConfig

Batch = dict[str, torch.Tensor]


class Method(nn.Module, ABC):
    """A self-supervised method as the training loop sees it.

    The loop knows nothing method-specific and a method knows nothing about Ray Train:
    the loop calls ``forward`` under the DeepSpeed engine, steps the optimizer, then calls
    ``after_step``. Parameters that must not be optimized (an EMA teacher) have
    ``requires_grad=False``.
    """

    @property
    @abstractmethod
    def view_spec(self) -> ViewConfig:
        """What the data pipeline must produce for this method (crops, masks)."""

    @abstractmethod
    def forward(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """Return ``{"loss": scalar tensor, **scalar metrics}`` for one batch."""

    def after_step(self, step: int) -> None:  # noqa: B027
        """Updates that follow the optimizer step (EMA teacher, memory bank)."""

    @abstractmethod
    def backbone(self) -> nn.Module:
        """The network that evaluation and export use."""

    def save_extra_state(self, directory: str, step: int) -> None:  # noqa: B027
        """Write state that lives outside the module (e.g. a memory bank) beside a checkpoint.

        Called on rank 0 only, with the local directory that becomes the checkpoint.
        """

    def load_extra_state(self, directory: str) -> None:  # noqa: B027
        """Restore what :meth:`save_extra_state` wrote; called on every rank at resume."""
