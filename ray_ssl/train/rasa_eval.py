"""The frozen backbone of a RASA job and the report that compares it before and after RASA.

Held-out images come from ``data.eval_uri`` (``eval.knn_max_test``) with ``eval.knn_max_train``
images of ``data.uri`` as the training side, or, without ``data.eval_uri``, from a split of
``data.uri``. All are resized and centre-cropped to the export's image size (no augmentation).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ray_ssl.config import Config, StorageConfig
from ray_ssl.data.stream import load_labelled_arrays
from ray_ssl.eval.errors import RasaError
from ray_ssl.eval.knn import weighted_knn_accuracy
from ray_ssl.eval.rasa import (
    chance_position_mse,
    held_out_position_mse,
    least_squares_position_mse,
    remove_subspace,
    removed_cosine,
)
from ray_ssl.models.vit import normalize_images

if TYPE_CHECKING:
    from ray_ssl.train.rasa_job import ExportInfo

log = logging.getLogger(__name__)


def frozen_backbone(export: ExportInfo, storage: StorageConfig, device: torch.device) -> nn.Module:
    """The exported timm model with its weights, in eval mode, without gradients."""
    from ray_ssl.models.export import load_exported_backbone

    return (
        load_exported_backbone(export.weights_uri, storage).eval().requires_grad_(False).to(device)
    )


@torch.no_grad()
def encode(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Final-norm tokens [B, prefix + N, D] of uint8 images [B, C, H, W]."""
    return backbone.forward_features(normalize_images(images)).float()


def patch_tokens(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Final-norm patch tokens [B, N, D] (CLS and registers dropped) of uint8 images."""
    return encode(backbone, images)[:, backbone.num_prefix_tokens :]


class RasaEvaluator:
    """Holds the held-out images; :meth:`report` scores a backbone and a basis Q."""

    def __init__(
        self,
        config: Config,
        export: ExportInfo,
        num_classes: int,
        device: torch.device,
    ):
        e, size = config.eval, export.img_size
        self.cfg, self.grid, self.device = config.rasa, export.grid, device
        self.batch_size = e.feature_batch_size
        self.knn_k, self.knn_temperature = e.knn_k, e.knn_temperature
        self.num_classes = num_classes
        if config.data.eval_uri is not None:
            self.train = load_labelled_arrays(
                config.data.uri, config.storage, e.knn_max_train, size
            )
            self.test = load_labelled_arrays(
                config.data.eval_uri, config.storage, e.knn_max_test, size
            )
            self.held_out = config.data.eval_uri
        else:
            images, labels, idx = load_labelled_arrays(
                config.data.uri, config.storage, e.knn_max_train + e.knn_max_test, size
            )
            cut = len(images) - min(e.knn_max_test, len(images) // 2)
            if cut < 1 or cut == len(images):
                raise RasaError(f"{config.data.uri} has too few images to hold some out")
            self.train = (images[:cut], labels[:cut], idx[:cut])
            self.test = (images[cut:], labels[cut:], idx[cut:])
            self.held_out = f"the last {len(images) - cut} of {len(images)} images of data.uri"

    def _features(
        self, backbone: nn.Module, images: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CLS [M, D], mean patch token [M, D], patch tokens of the first probe_images [m, N, D]."""
        cls, mean, kept = [], [], []
        prefix, probe = backbone.num_prefix_tokens, self.cfg.probe_images
        for start in range(0, len(images), self.batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + self.batch_size]))
            tokens = encode(backbone, chunk.to(self.device).permute(0, 3, 1, 2)).cpu()
            cls.append(tokens[:, 0])
            mean.append(tokens[:, prefix:].mean(1))
            if start < probe:
                kept.append(tokens[: probe - start, prefix:])
        return torch.cat(cls), torch.cat(mean), torch.cat(kept)

    def _knn(self, train: torch.Tensor, test: torch.Tensor) -> float:
        return weighted_knn_accuracy(
            train,
            torch.from_numpy(self.train[1]),
            test,
            torch.from_numpy(self.test[1]),
            self.num_classes,
            self.knn_k,
            self.knn_temperature,
        )

    def report(
        self, backbone: nn.Module, basis: torch.Tensor, before: nn.Module, after: nn.Module
    ) -> dict[str, Any]:
        """Position MSE, positional-embedding cosine and kNN, before and after removing Q.

        ``before`` is round 1's regressor, ``after`` the regressor of a round T+1 trained on the
        tokens with Q removed; both are scored on the held-out images (the reference's Eval 1).
        The closed-form affine probe is fitted on the first ``rasa.probe_images`` training images.
        """
        train_cls, train_mean, train_tokens = self._features(backbone, self.train[0])
        test_cls, test_mean, test_tokens = self._features(backbone, self.test[0])
        train_after, test_after = (remove_subspace(t, basis) for t in (train_tokens, test_tokens))
        chance = chance_position_mse(self.grid)
        before_mse = held_out_position_mse(before.cpu(), test_tokens)
        after_mse = held_out_position_mse(after.cpu(), test_tokens, basis)
        num_patches = self.grid * self.grid
        pos_embed = backbone.pos_embed.detach().float().cpu()[0, -num_patches:]
        cos_removed, cos_kept = removed_cosine(test_tokens, basis, pos_embed)
        report: dict[str, Any] = {
            "grid": self.grid,
            "dim": int(basis.shape[1]),
            "basis_rank": int(basis.shape[0]),
            "held_out": self.held_out,
            "train_images": len(self.train[0]),
            "test_images": len(self.test[0]),
            "probe_images": [len(train_tokens), len(test_tokens)],
            "position_mse": {
                "chance": chance,
                "probe": "round-1 regressor / round-T+1 regressor on held-out images",
                "before": before_mse,
                "after": after_mse,
                "before_vs_chance": before_mse / chance,
                "after_vs_chance": after_mse / chance,
                "least_squares_before": least_squares_position_mse(train_tokens, test_tokens),
                "least_squares_after": least_squares_position_mse(train_after, test_after),
            },
            "pos_embed_cosine": {"removed": cos_removed, "kept": cos_kept},
            "knn": None,
        }
        if self.num_classes >= 2:
            report["knn"] = {
                "features": "mean patch token",
                "k": self.knn_k,
                "temperature": self.knn_temperature,
                "before": self._knn(train_mean, test_mean),
                "after": self._knn(
                    remove_subspace(train_mean, basis), remove_subspace(test_mean, basis)
                ),
                "cls_unchanged": self._knn(train_cls, test_cls),
            }
        log.info(
            "RASA report: position MSE %.5f -> %.5f (chance %.5f); kNN %s",
            before_mse,
            after_mse,
            chance,
            report["knn"],
        )
        return report
