"""The two references a learnt embedding must beat under the same weighted kNN: raw pixels and
the same network at random initialisation (Wu et al., arXiv 1805.01978, sec. 4 compares against
both). Pure evaluation: the caller supplies the images and the untrained network.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ray_ssl.eval.features import Preprocess, extract_features
from ray_ssl.eval.knn import weighted_knn_accuracy


def knn_references(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    random_network: nn.Module,
    preprocess: Preprocess,
    num_classes: int,
    k: int,
    temperature: float,
    batch_size: int = 256,
) -> dict[str, float]:
    """Weighted kNN top-1 of flattened uint8 pixels and of ``random_network``'s features.

    Images are uint8 [N, H, W, C]; ``random_network`` maps ``preprocess``-ed images to features
    (e.g. an InstDisc embedding built with the run's seed and no training). Returns
    ``{"knn_raw_pixels_top1", "knn_random_init_top1"}``.
    """
    train_y, test_y = torch.from_numpy(train_labels), torch.from_numpy(test_labels)

    def accuracy(train: torch.Tensor, test: torch.Tensor) -> float:
        return weighted_knn_accuracy(train, train_y, test, test_y, num_classes, k, temperature)

    def pixels(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images.reshape(len(images), -1)).float()

    def random(images: np.ndarray) -> torch.Tensor:
        device = torch.device("cpu")
        return extract_features(random_network, images, batch_size, device, preprocess).cls

    return {
        "knn_raw_pixels_top1": accuracy(pixels(train_images), pixels(test_images)),
        "knn_random_init_top1": accuracy(random(train_images), random(test_images)),
    }
