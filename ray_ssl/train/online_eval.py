"""Online weighted kNN of the teacher backbone's CLS features during training.

The kNN memory is a labelled subset of the train split (``eval.knn_max_train`` samples of
``eval.knn_train_uri``, by default ``data.uri``), the queries a labelled held-out split
(``eval.knn_max_test`` of ``data.eval_uri``). Every rank extracts the features of an equal share
of the images (under ZeRO-3 each backbone forward is a collective, so all ranks take part); rank 0
gathers them, classifies (k=20, T=0.07, Wu et al. 2018 sec. 3.5) and broadcasts the accuracy.
Unlabelled samples (``cls`` missing, not an integer or not a class) are left out of both and
counted (``unlabelled``).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from ray_ssl.config import Config
from ray_ssl.data.stream import load_eval_set
from ray_ssl.eval.features import extract_features, rank_slice
from ray_ssl.eval.knn import weighted_knn_accuracy
from ray_ssl.models.vit import normalize_images

log = logging.getLogger(__name__)


def knn_memory_uri(config: Config) -> str:
    """The labelled shards whose features form the kNN memory."""
    return config.eval.knn_train_uri or config.data.uri


class KnnEvaluator:
    """Holds the labelled images of both splits; :meth:`accuracy` scores a backbone."""

    def __init__(self, config: Config, num_classes: int, rank: int, world_size: int):
        if config.data.eval_uri is None:
            raise ValueError("online kNN needs data.eval_uri")
        e, size = config.eval, config.views.global_size
        memory = load_eval_set(knn_memory_uri(config), config.storage, e.knn_max_train, size)
        queries = load_eval_set(config.data.eval_uri, config.storage, e.knn_max_test, size)
        self.train_images, self.train_labels = memory.images, memory.labels
        self.test_images, self.test_labels = queries.images, queries.labels
        self.unlabelled = {"memory": memory.unlabelled, "queries": queries.unlabelled}
        self.k, self.temperature, self.batch_size = e.knn_k, e.knn_temperature, e.feature_batch_size
        self.num_classes = num_classes
        self.autocast = config.train.precision == "bf16"  # as the engine's forward
        self.rank, self.world_size = rank, world_size
        log.info(
            "online kNN: %d labelled train images as memory, %d test images (unlabelled, left "
            "out: %d memory, %d queries)",
            len(self.train_images),
            len(self.test_images),
            memory.unlabelled,
            queries.unlabelled,
        )

    def _features(
        self, backbone: nn.Module, images: np.ndarray, device: torch.device
    ) -> torch.Tensor:
        rows = rank_slice(len(images), self.rank, self.world_size)
        local = extract_features(
            backbone, images[rows], self.batch_size, device, normalize_images
        ).cls
        if self.world_size == 1:
            return local
        local = local.to(device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, local)
        return torch.cat(parts).cpu()[: len(images)]

    def accuracy(self, backbone: nn.Module, device: torch.device) -> float:
        """Top-1 weighted-kNN accuracy in [0, 1]; every rank must call it."""
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast):
            train = self._features(backbone, self.train_images, device)
            test = self._features(backbone, self.test_images, device)
        result = torch.zeros(1, device=device)
        if self.rank == 0:
            result[0] = weighted_knn_accuracy(
                train,
                torch.from_numpy(self.train_labels),
                test,
                torch.from_numpy(self.test_labels),
                self.num_classes,
                self.k,
                self.temperature,
            )
        if self.world_size > 1:
            torch.distributed.broadcast(result, src=0)
        return float(result[0])


def pixel_knn_accuracy(config: Config, num_classes: int) -> float:
    """The raw-pixel baseline on the same subsets: flattened uint8 images as features."""
    e, size = config.eval, config.views.global_size
    train = load_eval_set(knn_memory_uri(config), config.storage, e.knn_max_train, size)
    test = load_eval_set(config.data.eval_uri, config.storage, e.knn_max_test, size)
    return weighted_knn_accuracy(
        torch.from_numpy(train.images.reshape(len(train.images), -1)).float(),
        torch.from_numpy(train.labels),
        torch.from_numpy(test.images.reshape(len(test.images), -1)).float(),
        torch.from_numpy(test.labels),
        num_classes,
        e.knn_k,
        e.knn_temperature,
    )
