"""VICReg (Bardes et al., ICLR 2022): backbone -> expander on two views of each image, loss =
25 x invariance + 25 x variance + 1 x covariance over the global batch (``vicreg_loss``).

The two views go through the network separately, as the official code does, so BatchNorm
normalises each view with its own statistics.
"""

from __future__ import annotations

import torch

from ray_ssl.config import Config
from ray_ssl.losses.vicreg import vicreg_loss
from ray_ssl.methods.base import Batch
from ray_ssl.methods.two_view import TwoViewMethod, collapse_metric
from ray_ssl.methods.vicreg_settings import NAME


class VICRegMethod(TwoViewMethod):
    """VICReg for the :class:`~ray_ssl.methods.base.Method` contract (batch: two views)."""

    def __init__(self, config: Config, steps_per_epoch: int, total_steps: int) -> None:
        settings = config.methods[NAME]
        super().__init__(config, NAME, list(settings.expander_dims), settings.sync_batchnorm)
        self.settings = settings

    def forward(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        first, second = self.pair_crops(batch).chunk(2)
        z_a, z_b = self.embed(first), self.embed(second)
        s = self.settings
        loss = vicreg_loss(
            z_a, z_b, s.sim_coeff, s.std_coeff, s.cov_coeff, distributed=self.distributed
        )
        return {"loss": loss, "embedding_std": collapse_metric(z_a)}
