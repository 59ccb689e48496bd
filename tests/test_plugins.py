"""Methods as plug-ins: the registry, method sections of the config, view settings a method
cannot honour, and the fail-fast path of the jobs (before torch, DeepSpeed or Ray)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ray_ssl.config import (
    ConfigError,
    config_from_dict,
    load_config,
    method_plugins,
    to_dict,
    training_views,
)

REPO = Path(__file__).resolve().parents[1]
HEAVY_MODULES = ("torch", "deepspeed", "ray")
LOCAL_PRESET_OF = {"franca": "local"}  # else <method>_local


def test_every_method_is_registered_with_its_local_preset() -> None:
    plugins = method_plugins()
    assert {"franca", "instdisc", "vicreg", "simclr"} <= set(plugins)
    for name in plugins:
        config = load_config(LOCAL_PRESET_OF.get(name, f"{name}_local"))
        assert config.train.method == name
        assert config.method_settings is config.methods[name] is getattr(config, name)
        training_views(config)  # each local preset suits its method


def test_method_sections_round_trip_and_name_unknown_keys() -> None:
    config = load_config("vicreg_local", ["vicreg.std_coeff=10", "franca.koleo_weight=0.2"])
    assert (config.vicreg.std_coeff, config.franca.koleo_weight) == (10.0, 0.2)
    saved = to_dict(config)
    assert saved["vicreg"]["expander_dims"] == [1024, 1024, 1024]
    assert config_from_dict(saved) == config
    with pytest.raises(ConfigError, match="unknown config key 'vicreg.std_coef'") as err:
        load_config("vicreg_local", ["vicreg.std_coef=10"])
    assert "std_coeff" in str(err.value)  # the valid keys are listed
    with pytest.raises(ConfigError, match="'byol' is not a registered method") as err:
        load_config("local", ["train.method=byol"])
    assert ", ".join(sorted(method_plugins())) in str(err.value)
    with pytest.raises(ConfigError, match="simclr.temperature=0.0 must be > 0"):
        load_config("simclr_local", ["simclr.temperature=0"])


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("local", ["views.mask=none"], "views.mask=none: Franca's iBOT loss"),
        ("local", ["views.kind=single"], "views.kind=single: Franca trains on multi-crop"),
        ("instdisc_local", ["views.kind=pair"], "views.kind=pair: InstDisc trains on one view"),
        ("instdisc_local", ["views.mask=block"], "views.mask=block: InstDisc uses no masks"),
        ("vicreg_local", ["views.kind=multicrop"], "VICReg trains on two views per sample"),
        ("simclr_local", ["views.mask=cyclic"], "views.mask=cyclic: SimCLR uses no masks"),
        ("vicreg_local", ["vicreg.backbone=vit", "model.in_chans=3"], "model.in_chans=3"),
        ("simclr_local", ["train.num_workers=2"], "simclr.sync_batchnorm needs GPUs"),
    ],
)
def test_view_setting_a_method_cannot_honour_is_one_line(
    preset: str, overrides: list[str], message: str
) -> None:
    config = load_config(preset, overrides)
    with pytest.raises(ConfigError, match=message) as err:
        training_views(config)
    assert "\n" not in str(err.value)


def test_lars_under_zero_partitions_is_refused() -> None:
    with pytest.raises(ConfigError, match="set train.zero_stage=0"):
        load_config("vicreg_local", ["train.zero_stage=2"])


def _run_job(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python jobs/<script> ARGS``, then which heavy modules it imported (printed last)."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{script!r}, *{args!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(REPO / 'jobs' / script)!r}, run_name='__main__')\n"
        "finally:\n"
        f"    print('heavy:', sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("franca_g.py", ["--preset", "nope"], "unknown preset 'nope'"),
        ("pretrain.py", ["--preset", "local", "views.mask=none"], "Franca's iBOT loss"),
        ("instdisc.py", ["--preset", "local", "instdisc.negatives=0"], "instdisc.negatives=0"),
        ("pretrain.py", ["--preset", "simclr_local", "simclr.nope=1"], "'simclr.nope'"),
    ],
)
def test_jobs_reject_bad_input_before_heavy_imports(
    tmp_path: Path, script: str, args: list[str], message: str
) -> None:
    result = _run_job(script, args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0], result.stderr
    assert result.stdout.strip().splitlines()[-1] == "heavy: []"
