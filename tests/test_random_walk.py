"""Random-walk partners (SAG-VICReg): the affinity, the walk matrix and the draws from it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ray_ssl.losses.random_walk import knn_gaussian_affinity, sample_walk_partners, walk_matrix


def affinity_by_loops(x: np.ndarray, neighbors: int, scale_neighbor: int) -> np.ndarray:
    """SpectralNet's kNN self-tuning Gaussian affinity written out point by point."""
    n = len(x)
    d = np.array([[math.dist(x[i], x[j]) for j in range(n)] for i in range(n)])
    knn = [
        sorted((j for j in range(n) if j != i), key=lambda j, i=i: d[i, j])[:neighbors]
        for i in range(n)
    ]
    sigma = [d[i, knn[i][scale_neighbor - 1]] for i in range(n)]
    w = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if j in knn[i] or i in knn[j]:
                w[i, j] = math.exp(-(d[i, j] ** 2) / (sigma[i] * sigma[j]))
    return w


def test_affinity_matches_the_definition() -> None:
    x = np.random.default_rng(0).standard_normal((12, 5))
    got = knn_gaussian_affinity(torch.from_numpy(x), neighbors=4, scale_neighbor=2)
    np.testing.assert_allclose(got.numpy(), affinity_by_loops(x, 4, 2), rtol=1e-5, atol=1e-7)
    assert torch.equal(got, got.T)
    assert torch.all(got.diagonal() == 0)


def test_affinity_rejects_impossible_neighbour_counts() -> None:
    with pytest.raises(ValueError, match="neighbors"):
        knn_gaussian_affinity(torch.zeros(4, 2), neighbors=4, scale_neighbor=1)


def test_walk_matrix_is_the_t_th_power_of_the_transition_matrix() -> None:
    w = torch.rand(6, 6, dtype=torch.float64)
    w = w + w.T
    p = w / w.sum(1, keepdim=True)
    np.testing.assert_allclose(walk_matrix(w, 3).numpy(), (p @ p @ p).numpy(), rtol=1e-12)
    assert torch.allclose(walk_matrix(w, 3).sum(1), torch.ones(6, dtype=torch.float64))


def test_partners_follow_the_walk_distribution() -> None:
    """Empirical partner frequencies over many draws match P^t restricted to allowed nodes."""
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    walk = walk_matrix(knn_gaussian_affinity(x, neighbors=4, scale_neighbor=2), steps=2)
    exclude = torch.eye(8, dtype=torch.bool)
    exclude[0, 1] = exclude[1, 0] = True  # 0 and 1 are augmentations of one image
    expected = walk.masked_fill(exclude, 0)
    expected = expected / expected.sum(1, keepdim=True)
    draws = 20000
    generator = torch.Generator().manual_seed(1)
    counts = torch.zeros(8, 8, dtype=torch.float64)
    for _ in range(draws // 100):
        partners = sample_walk_partners(walk.repeat(100, 1), exclude.repeat(100, 1), generator)
        counts.index_put_(
            (torch.arange(8).repeat(100), partners), torch.ones(800, dtype=torch.float64), True
        )
    frequencies = counts / draws
    assert torch.all(frequencies[exclude] == 0)
    # Binomial standard error is at most 0.5 / sqrt(draws) = 0.0035; allow five of them.
    assert torch.max(torch.abs(frequencies - expected)) < 5 * 0.5 / math.sqrt(draws)


def test_a_row_with_no_mass_left_draws_uniformly_over_allowed_nodes() -> None:
    walk = torch.zeros(3, 3)
    walk[:, 0] = 1.0
    exclude = torch.eye(3, dtype=torch.bool)
    partners = sample_walk_partners(walk, exclude, torch.Generator().manual_seed(0))
    assert partners[0].item() in (1, 2)
    assert partners[1].item() == 0 and partners[2].item() == 0
