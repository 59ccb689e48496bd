"""The Ray Data stream: S3 shards to two consumers with exactly the written samples, the batch
contract's crop-major layout, per-epoch shuffling, corrupt-sample accounting and the rate error,
both readers, evaluation helpers, and a real 2-worker TorchTrainer (Train V2) consuming it."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ray_ssl.config import DataConfig, ShardsConfig, StorageConfig, ViewConfig
from ray_ssl.data.datasource import ShardSetDatasource, shard_order
from ray_ssl.data.errors import CorruptDataError
from ray_ssl.data.shards import iter_shard, read_manifest, write_shard_set
from ray_ssl.data.stream import (
    WorkerBatchIterator,
    build_train_dataset,
    load_labelled_arrays,
    read_samples,
    to_batch_contract,
    view_batch_rows,
)
from ray_ssl.data.tario import TarSample, TruncatedShardError, iter_tar, write_tar
from ray_ssl.data.views import crop_counts
from ray_ssl.storage import resolve

STORAGE = StorageConfig()
CPU = torch.device("cpu")
VIEWS = ViewConfig(
    kind="multicrop",
    channels=1,
    global_crops=2,
    global_size=16,
    global_scale=(0.4, 1.0),
    local_crops=2,
    local_size=8,
    local_scale=(0.2, 0.5),
    patch_size=4,
    mask="cyclic",
)


@pytest.fixture(scope="module")
def digits_test(tmp_path_factory) -> str:
    """digits test split (359 samples) in shards of 60, on the local disk."""
    uri = str(tmp_path_factory.mktemp("digits") / "test")
    write_shard_set(ShardsConfig(source="digits", split="test", samples_per_shard=60), uri, STORAGE)
    return uri


def _written(uri: str) -> dict[int, tuple[str, int]]:
    """idx -> (key, label) as stored in the shards."""
    loc = resolve(uri, STORAGE)
    manifest = read_manifest(uri, STORAGE)
    samples = [s for info in manifest.shards for s in iter_shard(loc.join(info.name))]
    return {s.int_field("idx"): (s.key, s.int_field("cls")) for s in samples}


def _concurrently(consume, argument_lists: list[tuple]) -> list:
    """Run one consumer per split at the same time (split iterators advance together)."""
    with ThreadPoolExecutor(len(argument_lists)) as pool:
        return list(pool.map(lambda args: consume(*args), argument_lists))


def _consume_batches(split, views: ViewConfig) -> dict:
    it = WorkerBatchIterator(split, 32, views, CPU, max_corrupt_fraction=0.0, drop_last=False)
    idx, labels, shapes = [], [], set()
    for batch in it:
        idx += batch["idx"].tolist()
        labels += batch["label"].tolist()
        shapes.add(tuple((k, tuple(v.shape[1:]), str(v.dtype)) for k, v in sorted(batch.items())))
    return {"idx": idx, "labels": labels, "shapes": shapes, "seen": it.stats.seen}


def _consume_rows(split) -> list[tuple[str, int, int, tuple]]:
    rows = []
    for batch in split.iter_batches(batch_size=50, batch_format="numpy"):
        for key, idx, label, image in zip(
            batch["key"], batch["idx"], batch["label"], batch["image"], strict=True
        ):
            rows.append((str(key), int(idx), int(label), image.shape))
    return rows


def test_s3_shards_stream_to_two_consumers_exactly_once(ray_local, s3_bucket):
    uri = f"{s3_bucket}/digits/test"
    write_shard_set(ShardsConfig(source="digits", split="test", samples_per_shard=60), uri, STORAGE)
    written = _written(uri)
    assert sorted(written) == list(range(359))

    dataset = build_train_dataset(DataConfig(uri=uri), VIEWS, STORAGE)
    parts = _concurrently(_consume_batches, [(s, VIEWS) for s in dataset.streaming_split(2)])
    idx = parts[0]["idx"] + parts[1]["idx"]
    assert sorted(idx) == list(range(359))  # every sample once, no duplicates
    labels = dict(zip(idx, parts[0]["labels"] + parts[1]["labels"], strict=True))
    assert labels == {i: label for i, (_, label) in written.items()}
    assert parts[0]["seen"] + parts[1]["seen"] == 359
    shapes = parts[0]["shapes"] | parts[1]["shapes"]
    assert {dict((k, (s, d)) for k, s, d in entry)["global_crops"] for entry in shapes} == {
        ((1, 16, 16), "torch.uint8")
    }

    rows = _concurrently(
        _consume_rows, [(s,) for s in read_samples(uri, STORAGE).streaming_split(2)]
    )
    got = rows[0] + rows[1]
    assert sorted((i, (k, label)) for k, i, label, _ in got) == sorted(written.items())
    assert {shape for *_, shape in got} == {(8, 8, 1)}


def test_batch_contract_is_crop_major():
    views = ViewConfig(kind="multicrop", channels=3, global_crops=2, global_size=8, local_crops=3,
                       local_size=4, patch_size=4, mask="block")  # fmt: skip
    b, (g, n_local) = 5, crop_counts(views)
    batch = {
        "global_crops": np.zeros((b, g, 8, 8, 3), np.uint8),
        "local_crops": np.zeros((b, n_local, 4, 4, 3), np.uint8),
        "masks": np.zeros((b, g, 4), bool),
        "idx": np.arange(b),
        "label": np.arange(b) % 2,
    }
    for s in range(b):
        for v in range(g):
            batch["global_crops"][s, v] = 10 * s + v
            batch["masks"][s, v, v] = True
        for v in range(n_local):
            batch["local_crops"][s, v, :, :, 1] = 10 * s + v
    out = to_batch_contract(batch, CPU)
    assert out["global_crops"].shape == (g * b, 3, 8, 8)
    assert out["local_crops"].shape == (n_local * b, 3, 4, 4)
    assert out["masks"].shape == (g * b, 4) and out["masks"].dtype == torch.bool
    for s in range(b):
        for v in range(g):
            assert (out["global_crops"][v * b + s] == 10 * s + v).all()  # row g*B+b = crop g of b
            assert out["masks"][v * b + s].nonzero().flatten().tolist() == [v]
        for v in range(n_local):
            assert (out["local_crops"][v * b + s, 1] == 10 * s + v).all()
            assert (out["local_crops"][v * b + s, 0] == 0).all()  # channel axis moved, not mixed
    assert out["idx"].dtype == torch.int64 and out["label"].tolist() == [0, 1, 0, 1, 0]
    single = to_batch_contract(
        {k: v[:, :1] if k != "idx" and k != "label" else v for k, v in batch.items()}, CPU
    )
    single["global_crops"] += 1  # never a view of the (read-only) host batch
    assert batch["global_crops"][0, 0, 0, 0, 0] == 0


def test_batch_contract_from_row_pieces_equals_the_whole_batch():
    rng = np.random.default_rng(0)
    batch = {
        "global_crops": rng.integers(0, 256, (7, 2, 6, 6, 3), dtype=np.uint8),
        "local_crops": rng.integers(0, 256, (7, 3, 4, 4, 3), dtype=np.uint8),
        "masks": rng.random((7, 2, 9)) < 0.5,
        "idx": np.arange(7),
        "label": np.arange(7) % 3,
    }
    pieces = [{k: v[a:b] for k, v in batch.items()} for a, b in ((0, 3), (3, 4), (4, 7))]
    whole, joined = to_batch_contract(batch, CPU), to_batch_contract(pieces, CPU)
    for name, tensor in whole.items():
        assert torch.equal(joined[name], tensor), name


@pytest.mark.parametrize("batch", [16, 32, 48, 64, 100])
@pytest.mark.parametrize("samples", [160, 960, 60000])
def test_decode_blocks_fill_batches_and_keep_every_cpu_busy(batch, samples):
    franca = ViewConfig(kind="multicrop", mask="cyclic")
    rows = view_batch_rows(franca, batch, samples, cpus=2)
    assert batch % rows == 0 or rows % batch == 0  # whole blocks make whole batches
    n_global, n_local = crop_counts(franca)
    block_bytes = rows * 3 * (n_global * 224**2 + n_local * 98**2)
    assert block_bytes <= max(32 << 20, 8 * 3 * (n_global * 224**2 + n_local * 98**2))
    assert samples // rows >= 2 * 4 or rows <= 8  # at least 4 tasks per CPU when it can


def _shard_sequence(idx: list[int], per_shard: int) -> list[int]:
    shards = [i // per_shard for i in idx]
    return [s for k, s in enumerate(shards) if k == 0 or s != shards[k - 1]]


def _ordered_batches(dataset) -> tuple[list[int], np.ndarray]:
    idx, crops = [], []
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        idx += batch["idx"].tolist()
        crops.append(batch["global_crops"])
    order = np.argsort(idx)
    return idx, np.concatenate(crops)[order]


def test_epochs_reshuffle_deterministically(ray_local, digits_test):
    data = DataConfig(uri=digits_test, shuffle_seed=7)
    dataset = build_train_dataset(data, VIEWS, STORAGE, epoch=0)
    dataset.context.execution_options.preserve_order = True
    epoch0, crops0 = _ordered_batches(dataset)
    epoch1, crops1 = _ordered_batches(dataset)  # a second execution is the next epoch
    assert sorted(epoch0) == sorted(epoch1) == list(range(359))
    assert _shard_sequence(epoch0, 60) == shard_order(6, 7, 0)
    assert _shard_sequence(epoch1, 60) == shard_order(6, 7, 1) != shard_order(6, 7, 0)
    assert epoch0 != epoch1 and not np.array_equal(crops0, crops1)

    again = build_train_dataset(data, VIEWS, STORAGE, epoch=1)  # e.g. after a restart
    again.context.execution_options.preserve_order = True
    epoch1_again, crops1_again = _ordered_batches(again)
    assert epoch1_again == epoch1  # same (seed, epoch): same order and same augmentations
    np.testing.assert_array_equal(crops1_again, crops1)


def test_shuffle_buffer_mixes_shards_and_delivers_each_sample_once(ray_local, digits_test):
    data = DataConfig(uri=digits_test, shuffle_seed=7)

    def batches(buffer: int, seed: int = 0) -> tuple[list[list[int]], WorkerBatchIterator]:
        dataset = build_train_dataset(data, VIEWS, STORAGE, epoch=0)
        dataset.context.execution_options.preserve_order = True
        it = WorkerBatchIterator(
            dataset.iterator(), 32, VIEWS, CPU, 0.0, drop_last=False,
            shuffle_buffer=buffer, shuffle_seed=seed,
        )  # fmt: skip
        return [batch["idx"].tolist() for batch in it], it

    fifo, _ = batches(0)
    shuffled, it = batches(180, seed=5)  # 3 shards' worth of rows
    assert sorted(i for batch in shuffled for i in batch) == list(range(359))
    assert it.stats.seen == 359 and sorted(np.concatenate(it.consumed_idx)) == list(range(359))
    assert batches(180, seed=5)[0] == shuffled  # seeded
    shards_per_batch = [len({i // 60 for i in batch}) for batch in shuffled]
    assert max(len({i // 60 for i in batch}) for batch in fifo) <= 2  # a shard at a time
    assert min(shards_per_batch[:-1]) >= 3, shards_per_batch  # every full batch mixes shards


def test_read_tasks_follow_the_epoch_order(digits_test):
    manifest = read_manifest(digits_test, STORAGE)
    source = ShardSetDatasource(digits_test, manifest, STORAGE, shuffle_seed=3, epoch=4)
    files = [t.metadata.input_files[0].rsplit("/", 1)[1] for t in source.get_read_tasks(100)]
    assert files == [manifest.shards[i].name for i in shard_order(6, 3, 4)]


def test_ray_webdataset_reader_yields_the_same_samples(ray_local, digits_test):
    data = DataConfig(uri=digits_test, reader="ray_webdataset")
    it = WorkerBatchIterator(
        build_train_dataset(data, VIEWS, STORAGE).iterator(), 64, VIEWS, CPU, 0.0, drop_last=False
    )
    assert sorted(i for batch in it for i in batch["idx"].tolist()) == list(range(359))


def _rewrite_shard(path: Path, edit) -> None:
    with open(path, "rb") as fh:
        samples = list(iter_tar(fh))
    with open(path, "wb") as fh:
        write_tar(fh, [edit(i, s) for i, s in enumerate(samples)])


@pytest.fixture
def corrupted(tmp_path) -> tuple[str, set[int]]:
    """digits test in 6 shards with a bad image, a sample without idx and a truncated shard."""
    uri = str(tmp_path / "set")
    write_shard_set(ShardsConfig(source="digits", split="test", samples_per_shard=60), uri, STORAGE)
    bad = {5}

    def garbage_image(i: int, s: TarSample) -> TarSample:
        return TarSample(s.key, {**s.fields, "png": b"\x89PNG garbage"}) if i == 5 else s

    def no_idx(i: int, s: TarSample) -> TarSample:
        return TarSample(s.key, {k: v for k, v in s.fields.items() if k != "idx"}) if i == 3 else s

    _rewrite_shard(Path(uri) / "shard-000000.tar", garbage_image)
    _rewrite_shard(Path(uri) / "shard-000001.tar", no_idx)
    bad.add(63)
    shard = Path(uri) / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[: 40 * 3 * 1024 + 700])  # mid-way through sample 40
    survivors = 0  # whole samples before the cut (one cut short of its idx is corrupt)
    with open(shard, "rb") as fh:
        try:
            for sample in iter_tar(fh):
                survivors += sample.int_field("idx") is not None
        except TruncatedShardError:
            pass
    assert 30 < survivors < 60
    bad |= set(range(120 + survivors, 180))
    return uri, bad


def test_corrupt_samples_are_skipped_and_counted(ray_local, corrupted):
    uri, bad = corrupted
    it = WorkerBatchIterator(
        build_train_dataset(DataConfig(uri=uri), VIEWS, STORAGE).iterator(),
        32,
        VIEWS,
        CPU,
        0.2,
        drop_last=False,
    )
    idx = [i for batch in it for i in batch["idx"].tolist()]
    assert sorted(idx) == sorted(set(range(359)) - bad)
    assert (it.stats.seen, it.stats.corrupt) == (359, len(bad))


def test_corrupt_rate_above_the_limit_is_an_error(ray_local, corrupted):
    uri, bad = corrupted
    it = WorkerBatchIterator(
        build_train_dataset(DataConfig(uri=uri), VIEWS, STORAGE).iterator(), 32, VIEWS, CPU, 0.01
    )
    with pytest.raises(CorruptDataError, match="max_corrupt_fraction=0.01") as err:
        for _ in it:
            pass
    assert "\n" not in str(err.value) and it.stats.corrupt > 0


def test_load_labelled_arrays(digits_test, tmp_path):
    written = _written(digits_test)
    images, labels, idx = load_labelled_arrays(digits_test, STORAGE, limit=100)
    assert images.shape == (100, 8, 8, 1) and images.dtype == np.uint8
    assert idx.tolist() == list(range(100)) and labels.tolist() == [
        written[i][1] for i in range(100)
    ]
    resized, _, _ = load_labelled_arrays(digits_test, STORAGE, limit=3, size=12)
    assert resized.shape == (3, 12, 12, 1)


def test_torch_trainer_two_workers_consume_each_epoch(ray_local, tmp_path):
    from ray.train import DataConfig as TrainDataConfig
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # nested so that it is pickled by value: Train's controller cannot import this module
    def _train_loop(config: dict) -> None:
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        rank = ray.train.get_context().get_world_rank()
        for epoch in range(2):
            it = WorkerBatchIterator(shard, 16, config["views"], CPU, 0.0, drop_last=False)
            seen = []
            for batch in it:
                assert batch["global_crops"].shape[0] == 2 * batch["idx"].shape[0]
                seen += batch["idx"].tolist()
            Path(config["out"], f"rank{rank}_epoch{epoch}.json").write_text(json.dumps(seen))
            ray.train.report({"epoch": epoch, "samples": len(seen)})

    uri = str(tmp_path / "synthetic")
    write_shard_set(ShardsConfig(source="synthetic", synthetic_count=120, synthetic_size=16,
                                 samples_per_shard=20), uri, STORAGE)  # fmt: skip
    views = ViewConfig(
        kind="pair", channels=3, global_size=8, global_scale=(0.5, 1.0), patch_size=4
    )
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"views": views, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2),
        datasets={
            "train": build_train_dataset(DataConfig(uri=uri, shuffle_seed=1), views, STORAGE)
        },
        dataset_config=TrainDataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(storage_path=str(tmp_path / "results"), name="stream"),
    )
    trainer.fit()
    for epoch in range(2):
        parts = [
            json.loads((tmp_path / f"rank{r}_epoch{epoch}.json").read_text()) for r in range(2)
        ]
        assert len(parts[0]) == len(parts[1])  # equal shares
        assert sorted(parts[0] + parts[1]) == list(range(120))
    epochs = [
        sum((json.loads((tmp_path / f"rank{r}_epoch{e}.json").read_text()) for r in range(2)), [])
        for e in range(2)
    ]
    assert epochs[0] != epochs[1]  # reshuffled between epochs


def test_corrupt_bytes_in_decoded_rows_are_dropped(ray_local, tmp_path):
    uri = str(tmp_path / "set")
    write_shard_set(
        ShardsConfig(source="digits", split="test", samples_per_shard=400), uri, STORAGE
    )

    def junk_first_two(i: int, s: TarSample) -> TarSample:
        return TarSample(s.key, {**s.fields, "png": b"junk"}) if i < 2 else s

    _rewrite_shard(Path(uri) / "shard-000000.tar", junk_first_two)
    rows = read_samples(uri, STORAGE).take_all()
    assert sorted(r["idx"] for r in rows) == list(range(2, 359))
    image = Image.open(io.BytesIO(_rewrite_probe(uri)))
    assert image.size == (8, 8)


def _rewrite_probe(uri: str) -> bytes:
    loc = resolve(uri, STORAGE)
    return next(
        s.image for s in iter_shard(loc.join("shard-000000.tar")) if s.int_field("idx") == 2
    )


def test_iterator_rejects_a_dataset_built_for_other_views(ray_local, digits_test):
    dataset = build_train_dataset(DataConfig(uri=digits_test), VIEWS, STORAGE)
    pair = ViewConfig(kind="pair", channels=1, global_size=16, patch_size=4)
    with pytest.raises(ValueError, match="view spec asks for 2 / 0"):
        next(WorkerBatchIterator(dataset.iterator(), 8, pair, CPU, 0.0))
