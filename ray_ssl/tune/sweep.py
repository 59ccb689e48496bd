"""Ray Tune ablation sweeps over whole training runs.

Each Tune trial is a driver function that resolves the preset plus the trial's sampled values into
a :class:`~ray_ssl.config.Config` and runs one complete :func:`~ray_ssl.train.trainer.run_training`
(its own ``TorchTrainer``); the trainer's reports reach Tune through Ray's ``TuneReportCallback``.
This is the Train V2 way of tuning: Tune schedules runs, Train runs them.

Search dimensions are written ``key=kind:args``::

    optim.base_lr=loguniform:1e-4:1e-2     franca.koleo_weight=grid:0,0.1     train.seed=choice:0,1
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ray_ssl.config import ConfigError, load_config

log = logging.getLogger(__name__)

SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep varies and how it ranks trials."""

    preset: str
    overrides: tuple[str, ...] = ()
    dimensions: dict[str, str] = field(default_factory=dict)  # dotted key -> "kind:args"
    metric: str = "knn_top1"
    mode: str = "max"
    num_samples: int = 1
    max_concurrent: int = 1
    name: str = "sweep"
    storage_path: str = "ray_results"


def _scalar(text: str) -> Any:
    """A number where the text is one (YAML reads ``1e-4`` as a string), else YAML's value."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return yaml.safe_load(text)


def _values(raw: str) -> list[Any]:
    return [_scalar(v) for v in raw.split(",") if v != ""]


def parse_dimension(text: str) -> tuple[str, str]:
    """``"optim.base_lr=loguniform:1e-4:1e-2"`` -> ``("optim.base_lr", "loguniform:1e-4:1e-2")``."""
    key, sep, spec = text.partition("=")
    kind = spec.split(":", 1)[0]
    if not sep or not key or kind not in SEARCH_KINDS or ":" not in spec:
        raise ConfigError(
            f"search dimension '{text}' must look like key=kind:args with kind one of "
            f"{', '.join(SEARCH_KINDS)} (e.g. optim.base_lr=loguniform:1e-4:1e-2)"
        )
    return key.strip(), spec


def search_space(dimensions: dict[str, str]) -> dict[str, Any]:
    """Tune search space for the dotted keys; values are Tune domains."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, spec in dimensions.items():
        kind, _, args = spec.partition(":")
        try:
            if kind == "grid":
                space[key] = tune.grid_search(_values(args))
            elif kind == "choice":
                space[key] = tune.choice(_values(args))
            else:
                low, high = (_scalar(a) for a in args.split(":"))
                sampler = {"uniform": tune.uniform, "loguniform": tune.loguniform}.get(
                    kind, tune.randint
                )
                space[key] = sampler(low, high)
        except ValueError as err:
            raise ConfigError(f"search dimension '{key}={spec}': {err}") from err
    return space


def representative_values(dimensions: dict[str, str]) -> dict[str, Any]:
    """One value of each dimension (the first listed, or the lower bound)."""
    out: dict[str, Any] = {}
    for key, spec in dimensions.items():
        kind, _, args = spec.partition(":")
        listed = kind in ("grid", "choice")
        out[key] = _values(args)[0] if listed else _scalar(args.split(":")[0])
    return out


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")


def trial_overrides(spec: SweepSpec, sampled: dict[str, Any], trial_name: str) -> list[str]:
    """The overrides of one trial: the sweep's, the sampled values, and its own run name."""
    values = [f"{key}={_yaml_scalar(value)}" for key, value in sampled.items()]
    return [
        *spec.overrides,
        *values,
        f"train.run_name={spec.name}-{trial_name}",
        f"train.storage_path={spec.storage_path}",
    ]


def _trial(sampled: dict[str, Any], spec: SweepSpec) -> None:
    """One Tune trial: a whole training run whose reports flow to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_ssl.train.trainer import run_training

    trial_name = tune.get_context().get_trial_name()
    config = load_config(spec.preset, trial_overrides(spec, sampled, trial_name))
    run_training(config, callbacks=[TuneReportCallback()])


def run_sweep(spec: SweepSpec) -> Any:
    """Run the sweep; returns Tune's ``ResultGrid`` (best trial by ``spec.metric``)."""
    from ray import tune

    # Resolve the overrides with one value of every dimension before any trial starts, so that
    # an unknown key or a value of the wrong type is one line now, not a failed trial later.
    load_config(spec.preset, trial_overrides(spec, representative_values(spec.dimensions), "check"))
    tuner = tune.Tuner(
        tune.with_parameters(_trial, spec=spec),
        param_space=search_space(spec.dimensions),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent,
        ),
        run_config=tune.RunConfig(name=spec.name, storage_path=_absolute(spec.storage_path)),
    )
    results = tuner.fit()
    best = results.get_best_result()
    log.info("best trial %s: %s=%s", best.path, spec.metric, best.metrics.get(spec.metric))
    return results


def _absolute(path: str) -> str:
    return path if path.startswith("s3://") else str(Path(path).absolute())


def sweep_from_args(
    preset: str,
    overrides: Sequence[str],
    dimensions: Sequence[str],
    **options: Any,
) -> SweepSpec:
    """A :class:`SweepSpec` from CLI-style strings."""
    return SweepSpec(
        preset=preset,
        overrides=tuple(overrides),
        dimensions=dict(parse_dimension(d) for d in dimensions),
        **options,
    )
