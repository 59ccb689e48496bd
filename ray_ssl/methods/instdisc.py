"""InstDisc (Wu et al., arXiv 1805.01978): non-parametric instance discrimination with NCE and a
memory bank held by a pool of Ray actors (:class:`~ray_ssl.memory_bank.bank.ShardedMemoryBank`).

Per step: the bank entries v_i of the batch rows are fetched while the backbone runs; m noise rows
are drawn once for the whole batch (prefetched during the previous step, after its bank update,
so they see it); the loss is NCE with a running Monte-Carlo Z plus the proximal term, or the
exact softmax over the whole bank for small N. ``after_step`` enqueues v_i <- normalize(0.5 v_i +
0.5 f_i) for the batch rows without waiting. The bank is snapshotted with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ray_ssl.config import Config, ConfigError, ViewConfig
from ray_ssl.eval.knn import weighted_knn_predict
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
from ray_ssl.methods.base import Batch, Method
from ray_ssl.models.vit import build_vit, normalize_images

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
    inst, train = config.instdisc, config.train
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
        keep_snapshots=train.keep_checkpoints + 1,
        storage=config.storage,
    )


class TimmBackbone(nn.Module):
    """A timm network with its classifier removed (pooled features), e.g. ResNet-50 as in the
    paper, offering what the export path needs (``timm_name_and_kwargs``, ``timm_state_dict``)."""

    def __init__(self, name: str, in_chans: int) -> None:
        super().__init__()
        import timm

        self._name, self._kwargs = name, {"num_classes": 0, "in_chans": in_chans}
        try:
            self.net = timm.create_model(name, **self._kwargs)
        except RuntimeError as err:  # timm's "Unknown model"
            raise ConfigError(f"instdisc.backbone='{name}' is not 'vit' or a timm model") from err
        self.num_features = int(self.net.num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def timm_name_and_kwargs(self) -> tuple[str, dict]:
        return self._name, dict(self._kwargs)

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        return self.net.state_dict()


def build_backbone(config: Config) -> tuple[nn.Module, int]:
    """(backbone, feature width): the ViT of the model section, or a timm network by name."""
    if config.instdisc.backbone == "vit":
        vit = build_vit(config.model)
        return vit, vit.embed_dim
    net = TimmBackbone(config.instdisc.backbone, config.views.channels)
    return net, net.num_features


def project(encoder: nn.Module, projection: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised float32 embedding of normalised images: the backbone's pooled feature (the
    CLS token of a ViT) through the linear projection."""
    out = encoder(images)
    pooled = out if isinstance(out, torch.Tensor) else out[0]  # ViT: (cls, patches)
    return F.normalize(projection(pooled).float(), dim=1)


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class InstDiscMethod(Method):
    """Instance discrimination for the :class:`Method` contract.

    Batch: ``global_crops`` uint8 [B, C, H, W] (one augmented view) and ``idx`` int64 [B], the
    dense dataset index that is the sample's bank row.
    """

    def __init__(self, config: Config, steps_per_epoch: int, total_steps: int) -> None:
        super().__init__()
        inst = config.instdisc
        if inst.negatives < 1 or inst.temperature <= 0 or not 0 <= inst.z_momentum < 1:
            raise ConfigError(
                f"instdisc.negatives={inst.negatives} must be >= 1, instdisc.temperature="
                f"{inst.temperature} > 0 and instdisc.z_momentum={inst.z_momentum} in [0, 1)"
            )
        if inst.backbone == "vit" and config.views.channels != config.model.in_chans:
            raise ConfigError(
                f"views.channels={config.views.channels} differs from model.in_chans="
                f"{config.model.in_chans}; set both to the same value"
            )
        self.config, self.inst = config, inst
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.spec = bank_spec(config)
        if inst.exact_softmax and self.spec.size > EXACT_SOFTMAX_MAX_INSTANCES:
            raise ConfigError(
                f"instdisc.exact_softmax reads the whole bank every step; N={self.spec.size} is "
                f"above {EXACT_SOFTMAX_MAX_INSTANCES}: use NCE (instdisc.exact_softmax=false)"
            )
        self.num_instances = self.spec.size
        self.encoder, width = build_backbone(config)
        self.projection = nn.Linear(width, inst.feature_dim)  # 128-d embedding (paper sec. 3)
        # Running log Z (None until the first batch): a Python float kept in the state dict via
        # get_extra_state, so a bf16/fp16 engine does not round it as it would a buffer.
        self.log_z: float | None = None
        self._bank: ShardedMemoryBank | None = None
        self._pending_update: tuple[np.ndarray, np.ndarray] | None = None
        self._prefetched: tuple[int, PendingNegatives] | None = None

    # -- contract ------------------------------------------------------------------------------
    @property
    def view_spec(self) -> ViewConfig:
        """One augmented view per sample (paper sec. 4: random crop, jitter, grayscale, flip)."""
        return dataclasses.replace(
            self.config.views, kind="single", global_crops=1, local_crops=0, mask="none"
        )

    def backbone(self) -> nn.Module:
        return self.encoder

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
        if done % self.config.train.checkpoint_every == 0 or done == self.total_steps:
            self._settle_updates()  # the checkpoint after this step must hold every rank's update
        if not self.inst.exact_softmax and done < self.total_steps:
            self._prefetched = (
                done,
                self.bank.prefetch_negatives(self.inst.negatives, self._seed(done)),
            )

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

    # -- helpers ---------------------------------------------------------------------------------
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

    def _settle_updates(self) -> None:
        self.bank.flush()
        _, world_size = _distributed()
        if world_size > 1:
            torch.distributed.barrier()


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
    union returns the same prediction as over the whole bank.
    """
    predictions = []
    for start in range(0, queries.shape[0], KNN_QUERY_CHUNK):
        chunk = queries[start : start + KNN_QUERY_CHUNK].float()
        _, rows = bank.topk(chunk.cpu().numpy(), k)
        candidates = np.unique(rows)
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
