"""One run, three launches at three sizes: 2 workers (ZeRO-2) -> 1 (ZeRO-3) -> 3 (ZeRO-1).

Real Ray Train, real DeepSpeed (CPU, gloo), the real Franca method on 100 synthetic images
(4 steps of global batch 24 per pass). Each launch extends the run by 3 steps (``train.epochs``
grows; the worker count and ZeRO stage change) and checkpoints every step. Checked:
- each launch resumes at the previous one's last step, and every step is reported once;
- the sample count is exact (``samples_seen`` = steps x global batch);
- the data position is global: at every checkpoint the current pass's consumed samples are
  distinct and exactly (steps into the pass) x global batch of them, and they only grow within a
  pass, across the size changes too (no sample of a pass repeated or skipped);
- the losses are continuous: a launch's first loss is nearer the last loss before it than the
  run's initial loss (a restore that lost the weights would start over).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ray_ssl.config import ShardsConfig, StorageConfig, load_config
from ray_ssl.data.position import from_intervals
from ray_ssl.data.shards import write_shard_set
from ray_ssl.train.trainer import run_training

BATCH, SAMPLES, STEPS_PER_LEG = 24, 100, 3
# Franca at its smallest on 8 x 8 RGB synthetic images (also used by test_node_faults).
TINY_FRANCA = [
    "views.channels=3",
    "model.in_chans=3",
    "views.global_size=8",
    "views.local_size=4",
    "views.local_crops=2",
    "model.img_size=8",
    "model.depth=1",
]
LEGS = [(2, 2), (1, 3), (3, 1)]  # (workers, ZeRO stage)
STEPS_PER_PASS = SAMPLES // BATCH


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("synthetic")
    shards = ShardsConfig(
        source="synthetic", synthetic_count=SAMPLES, synthetic_size=8, samples_per_shard=25
    )
    write_shard_set(shards, f"{root}/train", StorageConfig())
    return f"{root}/train"


def _launch(uri: str, storage: Path, leg: int, workers: int, stage: int) -> dict:
    config = load_config(
        "local",
        [
            f"data.uri={uri}",
            "data.eval_uri=null",
            f"data.batch_size={BATCH}",
            *TINY_FRANCA,
            f"train.num_workers={workers}",
            f"train.zero_stage={stage}",
            f"train.epochs={leg + 1}",
            f"train.steps_per_epoch={STEPS_PER_LEG}",
            "train.checkpoint_every=1",
            "train.keep_checkpoints=100",
            "train.log_every=1",
            "train.torch_threads=1",
            f"train.storage_path={storage}",
            "train.run_name=elastic",
            "optim.warmup_epochs=0",
            "optim.base_lr=0.02",
        ],
    )
    return run_training(config).metrics


def test_resume_at_other_sizes_and_stages(ray_local: None, synthetic: str, tmp_path: Path) -> None:
    run = tmp_path / "elastic"
    for leg, (workers, stage) in enumerate(LEGS):
        metrics = _launch(synthetic, tmp_path, leg, workers, stage)
        steps = (leg + 1) * STEPS_PER_LEG
        assert metrics["step"] == steps
        assert metrics["samples_seen"] == steps * BATCH  # exact over the size changes
        state = json.loads((run / f"step_{steps:08d}" / "train_state.json").read_text())
        assert (state["world_size"], state["zero_stage"]) == (workers, stage)

    total = len(LEGS) * STEPS_PER_LEG
    history = json.loads((run / f"step_{total:08d}" / "train_state.json").read_text())["history"]
    assert [int(h["step"]) for h in history] == list(range(1, total + 1))
    loss = {int(h["step"]): h["loss"] for h in history}
    for first in range(STEPS_PER_LEG + 1, total + 1, STEPS_PER_LEG):
        assert abs(loss[first] - loss[first - 1]) < abs(loss[first] - loss[1]), loss

    previous: set[int] = set()
    for step in range(1, total + 1):
        data = json.loads((run / f"step_{step:08d}" / "train_state.json").read_text())["data"]
        assert data["pass_index"] == (step - 1) // STEPS_PER_PASS
        consumed = from_intervals(data["intervals"]).tolist()
        assert len(consumed) == len(set(consumed)) == ((step - 1) % STEPS_PER_PASS + 1) * BATCH
        assert set(consumed) < set(range(SAMPLES)) and not data["corrupt"]
        if (step - 1) % STEPS_PER_PASS:  # same pass as the step before: it only grows
            assert previous < set(consumed), step
        previous = set(consumed)
