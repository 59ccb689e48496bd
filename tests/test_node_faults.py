"""Nodes lost mid-run: the run goes on from its last checkpoint on what is left, or when the node
returns.

A real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``), shared by the
tests of this module: a head for the driver and Ray Data, and worker nodes added as each test
needs them, "train" nodes that each fit exactly one Train worker and a "bank" node that alone
offers the custom resource InstDisc's bank shards take (``instdisc.bank_resource``). A test
removes a node (its raylet and every process on it killed) once the run has a checkpoint:

- a Train worker's node, in an elastic run of Franca (1..2 workers): Ray Train restarts the
  worker group (``train.max_failures``, default 3) with the one worker that fits, which restores
  the latest checkpoint and finishes the run;
- the bank node, in an InstDisc run: the step fails (a lost shard is a transient
  ``BankFaultError``), Ray restarts the shards (empty) only once a node with the bank resource
  is back, so the restarted run waits for the node; then every shard restores the bank snapshot
  of the checkpoint the model resumes from, and the run finishes.

Checked: every step reported once in the final history, the sample count exact, where the last
leg ran, and the steps redone (trained before the fault, after the checkpoint restored) printed.

The cluster lives in one spawned child process for the module, with its own Ray temp dir
(``RAY_TMPDIR``, so nothing else on the machine finds it) and an explicit address: the test
session's own local Ray instance (``ray_local``) may already be connected in this one.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

BATCH, SAMPLES, STEPS, CHECKPOINT_EVERY = 24, 100, 12, 2
BANK_STEPS = 12  # InstDisc: one pass of ~4 batches of 24 = 3 passes
HEAD_CPUS, NODE_CPUS = 2, 3  # a Train worker takes all of a train node: one per node
BANK_RESOURCE, BANK_SHARDS, BANK_NODE_CPUS = "bank", 2, 1  # 2 x 0.1 CPU: no Ray Data task fits
NODE_AWAY_S = 5.0  # how long the bank node stays away: the restarted run must wait for it
POLL_S = 0.05
# Ray Train waits this long for a worker group's resources before it asks the cluster again
# (Ray's default is 60 s): just after a node is lost Ray may still count it and ask for 2
# workers that cannot be placed (docs/running.md, "Elastic runs").
START_TIMEOUT_ENV, START_TIMEOUT_S = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10"
CONTROLLER_RETRY = "Source: controller"  # Ray Train's FailurePolicy log of such a retry


class Nodes:
    """The shared cluster's worker nodes by role."""

    def __init__(self, cluster: Any) -> None:
        self.cluster, self.train, self.bank = cluster, [], None

    def ensure(self, train: int, bank: bool) -> None:
        while len(self.train) < train:
            self.train.append(self.cluster.add_node(num_cpus=NODE_CPUS))
        if bank and self.bank is None:
            self.add_bank()
        self.cluster.wait_for_nodes()

    def add_bank(self) -> None:
        self.bank = self.cluster.add_node(
            num_cpus=BANK_NODE_CPUS, resources={BANK_RESOURCE: BANK_SHARDS}
        )

    def remove(self, node: Any) -> None:
        self.cluster.remove_node(node)
        if node is self.bank:
            self.bank = None
        else:
            self.train.remove(node)


def _checkpoint_steps(run: Path) -> dict[int, Path]:
    """Step -> directory of every complete checkpoint of a run."""
    return {int(p.parent.name[5:]): p.parent for p in run.glob("step_*/train_state.json")}


def _snapshot_steps(prefix: Path) -> list[int]:
    """The steps of a bank shard's snapshots (``step-<step>.npy``)."""
    return sorted(int(p.name[len("step-") : -len(".npy")]) for p in prefix.glob("step-*.npy"))


def _shards(root: str) -> str:
    from ray_ssl.config import ShardsConfig, StorageConfig
    from ray_ssl.data.shards import write_shard_set

    uri = f"{root}/train"
    shards = ShardsConfig(
        source="synthetic", synthetic_count=SAMPLES, synthetic_size=8, samples_per_shard=25
    )
    write_shard_set(shards, uri, StorageConfig())
    return uri


def _common(root: str, steps: int) -> list[str]:
    return [
        f"data.uri={_shards(root)}",
        "data.eval_uri=null",
        f"data.batch_size={BATCH}",
        "views.channels=3",
        "model.in_chans=3",
        "views.global_size=8",
        "model.img_size=8",
        "model.depth=1",
        f"train.cpus_per_worker={NODE_CPUS}",
        "train.epochs=1",
        f"train.steps_per_epoch={steps}",
        f"train.checkpoint_every={CHECKPOINT_EVERY}",
        "train.keep_checkpoints=100",
        "train.log_every=1",
        "train.torch_threads=1",
        f"train.storage_path={root}/runs",
        "optim.warmup_epochs=0",
    ]


def _train_with_a_fault(config: Any, fault: Callable[[threading.Event], dict]) -> dict:
    """Train ``config`` in a thread while ``fault(done)`` runs here, in the main thread (Ray
    starts a node only from the main thread); ``done`` is set when training has ended."""
    from ray_ssl.train.trainer import run_training

    done, outcome = threading.Event(), {}

    def train() -> None:
        try:
            outcome["metrics"] = dict(run_training(config).metrics)
        except BaseException as err:  # re-raised below, in the main thread
            outcome["error"] = err
        finally:
            done.set()

    thread = threading.Thread(target=train)
    thread.start()
    try:
        result = fault(done)
    finally:
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return {"metrics": outcome["metrics"], **result}


def _elastic_run_loses_a_train_node(nodes: Nodes, root: str) -> dict:
    from test_elastic_resume import TINY_FRANCA

    from ray_ssl.config import load_config

    nodes.ensure(train=2, bank=False)
    config = load_config(
        "local",
        [
            *_common(root, STEPS),
            *TINY_FRANCA,
            "train.num_workers=2",
            "train.min_workers=1",
            "train.run_name=elastic",
        ],
    )
    run = Path(root, "runs", "elastic")

    def remove_a_train_node(done: threading.Event) -> dict:
        # Once Ray Train holds a checkpoint (every rank has reported the older of two), remove
        # a node: each holds one of the 2 Train workers.
        while not done.wait(POLL_S):
            steps = sorted(_checkpoint_steps(run))
            if len(steps) >= 2:
                nodes.remove(nodes.train[0])
                return {
                    "removed_after_checkpoint": steps[-2],
                    "reached": steps[-1],
                    "removed_at": time.time(),
                }
        return {}

    return _train_with_a_fault(config, remove_a_train_node)


def _instdisc_run_loses_the_bank_node(nodes: Nodes, root: str) -> dict:
    import ray

    from ray_ssl.config import load_config
    from ray_ssl.methods.instdisc import BANK_NAMESPACE, bank_name

    nodes.ensure(train=1, bank=True)
    run_name = "bank"
    config = load_config(
        "instdisc_local",
        [
            *_common(root, BANK_STEPS),
            "instdisc.num_instances=null",
            "instdisc.backbone=vit",
            "instdisc.feature_dim=16",
            f"instdisc.bank_shards={BANK_SHARDS}",
            "instdisc.bank_cpus_per_shard=0.1",
            f"instdisc.bank_resource={BANK_RESOURCE}",
            "train.num_workers=1",
            f"train.run_name={run_name}",
        ],
    )
    snapshots = Path(root, "runs", run_name, "memory_bank", f"shard-000-of-{BANK_SHARDS:03d}")
    names = [f"{bank_name(run_name)}-shard-{i:03d}-of-{BANK_SHARDS:03d}" for i in range(2)]

    def shard_infos() -> list[dict]:
        return [ray.get(ray.get_actor(n, namespace=BANK_NAMESPACE).info.remote()) for n in names]

    def remove_and_return_the_bank_node(done: threading.Event) -> dict:
        # Remove the node between checkpoints: once the second snapshot is written (the first
        # one's checkpoint is reported) and the bank has taken a later step's update (a step
        # updates BATCH rows; the shards count the rows updated since the reset at step 0).
        while not done.wait(POLL_S):
            snapshot_steps = _snapshot_steps(snapshots)
            if len(snapshot_steps) < 2:
                continue
            trained = sum(info["rows_updated"] for info in shard_infos()) // BATCH
            if trained > snapshot_steps[-1]:
                break
        else:
            return {}
        nodes.remove(nodes.bank)
        removed_at = time.time()
        time.sleep(NODE_AWAY_S)
        nodes.add_bank()
        returned_at = time.time()
        infos: list[dict] = []
        while not done.wait(POLL_S):  # record the shards once a whole-bank restore reached both
            try:
                infos = shard_infos()
            except (ray.exceptions.RayActorError, ValueError):
                continue  # restarting, or the run ended and shut the bank down
            if all(info["source"] is not None for info in infos):
                break
        return {"trained": trained, "removed_at": removed_at, "returned_at": returned_at,
                "restored": infos}  # fmt: skip

    return _train_with_a_fault(config, remove_and_return_the_bank_node)


SCENARIOS = {
    "elastic": _elastic_run_loses_a_train_node,
    "bank": _instdisc_run_loses_the_bank_node,
}


def _controller_retries(temp: str) -> int:
    """How many times Ray Train's controller has retried so far (a worker group that did not
    start in time: ``WorkerGroupStartupTimeoutError``), from its log."""
    logs = Path(temp).glob("ray/session_*/logs/**/*")
    counts = [p.read_text(errors="ignore").count(CONTROLLER_RETRY) for p in logs if p.is_file()]
    return max(counts, default=0)


def _host(requests: Any, results: Any) -> None:
    """The child process: start the cluster, then run each requested scenario on it."""
    temp = tempfile.mkdtemp(prefix="rs-nf-", dir="/tmp")  # short: Ray's socket paths
    os.environ.update(
        {
            "RAY_TMPDIR": temp,  # Ray's session dir and address file: nobody else finds ours
            "DS_ACCELERATOR": "cpu",
            "RAY_TRAIN_V2_ENABLED": "1",
            START_TIMEOUT_ENV: START_TIMEOUT_S,  # raylets hand it to the Train controller
        }
    )
    cluster, failure = None, None
    try:
        import ray
        from ray.cluster_utils import Cluster

        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": HEAD_CPUS, "include_dashboard": False},
        )
        os.environ["RAY_ADDRESS"] = cluster.address  # for anything started from here
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = Nodes(cluster)
    except Exception:  # answer every request with it: the parent must not wait forever
        failure = traceback.format_exc()
    while (request := requests.get()) is not None:
        name, root = request
        try:
            if failure is not None:
                raise RuntimeError(failure)
            retries = _controller_retries(temp)
            result = SCENARIOS[name](nodes, root)
            results.put({**result, "controller_retries": _controller_retries(temp) - retries})
        except Exception:
            results.put({"error": traceback.format_exc()})
    if cluster is not None:
        ray.shutdown()
        cluster.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def on_cluster() -> Iterator[Callable[[str, Path], dict]]:
    """Run a scenario (a name in ``SCENARIOS``) on the module's cluster; returns its result."""
    context = multiprocessing.get_context("spawn")
    requests, results = context.Queue(), context.Queue()
    host = context.Process(target=_host, args=(requests, results))
    host.start()

    def run(name: str, root: Path) -> dict:
        requests.put((name, str(root)))
        result = results.get()
        assert "error" not in result, result.get("error")
        return result

    yield run
    requests.put(None)
    host.join()


def _states(run: Path) -> dict[int, dict]:
    return {
        step: json.loads((path / "train_state.json").read_text())
        for step, path in _checkpoint_steps(run).items()
    }


def test_a_lost_worker_node_resumes_from_the_last_checkpoint_on_what_is_left(
    on_cluster: Callable[[str, Path], dict], tmp_path: Path
) -> None:
    result = on_cluster("elastic", tmp_path)
    assert "removed_after_checkpoint" in result, "the run ended before the fault"
    metrics = result["metrics"]
    assert metrics["step"] == STEPS and metrics["samples_seen"] == STEPS * BATCH, metrics

    states = _states(tmp_path / "runs" / "elastic")
    final = states[STEPS]
    assert [int(h["step"]) for h in final["history"]] == list(range(1, STEPS + 1))
    assert final["world_size"] == 1  # the last leg ran on the node that was left
    first_small = min(s for s, st in states.items() if st["world_size"] == 1)
    restored = first_small - CHECKPOINT_EVERY  # the checkpoint the 1-worker leg started from
    assert restored >= result["removed_after_checkpoint"], (restored, result)
    assert states[restored]["world_size"] == 2
    resumed = _checkpoint_steps(tmp_path / "runs" / "elastic")[first_small] / "train_state.json"
    print(
        f"node removed at step >= {result['reached']}; resumed from step {restored} on 1 "
        f"worker; steps redone: at least {result['reached'] - restored}; first 1-worker "
        f"checkpoint {resumed.stat().st_mtime - result['removed_at']:.0f} s after the removal; "
        f"worker group start timeouts: {result['controller_retries']}"
    )


def test_a_lost_bank_node_is_waited_for_and_the_bank_restores_its_snapshot(
    on_cluster: Callable[[str, Path], dict], tmp_path: Path
) -> None:
    result = on_cluster("bank", tmp_path)
    assert "trained" in result, "the run ended before the fault"
    metrics = result["metrics"]
    assert metrics["step"] == BANK_STEPS and metrics["samples_seen"] == BANK_STEPS * BATCH

    run = tmp_path / "runs" / "bank"
    states = _states(run)
    assert [int(h["step"]) for h in states[BANK_STEPS]["history"]] == list(range(1, BANK_STEPS + 1))
    # Every shard restored the snapshot of one step, in one whole-bank restore ...
    shard0, shard1 = result["restored"]
    assert shard0["generation"] == shard1["generation"] is not None
    snapshot = shard0["source"].rsplit("/", 1)[1]
    assert shard1["source"].endswith(f"shard-001-of-{BANK_SHARDS:03d}/{snapshot}")
    restored = int(snapshot[len("step-") : -len(".npy")])
    assert restored in states and restored < result["trained"]
    # ... and the model resumed from the same step only after the node was back: nothing
    # past it was written while the node was away.
    after = min(s for s in states if s > restored)
    written = (_checkpoint_steps(run)[after] / "train_state.json").stat().st_mtime
    assert written > result["returned_at"], (after, written, result)
    print(
        f"bank node removed after step {result['trained']}, back after "
        f"{result['returned_at'] - result['removed_at']:.0f} s; bank and model resumed from "
        f"step {restored}; steps redone: at least {result['trained'] - restored}; first "
        f"checkpoint after the fault {written - result['removed_at']:.0f} s after the removal; "
        f"worker group start timeouts: {result['controller_retries']}"
    )
