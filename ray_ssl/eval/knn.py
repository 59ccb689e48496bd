"""Weighted k-nearest-neighbour classification on L2-normalised features.

The protocol of Wu et al. (arXiv 1805.01978, sec. 3.5) used by DINO/DINOv2 for online evaluation:
each of the k nearest training features (cosine similarity s_i) votes for its class with weight
exp(s_i / T). DINOv2's softmax over the top max(k) similarities differs from these weights by
a factor per query, so it predicts the same class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

QUERY_CHUNK = 1024  # queries per similarity block; bounds memory at QUERY_CHUNK x N
DINO_KS = (10, 20, 100, 200)  # DINO/DINOv2 eval_knn nb_knn


@torch.no_grad()
def weighted_knn_predictions(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = (20,),
    temperature: float = 0.07,
) -> dict[int, torch.Tensor]:
    """k -> predicted class (int64 [n_test]) of each test feature by a weighted vote of its k
    nearest neighbours, for every k in ``ks`` from one top-max(k) search (DINO's ``eval_knn``).

    Features need not be normalised; cosine similarity is used.
    """
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError("kNN features must be 2-D [n, d]")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"kNN feature dims differ: train {train_features.shape[1]} vs test "
            f"{test_features.shape[1]}"
        )
    if not ks or min(ks) < 1:
        raise ValueError(f"kNN needs k >= 1, got {list(ks)}")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    labels = train_labels.long().to(train.device)
    max_k = min(max(ks), train.shape[0])
    predictions: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, test.shape[0], QUERY_CHUNK):
        sims = test[start : start + QUERY_CHUNK] @ train.T
        top_sims, top_idx = sims.topk(max_k, dim=1)  # sorted, most similar first
        weights = (top_sims / temperature).exp()  # Wu et al. sec. 3.5: exp(s_i / T)
        neighbour_labels = labels[top_idx]
        for k in ks:
            n = min(k, max_k)
            votes = weights.new_zeros(sims.shape[0], num_classes)
            votes.scatter_add_(1, neighbour_labels[:, :n], weights[:, :n])
            predictions[k].append(votes.argmax(dim=1))
    return {k: torch.cat(parts) for k, parts in predictions.items()}


def weighted_knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Predicted class (int64 [n_test]) of each test feature by its k nearest neighbours."""
    return weighted_knn_predictions(
        train_features, train_labels, test_features, num_classes, (k,), temperature
    )[k]


def weighted_knn_accuracies(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = DINO_KS,
    temperature: float = 0.07,
) -> dict[int, float]:
    """k -> top-1 accuracy in [0, 1] of :func:`weighted_knn_predictions`."""
    predicted = weighted_knn_predictions(
        train_features, train_labels, test_features, num_classes, ks, temperature
    )
    return {k: float((p == test_labels.to(p.device)).float().mean()) for k, p in predicted.items()}


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
