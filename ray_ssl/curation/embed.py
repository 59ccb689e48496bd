"""Embeddings of a shard set, one Parquet file per shard, by a Ray Data actor pool.

The unit of work is a shard: ``ray.data.from_items(pending shards).map_batches(ShardEmbedder,
concurrency=n)`` gives each actor (``num_gpus=1`` each when the cluster has GPUs) whole shards; it
reads and decodes one with the data plane's reader (``read_shard_rows`` + ``decode_rows``, the
path behind ``ray_ssl.data.stream.read_samples``), embeds it in batches and writes
``<embeddings_uri>/<shard>.parquet`` (key, idx, label, embedding) atomically. A rerun skips the
shards whose Parquet file exists, so an interrupted run resumes where it stopped; a sidecar
``embeddings.json`` records the source and backbone so that stale embeddings are never mixed in.

Backbones: ``pixels`` (area-downsampled, flattened pixels), a timm model name, or an exported
ray-ssl backbone (``<file>.safetensors`` beside ``<file>.json`` naming the timm model and its
kwargs, as written by ``ray_ssl.train.checkpoint.export_backbone``). Embeddings are L2-normalised.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from ray_ssl.config import CurationConfig, StorageConfig
from ray_ssl.curation.errors import CurationError
from ray_ssl.data.datasource import read_shard_rows
from ray_ssl.data.decode import decode_rows
from ray_ssl.data.shards import Manifest, ShardInfo
from ray_ssl.models.export import WEIGHTS_SUFFIX, load_exported_backbone
from ray_ssl.models.vit import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD
from ray_ssl.storage import (
    atomic_write,
    pin_endpoint,
    read_bytes,
    resolve,
    write_bytes_atomic,
)

log = logging.getLogger(__name__)

PIXELS = "pixels"
META_NAME = "embeddings.json"
UINT8_MAX = 255.0


def parquet_name(shard: str) -> str:
    return shard.rsplit(".", 1)[0] + ".parquet"


@dataclass(frozen=True)
class EmbedSpec:
    """What determines the embeddings; a rerun must match it to reuse existing files."""

    source_uri: str
    backbone: str
    pixels_size: int
    timm_pretrained: bool


class Backbone:
    """uint8 images [B, H, W, C] -> L2-normalised float32 embeddings [B, dim]."""

    def __init__(self, spec: EmbedSpec, channels: int, storage: StorageConfig, device: str):
        self.spec, self.device = spec, torch.device(device)
        self.model: torch.nn.Module | None = None
        if spec.backbone == PIXELS:
            self.in_chans, self.input_size = channels, spec.pixels_size
            self.dim = channels * spec.pixels_size**2
            return
        import timm

        if spec.backbone.endswith(WEIGHTS_SUFFIX):
            model = load_exported_backbone(spec.backbone, storage)
        else:
            try:
                model = timm.create_model(
                    spec.backbone, pretrained=spec.timm_pretrained, num_classes=0
                )
            except RuntimeError as err:  # timm: unknown model name
                raise CurationError(
                    f"curation.backbone='{spec.backbone}' is not 'pixels', a timm model name or a "
                    f"'.safetensors' export ({err})"
                ) from err
        self.model = model.eval().to(self.device)
        self.in_chans, self.input_size = _input_shape(self.model)
        self.dim = int(self.model.num_features)
        if spec.backbone.endswith(WEIGHTS_SUFFIX):  # as ray_ssl.models.vit.normalize_images
            mean, std = (
                (GRAY_MEAN, GRAY_STD) if self.in_chans == 1 else (IMAGENET_MEAN, IMAGENET_STD)
            )
        else:
            config = timm.data.resolve_data_config({}, model=self.model)
            mean, std = config["mean"][: self.in_chans], config["std"][: self.in_chans]
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)

    def _prepare(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, C] -> float [B, in_chans, side, side], normalised for the model."""
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        batch = batch.permute(0, 3, 1, 2).float() / UINT8_MAX
        if batch.shape[1] != self.in_chans:  # gray <-> RGB
            batch = (
                batch.mean(1, keepdim=True)
                if self.in_chans == 1
                else batch.expand(-1, self.in_chans, -1, -1)
            )
        side = (self.input_size, self.input_size)
        if self.model is None:
            return F.interpolate(batch, size=side, mode="area")
        if batch.shape[-2:] != side:
            batch = F.interpolate(batch, size=side, mode="bilinear", antialias=True)
        return (batch - self.mean) / self.std

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        pixels = self._prepare(images)
        if self.model is None:
            features = pixels.flatten(1)
        else:
            features = self.model.forward_head(self.model.forward_features(pixels), pre_logits=True)
        return F.normalize(features.float(), dim=1).cpu().numpy()


def _input_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(channels, side) that ``model`` takes. timm's data config keeps the pretrained defaults
    even when ``in_chans``/``img_size`` were overridden, so the first convolution and a ViT's
    patch embedding are asked instead."""
    import timm

    side = int(timm.data.resolve_data_config({}, model=model)["input_size"][-1])
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size:
        side = int(img_size[0])
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return (int(conv.in_channels) if conv is not None else 3), side


def _images(decoded: dict[str, np.ndarray], size: int) -> np.ndarray:
    """The image column as one uint8 [B, H, W, C] array; mixed sizes are resized to ``size``."""
    column = decoded["image"]
    if column.dtype != object:
        return column
    from PIL import Image

    resized = []
    for image in column:
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        array = np.asarray(pil.resize((size, size), Image.BICUBIC))
        resized.append(array[..., None] if array.ndim == 2 else array)
    return np.stack(resized)


def embed_shard(
    shard_uri: str,
    info: ShardInfo,
    channels: int,
    backbone: Backbone,
    batch_size: int,
    storage: StorageConfig,
) -> tuple[pa.Table, int]:
    """(key, idx, label, embedding) of one shard's readable samples, and how many were not."""
    keys, idx, labels, chunks, dropped = [], [], [], [], 0
    for raw in read_shard_rows(shard_uri, info, storage, seed=None):
        columns = {
            name: raw.column(name).to_numpy(zero_copy_only=False) for name in raw.column_names
        }
        decoded = decode_rows(columns, channels)  # drops (and logs) undecodable samples
        dropped += raw.num_rows - len(decoded["idx"])
        if not len(decoded["idx"]):
            continue
        keys += decoded["key"].tolist()
        idx.append(decoded["idx"])
        labels.append(decoded["label"])
        images = _images(decoded, backbone.input_size)
        for start in range(0, len(images), batch_size):
            chunks.append(backbone(images[start : start + batch_size]))
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, backbone.dim), np.float32)
    flat = pa.array(embeddings.reshape(-1), pa.float32())
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "idx": pa.array(np.concatenate(idx) if idx else np.zeros(0, np.int64)),
            "label": pa.array(np.concatenate(labels) if labels else np.zeros(0, np.int64)),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, backbone.dim),
        }
    )
    return table, dropped


class ShardEmbedder:
    """Ray Data actor: embeds whole shards and writes one Parquet file per shard."""

    def __init__(
        self,
        source_uri: str,
        out_uri: str,
        spec: EmbedSpec,
        channels: int,
        batch_size: int,
        storage: StorageConfig,
    ):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.backbone = Backbone(spec, channels, storage, device)
        self.source_uri, self.out_uri = source_uri.rstrip("/"), out_uri
        self.channels, self.batch_size, self.storage = channels, batch_size, storage

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, dropped = [], []
        for name, count, nbytes, first_idx in zip(
            batch["name"], batch["count"], batch["bytes"], batch["first_idx"], strict=True
        ):
            info = ShardInfo(str(name), int(count), int(nbytes), int(first_idx))
            table, bad = embed_shard(
                f"{self.source_uri}/{info.name}",
                info,
                self.channels,
                self.backbone,
                self.batch_size,
                self.storage,
            )
            with atomic_write(
                resolve(self.out_uri, self.storage).join(parquet_name(info.name))
            ) as fh:
                pq.write_table(table, fh)
            rows.append(table.num_rows)
            dropped.append(bad)
        return {"name": batch["name"], "rows": np.array(rows), "dropped": np.array(dropped)}


def _check_meta(out_uri: str, spec: EmbedSpec, storage: StorageConfig) -> None:
    """Write ``embeddings.json`` or check that an existing one describes the same embeddings."""
    loc = resolve(out_uri, storage).join(META_NAME)
    wanted = asdict(spec)
    try:
        found = json.loads(read_bytes(loc))
    except FileNotFoundError:
        write_bytes_atomic(loc, json.dumps(wanted, indent=1).encode())
        return
    if found != wanted:
        diff = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
        raise CurationError(
            f"{out_uri} holds embeddings made differently ({diff}, existing vs wanted); set "
            "curation.embeddings_uri to a new location or delete the old embeddings"
        )


def _gpus_available() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


@dataclass
class EmbedResult:
    names: list[str]  # Parquet file of every shard, in shard order
    embedded_shards: int  # embedded by this call (the others existed)
    embedded_rows: int
    dropped: int  # unreadable samples skipped by this call


def embed_shard_set(
    source_uri: str, manifest: Manifest, cfg: CurationConfig, storage: StorageConfig
) -> EmbedResult:
    """Embed every shard of ``manifest`` that has no Parquet output yet."""
    import ray

    spec = EmbedSpec(source_uri, cfg.backbone, cfg.pixels_size, cfg.timm_pretrained)
    _check_meta(cfg.embeddings_uri, spec, storage)
    out = resolve(cfg.embeddings_uri, storage)
    names = [parquet_name(s.name) for s in manifest.shards]
    pending = [s for s, n in zip(manifest.shards, names, strict=True) if not out.join(n).exists()]
    log.info(
        "embedding %d of %d shards of %s with '%s' (%d already done)",
        len(pending),
        len(names),
        source_uri,
        cfg.backbone,
        len(names) - len(pending),
    )
    if not pending:
        return EmbedResult(names, 0, 0, 0)
    gpus = int(_gpus_available()) if cfg.embed_num_gpus is None else cfg.embed_num_gpus
    per_actor = {"num_gpus": 1.0} if gpus > 0 else {"num_cpus": 1.0}
    actors = min(gpus if gpus > 0 else cfg.embed_concurrency, len(pending))
    pinned = pin_endpoint(storage)
    items = [asdict(s) for s in pending]
    done = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(
            ShardEmbedder,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={
                "source_uri": source_uri,
                "out_uri": out.uri,
                "spec": spec,
                "channels": manifest.channels,
                "batch_size": cfg.embed_batch_size,
                "storage": pinned,
            },
            **per_actor,
        )
        .take_all()
    )
    result = EmbedResult(
        names, len(done), sum(int(r["rows"]) for r in done), sum(int(r["dropped"]) for r in done)
    )
    log.info(
        "embedded %d samples of %d shards (%d unreadable skipped)",
        result.embedded_rows,
        result.embedded_shards,
        result.dropped,
    )
    return result
