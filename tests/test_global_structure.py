"""The global-structure metric on hand-made embeddings, and the class tree it compares against."""

from __future__ import annotations

import numpy as np
import pytest

from ray_ssl.data.sources import FASHION_MNIST_CLASSES
from ray_ssl.eval.class_tree import ClassTree, ClassTreeError, load_class_tree
from ray_ssl.eval.global_structure import class_tree_structure, label_free_structure

CLASSES = list(FASHION_MNIST_CLASSES)


def tree_shaped_embedding(tree: ClassTree, classes: list[str]) -> np.ndarray:
    """One point per class: its superclass's axis x 10 plus its own unit axis.

    Two classes of one superclass lie sqrt(2) apart, of two superclasses sqrt(202): distances
    rank exactly as the tree's (height 2: 1 within a group, 2 across).
    """
    supers = sorted({tree.superclass(c) for c in classes})
    points = np.zeros((len(classes), len(supers) + len(classes)))
    for row, name in enumerate(classes):
        points[row, supers.index(tree.superclass(name))] = 10.0
        points[row, len(supers) + row] = 1.0
    return points


def samples_around(points: np.ndarray, per_class: int, noise: float, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(points)), per_class)
    x = points[labels] + noise * rng.standard_normal((len(labels), points.shape[1]))
    return x, labels


def test_fashion_mnist_tree_ships_and_covers_every_class() -> None:
    tree = load_class_tree("fashion_mnist")
    assert sorted(tree.paths) == sorted(CLASSES)
    assert tree.superclass("Sneaker") == tree.superclass("Sandal") == "footwear"
    assert tree.superclass("Bag") == "Bag"
    assert tree.distance("Shirt", "Shirt") == 0
    assert tree.distance("Shirt", "Coat") == 1
    assert tree.distance("Shirt", "Sandal") == 2
    assert tree.distance("Bag", "Trouser") == 2
    assert tree.distance("Bag", "Sandal") == 2


def test_a_bad_tree_file_is_a_one_line_error(tmp_path) -> None:
    bad = tmp_path / "tree.yaml"
    bad.write_text("- tops: [a, b]\n- {x: [c], y: [d]}\n")
    with pytest.raises(ClassTreeError, match="one-key mapping"):
        load_class_tree(str(bad))
    with pytest.raises(ClassTreeError, match="no class tree"):
        load_class_tree("nope")
    tree = load_class_tree("fashion_mnist")
    with pytest.raises(ClassTreeError, match="not leaves"):
        tree.distance_matrix(["Shirt", "Hat"])


def test_an_embedding_shaped_like_the_tree_scores_one() -> None:
    tree = load_class_tree("fashion_mnist")
    x, labels = samples_around(tree_shaped_embedding(tree, CLASSES), 5, 0.0, seed=0)
    result = class_tree_structure(x, labels, CLASSES, tree, normalize=False)
    assert result.tree_spearman == pytest.approx(1.0, abs=1e-9)
    assert result.tree_kendall == pytest.approx(1.0, abs=1e-9)
    assert result.superclass_ari == pytest.approx(1.0)


def test_a_shuffled_embedding_scores_about_zero() -> None:
    tree = load_class_tree("fashion_mnist")
    points = tree_shaped_embedding(tree, CLASSES)
    rng = np.random.default_rng(1)
    spearman = []
    for seed in range(40):
        x, labels = samples_around(points[rng.permutation(len(points))], 20, 0.02, seed)
        spearman.append(class_tree_structure(x, labels, CLASSES, tree).tree_spearman)
    assert abs(np.mean(spearman)) < 0.1
    assert np.std(spearman) > 0.1  # each draw does vary: the score is not a constant


def test_label_free_metric_separates_structure_from_noise() -> None:
    rng = np.random.default_rng(0)
    # Two well-separated groups of four tight clusters: a clear, stable hierarchy.
    group = np.array([[10.0, 0, 0, 0], [0, 10.0, 0, 0]])
    offsets = rng.standard_normal((8, 4)) * 2.0
    centres = group[np.arange(8) // 4] + offsets
    x = centres[rng.integers(0, 8, 4000)] + 0.05 * rng.standard_normal((4000, 4)) + [0, 0, 30, 0]
    structured = label_free_structure(x, num_centroids=16, cuts=(2, 4), seed=0)
    noise = label_free_structure(rng.standard_normal((4000, 4)), num_centroids=16, cuts=(2, 4))
    assert structured.cophenetic_pearson > 0.9
    assert structured.cophenetic_spearman > 0.7
    assert structured.stability_ari > 0.9
    assert structured.stability_ari > noise.stability_ari
    assert -1.0 <= noise.cophenetic_kendall <= 1.0


def test_label_free_metric_needs_enough_points() -> None:
    with pytest.raises(ValueError, match="too few"):
        label_free_structure(np.ones((10, 3)), num_centroids=8)
