"""Tune sweeps: dimensions and YAML specs parse, results are classified and tabulated, and a real
ASHA sweep run by `ray-ssl tune` from another directory stops a trial and writes its results."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray import tune

from ray_ssl.config import ConfigError, load_config
from ray_ssl.tune.resources import TrialNeeds, concurrent_trials
from ray_ssl.tune.results import (
    COMPLETED,
    FAILED,
    INTERRUPTED,
    NOT_STARTED,
    STOPPED,
    TrialRow,
    best_row,
    fresh_curve,
    render_markdown,
    status_of,
)
from ray_ssl.tune.spec import (
    SweepSpec,
    load_spec_file,
    parse_dimension,
    representative_values,
    value_overrides,
)
from ray_ssl.tune.sweep import plan_sweep, trial_overrides

REPO = Path(__file__).resolve().parents[1]
RAY_SSL = Path(sys.executable).with_name("ray-ssl")


def test_dimensions_become_tune_domains() -> None:
    dims = dict(
        parse_dimension(d)
        for d in (
            "optim.base_lr=loguniform:1e-4:1e-2",
            "train.seed=grid:0,1",
            "views.flip_p=choice:0.0,0.5",
        )
    )
    assert dims["train.seed"].domain() == tune.grid_search([0, 1])
    lr = dims["optim.base_lr"].domain()
    assert isinstance(lr, tune.search.sample.Float) and lr.lower == pytest.approx(1e-4)
    assert representative_values(dims) == {
        "optim.base_lr": pytest.approx(1e-4),
        "train.seed": 0,
        "views.flip_p": 0.0,
    }


@pytest.mark.parametrize(
    "bad", ["optim.base_lr", "optim.base_lr=normal:0:1", "x=grid", "optim.base_lr=uniform:2:1"]
)
def test_malformed_dimension_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="search dimension"):
        parse_dimension(bad)


def test_yaml_spec_lists_are_grids_and_values_become_overrides(tmp_path: Path) -> None:
    spec = tmp_path / "ablation.yaml"
    spec.write_text(
        "params:\n"
        "  views.mask: [cyclic, block]\n"
        "  franca.nesting_levels: [1, 5]\n"
        "  views.global_scale: [[0.3, 1.0], [0.5, 1.0]]\n"
        "  optim.base_lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
        "overrides: [train.epochs=2]\n"
    )
    dims, overrides = load_spec_file(str(spec))
    assert dims["views.mask"].domain() == tune.grid_search(["cyclic", "block"])
    assert dims["optim.base_lr"].kind == "loguniform"
    assert overrides == ("train.epochs=2",)
    sampled = {"views.mask": "block", "franca.nesting_levels": 1, "views.global_scale": [0.5, 1.0]}
    config = load_config("local", [*overrides, *value_overrides(sampled)])
    assert (config.views.mask, config.views.global_scale) == ("block", (0.5, 1.0))
    assert config.franca.nesting_levels == 1 and config.train.epochs == 2


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("params: [a]\n", "'params' mapping"),
        ("params: {a.b: 3}\n", "must be a list"),
        ("params: {a.b: [1]}\nscheduler: asha\n", "unknown key(s) scheduler"),
        ("params: {a.b: {normal: [0, 1]}}\n", "kind 'normal'"),
        ("params: {a.b: [1\n", "not valid YAML at line"),
    ],
)
def test_bad_spec_file_is_one_line(tmp_path: Path, text: str, fragment: str) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_spec_file(str(spec))


def test_trial_overrides_put_the_run_under_the_sweep() -> None:
    spec = SweepSpec(preset="local", overrides=("train.epochs=2",))
    overrides = trial_overrides(spec, {"optim.base_lr": 0.15}, "/runs", "abc_00001")
    config = load_config("local", overrides)
    assert config.optim.base_lr == pytest.approx(0.15) and config.train.epochs == 2
    assert (config.train.storage_path, config.train.run_name) == ("/runs", "abc_00001")
    # A trial id of digits reads as a YAML (octal) integer unless it is quoted.
    digits = load_config("local", trial_overrides(spec, {}, "/runs", "02543_00000"))
    assert digits.train.run_name == "02543_00000"


def test_every_listed_value_is_checked_before_any_trial(tmp_path: Path) -> None:
    spec = SweepSpec(preset="local", dimensions=dict([parse_dimension("views.mask=grid:cyclic,x")]))
    with pytest.raises(ConfigError, match="views.mask"):
        plan_sweep(spec)
    unknown = SweepSpec(preset="local", dimensions=dict([parse_dimension("optim.nope=grid:1,2")]))
    with pytest.raises(ConfigError, match="optim.nope"):
        plan_sweep(unknown)
    no_eval = SweepSpec(preset="local", overrides=("data.eval_uri=null",))
    with pytest.raises(ConfigError, match="needs labelled held-out shards"):
        plan_sweep(no_eval)
    off_rung = SweepSpec(preset="local", scheduler="asha", grace_period=30)  # knn_every=50
    with pytest.raises(ConfigError, match="multiple of the knn_top1 interval"):
        plan_sweep(off_rung)


def test_trials_fit_the_cluster_and_never_fall_below_one() -> None:
    config = load_config("local", ["train.num_workers=2"])  # 2 x 1 CPU + 1 for Ray Data
    assert TrialNeeds.of(config) == TrialNeeds(cpus=3, gpus=0.0)
    assert concurrent_trials(TrialNeeds.of(config), {"CPU": 7.0}) == 2
    gpu = TrialNeeds(cpus=9, gpus=8.0)
    assert concurrent_trials(gpu, {"CPU": 192.0, "GPU": 16.0}) == 2
    assert concurrent_trials(gpu, {"CPU": 0.0}) == 1  # autoscaler not grown yet


def test_trial_status_from_its_last_result() -> None:
    assert status_of({"step": 8.0, "total_steps": 8, "done": True}, failed=False) == COMPLETED
    assert status_of({"step": 4.0, "total_steps": 8, "done": True}, failed=False) == STOPPED
    assert status_of({"step": 4.0, "total_steps": 8, "done": False}, failed=False) == INTERRUPTED
    assert status_of({}, failed=False) == NOT_STARTED
    assert status_of({"step": 4.0}, failed=True) == FAILED


def test_best_ignores_step_zero_and_unfinished_trials() -> None:
    def row(trial: str, status: str, value: float, step: float) -> TrialRow:
        return TrialRow(trial, status, {"k": trial}, step, 8, value, step)

    rows = [
        row("untrained", INTERRUPTED, 0.9, 0.0),
        row("early", STOPPED, 0.5, 4.0),
        row("done", COMPLETED, 0.6, 8.0),
        row("broken", FAILED, 0.99, 8.0),
    ]
    assert best_row(rows, "max").trial_id == "done"
    assert best_row(rows, "min").trial_id == "early"
    assert best_row(rows[:1], "max") is None
    table = render_markdown(rows, "knn_top1").decode().splitlines()
    assert (
        table[0] == "| trial | status | k | step | total_steps | knn_top1 | knn_top1_step | run |"
    )
    assert len(table) == 2 + len(rows)


def test_fresh_curve_drops_carried_values() -> None:
    history = [
        {"step": 0.0, "knn_top1": 0.1, "knn_top1_step": 0.0},
        {"step": 2.0, "knn_top1": 0.1, "knn_top1_step": 0.0, "loss": 3.0},
        {"step": 4.0, "knn_top1": 0.3, "knn_top1_step": 4.0, "loss": 2.0},
    ]
    assert fresh_curve(history, "knn_top1") == [(0.0, 0.1), (4.0, 0.3)]


# --- a real sweep -------------------------------------------------------------------------------

TINY_RUN = [
    "data.uri=data/train",  # relative: resolved against the directory the sweep ran from
    "data.eval_uri=data/test",
    "data.batch_size=32",
    "model.depth=2",
    "train.epochs=1",
    "train.steps_per_epoch=8",
    "train.log_every=4",
    "train.checkpoint_every=8",
    "optim.warmup_epochs=0",
    "eval.knn_every=4",
    "eval.knn_max_train=1000",
    "eval.knn_max_test=300",
]
# LayerScale 1e-5 makes a fresh ViT's CLS features almost identical for every image (kNN near
# chance) while without it they keep the images' structure: ASHA must stop the second trial.
ABLATION = "params:\n  model.layerscale: [null, 1.0e-5]\n"


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with Fashion-MNIST train/test shards under ./data, outside the repository."""
    from ray_ssl.data.shards import ensure_shard_set
    from tests.test_franca_job import FASHION_MNIST_DIR, write_fashion_subset

    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST idx files are not installed")
    work = tmp_path_factory.mktemp("sweep-cwd")
    fashion = write_fashion_subset(work / "fashion")
    config = load_config("local", [f"shards.fashion_mnist_dir={fashion}"])
    for split in ("train", "test"):
        shards = dataclasses.replace(config.shards, split=split)
        ensure_shard_set(shards, str(work / "data" / split), config.storage)
    (work / "ablation.yaml").write_text(ABLATION)
    return work


def _ray_ssl(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PATH": f"{RAY_SSL.parent}:{os.environ['PATH']}",
        "RAY_TRAIN_V2_ENABLED": "1",
    }
    return subprocess.run(
        [str(RAY_SSL), *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )


def test_asha_sweep_from_another_directory_stops_a_trial_and_writes_results(
    sweep_dir: Path,
) -> None:
    args = ["tune", "--preset", "local", "--spec", "ablation.yaml", "--scheduler", "asha"]
    args += ["--max-concurrent", "1", "--name", "abl", *TINY_RUN]
    done = _ray_ssl(args, cwd=sweep_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = sweep_dir / "ray_results" / "abl"  # <train.storage_path>/<name>, as the docs say
    with (sweep / "sweep_results.csv").open() as fh:
        rows = {r["model.layerscale"]: r for r in csv.DictReader(fh)}
    assert rows.keys() == {"null", "1.0e-05"}, rows  # the values as override text
    assert rows["null"]["status"] == COMPLETED and rows["null"]["step"] == "8"
    assert rows["1.0e-05"]["status"] == STOPPED and rows["1.0e-05"]["step"] == "4"
    assert float(rows["null"]["knn_top1"]) > float(rows["1.0e-05"]["knn_top1"])
    assert (sweep / "sweep_results.md").read_text().count("\n") == 2 + 2
    assert (sweep / "sweep_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best config: model.layerscale=null" in done.stdout, done.stdout[-2000:]
    # Each trial's run lives under the sweep, with its paths resolved against the sweep's cwd.
    run = Path(rows["null"]["run"])
    assert run.parent == sweep / "runs"
    saved = json.loads((run / "ray_ssl_config.json").read_text())
    assert saved["data"]["uri"] == str(sweep_dir / "data" / "train")
    assert (run / "report.json").is_file()  # the completed run finished its report


def test_sweep_with_bad_input_is_one_line(sweep_dir: Path) -> None:
    done = _ray_ssl(["tune", "--param", "views.mask=grid:cyclic,nope", *TINY_RUN], sweep_dir)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "views.mask" in lines[0] and "nope" in lines[0], done.stderr


def test_interrupted_sweep_exits_130_and_names_no_best(sweep_dir: Path) -> None:
    """Ctrl-C (SIGINT to the process group) after the first result: the step-0 kNN of an
    untrained network must not be reported as the best."""
    args = ["tune", "--param", "model.layerscale=grid:null", "--name", "intr", *TINY_RUN]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TRAIN_V2_ENABLED": "1"}
    out_file, err_file = sweep_dir / "intr.out", sweep_dir / "intr.err"
    with out_file.open("w") as out, err_file.open("w") as err:
        sweep = subprocess.Popen(
            [str(RAY_SSL), *args],
            cwd=sweep_dir,
            env=env,
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group, as a shell's foreground job
        )
        progress = sweep_dir / "ray_results" / "intr"
        while not any(len(p.read_text().splitlines()) > 1 for p in progress.glob("*/progress.csv")):
            assert sweep.poll() is None, err_file.read_text()[-2000:]
            time.sleep(1.0)
        os.killpg(sweep.pid, signal.SIGINT)
        sweep.wait()
    stderr = err_file.read_text()
    assert sweep.returncode == 130, stderr[-2000:]
    # The one-line error; Ray may still forward a worker's last progress line after it.
    ours_err = [line for line in stderr.splitlines() if line.startswith("ray-ssl: error:")]
    assert ours_err and ours_err[-1].startswith("ray-ssl: error: sweep interrupted"), stderr[-2000:]
    ours = out_file.read_text().split("\nresults: ", 1)[-1]  # after Tune's own progress table
    assert not any(line.startswith("best") for line in ours.splitlines()), ours
    with (progress / "sweep_results.csv").open() as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == [INTERRUPTED]
