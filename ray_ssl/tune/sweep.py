"""Ray Tune ablation sweeps over whole training runs (the Ray Train V2 way).

Each trial is a driver function: it resolves the preset, the sweep's overrides and its sampled
values into a :class:`~ray_ssl.config.Config` and runs one complete
:func:`~ray_ssl.train.trainer.run_training` (its own ``TorchTrainer``), whose reports reach Tune
through :class:`~ray_ssl.tune.reporting.MetricCarryingReportCallback`.

Before any trial starts, on the driver: every listed value of every dimension is resolved and
planned (an unknown key, a bad value or missing shards is one line now, not a failed trial
later), relative paths are made absolute against the user's directory (trials run in Tune's
per-trial directories), and the number of concurrent trials is fitted to the cluster.

Layout under ``<train.storage_path>/<name>/`` (the sweep directory, Tune's experiment directory):
Tune's per-trial directories ``<trial_id>/`` (params.json, progress.csv, result.json,
error.txt), each trial's training run ``runs/<trial_id>/`` (checkpoints, report, export), and at
the end ``sweep_results.csv``, ``sweep_results.md`` and ``sweep_curves.png``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from ray_ssl.config import Config, ConfigError, load_config
from ray_ssl.errors import UserError
from ray_ssl.paths import resolve_config_paths
from ray_ssl.storage import resolve, write_bytes_atomic
from ray_ssl.tune.resources import TrialNeeds, concurrent_trials, trial_driver_resources
from ray_ssl.tune.results import (
    CURVES_PNG,
    FAILED,
    INTERRUPTED,
    NOT_STARTED,
    TABLE_CSV,
    TABLE_MARKDOWN,
    TrialRow,
    best_row,
    plot_trial_curves,
    ranked,
    render_csv,
    render_markdown,
    trial_rows,
)
from ray_ssl.tune.spec import SweepSpec, representative_values, value_overrides

log = logging.getLogger(__name__)

KNN_METRIC = "knn_top1"
RUNS_DIR = "runs"


class SweepError(UserError, RuntimeError):
    """A sweep whose trials failed; the message names the first failure and where its log is."""


@dataclass(frozen=True)
class SweepPlan:
    """What the driver settled before any trial: where the sweep lives and how it stops trials."""

    sweep_uri: str  # <train.storage_path>/<name>
    config: Config  # the representative trial's config (storage settings, paths)
    max_steps: int  # the longest trial's planned steps (ASHA's max_t)
    grace_period: int  # ASHA's first rung, in steps
    needs: TrialNeeds

    @property
    def runs_uri(self) -> str:
        return f"{self.sweep_uri}/{RUNS_DIR}"


@dataclass(frozen=True)
class SweepOutcome:
    """Where a sweep left its results, and how its trials ended."""

    sweep_uri: str
    rows: list[TrialRow]
    best: TrialRow | None
    best_overrides: list[str]
    interrupted: bool
    failed: list[TrialRow]

    @property
    def table_uri(self) -> str:
        return f"{self.sweep_uri}/{TABLE_CSV}"


def trial_overrides(
    spec: SweepSpec, sampled: dict[str, Any], runs_uri: str, trial_id: str
) -> list[str]:
    """The overrides of one trial: the sweep's, its sampled values, and its own run directory.

    The paths are quoted as JSON strings: override values are read as YAML, which takes a Tune
    trial id such as ``02543_00000`` for an (octal) integer.
    """
    return [
        *spec.overrides,
        *value_overrides(sampled),
        f"train.storage_path={json.dumps(runs_uri)}",
        f"train.run_name={json.dumps(trial_id)}",
    ]


def _resolved(spec: SweepSpec, overrides: list[str]) -> Config:
    return resolve_config_paths(load_config(spec.preset, overrides), spec.base_dir)


def _metric_interval(config: Config, metric: str) -> int:
    """Steps between measurements of ``metric`` (kNN is measured every eval.knn_every steps)."""
    return config.eval.knn_every if metric == KNN_METRIC else config.train.log_every


def _check_metric(config: Config, spec: SweepSpec) -> None:
    if spec.metric == KNN_METRIC and config.data.eval_uri is None:
        raise ConfigError(
            f"--metric {KNN_METRIC} needs labelled held-out shards: set data.eval_uri, or rank "
            "by another metric (e.g. --metric loss --mode min)"
        )
    if spec.scheduler != "asha":
        return
    interval = _metric_interval(config, spec.metric)
    if interval < 1:
        raise ConfigError(
            f"--scheduler asha compares {spec.metric} at its rungs; set eval.knn_every > 0"
        )
    grace = spec.grace_period or interval
    if grace % interval:
        raise ConfigError(
            f"--grace-period {grace} must be a multiple of the {spec.metric} interval "
            f"({interval} steps) so that ASHA's rungs compare freshly measured values"
        )
    if spec.reduction_factor < 2:
        raise ConfigError(f"--reduction-factor {spec.reduction_factor} must be >= 2")


def plan_sweep(spec: SweepSpec) -> SweepPlan:
    """Check every listed value of every dimension and plan the sweep; starts no trial."""
    if spec.num_samples < 1:
        raise ConfigError(f"--samples {spec.num_samples} must be >= 1")
    if spec.max_concurrent is not None and spec.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent {spec.max_concurrent} must be >= 1")
    base = representative_values(spec.dimensions)
    variants = [base] + [
        {**base, key: value}
        for key, dim in spec.dimensions.items()
        for value in dim.checked_values()[1:]
    ]
    configs = [_resolved(spec, [*spec.overrides, *value_overrides(v)]) for v in variants]
    for config in configs:
        _check_metric(config, spec)
    from ray_ssl.train.trainer import plan_run  # torch: after the checks of the config alone

    planned = [(config, plan_run(config)[0]) for config in configs]  # reads the shard sets
    config = planned[0][0]
    needs = TrialNeeds.of(config)
    for other, _ in planned[1:]:
        needs = needs.union(TrialNeeds.of(other))
    max_steps = max(plan.total_steps for _, plan in planned)
    grace = spec.grace_period or _metric_interval(config, spec.metric) or 1
    if spec.scheduler == "asha" and grace >= max_steps:
        log.warning(
            "ASHA's grace period %d >= the %d steps of a trial: it stops none", grace, max_steps
        )
    sweep_uri = f"{config.train.storage_path.rstrip('/')}/{spec.name}"
    return SweepPlan(sweep_uri, config, max_steps, grace, needs)


def _trial(sampled: dict[str, Any], spec: SweepSpec, runs_uri: str) -> None:
    """One Tune trial: a whole training run whose reports flow to Tune."""
    from ray import tune

    from ray_ssl.train.trainer import plan_run, run_training
    from ray_ssl.tune.reporting import MetricCarryingReportCallback

    trial_id = tune.get_context().get_trial_id()
    config = _resolved(spec, trial_overrides(spec, sampled, runs_uri, trial_id))
    plan, _ = plan_run(config)
    run_training(config, callbacks=[MetricCarryingReportCallback(spec.metric, plan.total_steps)])


def _trial_dirname(trial: Any) -> str:
    return str(trial.trial_id)


def _scheduler(spec: SweepSpec, plan: SweepPlan) -> Any:
    if spec.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="step",
        max_t=plan.max_steps + 1,  # ASHA stops a trial at max_t: let every run end by itself
        grace_period=plan.grace_period,
        reduction_factor=spec.reduction_factor,
    )


def _warn_if_storage_is_node_local(sweep_uri: str) -> None:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and not sweep_uri.startswith("s3://"):
        log.warning(
            "%s is a local path on a %d-node cluster: trials on other nodes write their runs "
            "there only if it is a shared filesystem; use train.storage_path=s3://...",
            sweep_uri,
            len(nodes),
        )


def _write_results(plan: SweepPlan, rows: list[TrialRow], metric: str) -> None:
    storage = plan.config.storage
    sweep = resolve(plan.sweep_uri, storage)
    write_bytes_atomic(sweep.join(TABLE_CSV), render_csv(rows, metric))
    write_bytes_atomic(sweep.join(TABLE_MARKDOWN), render_markdown(rows, metric))
    write_bytes_atomic(sweep.join(CURVES_PNG), plot_trial_curves(rows, metric))


def run_sweep(spec: SweepSpec) -> SweepOutcome:
    """Plan, run and summarise the sweep (table + curves written into the sweep directory)."""
    plan = plan_sweep(spec)
    import ray
    from ray import tune
    from ray.tune.error import TuneError

    from ray_ssl.train.trainer import storage_for_ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    _warn_if_storage_is_node_local(plan.sweep_uri)
    max_concurrent = spec.max_concurrent or concurrent_trials(plan.needs, ray.cluster_resources())
    log.info(
        "sweep %s: up to %d trials at once (%g CPUs, %g GPUs each), results in %s",
        spec.name,
        max_concurrent,
        plan.needs.cpus,
        plan.needs.gpus,
        plan.sweep_uri,
    )
    storage_path, filesystem = storage_for_ray(plan.config)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, spec=spec, runs_uri=plan.runs_uri), trial_driver_resources()
    )
    tuner = tune.Tuner(
        trainable,
        param_space={key: dim.domain() for key, dim in spec.dimensions.items()},
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            num_samples=spec.num_samples,
            max_concurrent_trials=max_concurrent,
            scheduler=_scheduler(spec, plan),
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=storage_path, storage_filesystem=filesystem
        ),
    )
    try:
        results = tuner.fit()
    except TuneError as err:
        raise SweepError(f"sweep {spec.name} failed: {err}") from err
    return summarise(spec, plan, results)


def summarise(spec: SweepSpec, plan: SweepPlan, results: Any) -> SweepOutcome:
    """Rows, table and curves of a finished (or interrupted) sweep."""
    rows = ranked(trial_rows(results, spec.metric, list(spec.dimensions), plan.runs_uri), spec.mode)
    _write_results(plan, rows, spec.metric)
    best = best_row(rows, spec.mode)
    best_overrides = [*spec.overrides, *value_overrides(best.params)] if best else []
    return SweepOutcome(
        sweep_uri=plan.sweep_uri,
        rows=rows,
        best=best,
        best_overrides=best_overrides,
        interrupted=any(r.status in (INTERRUPTED, NOT_STARTED) for r in rows),
        failed=[r for r in rows if r.status == FAILED],
    )


def failure_message(outcome: SweepOutcome) -> str:
    """One line naming how many trials failed, the first error and where its log is."""
    first = outcome.failed[0]
    return (
        f"{len(outcome.failed)} of {len(outcome.rows)} trials failed; trial {first.trial_id}: "
        f"{first.error} (log: {outcome.sweep_uri}/{first.trial_id}/error.txt)"
    )
