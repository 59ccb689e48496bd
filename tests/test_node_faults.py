"""A worker node lost mid-run: the run goes on from its last checkpoint on the node that is left.

A real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head for the
driver and Ray Data, two worker nodes that each fit exactly one Train worker), an elastic run
(``train.min_workers=1``, ``train.num_workers=2``) of Franca on 100 synthetic images. Once the
run has a checkpoint, the node of one Train worker is removed (its raylet and every process on it
killed). Ray Train restarts the worker group (``train.max_failures``, default 3) with the one
worker that fits, which restores the latest checkpoint and finishes the run. Checked: every
step reported once in the final history, the sample count exact, the last leg on 1 worker, and
the steps redone (trained before the fault, after the checkpoint restored) printed.

The cluster runs in a spawned child process: the test session's own local Ray instance
(``ray_local``) may already be connected in this one.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
import traceback
from pathlib import Path
from typing import Any

BATCH, SAMPLES, STEPS, CHECKPOINT_EVERY = 24, 100, 24, 2
HEAD_CPUS, NODE_CPUS = 2, 3  # a Train worker takes all of a worker node: one per node
POLL_S = 0.05


def _remove_a_train_workers_node(cluster: Any, run: Path, done: threading.Event) -> dict:
    """Once Ray Train holds a checkpoint, remove a worker node: each holds one of the 2 Train
    workers (a worker needs all of a worker node's CPUs and more than the head has)."""
    while not done.is_set():
        steps = sorted(int(p.parent.name[5:]) for p in run.glob("step_*/train_state.json"))
        if len(steps) >= 2:  # every rank has reported the older one: Ray Train holds it
            cluster.remove_node(next(iter(cluster.worker_nodes)))
            return {"removed_after_checkpoint": steps[-2], "reached": steps[-1]}
        time.sleep(POLL_S)
    return {}


def _run_with_a_node_fault(root: str) -> dict:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray
    from ray.cluster_utils import Cluster
    from test_elastic_resume import TINY_FRANCA

    from ray_ssl.config import ShardsConfig, StorageConfig, load_config
    from ray_ssl.data.shards import write_shard_set
    from ray_ssl.train.trainer import run_training

    uri = f"{root}/train"
    shards = ShardsConfig(
        source="synthetic", synthetic_count=SAMPLES, synthetic_size=8, samples_per_shard=25
    )
    write_shard_set(shards, uri, StorageConfig())
    cluster = Cluster(
        initialize_head=True,
        connect=True,
        head_node_args={"num_cpus": HEAD_CPUS, "include_dashboard": False},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=NODE_CPUS)
    cluster.wait_for_nodes()
    config = load_config(
        "local",
        [
            f"data.uri={uri}",
            "data.eval_uri=null",
            f"data.batch_size={BATCH}",
            *TINY_FRANCA,
            "train.num_workers=2",
            "train.min_workers=1",
            f"train.cpus_per_worker={NODE_CPUS}",
            "train.epochs=1",
            f"train.steps_per_epoch={STEPS}",
            f"train.checkpoint_every={CHECKPOINT_EVERY}",
            "train.keep_checkpoints=100",
            "train.log_every=1",
            "train.torch_threads=1",
            f"train.storage_path={root}/runs",
            "train.run_name=faults",
            "optim.warmup_epochs=0",
        ],
    )
    done = threading.Event()
    fault: dict = {}
    watcher = threading.Thread(
        target=lambda: fault.update(
            _remove_a_train_workers_node(cluster, Path(root, "runs", "faults"), done)
        )
    )
    watcher.start()
    try:
        metrics = run_training(config).metrics
    finally:
        done.set()
        watcher.join()
        ray.shutdown()
        cluster.shutdown()
    return {"metrics": dict(metrics), **fault}


def _child(queue: Any, root: str) -> None:
    try:
        queue.put(_run_with_a_node_fault(root))
    except Exception:  # the parent must not wait forever on a crashed child
        queue.put({"error": traceback.format_exc()})


def test_a_lost_worker_node_resumes_from_the_last_checkpoint_on_what_is_left(
    tmp_path: Path,
) -> None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child, args=(queue, str(tmp_path)))
    child.start()
    result = queue.get()
    child.join()
    assert "error" not in result, result.get("error")
    assert "removed_after_checkpoint" in result, "the run ended before the fault"
    metrics = result["metrics"]
    assert metrics["step"] == STEPS and metrics["samples_seen"] == STEPS * BATCH, metrics

    run = tmp_path / "runs" / "faults"
    states = {
        int(p.name[5:]): json.loads((p / "train_state.json").read_text())
        for p in run.glob("step_*")
    }
    final = states[STEPS]
    assert [int(h["step"]) for h in final["history"]] == list(range(1, STEPS + 1))
    assert final["world_size"] == 1  # the last leg ran on the node that was left
    first_small = min(s for s, st in states.items() if st["world_size"] == 1)
    restored = first_small - CHECKPOINT_EVERY  # the checkpoint the 1-worker leg started from
    assert restored >= result["removed_after_checkpoint"], (restored, result)
    assert states[restored]["world_size"] == 2
    print(
        f"node removed at step >= {result['reached']}; resumed from step {restored} on 1 "
        f"worker; steps redone: at least {result['reached'] - restored}"
    )
