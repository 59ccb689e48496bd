"""Each job of a plug-in method trains a few steps end to end under Ray Train + DeepSpeed on real
Fashion-MNIST, then a relaunch with more epochs resumes from its last checkpoint.

``jobs/pretrain.py`` with the ``vicreg_local`` and ``simclr_local`` presets, and
``jobs/instdisc.py --preset local`` (its driver pins N, owns the bank actors, restores the bank
with the checkpoint and reports the bank kNN). Resumption is visible in the run's history: the
relaunch keeps the first launch's reports of steps 1..STEPS byte for byte (their wall-clock
throughput included), which a recomputation could not reproduce.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_franca_job import FASHION_MNIST_DIR, write_fashion_subset

from jobs.instdisc import main as instdisc_main
from jobs.pretrain import main as pretrain_main

STEPS, BATCH = 4, 32  # per launch; the relaunch trains a second epoch of STEPS


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST idx files are not installed")
    return write_fashion_subset(tmp_path_factory.mktemp("fashion-mnist"))


def _overrides(fashion: Path, root: Path, epochs: int) -> list[str]:
    return [
        f"shards.fashion_mnist_dir={fashion}",
        f"data.uri={root}/shards/train",
        f"data.eval_uri={root}/shards/test",
        f"data.batch_size={BATCH}",
        f"train.epochs={epochs}",
        f"train.steps_per_epoch={STEPS}",
        f"train.checkpoint_every={STEPS}",
        "train.log_every=1",
        f"train.storage_path={root}/runs",
        "train.run_name=run",
        "optim.warmup_epochs=0",
        "eval.knn_max_train=1000",
        "eval.knn_max_test=200",
    ]


JOBS = {
    "vicreg": (pretrain_main, ["--preset", "vicreg_local", "vicreg.expander_dims=[64,64,64]"]),
    "simclr": (pretrain_main, ["--preset", "simclr_local", "simclr.projection_hidden_dim=64"]),
    "instdisc": (
        instdisc_main,
        ["--preset", "local", "instdisc.negatives=256", "instdisc.num_instances=null"],
    ),
}


def _history(run: Path, step: int) -> list[dict[str, float]]:
    state = json.loads((run / f"step_{step:08d}" / "train_state.json").read_text())
    assert state["step"] == step
    return state["history"]


@pytest.mark.parametrize("method", sorted(JOBS))
def test_job_trains_then_resumes(
    ray_local: None,
    fashion_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    method: str,
) -> None:
    main, args = JOBS[method]
    run = tmp_path / "runs" / "run"
    main([*args, *_overrides(fashion_dir, tmp_path, epochs=1)])
    first = _history(run, STEPS)
    assert [h["step"] for h in first] == [float(s) for s in range(STEPS + 1)]  # 0: initial kNN
    assert all(math.isfinite(h["loss"]) for h in first[1:])
    saved = json.loads((run / "ray_ssl_config.json").read_text())
    assert saved["train"]["method"] == method

    main([*args, *_overrides(fashion_dir, tmp_path, epochs=2)])
    second = _history(run, 2 * STEPS)
    assert second[: STEPS + 1] == first  # restored with the checkpoint, not recomputed
    assert [h["step"] for h in second] == [float(s) for s in range(2 * STEPS + 1)]
    assert (run / "export" / "teacher_backbone.safetensors").is_file()
    out = capsys.readouterr().out
    assert f"run directory: {run}" in out
    if method == "instdisc":  # the method's own final evaluation, from its driver
        top1 = [line for line in out.splitlines() if line.startswith("knn_bank_top1=")]
        assert len(top1) == 2 and 0.0 <= float(top1[-1].split("=")[1]) <= 1.0
