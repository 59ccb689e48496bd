"""InstDisc (Wu et al., arXiv 1805.01978): non-parametric instance discrimination with NCE and a
memory bank held by a pool of Ray actors (:class:`~ray_ssl.memory_bank.bank.ShardedMemoryBank`).

Per step: the bank entries v_i of the batch rows are fetched while the backbone runs; m noise rows
are drawn once for the whole batch (prefetched during the previous step, after its bank update,
so they see it); the loss is NCE with a running Monte-Carlo Z plus the proximal term, or the
exact softmax over the whole bank for small N. ``after_step`` enqueues v_i <- normalize(0.5 v_i +
0.5 f_i) for the batch rows without waiting; ``before_checkpoint`` settles every rank's updates,
and the bank is snapshotted with every checkpoint.

Bank and model always come from the same step: a run that starts at step 0 resets the bank to
its seeded initial rows (whatever an earlier attempt left in the pool), a resumed run restores
the snapshot its checkpoint names, and a shard that dies mid-run fails the step with
``MemoryBankError`` so that Ray Train (``train.max_failures``) resumes from the checkpoint.

The driver (:class:`InstDiscDriver`) pins N to the shard set, owns the bank actors (so the bank
outlives the Train workers) and reports weighted kNN (k=200, sigma=0.07, sec. 3.4) on the
held-out split two ways: with the bank itself as the training features (the paper's protocol)
and with recomputed features, beside the references learning must beat: raw pixels and the same
network at random init (:func:`ray_ssl.eval.baselines.knn_references`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ray_ssl.config import Config, ConfigError
from ray_ssl.eval.knn import weighted_knn_accuracy, weighted_knn_predict
from ray_ssl.losses.nce import (
    exact_softmax_loss,
    monte_carlo_log_z,
    nce_logits,
    nce_loss,
    proximal_term,
    running_log_z,
)
from ray_ssl.memory_bank.bank import BankSpec, PendingNegatives, ShardedMemoryBank
from ray_ssl.memory_bank.shard import MemoryBankError
from ray_ssl.methods.base import Batch, Method, MethodDriver
from ray_ssl.methods.instdisc_settings import NAME
from ray_ssl.models.backbone import build_backbone, pooled_features
from ray_ssl.models.vit import normalize_images

log = logging.getLogger(__name__)

BANK_POINTER_FILE = "instdisc_bank.json"  # in a checkpoint: the bank snapshot it goes with
BANK_DIR = "memory_bank"  # under the run directory
BANK_NAMESPACE = "ray-ssl"
KNN_QUERY_CHUNK = 256  # queries per map-reduce top-k round in the bank kNN
# The exact softmax reads the whole N x D bank every step: ~100 MB at D=128 fp32 is the limit.
EXACT_SOFTMAX_MAX_INSTANCES = 200_000


def bank_name(run_name: str) -> str:
    """Actor names of a run's bank: every Train worker of the run attaches to the same pool."""
    return f"instdisc-bank-{run_name}"


def bank_spec(config: Config) -> BankSpec:
    """The memory bank a config describes (N, D, shards, dtype, names, snapshot prefix)."""
    inst, train = config.methods[NAME], config.train
    if inst.num_instances is None:
        raise ConfigError(
            "instdisc.num_instances is not set; set it to the shard set's sample count "
            "(`ray-ssl shards inspect <uri>` prints it)"
        )
    return BankSpec(
        size=inst.num_instances,
        dim=inst.feature_dim,
        num_shards=inst.bank_shards,
        dtype=inst.bank_dtype,
        name=bank_name(train.run_name),
        namespace=BANK_NAMESPACE,
        snapshot_uri=f"{train.storage_path.rstrip('/')}/{train.run_name}/{BANK_DIR}",
        seed=train.seed,
        max_restarts=inst.bank_max_restarts,
        max_inflight_updates=inst.max_inflight_updates,
        cpus_per_shard=inst.bank_cpus_per_shard,
        resource=inst.bank_resource,
        keep_snapshots=train.keep_checkpoints + 1,
        storage=config.storage,
    )


def project(encoder: nn.Module, projection: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised float32 embedding of normalised images: the backbone's pooled feature (the
    CLS token of a ViT) through the linear projection."""
    return F.normalize(projection(pooled_features(encoder, images)).float(), dim=1)


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class InstDiscDriver(MethodDriver):
    """Pins N to the shard set, owns the bank actors for the run, evaluates kNN at the end."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.bank: ShardedMemoryBank | None = None

    def prepare(self, config: Config) -> Config:
        """``instdisc.num_instances`` from the shard set's sample count (one bank row each)."""
        from ray_ssl.data.shards import read_manifest

        count = read_manifest(config.data.uri, config.storage).count
        n = config.methods[NAME].num_instances
        if n is not None and n != count:
            raise ConfigError(
                f"{NAME}.num_instances={n} but {config.data.uri} holds {count} samples; the bank "
                f"needs one row per sample: set {NAME}.num_instances={count}"
            )
        settings = dataclasses.replace(config.methods[NAME], num_instances=count)
        self.config = dataclasses.replace(config, methods={**config.methods, NAME: settings})
        return self.config

    def extra_cpus(self) -> float:
        inst = self.config.methods[NAME]
        return inst.bank_shards * inst.bank_cpus_per_shard

    def setup(self) -> None:
        """Create the bank from the driver, so that it outlives the Train workers."""
        self.bank = ShardedMemoryBank(bank_spec(self.config))

    def teardown(self) -> None:
        if self.bank is not None:
            self.bank.shutdown()
            self.bank = None

    def evaluate(self, load_trained: Callable[[], Method]) -> dict[str, float]:
        """Weighted kNN top-1 on the held-out split (``eval.knn_max_test`` images), with the
        whole bank as the labelled memory (paper protocol) and with recomputed features of the
        first ``eval.knn_max_train`` training images (a full feature pass costs an epoch); on
        the same images, raw pixels and the network at random init (``train.seed``)."""
        from ray_ssl.data.stream import load_labelled_arrays
        from ray_ssl.eval.baselines import knn_references
        from ray_ssl.eval.features import extract_features

        assert self.bank is not None, "setup() creates the bank"
        self.bank.reattach()  # the workers reset or restored the bank: serve its final state
        config = self.config
        inst, e, size = config.methods[NAME], config.eval, config.views.global_size
        method = load_trained()
        assert isinstance(method, InstDiscMethod)
        train_images, train_labels, train_idx = load_labelled_arrays(
            config.data.uri, config.storage, size=size
        )
        test_images, test_labels, _ = load_labelled_arrays(
            config.data.eval_uri, config.storage, limit=e.knn_max_test, size=size
        )
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
        row_labels = np.full(inst.num_instances, -1, dtype=np.int64)
        row_labels[train_idx] = train_labels
        network, device = embedding_network(method), torch.device("cpu")
        test = extract_features(
            network, test_images, e.feature_batch_size, device, normalize_images
        ).cls
        test_labels_t = torch.from_numpy(test_labels)
        predicted = knn_predict_from_bank(
            self.bank, row_labels, test, num_classes, inst.knn_k, inst.knn_sigma
        )
        subset = slice(0, e.knn_max_train)
        train = extract_features(
            network, train_images[subset], e.feature_batch_size, device, normalize_images
        ).cls
        recomputed = weighted_knn_accuracy(
            train,
            torch.from_numpy(train_labels[subset]),
            test,
            test_labels_t,
            num_classes,
            inst.knn_k,
            inst.knn_sigma,
        )
        torch.manual_seed(config.train.seed)  # the initialisation the run started from
        untrained = InstDiscMethod(config, steps_per_epoch=1, total_steps=1)
        references = knn_references(
            train_images[subset],
            train_labels[subset],
            test_images,
            test_labels,
            embedding_network(untrained),
            normalize_images,
            num_classes,
            inst.knn_k,
            inst.knn_sigma,
            e.feature_batch_size,
        )
        return {
            "knn_bank_top1": float((predicted == test_labels_t).float().mean()),
            "knn_recomputed_top1": recomputed,
            **references,
        }


class InstDiscMethod(Method):
    """Instance discrimination for the :class:`Method` contract.

    Batch: ``global_crops`` uint8 [B, C, H, W] (one augmented view) and ``idx`` int64 [B], the
    dense dataset index that is the sample's bank row.
    """

    driver_class = InstDiscDriver

    def __init__(self, config: Config, steps_per_epoch: int, total_steps: int) -> None:
        super().__init__(config)  # checks the views (instdisc_settings.view_spec)
        inst = config.methods[NAME]
        self.inst = inst
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.spec = bank_spec(config)
        if inst.exact_softmax and self.spec.size > EXACT_SOFTMAX_MAX_INSTANCES:
            raise ConfigError(
                f"instdisc.exact_softmax reads the whole bank every step; N={self.spec.size} is "
                f"above {EXACT_SOFTMAX_MAX_INSTANCES}: use NCE (instdisc.exact_softmax=false)"
            )
        self.num_instances = self.spec.size
        self.encoder, width = build_backbone(
            inst.backbone, config.model, config.views.channels, f"{NAME}.backbone"
        )
        self.projection = nn.Linear(width, inst.feature_dim)  # 128-d embedding (paper sec. 3)
        # Running log Z (None until the first batch): a Python float kept in the state dict via
        # get_extra_state, so a bf16/fp16 engine does not round it as it would a buffer.
        self.log_z: float | None = None
        self._bank: ShardedMemoryBank | None = None
        self._pending_update: tuple[np.ndarray, np.ndarray] | None = None
        self._prefetched: tuple[int, PendingNegatives] | None = None
        self._bank_ready = False  # the bank holds the rows of this run's current step

    # -- contract ------------------------------------------------------------------------------
    def backbone(self) -> nn.Module:
        return self.encoder

    def no_weight_decay(self, name: str, param: torch.Tensor) -> bool:
        """None exempt: lemniscate.pytorch decays every parameter, biases and norms included
        (``optim.SGD(net.parameters(), ..., weight_decay=5e-4)`` in cifar.py and main.py)."""
        return False

    @property
    def bank(self) -> ShardedMemoryBank:
        """The shared bank: rank 0 creates it (idempotently), the other ranks attach by name."""
        if self._bank is None:
            rank, _ = _distributed()
            self._bank = ShardedMemoryBank(self.spec, create=rank == 0)
        return self._bank

    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        """L2-normalised 128-d features f_i of uint8 crops [B, C, H, W]."""
        param = next(self.projection.parameters())
        return project(self.encoder, self.projection, normalize_images(crops).to(param.dtype))

    def get_extra_state(self) -> dict:
        return {"log_z": self.log_z}

    def set_extra_state(self, state: dict) -> None:
        self.log_z = state["log_z"]

    def forward(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        if not self._bank_ready:
            self._start_bank(step)
        rows = batch["idx"].detach().cpu().numpy()
        positives_pending = self.bank.gather_async(rows)  # overlaps with the backbone forward
        whole_bank = (
            self.bank.gather_async(np.arange(self.num_instances))
            if self.inst.exact_softmax
            else None
        )
        features = self.embed(batch["global_crops"])
        positives = torch.from_numpy(positives_pending.result()).to(features)
        self._pending_update = (rows, features.detach().cpu().numpy())
        positive_sim = (features.detach() * positives).sum(dim=1).mean()
        if whole_bank is not None:
            bank = torch.from_numpy(whole_bank.result()).to(features)
            target = batch["idx"].to(features.device)
            loss = exact_softmax_loss(features, bank, target, self.inst.temperature)
            return {"loss": loss, "exact_softmax": loss.detach(), "positive_sim": positive_sim}
        negatives = torch.from_numpy(self._negatives(step).features).to(features)
        data_logits, noise_logits = nce_logits(
            features, positives, negatives, self.inst.temperature
        )
        log_z = self._update_log_z(monte_carlo_log_z(noise_logits, self.num_instances))
        nce = nce_loss(data_logits, noise_logits, log_z, self.num_instances)
        proximal = proximal_term(features, positives, self.inst.proximal_weight)
        return {
            "loss": nce + proximal,
            "nce": nce.detach(),
            "proximal": proximal.detach(),
            "log_z": log_z,
            "positive_sim": positive_sim,
        }

    def after_step(self, step: int) -> None:
        """Enqueue this batch's bank update, then prefetch the next step's negatives."""
        if self._pending_update is None:
            return
        rows, features = self._pending_update
        self._pending_update = None
        self.bank.update(rows, features, self.inst.bank_momentum)
        done = step + 1
        if not self.inst.exact_softmax and done < self.total_steps:
            self._prefetched = (
                done,
                self.bank.prefetch_negatives(self.inst.negatives, self._seed(done)),
            )

    def before_checkpoint(self, step: int) -> None:
        """The checkpoint must hold every rank's updates: settle them, and drop negatives that
        were prefetched before the other ranks' updates landed (a resumed run draws them after)."""
        self.bank.flush()
        _, world_size = _distributed()
        if world_size > 1:
            torch.distributed.barrier()
        self._prefetched = None

    def save_extra_state(self, directory: str, step: int) -> None:
        """Snapshot every shard to run storage and point the checkpoint at it (rank 0)."""
        manifest = self.bank.snapshot(step)
        (Path(directory) / BANK_POINTER_FILE).write_text(json.dumps(manifest))

    def load_extra_state(self, directory: str) -> None:
        """Restore the bank to the checkpoint's snapshot, so model and bank agree."""
        pointer = Path(directory) / BANK_POINTER_FILE
        if not pointer.is_file():
            raise MemoryBankError(
                f"checkpoint {directory} has no {BANK_POINTER_FILE}; it was not written by InstDisc"
            )
        self._pending_update, self._prefetched = None, None
        rank, world_size = _distributed()
        if rank == 0:
            manifest = json.loads(pointer.read_text())
            self.bank.restore(manifest)
            log.info("memory bank restored to its snapshot of step %d", manifest["step"])
        if world_size > 1:
            torch.distributed.barrier()  # no rank updates the bank before it is restored
        self._bank_ready = True

    # -- helpers ---------------------------------------------------------------------------------
    def _start_bank(self, step: int) -> None:
        """A run from scratch starts from the seeded initial bank (rank 0 resets it)."""
        if step != 0:
            raise MemoryBankError(
                f"InstDisc is at step {step} but no bank snapshot was restored; resume from a "
                "checkpoint written by InstDisc"
            )
        rank, world_size = _distributed()
        if rank == 0:
            self.bank.reset()
        if world_size > 1:
            torch.distributed.barrier()  # the other ranks attach to the reset bank
        self._bank_ready = True

    def _seed(self, step: int) -> int:
        rank, _ = _distributed()
        return int(
            np.random.SeedSequence([self.config.train.seed, rank, step]).generate_state(1)[0]
        )

    def _negatives(self, step: int):
        if self._prefetched is not None and self._prefetched[0] == step:
            pending = self._prefetched[1]
        else:
            pending = self.bank.prefetch_negatives(self.inst.negatives, self._seed(step))
        self._prefetched = None
        return pending.result()

    def _update_log_z(self, batch_log_z: torch.Tensor) -> torch.Tensor:
        """Average Z over the workers, then into the running estimate (see ``running_log_z``)."""
        _, world_size = _distributed()
        batch_log_z = batch_log_z.double()
        if world_size > 1:
            z = batch_log_z.exp().reshape(1)
            torch.distributed.all_reduce(z)
            batch_log_z = (z / world_size).log().reshape(())
        previous = None if self.log_z is None else torch.tensor(self.log_z, dtype=torch.float64)
        log_z = running_log_z(previous, batch_log_z.cpu(), self.inst.z_momentum)
        self.log_z = float(log_z)
        return log_z.float()


@torch.no_grad()
def knn_predict_from_bank(
    bank: ShardedMemoryBank,
    row_labels: np.ndarray,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 200,
    sigma: float = 0.07,
) -> torch.Tensor:
    """Weighted kNN (sec. 3.4) with the memory bank itself as the labelled training features.

    Each chunk of queries gets its k nearest rows by the bank's map-reduce top-k; every query's
    neighbours lie in the union of those rows, so :func:`weighted_knn_predict` over just that
    union returns the same prediction as over the whole bank. Unlabelled rows (label -1) are
    left out of the vote (a -1 would index no class), so a query among them votes with fewer.
    """
    predictions = []
    for start in range(0, queries.shape[0], KNN_QUERY_CHUNK):
        chunk = queries[start : start + KNN_QUERY_CHUNK].float()
        _, rows = bank.topk(chunk.cpu().numpy(), k)
        candidates = np.unique(rows)
        candidates = candidates[row_labels[candidates] >= 0]  # unlabelled rows vote for nothing
        features = torch.from_numpy(bank.gather(candidates)).float()
        labels = torch.from_numpy(row_labels[candidates])
        predictions.append(weighted_knn_predict(features, labels, chunk, num_classes, k, sigma))
    return torch.cat(predictions)


def embedding_network(method: InstDiscMethod) -> nn.Module:
    """Backbone + projection + L2 norm as one module (the paper's kNN features), for
    :func:`ray_ssl.eval.features.extract_features` with ``normalize_images``."""
    return _Embedding(method)


class _Embedding(nn.Module):
    def __init__(self, method: InstDiscMethod) -> None:
        super().__init__()
        self.encoder, self.projection = method.encoder, method.projection

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return project(self.encoder, self.projection, images)
