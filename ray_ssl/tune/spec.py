"""What a sweep varies: search dimensions from the command line or a YAML ablation spec.

A dimension is a dotted config override key (``optim.base_lr``, ``views.mask``,
``franca.nesting_levels``; any key that ``load_config`` accepts as ``key=value``) and a Tune
domain over its values. On the command line::

    optim.base_lr=loguniform:1e-4:1e-2     views.mask=grid:cyclic,block     train.seed=choice:0,1

In a YAML spec (``ray-ssl tune --spec ablation.yaml``)::

    params:
      views.mask: [cyclic, block]                  # a list is a grid
      franca.nesting_levels: [1, 5]
      optim.base_lr: {loguniform: [1.0e-4, 1.0e-2]}
      train.seed: {choice: [0, 1, 2]}
    overrides: [train.epochs=1]                    # optional, fixed for every trial
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ray_ssl.config import ConfigError

LISTED_KINDS = ("grid", "choice")
RANGE_KINDS = ("uniform", "loguniform", "randint")
SEARCH_KINDS = LISTED_KINDS + RANGE_KINDS
SPEC_KEYS = ("params", "overrides")
SCHEDULERS = ("fifo", "asha")


@dataclass(frozen=True)
class Dimension:
    """One searched config key: ``kind`` and its listed values or ``(low, high)`` bounds."""

    kind: str
    values: tuple[Any, ...]

    def domain(self) -> Any:
        """The Tune search domain."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        sampler = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
        return sampler[self.kind](*self.values)

    def checked_values(self) -> tuple[Any, ...]:
        """Values to validate before any trial: every listed value, or the lower bound."""
        return self.values if self.kind in LISTED_KINDS else self.values[:1]


def make_dimension(key: str, kind: str, values: list[Any] | tuple[Any, ...]) -> Dimension:
    """A validated :class:`Dimension`; a malformed one is a one-line ConfigError."""
    if kind not in SEARCH_KINDS:
        raise ConfigError(f"search dimension '{key}': kind '{kind}' is not one of {SEARCH_KINDS}")
    if kind in LISTED_KINDS and not values:
        raise ConfigError(f"search dimension '{key}': {kind} needs at least one value")
    if kind in RANGE_KINDS:
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if len(values) != 2 or not numeric or not values[0] < values[1]:
            raise ConfigError(
                f"search dimension '{key}': {kind} needs two numbers low < high, got {values}"
            )
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"search dimension '{key}': loguniform bounds must be > 0")
    return Dimension(kind, tuple(values))


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep varies, how it ranks and stops trials, and where it runs from."""

    preset: str
    overrides: tuple[str, ...] = ()
    dimensions: dict[str, Dimension] = field(default_factory=dict)
    metric: str = "knn_top1"
    mode: str = "max"
    num_samples: int = 1
    max_concurrent: int | None = None  # None: as many trials as the cluster's resources fit
    name: str = "sweep"
    scheduler: str = "fifo"  # fifo | asha
    grace_period: int | None = None  # ASHA's first rung in steps; None = eval.knn_every
    reduction_factor: int = 2
    base_dir: str | None = None  # where relative paths resolve (the user's directory)


def scalar(text: str) -> Any:
    """A number where the text is one (YAML reads ``1e-4`` as a string), else YAML's value."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return yaml.safe_load(text)


def parse_dimension(text: str) -> tuple[str, Dimension]:
    """``"optim.base_lr=loguniform:1e-4:1e-2"`` -> ``("optim.base_lr", Dimension(...))``."""
    key, sep, spec = text.partition("=")
    kind, colon, args = spec.partition(":")
    if not sep or not key.strip() or kind not in SEARCH_KINDS or not colon:
        raise ConfigError(
            f"search dimension '{text}' must look like key=kind:args with kind one of "
            f"{', '.join(SEARCH_KINDS)} (e.g. optim.base_lr=loguniform:1e-4:1e-2)"
        )
    separator = "," if kind in LISTED_KINDS else ":"
    values = [scalar(v) for v in args.split(separator) if v != ""]
    return key.strip(), make_dimension(key.strip(), kind, values)


def _spec_dimension(key: str, raw: Any) -> Dimension:
    if isinstance(raw, list):
        return make_dimension(key, "grid", raw)
    if isinstance(raw, dict) and len(raw) == 1:
        ((kind, values),) = raw.items()
        if isinstance(values, list):
            return make_dimension(key, str(kind), values)
    raise ConfigError(
        f"spec param '{key}' must be a list (grid) or a mapping like {{choice: [a, b]}} or "
        f"{{loguniform: [low, high]}}, got {raw!r}"
    )


def load_spec_file(path: str) -> tuple[dict[str, Dimension], tuple[str, ...]]:
    """(dimensions, overrides) of a YAML ablation spec (format in this module's docstring)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"sweep spec {path} does not exist; pass a YAML file to --spec")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"sweep spec {path} is not valid YAML{where}") from err
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
        raise ConfigError(f"sweep spec {path} must be a mapping with a 'params' mapping")
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(
            f"sweep spec {path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(SPEC_KEYS)}"
        )
    overrides = data.get("overrides") or []
    if isinstance(overrides, dict):
        overrides = [f"{k}={yaml_scalar(v)}" for k, v in overrides.items()]
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"sweep spec {path}: 'overrides' must be a list of key=value strings")
    dimensions = {str(k): _spec_dimension(str(k), v) for k, v in data["params"].items()}
    return dimensions, tuple(overrides)


def yaml_scalar(value: Any) -> str:
    """``value`` as the text of a ``key=value`` override (YAML flow style)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")


def representative_values(dimensions: dict[str, Dimension]) -> dict[str, Any]:
    """One value of each dimension (the first listed, or the lower bound)."""
    return {key: dim.checked_values()[0] for key, dim in dimensions.items()}


def value_overrides(sampled: dict[str, Any]) -> list[str]:
    """``key=value`` override strings of sampled dimension values."""
    return [f"{key}={yaml_scalar(value)}" for key, value in sampled.items()]
