"""Tune sweep specs: search dimensions parse, and a bad key fails before any trial starts."""

from __future__ import annotations

import pytest
from ray import tune

from ray_ssl.config import ConfigError, load_config
from ray_ssl.tune.sweep import (
    parse_dimension,
    representative_values,
    run_sweep,
    search_space,
    sweep_from_args,
    trial_overrides,
)


def test_dimensions_become_tune_domains() -> None:
    dims = dict(
        parse_dimension(d)
        for d in (
            "optim.base_lr=loguniform:1e-4:1e-2",
            "train.seed=grid:0,1",
            "views.flip_p=choice:0.0,0.5",
        )
    )
    space = search_space(dims)
    assert space["train.seed"] == tune.grid_search([0, 1])
    assert isinstance(space["optim.base_lr"], tune.search.sample.Float)
    assert space["optim.base_lr"].lower == pytest.approx(1e-4)
    assert representative_values(dims) == {
        "optim.base_lr": pytest.approx(1e-4),
        "train.seed": 0,
        "views.flip_p": 0.0,
    }


def test_trial_overrides_resolve_to_a_config() -> None:
    spec = sweep_from_args("local", ["train.epochs=2"], ["optim.base_lr=uniform:0.1:0.2"], name="s")
    config = load_config("local", trial_overrides(spec, {"optim.base_lr": 0.15}, "t0"))
    assert config.optim.base_lr == pytest.approx(0.15)
    assert config.train.epochs == 2
    assert config.train.run_name == "s-t0"


@pytest.mark.parametrize("bad", ["optim.base_lr", "optim.base_lr=normal:0:1", "x=grid"])
def test_malformed_dimension_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="key=kind:args"):
        parse_dimension(bad)


def test_unknown_key_fails_before_any_trial() -> None:
    spec = sweep_from_args("local", [], ["optim.no_such_key=grid:1,2"])
    with pytest.raises(ConfigError, match="optim.no_such_key"):
        run_sweep(spec)
