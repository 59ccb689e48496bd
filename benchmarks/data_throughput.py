"""Images/s of our Ray Data pipeline against webdataset + torch DataLoader, side by side.

Both pipelines read the SAME shards (natural JPEG crops cut from scikit-learn's two sample
photos), do the SAME decode and views (``ray_ssl.data.views``: Franca multi-crop 2x224 + 8x98 with
CyclicMask) with the same number of CPU workers, and deliver the same batch contract (crop-major
uint8 tensors) for every image of the epoch. After one cold epoch each, the pipelines run in
rounds of one warm epoch each, the order rotating every round, so that both see the same machine
(on a shared host the speed of a core drifts by tens of percent within a minute). Each round
gives a ratio of the two epochs' images/s; the figure is the median of those ratios. The Ray
cluster stays up through the DataLoader's epochs too (idle, it uses about 0.045 cores).
Images per CPU-second of the whole process tree is printed as well. Also printed: decode + views
per CPU-second with our PIL implementation and with an equivalent torchvision.transforms.v2
pipeline on uint8 tensors, and raw read throughput of ``ray.data.read_webdataset`` against our
block datasource.

Last line: ``ray_data_vs_dataloader=<median over rounds of ours / DataLoader images/s>``, the
issue's figure. Usage: ``python benchmarks/data_throughput.py [--quick] [--workers 2]``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ray_ssl.config import DataConfig, ShardsConfig, StorageConfig, ViewConfig
from ray_ssl.data.decode import build_views_batch
from ray_ssl.data.shards import Manifest, write_shard_set
from ray_ssl.data.views import ViewBuilder, decode_image

CROP_SIDES = (256, 480)  # random JPEG sizes cut from the sample photos (clipped to the photo)
JPEG_QUALITY = 90
FRANCA_VIEWS = ViewConfig(kind="multicrop", mask="cyclic")  # 2 x 224 + 8 x 98, patch 14
BATCH = 32
READ_SAMPLES = {True: 4000, False: 40000}  # small PNGs for the reader comparison (quick, full)
READ_REPEATS = 3  # full mode: best of three reads per reader
VIEW_SAMPLES = {True: 24, False: 128}  # JPEGs for the one-core PIL vs torchvision comparison
ROUNDS = {True: 3, False: 5}  # warm epochs timed per pipeline, interleaved (quick, full)


def make_jpeg_folder(root: Path, count: int, seed: int = 0) -> None:
    """``count`` random crops of the two scikit-learn sample photos, one class per photo."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    rng = np.random.default_rng(seed)
    for name in photos.filenames:
        (root / Path(name).stem).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        which = i % len(photos.images)
        photo = photos.images[which]
        h = int(rng.integers(CROP_SIDES[0], min(CROP_SIDES[1], photo.shape[0]) + 1))
        w = int(rng.integers(CROP_SIDES[0], min(CROP_SIDES[1], photo.shape[1]) + 1))
        top = int(rng.integers(0, photo.shape[0] - h + 1))
        left = int(rng.integers(0, photo.shape[1] - w + 1))
        target = root / Path(photos.filenames[which]).stem / f"{i:06d}.jpg"
        Image.fromarray(photo[top : top + h, left : left + w]).save(target, quality=JPEG_QUALITY)


def tree_cpu_seconds() -> float:
    """CPU time so far of this process and all its descendants (DataLoader workers, Ray)."""
    import psutil  # installed with deepspeed

    total = 0.0
    root = psutil.Process()
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:  # exited meanwhile
            continue
    return total


Epochs = Callable[[], Iterable[dict]]


def timed_epoch(epochs: Epochs) -> tuple[int, float, float]:
    """Images, wall seconds and process-tree CPU seconds of one epoch."""
    start, cpu_start, images = time.perf_counter(), tree_cpu_seconds(), 0
    for batch in epochs():
        images += int(batch["idx"].shape[0])
    return images, time.perf_counter() - start, tree_cpu_seconds() - cpu_start


@dataclass
class PipelineRates:
    """Per warm epoch of one pipeline, in round order."""

    images: int
    rates: list[float] = field(default_factory=list)  # images/s, pipeline fill included
    cpu_seconds: float = 0.0

    @property
    def median(self) -> float:
        return float(np.median(self.rates))

    @property
    def per_cpu_second(self) -> float:
        return self.images * len(self.rates) / self.cpu_seconds


def interleaved_rates(pipelines: dict[str, Epochs], rounds: int) -> dict[str, PipelineRates]:
    """``rounds`` warm epochs of each pipeline, one of each per round, the order rotated by one
    every round so no pipeline always runs first or last (drift in machine speed cancels)."""
    names = list(pipelines)
    results: dict[str, PipelineRates] = {}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            images, wall, cpu = timed_epoch(pipelines[name])
            result = results.setdefault(name, PipelineRates(images))
            result.rates.append(images / wall)
            result.cpu_seconds += cpu
    return results


def median_ratio(ours: PipelineRates, baseline: PipelineRates) -> float:
    """Median over rounds of ours / baseline images/s within the same round."""
    return float(np.median([a / b for a, b in zip(ours.rates, baseline.rates, strict=True)]))


def ray_pipeline(uri: str, views: ViewConfig, reader: str) -> Epochs:
    """One epoch per call: each iteration of the dataset is a new execution on warm workers."""
    from ray_ssl.data.stream import WorkerBatchIterator, build_train_dataset

    data = DataConfig(uri=uri, reader=reader, batch_size=BATCH)
    dataset = build_train_dataset(data, views, StorageConfig())
    cpu = torch.device("cpu")
    return lambda: WorkerBatchIterator(dataset.iterator(), BATCH, views, cpu, 0.0)


class _DecodeViews:
    """webdataset sample -> the same decode and views as ours (same per-sample seeding)."""

    def __init__(self, views: ViewConfig):
        self.views = views

    def __call__(self, sample: dict) -> dict:
        raw = {
            "key": np.array([sample["__key__"]], dtype=object),
            "idx": np.array([int(sample["idx"])]),
            "label": np.array([int(sample["cls"])]),
            "image": np.array([sample.get("jpg", sample.get("png"))], dtype=object),
            "corrupt": np.zeros(1, bool),
            "seed": np.zeros(1, np.int64),
        }
        return {k: v[0] for k, v in build_views_batch(raw, self.views).items()}


def _collate(samples: list[dict], views: ViewConfig) -> dict:
    from ray_ssl.data.stream import to_batch_contract
    from ray_ssl.data.views import mask_generator

    batch = {k: np.stack([s[k] for s in samples]) for k in samples[0]}
    batch.pop("corrupt")
    out = to_batch_contract(batch, torch.device("cpu"))
    masks = mask_generator(views)
    if masks is not None:  # drawn per batch, as ours
        out["masks"] = torch.from_numpy(
            masks.for_batch(len(out["global_crops"]), batch["mask_seed"])
        )
    return out


def dataloader_pipeline(uri: str, manifest: Manifest, views: ViewConfig, workers: int) -> Epochs:
    import webdataset as wds

    urls = [f"{uri}/{s.name}" for s in manifest.shards]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(_DecodeViews(views))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=BATCH,
        num_workers=workers,
        collate_fn=functools.partial(_collate, views=views),
        drop_last=False,  # every image of the epoch is delivered and counted, as in ours
        persistent_workers=True,
    )
    return lambda: iter(loader)


def views_per_cpu_second(
    jpegs: list[bytes], builder: Callable[[bytes, np.random.Generator], object]
) -> float:
    """Decode + views in this process (one thread): images per CPU-second."""
    rng = np.random.default_rng(0)
    builder(jpegs[0], rng)
    start = time.process_time()
    for data in jpegs:
        builder(data, rng)
    return len(jpegs) / (time.process_time() - start)


def torchvision_views(views: ViewConfig) -> Callable[[bytes, np.random.Generator], object]:
    """The same recipe with torchvision.transforms.v2 on uint8 tensors (decode: torchvision.io)."""
    import torchvision.transforms.v2 as T
    from torchvision.io import decode_jpeg

    bicubic = T.InterpolationMode.BICUBIC

    def crop(size, scale, blur_p, solarize_p):
        ops = [
            T.RandomResizedCrop(size, scale=scale, interpolation=bicubic, antialias=True),
            T.RandomHorizontalFlip(views.flip_p),
            T.RandomApply([T.ColorJitter(*views.jitter_strength)], p=views.jitter_p),
            T.RandomGrayscale(views.grayscale_p),
            T.RandomApply([T.GaussianBlur(9, (0.1, 2.0))], p=blur_p),
            T.RandomSolarize(128, p=solarize_p),
        ]
        return T.Compose(ops)

    globals_ = [
        crop(views.global_size, views.global_scale, views.blur_p[0], 0.0),
        crop(views.global_size, views.global_scale, views.blur_p[1], views.solarize_p),
    ]
    local = crop(views.local_size, views.local_scale, views.local_blur_p, 0.0)

    def build(data: bytes, rng: np.random.Generator) -> list:
        image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return [t(image) for t in globals_] + [local(image) for _ in range(views.local_crops)]

    return build


def read_only(uri: str, manifest: Manifest, reader: str, repeats: int) -> tuple[float, float]:
    """Best raw samples per second and per CPU-second of a reader (no decode) over repeats."""
    import ray

    from ray_ssl.data.datasource import ShardSetDatasource

    if reader == "blocks":
        dataset = ray.data.read_datasource(ShardSetDatasource(uri, manifest, StorageConfig()))
    else:
        paths = [f"{uri}/{s.name}" for s in manifest.shards]
        dataset = ray.data.read_webdataset(paths, decoder=None)
    best_wall, best_cpu = 0.0, 0.0
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), tree_cpu_seconds()
        batches = dataset.iter_batches(batch_size=256, batch_format="numpy")
        rows = sum(len(b["idx"]) for b in batches)
        best_wall = max(best_wall, rows / (time.perf_counter() - start))
        best_cpu = max(best_cpu, rows / (tree_cpu_seconds() - cpu_start))
    return best_wall, best_cpu


def print_cold_epoch(name: str, epochs: Epochs) -> None:
    """The first epoch, which starts the workers and imports; not part of the figure."""
    images, wall, _ = timed_epoch(epochs)
    print(f"{name}: cold epoch {images / wall:.1f} img/s ({images} images)")


def print_raw_reads(uri: str, manifest: Manifest, tmp: str, quick: bool) -> None:
    """Raw read throughput, no decode: our block datasource against read_webdataset, on the
    JPEG set and on many small PNGs (where per-sample overhead shows, ray issue 65350)."""
    small_uri = f"{tmp}/small"
    small = ShardsConfig(source="synthetic", synthetic_count=READ_SAMPLES[quick],
                         synthetic_size=32, samples_per_shard=1000)  # fmt: skip
    small_manifest = write_shard_set(small, small_uri, StorageConfig())
    for name, (set_uri, set_manifest) in {
        "JPEG set": (uri, manifest),
        f"{small_manifest.count} 32px PNGs": (small_uri, small_manifest),
    }.items():
        repeats = 1 if quick else READ_REPEATS
        blocks = read_only(set_uri, set_manifest, "blocks", repeats)
        webdataset = read_only(set_uri, set_manifest, "ray_webdataset", repeats)
        print(f"raw read ({name}): blocks {blocks[0]:.0f} samples/s ({blocks[1]:.0f} per "
              f"CPU-s), read_webdataset {webdataset[0]:.0f} samples/s ({webdataset[1]:.0f} "
              f"per CPU-s); blocks/read_webdataset = {blocks[0] / webdataset[0]:.2f} wall, "
              f"{blocks[1] / webdataset[1]:.2f} per CPU-s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run, under a minute")
    parser.add_argument("--workers", type=int, default=2, help="CPU workers for both pipelines")
    parser.add_argument("--images", type=int, default=None)
    args = parser.parse_args()
    count = args.images or (160 if args.quick else 960)
    per_shard = 16 if args.quick else 64
    torch.set_num_threads(1)

    import ray

    with tempfile.TemporaryDirectory(prefix="ray-ssl-bench-") as tmp:
        folder, uri = Path(tmp) / "jpegs", f"{tmp}/shards"
        make_jpeg_folder(folder / "train", count)
        shards = ShardsConfig(source=f"folder:{folder}", image_format="jpg",
                              samples_per_shard=per_shard)  # fmt: skip
        manifest = write_shard_set(shards, uri, StorageConfig())
        files = sorted((folder / "train").glob("*/*.jpg"))[: VIEW_SAMPLES[args.quick]]
        jpegs = [p.read_bytes() for p in files]
        v = FRANCA_VIEWS
        print(f"{manifest.count} JPEGs of {CROP_SIDES[0]}-{CROP_SIDES[1]} px in "
              f"{len(manifest.shards)} shards; views {v.global_crops}x{v.global_size} + "
              f"{v.local_crops}x{v.local_size}, mask {v.mask}")  # fmt: skip

        builder = ViewBuilder(FRANCA_VIEWS)
        pil = views_per_cpu_second(jpegs, lambda d, rng: builder(decode_image(d, 3), rng))
        tv2 = views_per_cpu_second(jpegs, torchvision_views(FRANCA_VIEWS))
        print(f"decode + views, one core: PIL (ours) {pil:.1f} img/CPU-s, torchvision.v2 on uint8 "
              f"tensors {tv2:.1f} img/CPU-s, PIL/tv2 = {pil / tv2:.2f}")  # fmt: skip

        # The DataLoader's persistent workers fork before Ray starts any threads in this process.
        pipelines = {"DataLoader": dataloader_pipeline(uri, manifest, FRANCA_VIEWS, args.workers)}
        print_cold_epoch("DataLoader", pipelines["DataLoader"])
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        try:
            for reader in ("blocks",) if args.quick else ("blocks", "ray_webdataset"):
                name = f"Ray Data, reader={reader}"
                pipelines[name] = ray_pipeline(uri, FRANCA_VIEWS, reader)
                print_cold_epoch(name, pipelines[name])
            results = interleaved_rates(pipelines, ROUNDS[args.quick])
            baseline = results["DataLoader"]
            for name, rates in results.items():
                epochs = ", ".join(f"{r:.1f}" for r in rates.rates)
                print(
                    f"{name} ({args.workers} workers): warm epochs {epochs} img/s, median "
                    f"{rates.median:.1f}; {rates.per_cpu_second:.1f} img/CPU-s; over the "
                    f"DataLoader in the same round: {median_ratio(rates, baseline):.3f}"
                )
            print_raw_reads(uri, manifest, tmp, args.quick)
        finally:
            ray.shutdown()
        ours = results["Ray Data, reader=blocks"]
        print(f"per core used: Ray Data {ours.per_cpu_second:.1f} img/s/core, DataLoader "
              f"{baseline.per_cpu_second:.1f} img/s/core, ratio "
              f"{ours.per_cpu_second / baseline.per_cpu_second:.3f}")  # fmt: skip
    print(f"ray_data_vs_dataloader={median_ratio(ours, baseline):.3f}")


if __name__ == "__main__":
    main()
