"""SAG-VICReg (Simai, Talmon, Shaham, arXiv 2506.18104): VICReg whose invariance term also pulls
together images that a random walk on the batch similarity graph joins.

Per step: both views through backbone and expander (as VICReg); the affinity over the global
batch's 2N views is built from detached features (the backbone's, or the expander's), gathered
from every rank so that every rank draws the same partners from the same seeded generator; a
t-step walk gives each view a partner that is neither itself nor its own augmentation; the loss
is :func:`~ray_ssl.losses.sag_vicreg.sag_vicreg_loss` with w warmed up linearly from 0.
"""

from __future__ import annotations

import torch

from ray_ssl.config import Config
from ray_ssl.losses.gather import gather_rows
from ray_ssl.losses.sag_vicreg import sag_vicreg_loss, walk_partners
from ray_ssl.methods.base import Batch
from ray_ssl.methods.sag_vicreg_settings import NAME
from ray_ssl.methods.two_view import TwoViewMethod, collapse_metric
from ray_ssl.models.backbone import pooled_features
from ray_ssl.models.vit import normalize_images

SEED_STRIDE = 1_000_003  # a prime: (seed, step) pairs map to distinct generator seeds


class SAGVICRegMethod(TwoViewMethod):
    """SAG-VICReg for the :class:`~ray_ssl.methods.base.Method` contract (batch: two views)."""

    def __init__(self, config: Config, steps_per_epoch: int, total_steps: int) -> None:
        settings = config.methods[NAME]
        super().__init__(config, NAME, list(settings.expander_dims), settings.sync_batchnorm)
        self.settings = settings
        self.warmup_steps = settings.walk_warmup_epochs * steps_per_epoch
        self.seed = config.train.seed

    def walk_weight(self, step: int) -> float:
        """w at ``step``: linear from 0 to ``walk_weight`` over the warm-up (ours)."""
        if self.warmup_steps <= 0:
            return self.settings.walk_weight
        return self.settings.walk_weight * min(1.0, step / self.warmup_steps)

    def _features_and_embedding(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = next(self.head.parameters()).dtype
        features = pooled_features(self.encoder, normalize_images(crops).to(dtype))
        return features, self.head(features).float()

    @torch.no_grad()
    def partners(self, graph_a: torch.Tensor, graph_b: torch.Tensor, step: int) -> torch.Tensor:
        """Walk partners [2N] over the global batch (a-views of every rank, then b-views)."""
        both = torch.cat([graph_a, graph_b], dim=1).float()
        if self.distributed:
            both = gather_rows(both)
        dim = graph_a.shape[1]
        nodes = torch.cat([both[:, :dim], both[:, dim:]])
        generator = torch.Generator(device=nodes.device)
        generator.manual_seed(self.seed * SEED_STRIDE + step)
        s = self.settings
        return walk_partners(nodes, s.neighbors, s.scale_neighbor, s.walk_steps, generator)

    def forward(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        first, second = self.pair_crops(batch).chunk(2)
        (h_a, z_a), (h_b, z_b) = (self._features_and_embedding(v) for v in (first, second))
        graph = (h_a, h_b) if self.settings.graph_features == "backbone" else (z_a, z_b)
        partners = self.partners(graph[0].detach(), graph[1].detach(), step)
        s, weight = self.settings, self.walk_weight(step)
        loss, terms, walk = sag_vicreg_loss(
            z_a, z_b, partners, weight, s.sim_coeff, s.std_coeff, s.cov_coeff, self.distributed
        )
        return {
            "loss": loss,
            "invariance_loss": terms.invariance.detach(),
            "walk_invariance_loss": walk.detach(),
            "walk_weight": torch.tensor(weight),
            "embedding_std": collapse_metric(z_a),
        }
