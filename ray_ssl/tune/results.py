"""A finished sweep's results: one row per trial, a CSV + Markdown table and a PNG of the curves.

Pure functions over plain data; :func:`trial_rows` is the one place that reads Tune's
``ResultGrid``. A trial is ``completed`` (reached its last step), ``stopped`` (ended early by the
scheduler, e.g. ASHA), ``failed`` (raised), or ``interrupted`` / ``not started`` (the sweep ended
first).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any

from ray_ssl.tune.spec import yaml_scalar

STEP_KEY = "step"
TOTAL_STEPS_KEY = "total_steps"  # added to every result by the trial's report callback
TABLE_CSV = "sweep_results.csv"
TABLE_MARKDOWN = "sweep_results.md"
CURVES_PNG = "sweep_curves.png"
COMPLETED, STOPPED, FAILED, INTERRUPTED, NOT_STARTED = (
    "completed",
    "stopped",
    "failed",
    "interrupted",
    "not started",
)


def metric_step_key(metric: str) -> str:
    """The result key holding the step at which ``metric`` was measured."""
    return f"{metric}_step"


@dataclass(frozen=True)
class TrialRow:
    """What one trial did."""

    trial_id: str
    status: str
    params: dict[str, Any]
    step: float | None  # last reported step
    total_steps: float | None
    value: float | None  # latest measured metric
    value_step: float | None  # the step it was measured at
    curve: list[tuple[float, float]] = field(default_factory=list)  # (step, fresh value)
    run_uri: str = ""
    error: str = ""


def status_of(last: dict[str, Any], failed: bool) -> str:
    """A trial's status from its last Tune result (``done`` is set on completion and on a
    scheduler's stop; only a completed run reaches its planned last step)."""
    if failed:
        return FAILED
    if not last or STEP_KEY not in last:
        return NOT_STARTED
    if TOTAL_STEPS_KEY in last and last[STEP_KEY] >= last[TOTAL_STEPS_KEY]:
        return COMPLETED
    return STOPPED if last.get("done") else INTERRUPTED


def fresh_curve(history: list[dict[str, Any]], metric: str) -> list[tuple[float, float]]:
    """(step, value) where the metric was measured at that step (carried values dropped)."""
    key = metric_step_key(metric)
    return [
        (float(h[STEP_KEY]), float(h[metric]))
        for h in history
        if metric in h and STEP_KEY in h and h.get(key, h[STEP_KEY]) == h[STEP_KEY]
    ]


def one_line(error: BaseException | None) -> str:
    """The last non-empty line of an error's text (Ray wraps the cause in a traceback)."""
    if error is None:
        return ""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def trial_rows(results: Any, metric: str, dimensions: list[str], runs_uri: str) -> list[TrialRow]:
    """One :class:`TrialRow` per trial of a Tune ``ResultGrid``; runs live in
    ``<runs_uri>/<trial_id>``."""
    rows = []
    for result in results:
        last = dict(result.metrics or {})
        frame = result.metrics_dataframe
        history = frame.to_dict("records") if frame is not None else []
        trial_id = str(last.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1])
        status = status_of(last, result.error is not None)
        rows.append(
            TrialRow(
                trial_id=trial_id,
                status=status,
                params={k: result.config.get(k) for k in dimensions},
                step=last.get(STEP_KEY),
                total_steps=last.get(TOTAL_STEPS_KEY),
                value=last.get(metric),
                value_step=last.get(metric_step_key(metric)),
                curve=fresh_curve(history, metric),
                run_uri="" if status == NOT_STARTED else f"{runs_uri}/{trial_id}",
                error=one_line(result.error),
            )
        )
    return rows


def ranked(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    """Rows by their latest metric, best first; trials without one last."""
    measured = [r for r in rows if r.value is not None and not math.isnan(r.value)]
    unmeasured = [r for r in rows if r not in measured]
    return sorted(measured, key=lambda r: r.value, reverse=mode == "max") + unmeasured


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The trial with the best latest metric among those that trained and measured it after
    step 0 (an untrained network's kNN is never "best")."""
    eligible = [
        r
        for r in rows
        if r.status in (COMPLETED, STOPPED)
        and r.value is not None
        and not math.isnan(r.value)
        and (r.value_step or 0) > 0
    ]
    if not eligible:
        return None
    pick = max if mode == "max" else min
    return pick(eligible, key=lambda r: r.value)


def _columns(rows: list[TrialRow], metric: str) -> tuple[list[str], list[list[Any]]]:
    keys = sorted({k for r in rows for k in r.params})
    header = ["trial", "status", *keys, "step", "total_steps", metric, f"{metric}_step", "run"]
    body = [
        [r.trial_id, r.status, *(yaml_scalar(r.params.get(k)) for k in keys), r.step]
        + [r.total_steps, r.value, r.value_step, r.run_uri or r.error]
        for r in rows
    ]
    return header, body


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.6g}"
    return str(value)


def render_csv(rows: list[TrialRow], metric: str) -> bytes:
    header, body = _columns(rows, metric)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows([[_text(v) for v in line] for line in body])
    return out.getvalue().encode()


def render_markdown(rows: list[TrialRow], metric: str) -> bytes:
    header, body = _columns(rows, metric)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_text(v).replace("|", "/") for v in line) + " |" for line in body]
    return ("\n".join(lines) + "\n").encode()


def plot_trial_curves(rows: list[TrialRow], metric: str) -> bytes:
    """PNG bytes: every trial's measured metric against the step; stopped trials end in an x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if not row.curve:
            continue
        steps, values = zip(*row.curve, strict=True)
        values_text = ", ".join(f"{k}={yaml_scalar(v)}" for k, v in sorted(row.params.items()))
        stopped = f" (stopped at step {_text(row.step)})" if row.status == STOPPED else ""
        label = f"{row.trial_id} {values_text}{stopped}"
        (line,) = ax.plot(steps, values, marker="o", markersize=3, label=label)
        if row.status == STOPPED:
            ax.plot(steps[-1], values[-1], marker="x", markersize=12, color=line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (x: stopped early)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
