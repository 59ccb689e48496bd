"""SimCLR (Chen et al., ICML 2020): backbone -> projection head g on two views of each image,
NT-Xent over the global batch (2N - 2 negatives per anchor; ``nt_xent_loss``).

Both views go through the network as one batch, as the released code concatenates them.
"""

from __future__ import annotations

import torch

from ray_ssl.config import Config
from ray_ssl.losses.ntxent import nt_xent_loss
from ray_ssl.methods.base import Batch
from ray_ssl.methods.simclr_settings import NAME
from ray_ssl.methods.two_view import TwoViewMethod, collapse_metric


class SimCLRMethod(TwoViewMethod):
    """SimCLR for the :class:`~ray_ssl.methods.base.Method` contract (batch: two views)."""

    def __init__(self, config: Config, steps_per_epoch: int, total_steps: int) -> None:
        settings = config.methods[NAME]
        head = [settings.projection_hidden_dim, settings.projection_dim]
        super().__init__(config, NAME, head, settings.sync_batchnorm)
        self.temperature = settings.temperature

    def forward(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        z_a, z_b = self.embed(self.pair_crops(batch)).chunk(2)
        loss = nt_xent_loss(z_a, z_b, self.temperature, distributed=self.distributed)
        return {"loss": loss, "embedding_std": collapse_metric(z_a)}
