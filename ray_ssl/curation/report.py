"""Balance report of a curation run: cluster-size distributions and their KL divergence to uniform.

KL(p || U) = sum_j p_j log(k p_j) with p_j the fraction of points in cluster j of k (0 for equal
sizes, log k when one cluster holds everything) - the balance measure we report. Like for like,
the curated sample is compared with samples of the same size - a uniform random subset and a
balanced sample from one flat k-means - over the clusters of every level of the hierarchy and,
when the samples carry class labels, over the classes (with the pool before curation). The
cluster sizes of the hierarchy and of flat k-means with each level's k are reported too.
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


CURATED = "curated"
RANDOM_SUBSET, FLAT_BALANCED = "random", "flat_kmeans_balanced"
SAMPLE_NAMES = {
    RANDOM_SUBSET: "random subset",
    FLAT_BALANCED: "flat k-means + balanced sampling",
    CURATED: "hierarchical k-means + balanced sampling (curated)",
}
SAMPLE_STYLE = {RANDOM_SUBSET: "#999999", FLAT_BALANCED: "#e08a2c", CURATED: "#2c6fbb"}
POOL_COLOR = "#d8d8d8"
LEGEND_HEADROOM = 1.45  # y range over the tallest bar: room for the legend above the bars
CAPTION = (
    "KL to uniform (nats): 0 = every class (left) or cluster (right) equally represented; "
    "lower = more balanced. All samples have the same size."
)


@dataclass
class CurationReport:
    """What the JSON report and the picture hold.

    ``flat_sizes[l]``: cluster sizes of flat k-means with level l's k; ``baselines``: row ids of
    other samples of the selection's size (a random subset, a balanced sample from flat k-means),
    compared with the curated sample over the classes and over every level's clusters.
    """

    hierarchy: Hierarchy
    selection: Selection
    flat_sizes: dict[int, np.ndarray] = field(default_factory=dict)
    labels: np.ndarray | None = None  # class of every point (-1 unknown)
    baselines: dict[str, np.ndarray] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    embedding: str = ""  # what was clustered, said on the picture
    extra: dict[str, Any] = field(default_factory=dict)

    def _samples(self) -> dict[str, np.ndarray]:
        return {**self.baselines, CURATED: self.selection.points}

    def _level_counts(self, level: int) -> dict[str, np.ndarray]:
        """Points of every sample per cluster of ``level``."""
        labels, k = self.hierarchy.point_labels(level), self.hierarchy.n_clusters(level)
        return {
            name: np.bincount(labels[rows], minlength=k) for name, rows in self._samples().items()
        }

    def _class_counts(self) -> dict[str, np.ndarray] | None:
        """Points per class of the pool and of every sample; None without labels."""
        if self.labels is None or len(self.labels) == 0 or np.any(self.labels < 0):
            return None
        n_classes = max(int(self.labels.max()) + 1, len(self.class_names))
        counts = {"pool": np.bincount(self.labels, minlength=n_classes)}
        for name, rows in self._samples().items():
            counts[name] = np.bincount(self.labels[rows], minlength=n_classes)
        return counts

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
                "samples_kl_to_uniform": {
                    name: kl_to_uniform(c) for name, c in self._level_counts(level).items()
                },
            }
            if level in self.flat_sizes:
                entry["flat_kmeans_sizes"] = _size_summary(self.flat_sizes[level])
            levels.append(entry)
        out: dict[str, Any] = {
            "n_points": h.n_points,
            "selected": len(sel.points),
            "embedding": self.embedding,
            "levels": levels,
            **self.extra,
        }
        counts = self._class_counts()
        if counts is not None:
            out["classes"] = {
                "names": self.class_names,
                "before": counts["pool"].tolist(),
                "after": counts[CURATED].tolist(),
                "kl_to_uniform_before": kl_to_uniform(counts["pool"]),
                "kl_to_uniform_after": kl_to_uniform(counts[CURATED]),
                "baselines": {
                    name: {
                        "counts": counts[name].tolist(),
                        "kl_to_uniform": kl_to_uniform(counts[name]),
                    }
                    for name in self.baselines
                },
            }
        return out

    def plot_png(self) -> bytes:
        """Class balance of the pool and of each sample (when labelled) beside the KL to uniform
        of each sample over every level's clusters."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        counts = self._class_counts()
        panels = 2 if counts is not None else 1
        fig, axes = plt.subplots(
            1, panels, figsize=(7.0 * panels, 5.2), squeeze=False, width_ratios=[1.4, 1][:panels]
        )
        if counts is not None:
            self._plot_classes(axes[0][0], counts)
        self._plot_levels(axes[0][-1])
        fig.suptitle(
            f"Curation: {len(self.selection.points)} of {self.hierarchy.n_points} samples "
            f"selected\nembedding: {self.embedding or 'unknown'}",
            fontsize=12,
        )
        fig.text(0.5, 0.015, CAPTION, ha="center", fontsize=9, style="italic")
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        return buffer.getvalue()

    def _plot_classes(self, ax: Any, counts: dict[str, np.ndarray]) -> None:
        n_classes = len(counts["pool"])
        names = self.class_names or [str(c) for c in range(n_classes)]
        series = ["pool", *self.baselines, CURATED]
        width = 0.8 / len(series)
        x = np.arange(n_classes)
        for i, name in enumerate(series):
            share = counts[name] / max(1, counts[name].sum())
            label = "pool (before curation)" if name == "pool" else SAMPLE_NAMES.get(name, name)
            ax.bar(
                x + (i - (len(series) - 1) / 2) * width,
                share,
                width,
                color=POOL_COLOR if name == "pool" else SAMPLE_STYLE.get(name),
                label=f"{label}: KL {kl_to_uniform(counts[name]):.3f}",
            )
        ax.axhline(1.0 / n_classes, color="black", ls="--", lw=1, label="uniform")
        tallest = max(c.max() / max(1, c.sum()) for name, c in counts.items() if name in series)
        ax.set_ylim(0, tallest * LEGEND_HEADROOM)
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set(ylabel="share of the samples in the class", title="Class balance")
        ax.legend(fontsize=7, loc="upper right")

    def _plot_levels(self, ax: Any) -> None:
        n_levels = len(self.hierarchy.levels)
        levels = np.arange(1, n_levels + 1)
        per_level = [self._level_counts(level) for level in levels]
        for name in [*self.baselines, CURATED]:
            kl = [kl_to_uniform(c[name]) for c in per_level]
            ax.plot(
                levels,
                kl,
                marker="o",
                color=SAMPLE_STYLE.get(name),
                label=SAMPLE_NAMES.get(name, name),
            )
        ax.set_xticks(
            levels, [f"{lv}\n({self.hierarchy.n_clusters(lv)} clusters)" for lv in levels]
        )
        ax.set_ylim(bottom=0)
        ax.set(
            xlabel="level of the hierarchy",
            ylabel="KL to uniform over the level's clusters (nats)",
            title="Balance over the hierarchy's clusters",
        )
        ax.legend(fontsize=7)
