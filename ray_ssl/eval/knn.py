"""Weighted k-nearest-neighbour classification on L2-normalised features.

The protocol of Wu et al. (arXiv 1805.01978, sec. 3.5) used by DINO/DINOv2 for online evaluation:
each of the k nearest training features (cosine similarity s_i) votes for its class with weight
exp(s_i / T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QUERY_CHUNK = 1024  # queries per similarity block; bounds memory at QUERY_CHUNK x N


@torch.no_grad()
def weighted_knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Predicted class of each test feature by a weighted vote of its k nearest neighbours.

    Features need not be normalised; cosine similarity is used. Returns int64 [n_test].
    """
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError("kNN features must be 2-D [n, d]")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"kNN feature dims differ: train {train_features.shape[1]} vs test "
            f"{test_features.shape[1]}"
        )
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    labels = train_labels.long()
    k = min(k, train.shape[0])
    predictions = []
    for start in range(0, test.shape[0], QUERY_CHUNK):
        sims = test[start : start + QUERY_CHUNK] @ train.T
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = (top_sims / temperature).exp()
        votes = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, labels[top_idx], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def weighted_knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy in [0, 1] of :func:`weighted_knn_predict`."""
    predicted = weighted_knn_predict(
        train_features, train_labels, test_features, num_classes, k, temperature
    )
    return float((predicted == test_labels.to(predicted.device)).float().mean())
