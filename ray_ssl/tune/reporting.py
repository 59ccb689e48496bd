"""Ray Train reports -> Tune results, each carrying the sweep's metric.

The training loop reports every ``train.log_every`` steps but measures kNN only every
``eval.knn_every`` steps, and Tune requires the sweep's metric in every result. So each result
carries the latest measured value of the metric and ``<metric>_step``, the step it was measured
at (fresh when it equals ``step``); results before the first measurement are not forwarded.
ASHA's rungs sit on measurement steps (its grace period is a multiple of ``eval.knn_every``), so
its decisions always compare fresh values.
"""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from ray_ssl.tune.results import STEP_KEY, TOTAL_STEPS_KEY, metric_step_key


class MetricCarryingReportCallback(TuneReportCallback):
    """A ``TuneReportCallback`` whose results always hold ``metric`` (its latest value)."""

    def __init__(self, metric: str, total_steps: int):
        super().__init__()
        self.metric, self.total_steps = metric, total_steps
        self.latest: tuple[float, float] | None = None  # (value, step)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        result = dict(metrics[0])
        if self.metric in result:
            self.latest = (result[self.metric], result.get(STEP_KEY, 0.0))
        if self.latest is None:
            return  # Tune would reject a result without the metric
        value, step = self.latest
        result.update(
            {
                self.metric: value,
                metric_step_key(self.metric): step,
                TOTAL_STEPS_KEY: self.total_steps,
            }
        )
        super().after_report(run_context, [result, *metrics[1:]], checkpoint)
