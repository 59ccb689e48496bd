"""How many trials fit on the cluster at once, and what a trial's driver reserves.

A trial is a driver (the Tune function that starts a ``TorchTrainer``) plus the run it starts:
Train workers (``train.num_workers`` x ``train.cpus_per_worker`` CPUs, one GPU each with
``train.use_gpu``) and the Ray Data tasks that decode and crop for them (at least one CPU).
Ray Train reserves its workers itself, outside Tune's placement group, so the driver reserves no
CPU (it only waits on the run; with one CPU it would starve the data pipeline of a 2-CPU
machine), and Tune's ``max_concurrent_trials`` keeps the runs from competing for the workers'
resources (Ray's Train-V2-with-Tune guide, "Set max_concurrent_trials").
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from ray_ssl.config import Config

log = logging.getLogger(__name__)

DATA_CPUS_PER_TRIAL = 1  # the least Ray Data needs to feed a run
# Tune refuses an empty bundle; the driver reserves memory instead of a CPU (it imports torch
# and plans the run, a few hundred MiB).
TRIAL_DRIVER_MEMORY_BYTES = 512 * 2**20


@dataclass(frozen=True)
class TrialNeeds:
    """Logical resources one trial's run holds while it trains."""

    cpus: float
    gpus: float

    @classmethod
    def of(cls, config: Config) -> TrialNeeds:
        t = config.train
        return cls(
            cpus=t.num_workers * t.cpus_per_worker + DATA_CPUS_PER_TRIAL,
            gpus=float(t.num_workers) if t.use_gpu else 0.0,
        )

    def union(self, other: TrialNeeds) -> TrialNeeds:
        return TrialNeeds(max(self.cpus, other.cpus), max(self.gpus, other.gpus))


def trial_driver_resources() -> dict[str, float]:
    """``tune.with_resources`` of the trial driver: no CPU (see the module docstring)."""
    return {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY_BYTES}


def concurrent_trials(needs: TrialNeeds, cluster: dict[str, float]) -> int:
    """Trials whose runs fit side by side in ``cluster`` (``ray.cluster_resources()``), >= 1.

    With fewer resources than one trial needs (an autoscaling cluster before it grows), one
    trial at a time: Ray Train waits for the autoscaler to add nodes.
    """
    fits = [math.floor(cluster.get("CPU", 0.0) / needs.cpus)]
    if needs.gpus:
        fits.append(math.floor(cluster.get("GPU", 0.0) / needs.gpus))
    count = min(fits)
    if count < 1:
        log.warning(
            "one trial needs %g CPUs and %g GPUs but the cluster has %g and %g now; running one "
            "trial at a time (Ray Train waits for the resources)",
            needs.cpus,
            needs.gpus,
            cluster.get("CPU", 0.0),
            cluster.get("GPU", 0.0),
        )
    return max(count, 1)
