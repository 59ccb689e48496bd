"""Balance report of a curation run: cluster-size distributions and their KL divergence to uniform.

KL(p || U) = sum_j p_j log(k p_j) with p_j the fraction of points in cluster j of k (0 for equal
sizes, log k when one cluster holds everything) - the balance measure we report for every level,
next to flat k-means with the same k on the same points, and, when the samples carry class labels,
for the class distribution before and after curation.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ray_ssl.curation.hierarchy import Hierarchy
from ray_ssl.curation.sampling import Selection


def kl_to_uniform(sizes: np.ndarray) -> float:
    """KL divergence (nats) of the distribution ``sizes / sizes.sum()`` to uniform over its bins."""
    sizes = np.asarray(sizes, np.float64)
    p = sizes / sizes.sum()
    nonzero = p > 0
    return float(np.sum(p[nonzero] * np.log(p[nonzero] * len(p))))


def _size_summary(sizes: np.ndarray) -> dict[str, Any]:
    return {
        "n_clusters": len(sizes),
        "empty": int(np.sum(sizes == 0)),
        "min": int(sizes.min()),
        "median": float(np.median(sizes)),
        "max": int(sizes.max()),
        "kl_to_uniform": kl_to_uniform(sizes),
    }


@dataclass
class CurationReport:
    """What the JSON report holds; ``flat_sizes[l]`` are flat k-means sizes with level l's k."""

    hierarchy: Hierarchy
    selection: Selection
    flat_sizes: dict[int, np.ndarray] = field(default_factory=dict)
    labels: np.ndarray | None = None  # class of every point (-1 unknown)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        h, sel = self.hierarchy, self.selection
        levels = []
        for level in range(1, len(h.levels) + 1):
            sizes = h.sizes(level)
            entry = {
                "level": level,
                "inertia": h.levels[level - 1].inertia,
                "sizes": _size_summary(sizes),
                "curated_sizes": _size_summary(sel.shares[level - 1]),
                "caps": {
                    "min": int(sel.caps[level - 1].min()),
                    "max": int(sel.caps[level - 1].max()),
                },
            }
            if level in self.flat_sizes:
                entry["flat_kmeans_sizes"] = _size_summary(self.flat_sizes[level])
            levels.append(entry)
        out: dict[str, Any] = {
            "n_points": h.n_points,
            "selected": len(sel.points),
            "levels": levels,
            **self.extra,
        }
        if self.labels is not None and np.all(self.labels >= 0):
            n_classes = int(self.labels.max()) + 1
            before = np.bincount(self.labels, minlength=n_classes)
            after = np.bincount(self.labels[sel.points], minlength=n_classes)
            out["classes"] = {
                "before": before.tolist(),
                "after": after.tolist(),
                "kl_to_uniform_before": kl_to_uniform(before),
                "kl_to_uniform_after": kl_to_uniform(after),
            }
        return out

    def plot_png(self) -> bytes:
        """Cluster sizes per level, largest first (log scale): hierarchical vs flat k-means."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n_levels = len(self.hierarchy.levels)
        fig, axes = plt.subplots(1, n_levels, figsize=(4.5 * n_levels, 3.6), squeeze=False)
        for level, ax in enumerate(axes[0], 1):
            sizes = np.sort(self.hierarchy.sizes(level))[::-1]
            ax.plot(sizes, label=f"hierarchical (KL {kl_to_uniform(sizes):.3f})")
            if level in self.flat_sizes:
                flat = np.sort(self.flat_sizes[level])[::-1]
                ax.plot(flat, label=f"flat k-means (KL {kl_to_uniform(flat):.3f})", ls="--")
            curated = np.sort(self.selection.shares[level - 1])[::-1]
            ax.plot(curated, label=f"curated sample (KL {kl_to_uniform(curated):.3f})", ls=":")
            ax.set(yscale="symlog", xlabel="cluster rank", ylabel="points", title=f"level {level}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        return buffer.getvalue()
