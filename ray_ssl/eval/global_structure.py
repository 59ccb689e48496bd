"""How well an embedding keeps the global structure of the data (SAG-VICReg, arXiv 2506.18104).

The paper proposes a label-free metric of global structure built from an affinity hierarchy,
cophenetic correlation and the stability of its cuts (Rand index). Its exact recipe is not
available to us; this module implements the following, each choice ours:

- label-free (:func:`label_free_structure`): k-means centroids of the embedding, an
  average-linkage (UPGMA) hierarchy over them, and the cophenetic correlation (Sokal & Rohlf
  1962) between the hierarchy's cophenetic distances and the centroids' distances, as Pearson,
  Spearman and Kendall; plus its stability: the adjusted Rand index (Hubert & Arabie 1985)
  between the cuts of hierarchies built on two random halves of the data, each half's cut
  extended to every point through its nearest centroid, averaged over the cut sizes;
- with labels and a class tree (:func:`class_tree_structure`): Spearman and Kendall between the
  distances of class centroids in the embedding and the classes' distances in the tree, and the
  adjusted Rand index between a cut of the class-centroid hierarchy (as many clusters as
  superclasses) and the superclasses.

Distances are Euclidean, between L2-normalised embeddings unless ``normalize=False`` (SSL
embeddings are compared by cosine; a tree-shaped test embedding is not on a sphere). SciPy and
scikit-learn do the statistics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.cluster.hierarchy import cophenet, fcluster, linkage
from scipy.spatial.distance import pdist, squareform
from scipy.stats import kendalltau, pearsonr, spearmanr
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from ray_ssl.eval.class_tree import ClassTree

LINKAGE_METHOD = "average"  # UPGMA, the hierarchy cophenetic correlation was defined on
DEFAULT_CENTROIDS = 64
DEFAULT_CUTS = (2, 4, 8, 16)


@dataclass(frozen=True)
class LabelFreeStructure:
    cophenetic_pearson: float
    cophenetic_spearman: float
    cophenetic_kendall: float
    stability_ari: float  # mean over the cut sizes

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class ClassTreeStructure:
    tree_spearman: float
    tree_kendall: float
    superclass_ari: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _normalized(embeddings: np.ndarray, normalize: bool = True) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"embeddings must be a non-empty 2-D array, got shape {x.shape}")
    if not normalize:
        return x
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float64).tiny)


def _centroids(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    return KMeans(n_clusters=k, n_init=1, random_state=seed).fit(x).cluster_centers_


def _cut_labels(points: np.ndarray, centroids: np.ndarray, clusters: int) -> np.ndarray:
    """Each point's cluster when the centroid hierarchy is cut into ``clusters`` clusters."""
    cut = fcluster(linkage(centroids, LINKAGE_METHOD), t=clusters, criterion="maxclust")
    nearest = np.argmin((centroids**2).sum(1)[None, :] - 2.0 * points @ centroids.T, axis=1)
    return cut[nearest]


def label_free_structure(
    embeddings: np.ndarray,
    num_centroids: int = DEFAULT_CENTROIDS,
    cuts: tuple[int, ...] = DEFAULT_CUTS,
    seed: int = 0,
) -> LabelFreeStructure:
    """Cophenetic correlations of the centroid hierarchy and the stability of its cuts."""
    x = _normalized(embeddings)
    half = len(x) // 2
    if half < num_centroids:
        raise ValueError(
            f"{len(x)} embeddings are too few for {num_centroids} centroids per half; "
            "pass more samples or fewer centroids"
        )
    centroids = _centroids(x, num_centroids, seed)
    distances = pdist(centroids)
    coph = cophenet(linkage(centroids, LINKAGE_METHOD))
    order = np.random.default_rng(seed).permutation(len(x))
    half_centroids = [
        _centroids(x[rows], num_centroids, seed) for rows in (order[:half], order[half:])
    ]
    stability = [
        adjusted_rand_score(*(_cut_labels(x, c, clusters) for c in half_centroids))
        for clusters in cuts
    ]
    return LabelFreeStructure(
        cophenetic_pearson=float(pearsonr(coph, distances).statistic),
        cophenetic_spearman=float(spearmanr(coph, distances).statistic),
        cophenetic_kendall=float(kendalltau(coph, distances).statistic),
        stability_ari=float(np.mean(stability)),
    )


def class_centroids(
    embeddings: np.ndarray, labels: np.ndarray, num_classes: int, normalize: bool = True
) -> np.ndarray:
    """Mean (L2-normalised) embedding of each class [num_classes, D]; label -1 rows skipped."""
    x = _normalized(embeddings, normalize)
    labels = np.asarray(labels)
    present = [c for c in range(num_classes) if np.any(labels == c)]
    if len(present) != num_classes:
        missing = sorted(set(range(num_classes)) - set(present))
        raise ValueError(f"classes {missing} have no samples; the class-tree metric needs all")
    return np.stack([x[labels == c].mean(axis=0) for c in range(num_classes)])


def class_tree_structure(
    embeddings: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    tree: ClassTree,
    normalize: bool = True,
) -> ClassTreeStructure:
    """Rank agreement of class-centroid distances with tree distances, and superclass ARI."""
    centroids = class_centroids(embeddings, labels, len(class_names), normalize)
    embedded = pdist(centroids)
    tree_distances = squareform(tree.distance_matrix(class_names), checks=False)
    superclasses = [tree.superclass(name) for name in class_names]
    cut = fcluster(
        linkage(centroids, LINKAGE_METHOD), t=len(set(superclasses)), criterion="maxclust"
    )
    return ClassTreeStructure(
        tree_spearman=float(spearmanr(embedded, tree_distances).statistic),
        tree_kendall=float(kendalltau(embedded, tree_distances).statistic),
        superclass_ari=float(adjusted_rand_score(superclasses, cut)),
    )
