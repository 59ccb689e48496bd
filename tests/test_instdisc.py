"""InstDiscMethod standalone (no Ray Train): loss, bank updates, checkpoint round trip, kNN."""

from __future__ import annotations

import copy
import importlib.util
import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from ray_ssl.config import ConfigError, load_config
from ray_ssl.eval.knn import weighted_knn_predict
from ray_ssl.losses.nce import exact_softmax_loss
from ray_ssl.memory_bank.shard import momentum_update
from ray_ssl.methods.instdisc import BANK_POINTER_FILE, InstDiscMethod, knn_predict_from_bank

N, BATCH = 64, 8


def _config(tmp_path, *overrides: str):
    return load_config(
        "instdisc_local",
        [
            f"instdisc.num_instances={N}",
            "instdisc.exact_softmax=false",  # the NCE path (the local preset's is exact)
            "instdisc.temperature=0.07",
            "instdisc.negatives=32",
            "instdisc.bank_cpus_per_shard=0.1",
            f"train.run_name=instdisc-test-{uuid.uuid4().hex[:8]}",
            f"train.storage_path={tmp_path}",
            "train.checkpoint_every=3",
            *overrides,
        ],
    )


def _batch(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    crops = torch.randint(0, 256, (BATCH, 1, 28, 28), dtype=torch.uint8, generator=gen)
    return {"global_crops": crops, "idx": torch.randperm(N, generator=gen)[:BATCH]}


def _train_steps(method: InstDiscMethod, steps: range) -> list[dict[str, torch.Tensor]]:
    optimizer = torch.optim.SGD(method.parameters(), lr=0.03)
    outs = []
    for step in steps:
        out = method(_batch(step), step)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        method.after_step(step)
        outs.append(out)
    return outs


@pytest.fixture
def method(ray_local, tmp_path):
    method = InstDiscMethod(_config(tmp_path), steps_per_epoch=10, total_steps=10)
    yield method
    if method._bank is not None:  # created on first use
        method.bank.shutdown()


def test_view_spec_is_one_single_view(method: InstDiscMethod) -> None:
    spec = method.view_spec
    assert (spec.kind, spec.global_crops, spec.local_crops, spec.mask) == ("single", 1, 0, "none")


def test_every_parameter_takes_weight_decay_as_in_lemniscate(method: InstDiscMethod) -> None:
    groups = method.param_groups(method.config.optim)
    decayed = {id(p) for g in groups if g["wd_mult"] == 1.0 for p in g["params"]}
    assert decayed == {id(p) for p in method.parameters() if p.requires_grad}
    assert any(p.ndim == 1 for p in method.parameters())  # biases and norms are among them


def test_step_updates_the_bank_rows_of_the_batch(method: InstDiscMethod) -> None:
    before = method.bank.read_all().copy()
    batch = _batch(0)
    out = method(batch, 0)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out["loss"].backward()
    assert method.projection.weight.grad.abs().sum() > 0
    with torch.no_grad():  # same crops and weights, BN in train mode on the same batch
        features = method.embed(batch["global_crops"]).numpy()
    method.after_step(0)
    method.bank.flush()
    rows = batch["idx"].numpy()
    after = method.bank.read_all()
    np.testing.assert_allclose(after[rows], momentum_update(before[rows], features, 0.5), atol=1e-5)
    untouched = np.setdiff1d(np.arange(N), rows)
    np.testing.assert_array_equal(after[untouched], before[untouched])
    assert method.log_z is not None and np.isfinite(method.log_z)


def test_checkpoint_round_trip_restores_bank_and_z(method: InstDiscMethod, tmp_path) -> None:
    _train_steps(method, range(3))
    method.before_checkpoint(3)  # settles the updates, as the loop does before every checkpoint
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    method.save_extra_state(str(checkpoint), 3)
    at_checkpoint = method.bank.read_all().copy()
    state_at_checkpoint = copy.deepcopy(method.state_dict())
    assert json.loads((checkpoint / BANK_POINTER_FILE).read_text())["step"] == 3

    _train_steps(method, range(3, 6))
    assert not np.array_equal(method.bank.read_all(), at_checkpoint)
    method.load_state_dict(state_at_checkpoint)  # what DeepSpeed's load_checkpoint does
    method.load_extra_state(str(checkpoint))
    np.testing.assert_array_equal(method.bank.read_all(), at_checkpoint)
    assert method.log_z == state_at_checkpoint["_extra_state"]["log_z"]
    _train_steps(method, range(3, 4))  # training continues from the restored bank


def test_exact_softmax_variant_uses_the_whole_bank(ray_local, tmp_path) -> None:
    method = InstDiscMethod(
        _config(tmp_path, "instdisc.exact_softmax=true"), steps_per_epoch=10, total_steps=10
    )
    try:
        batch = _batch(1)
        bank = torch.from_numpy(method.bank.read_all().copy())
        out = method(batch, 0)
        with torch.no_grad():
            features = method.embed(batch["global_crops"])
        expected = exact_softmax_loss(features, bank, batch["idx"], 0.07)
        assert torch.isclose(out["loss"], expected, rtol=1e-4)
    finally:
        method.bank.shutdown()


def test_knn_from_bank_equals_knn_over_the_whole_bank(method: InstDiscMethod) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=N)
    queries = torch.from_numpy(rng.normal(size=(300, 128)).astype(np.float32))
    ours = knn_predict_from_bank(method.bank, labels, queries, num_classes=5, k=10, sigma=0.07)
    full = weighted_knn_predict(
        torch.from_numpy(method.bank.read_all().copy()), torch.from_numpy(labels), queries, 5, 10
    )
    assert torch.equal(ours, full)


def test_missing_instance_count_is_a_one_line_error(ray_local, tmp_path) -> None:
    config = _config(tmp_path)
    config.instdisc.num_instances = None
    with pytest.raises(ConfigError, match="num_instances") as err:
        InstDiscMethod(config, steps_per_epoch=1, total_steps=1)
    assert "\n" not in str(err.value)


def test_vit_backbone_trains_through_the_same_path(ray_local, tmp_path) -> None:
    method = InstDiscMethod(
        _config(tmp_path, "instdisc.backbone=vit", "model.depth=1"),
        steps_per_epoch=2,
        total_steps=2,
    )
    try:
        outs = _train_steps(method, range(2))
        assert all(torch.isfinite(out["loss"]) for out in outs)
        assert method.backbone().timm_name_and_kwargs()[0].startswith("vit_tiny")
    finally:
        method.bank.shutdown()


def test_driver_pins_the_bank_size_to_the_shard_set(tmp_path) -> None:
    from ray_ssl.data.shards import ensure_shard_set
    from ray_ssl.methods.registry import method_driver

    config = load_config("instdisc_local", ["shards.source=digits", f"data.uri={tmp_path}/train"])
    count = ensure_shard_set(config.shards, config.data.uri, config.storage).count
    config.instdisc.num_instances = None
    prepared = method_driver(config).prepare(config)
    assert prepared.instdisc.num_instances == count  # filled from the digits train manifest
    config.instdisc.num_instances = count + 1
    with pytest.raises(ConfigError, match=f"holds {count} samples") as err:
        method_driver(config).prepare(config)
    assert "\n" not in str(err.value)


def _instdisc_job():
    path = Path(__file__).resolve().parents[1] / "jobs" / "instdisc.py"
    spec = importlib.util.spec_from_file_location("instdisc_job", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_local_preset_follows_lemniscates_small_data_recipe() -> None:
    from ray_ssl.train.schedules import TrainSchedules

    config = load_config("instdisc_local")
    inst = config.instdisc
    assert (inst.exact_softmax, inst.temperature, inst.proximal_weight) == (True, 0.1, 0.0)
    assert inst.num_instances == config.shards.max_samples  # a subset sized for 2 CPUs
    steps = inst.num_instances // config.data.batch_size
    schedules = TrainSchedules.from_config(config, steps)
    total = config.train.epochs * steps
    assert config.optim.lr_schedule == "constant"
    assert {schedules.lr(step) for step in (0, total // 2, total - 1)} == {0.03}
    imagenet = load_config("instdisc_imagenet")
    assert not imagenet.instdisc.exact_softmax and imagenet.instdisc.proximal_weight > 0


class _ShardKiller(threading.Thread):
    """Kills bank shard 0 once the run has two bank snapshots, then records the state of every
    shard after the whole bank has been restored (a resumed run's load_extra_state)."""

    def __init__(self, storage: Path, run_name: str) -> None:
        super().__init__(daemon=True)
        self.snapshots = storage / run_name / "memory_bank" / "shard-000-of-002"
        self.names = [f"instdisc-bank-{run_name}-shard-{i:03d}-of-002" for i in range(2)]
        self.stop, self.killed, self.restored = threading.Event(), False, None

    def _infos(self) -> list[dict]:
        return [ray.get(ray.get_actor(n, namespace="ray-ssl").info.remote()) for n in self.names]

    def run(self) -> None:
        # The second snapshot: the first one's checkpoint is reported by then, so the run
        # resumes from a checkpoint (not from scratch) whatever the kill interrupts.
        while len(list(self.snapshots.glob("step-*.npy"))) < 2:
            if self.stop.wait(0.05):
                return
        ray.kill(ray.get_actor(self.names[0], namespace="ray-ssl"), no_restart=False)
        self.killed = True
        while not self.stop.is_set():
            try:
                infos = self._infos()
            except ray.exceptions.ActorUnavailableError:
                continue  # shard 0 is restarting
            except ray.exceptions.RayActorError:
                return  # the run ended and shut the bank down
            if all(info["source"] is not None for info in infos):  # a restore reached both
                self.restored = infos
                return
            time.sleep(0.05)


def test_job_resumes_from_its_checkpoint_after_a_shard_dies(ray_local, tmp_path, capsys) -> None:
    """A bank shard killed mid-run fails the step; Ray Train (max_failures=1) resumes from the
    checkpoint, whose snapshot every shard restores; the job then prints all four kNN figures."""
    job, run_name = _instdisc_job(), f"instdisc-job-{uuid.uuid4().hex[:8]}"
    storage = tmp_path / "runs"
    killer = _ShardKiller(storage, run_name)
    killer.start()
    try:
        job.main(
            [
                "--preset",
                "local",
                "shards.source=digits",
                "instdisc.num_instances=null",
                f"data.uri={tmp_path}/train",
                f"data.eval_uri={tmp_path}/test",
                "views.global_size=8",  # the digits are 8 x 8
                "views.local_size=8",
                "data.batch_size=32",
                "train.epochs=1",
                "train.steps_per_epoch=24",
                "train.checkpoint_every=4",
                "train.max_failures=1",
                f"train.run_name={run_name}",
                f"train.storage_path={storage}",
                "instdisc.bank_cpus_per_shard=0.1",
                "eval.knn_max_train=300",
                "eval.knn_max_test=100",
            ]
        )
    finally:
        killer.stop.set()
        killer.join()
    out = capsys.readouterr().out
    assert killer.killed and killer.restored is not None
    shard0, shard1 = killer.restored
    assert shard0["generation"] == shard1["generation"] is not None  # one whole-bank restore ...
    step = shard0["source"].rsplit("/", 1)[1]
    assert shard1["source"].endswith(f"shard-001-of-002/{step}")  # ... of one snapshot step
    for name in ("bank", "recomputed", "raw_pixels", "random_init"):
        assert f"knn_{name}_top1=" in out
