"""The training loop on 2 workers under ZeRO-3 with the real Franca method and data pipeline.

Checks the run's geometry (steps per epoch from the shard count, exact global batch, a second data
pass), the metrics reported, online kNN of the teacher under ZeRO-3 (a collective forward), the
ranks' checkpoint parts merged by Ray Train into one complete consolidated checkpoint, and the
export.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ray_ssl.config import ShardsConfig, StorageConfig, load_config
from ray_ssl.data.shards import write_shard_set
from ray_ssl.train.trainer import run_training

GLOBAL_BATCH, WORKERS, EPOCHS = 128, 2, 2
EXPECTED_METRICS = {
    "loss", "dino_loss", "ibot_loss", "koleo_loss", "lr", "weight_decay", "images_per_s",
    "samples_seen", "corrupt_samples", "teacher_temp", "momentum", "step", "epoch", "knn_top1",
}  # fmt: skip


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, int]:
    root = tmp_path_factory.mktemp("digits")
    storage = StorageConfig()
    train = write_shard_set(ShardsConfig(source="digits", split="train"), f"{root}/train", storage)
    write_shard_set(ShardsConfig(source="digits", split="test"), f"{root}/test", storage)
    return f"{root}/train", f"{root}/test", train.count


def test_two_workers_zero3_run(
    ray_local: None, digits: tuple[str, str, int], tmp_path: Path
) -> None:
    train_uri, test_uri, count = digits
    steps_per_epoch = count // GLOBAL_BATCH
    config = load_config(
        "local",
        [
            f"data.uri={train_uri}",
            f"data.eval_uri={test_uri}",
            f"data.batch_size={GLOBAL_BATCH}",
            "views.global_size=8",
            "views.local_size=4",
            "views.local_crops=2",
            "model.img_size=8",
            "model.depth=2",
            f"train.num_workers={WORKERS}",
            "train.zero_stage=3",
            f"train.epochs={EPOCHS}",
            "train.steps_per_epoch=null",  # one epoch = one pass over the shards
            f"train.checkpoint_every={steps_per_epoch}",
            f"train.log_every={steps_per_epoch}",
            f"eval.knn_every={steps_per_epoch}",
            f"train.storage_path={tmp_path}",
            "train.run_name=loop",
            "optim.warmup_epochs=1",
        ],
    )
    outcome = run_training(config)
    total = EPOCHS * steps_per_epoch

    metrics = outcome.metrics
    assert EXPECTED_METRICS <= set(metrics)
    assert metrics["step"] == total and metrics["epoch"] == EPOCHS
    assert metrics["samples_seen"] == total * GLOBAL_BATCH  # exact global batch, both workers
    assert metrics["corrupt_samples"] == 0
    assert 0.0 <= metrics["knn_top1"] <= 1.0

    checkpoint = Path(outcome.checkpoint_path)
    assert checkpoint.name == f"step_{total:08d}"
    # Both ranks' parts were merged into the one checkpoint directory; the ZeRO-3 partitions
    # were consolidated (no per-rank DeepSpeed files).
    assert sorted(p.name for p in (checkpoint / "complete").iterdir()) == ["rank_0", "rank_1"]
    assert sorted(p.name for p in (checkpoint / "rng").iterdir()) == [
        "rank_0.safetensors",
        "rank_1.safetensors",
    ]
    assert (checkpoint / "model-00000.safetensors").is_file()
    assert (checkpoint / "optimizer-00000.safetensors").is_file()
    assert not list(checkpoint.rglob("*.pt"))
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert (state["world_size"], state["zero_stage"], state["step"]) == (WORKERS, 3, total)
    knn_steps = [h["step"] for h in state["history"] if "knn_top1" in h]
    assert knn_steps == [0.0, steps_per_epoch, total]  # initial, every knn_every steps
    assert (Path(outcome.export_uri) / "teacher_backbone.safetensors").is_file()
    report = json.loads(Path(outcome.report_uri).read_text())
    assert report["knn"]["teacher_top1_final"] == pytest.approx(metrics["knn_top1"])
