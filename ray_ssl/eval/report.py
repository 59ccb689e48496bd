"""The final report of a training run: one JSON document and a PNG of the loss and kNN curves.

Pure rendering (bytes out); the caller writes them where the run lives.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
CURVES_FILE = "curves.png"
KNN_KEY = "knn_top1"
LOSS_PREFIX = "loss"
# Weighted kNN (k=20, cosine, T=0.07) on raw pixels over the full Fashion-MNIST train/test split.
PIXEL_KNN_FASHION_MNIST_FULL = 0.846


def _series(history: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    rows = [h for h in history if key in h and "step" in h]
    return [h["step"] for h in rows], [h[key] for h in rows]


def loss_keys(history: list[dict[str, float]]) -> list[str]:
    """``loss`` and its parts (``*_loss``) that appear in the history."""
    keys = {k for h in history for k in h if k == LOSS_PREFIX or k.endswith("_" + LOSS_PREFIX)}
    return sorted(keys, key=lambda k: (k != LOSS_PREFIX, k))


def summarize(
    config: dict[str, Any], history: list[dict[str, float]], pixel_baseline: float | None
) -> dict[str, Any]:
    """The report document: config, final metrics, teacher kNN against the pixel baseline."""
    losses = [h for h in history if LOSS_PREFIX in h]
    _, knn = _series(history, KNN_KEY)
    return {
        "config": config,
        "final_metrics": losses[-1] if losses else {},
        "knn": {
            "k": config.get("eval", {}).get("knn_k"),
            "temperature": config.get("eval", {}).get("knn_temperature"),
            "teacher_top1_initial": knn[0] if knn else None,
            "teacher_top1_final": knn[-1] if knn else None,
            "pixel_baseline_top1": pixel_baseline,
            "pixel_baseline_full_fashion_mnist_reference": PIXEL_KNN_FASHION_MNIST_FULL,
        },
        "history": history,
    }


def plot_curves(history: list[dict[str, float]], pixel_baseline: float | None) -> bytes:
    """PNG bytes: losses against step (left), teacher kNN top-1 against step (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, knn_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for key in loss_keys(history):
        steps, values = _series(history, key)
        loss_ax.plot(steps, values, label=key)
    loss_ax.set(xlabel="step", ylabel="loss", title="training loss")
    loss_ax.legend()
    steps, values = _series(history, KNN_KEY)
    knn_ax.plot(steps, [100 * v for v in values], marker="o", label="teacher CLS")
    if pixel_baseline is not None:
        knn_ax.axhline(100 * pixel_baseline, color="gray", linestyle="--", label="raw pixels")
    knn_ax.set(xlabel="step", ylabel="top-1 (%)", title="weighted kNN (k=20, T=0.07)")
    knn_ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def render_report(
    config: dict[str, Any], history: list[dict[str, float]], pixel_baseline: float | None
) -> dict[str, bytes]:
    """File name -> contents of the report (``report.json``) and its curves (``curves.png``)."""
    document = summarize(config, history, pixel_baseline)
    knn = document["knn"]
    log.info(
        "teacher kNN top-1 %s -> %s; raw pixels %s",
        knn["teacher_top1_initial"],
        knn["teacher_top1_final"],
        pixel_baseline,
    )
    return {
        REPORT_FILE: json.dumps(document, indent=1).encode(),
        CURVES_FILE: plot_curves(history, pixel_baseline),
    }
