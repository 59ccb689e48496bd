"""Shard sets: what is written matches the source; atomic, manifest-last writes; inspection finds
disagreements; ensure_shard_set reuses or rewrites; every bad input is a one-line ShardError."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ray_ssl.cli import EXIT_BAD_INPUT, main
from ray_ssl.config import ShardsConfig, StorageConfig
from ray_ssl.data.errors import ShardError
from ray_ssl.data.shards import (
    MANIFEST_NAME,
    ensure_shard_set,
    inspect_shard_set,
    iter_shard,
    read_manifest,
    write_shard_set,
)
from ray_ssl.data.sources import FASHION_MNIST_CLASSES, digits_split, read_idx
from ray_ssl.storage import StorageError, resolve

STORAGE = StorageConfig()


def _samples(uri: str) -> list:
    manifest = read_manifest(uri, STORAGE)
    loc = resolve(uri, STORAGE)
    return [s for info in manifest.shards for s in iter_shard(loc.join(info.name))]


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.skipif(
    not (Path(ShardsConfig().fashion_mnist_dir) / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST idx files are not installed (Debian package dataset-fashion-mnist)",
)
def test_fashion_mnist_test_split_round_trip(tmp_path):
    cfg = ShardsConfig(source="fashion-mnist", split="test", samples_per_shard=4000)
    manifest = write_shard_set(cfg, str(tmp_path), STORAGE)
    assert manifest.count == 10000 and manifest.source == "fashion-mnist"
    assert [s.count for s in manifest.shards] == [4000, 4000, 2000]
    assert manifest.classes == list(FASHION_MNIST_CLASSES) and manifest.channels == 1
    samples = _samples(str(tmp_path))
    root = Path(cfg.fashion_mnist_dir)
    images = read_idx(root / "t10k-images-idx3-ubyte.gz", 2051)
    labels = read_idx(root / "t10k-labels-idx1-ubyte.gz", 2049)
    assert [s.int_field("idx") for s in samples] == list(range(10000))
    assert [s.int_field("cls") for s in samples] == labels.tolist()
    for i in (0, 4321, 9999):
        np.testing.assert_array_equal(
            np.asarray(Image.open(io.BytesIO(samples[i].image))), images[i]
        )
    assert len({s.key for s in samples}) == 10000
    assert _leftovers(tmp_path) == []  # no temporary files
    on_disk = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert on_disk["format"] == "webdataset" and on_disk["image_format"] == "png"


def test_fallback_to_digits_says_so(tmp_path, caplog):
    cfg = ShardsConfig(source="fashion-mnist", fashion_mnist_dir=str(tmp_path / "absent"))
    with caplog.at_level(logging.WARNING):
        manifest = write_shard_set(cfg, str(tmp_path / "out"), STORAGE)
    assert "FALLING BACK to scikit-learn digits" in caplog.text
    assert manifest.source.startswith("digits") and manifest.requested_source == "fashion-mnist"
    images, labels = digits_split("train")
    assert manifest.count == len(images)
    assert [s.int_field("cls") for s in _samples(str(tmp_path / "out"))] == labels.tolist()


def test_digits_splits_are_disjoint_and_deterministic():
    train, _ = digits_split("train")
    test, _ = digits_split("test")
    assert len(train) + len(test) == 1797
    train_set = {a.tobytes() for a in train}
    assert sum(a.tobytes() in train_set for a in test) < 10  # digits has a few duplicate images
    np.testing.assert_array_equal(digits_split("test")[0], test)


def _make_folder(root: Path, per_class: int = 3, bad: str | None = None) -> None:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            array = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / name / f"{i}.jpg", quality=95)
    if bad:
        (root / "dog" / bad).write_bytes(b"this is not a jpeg")


def test_folder_source_with_split_subtrees(tmp_path):
    _make_folder(tmp_path / "imgs" / "train")
    _make_folder(tmp_path / "imgs" / "test", per_class=1)
    cfg = ShardsConfig(
        source=f"folder:{tmp_path / 'imgs'}", image_format="jpg", samples_per_shard=4
    )
    manifest = write_shard_set(cfg, str(tmp_path / "out"), STORAGE)
    assert manifest.classes == ["cat", "dog"] and manifest.count == 6
    assert [s.int_field("cls") for s in _samples(str(tmp_path / "out"))] == [0, 0, 0, 1, 1, 1]
    original = (tmp_path / "imgs" / "train" / "cat" / "0.jpg").read_bytes()
    assert _samples(str(tmp_path / "out"))[0].image == original  # JPEG passed through untouched
    cfg.split = "test"
    assert write_shard_set(cfg, str(tmp_path / "out_test"), STORAGE).count == 2


def test_folder_without_split_subtrees_splits_by_name_hash(tmp_path):
    _make_folder(tmp_path / "imgs", per_class=20)
    train = ShardsConfig(source=f"folder:{tmp_path / 'imgs'}", split="train")
    test = ShardsConfig(source=f"folder:{tmp_path / 'imgs'}", split="test")
    n_train = write_shard_set(train, str(tmp_path / "a"), STORAGE).count
    n_test = write_shard_set(test, str(tmp_path / "b"), STORAGE).count
    assert n_train + n_test == 40 and 0 < n_test < n_train


def test_failed_write_leaves_nothing_behind(tmp_path):
    _make_folder(tmp_path / "imgs", per_class=3, bad="2_broken.jpg")
    out = tmp_path / "out"
    cfg = ShardsConfig(source=f"folder:{tmp_path / 'imgs'}", split="train", samples_per_shard=1)
    cfg_all = ShardsConfig(source=cfg.source, split="test", samples_per_shard=1)
    for attempt in (cfg, cfg_all):
        try:
            write_shard_set(attempt, str(out), STORAGE)
        except ShardError as err:
            assert "2_broken.jpg" in str(err) and "\n" not in str(err)
            break
    else:
        pytest.fail("the broken image was in neither split")
    assert not out.exists() or sorted(os.listdir(out)) == []


def test_rewrite_replaces_old_shards(tmp_path):
    write_shard_set(ShardsConfig(source="digits", samples_per_shard=100), str(tmp_path), STORAGE)
    manifest = write_shard_set(
        ShardsConfig(source="digits", samples_per_shard=1000),
        str(tmp_path),
        STORAGE,
        overwrite=True,
    )
    assert sorted(os.listdir(tmp_path)) == sorted(
        [MANIFEST_NAME, *[s.name for s in manifest.shards]]
    )


def test_inspect_reports_counts_and_catches_disagreement(tmp_path):
    cfg = ShardsConfig(
        source="synthetic", synthetic_count=30, synthetic_size=16, samples_per_shard=10
    )
    write_shard_set(cfg, str(tmp_path), STORAGE)
    report = inspect_shard_set(str(tmp_path), STORAGE)
    assert report.ok and [c.found for c in report.checks] == [10, 10, 10]
    assert "verified" in report.summary() and "class_0" in report.summary()
    shard = tmp_path / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])  # truncate
    with pytest.raises(ShardError, match="shard-000001.tar") as err:
        inspect_shard_set(str(tmp_path), STORAGE)
    assert "\n" not in str(err.value)
    report = inspect_shard_set(str(tmp_path), STORAGE, strict=False)
    assert not report.ok and "PROBLEMS" in report.summary()


def test_ensure_reuses_rewrites_and_refuses(tmp_path):
    cfg = ShardsConfig(source="digits", split="test", samples_per_shard=100)
    first = ensure_shard_set(cfg, str(tmp_path), STORAGE)
    stamp = (tmp_path / MANIFEST_NAME).stat().st_mtime_ns
    assert ensure_shard_set(cfg, str(tmp_path), STORAGE) == first
    assert (tmp_path / MANIFEST_NAME).stat().st_mtime_ns == stamp  # reused, not rewritten
    (tmp_path / first.shards[1].name).unlink()
    rewritten = ensure_shard_set(cfg, str(tmp_path), STORAGE)
    assert rewritten.count == first.count and rewritten.generation == first.generation + 1
    assert all((tmp_path / s.name).exists() for s in rewritten.shards)
    with pytest.raises(ShardError, match="holds shards of 'digits'"):
        ensure_shard_set(ShardsConfig(source="synthetic", split="test"), str(tmp_path), STORAGE)


def samples_of(directory: Path, shard) -> list[tuple[bytes | None, dict[str, bytes]]]:
    """(image, other fields but the key-bearing ones) of each sample of one shard."""
    return [(t.image, t.fields) for t in iter_shard(resolve(str(directory / shard.name), STORAGE))]


def test_max_samples_writes_the_first_n_and_refuses_another_size(tmp_path):
    whole = ShardsConfig(source="digits", split="test")
    full = write_shard_set(whole, str(tmp_path / "a"), STORAGE)
    cfg = ShardsConfig(source="digits", split="test", samples_per_shard=40, max_samples=100)
    subset = ensure_shard_set(cfg, str(tmp_path / "b"), STORAGE)
    assert subset.count == 100 and [s.count for s in subset.shards] == [40, 40, 20]
    written = [sample for shard in subset.shards for sample in samples_of(tmp_path / "b", shard)]
    assert written == samples_of(tmp_path / "a", full.shards[0])[:100]  # idx, cls, image alike
    assert ensure_shard_set(cfg, str(tmp_path / "b"), STORAGE) == subset  # reused
    with pytest.raises(ShardError, match="holds 100 samples, not the 50 that"):
        ensure_shard_set(dataclasses.replace(cfg, max_samples=50), str(tmp_path / "b"), STORAGE)
    assert full.count > 100


@pytest.mark.parametrize(
    "cfg, match",
    [
        (ShardsConfig(source="digits", max_samples=0), "max_samples"),
        (ShardsConfig(source="folder:/nonexistent/images"), "does not exist"),
        (ShardsConfig(source="imagenet"), "unknown shard source"),
        (ShardsConfig(source="digits", split="validation"), "unknown split"),  # type: ignore[arg-type]
        (ShardsConfig(source="digits", samples_per_shard=0), "samples_per_shard"),
    ],
)
def test_bad_sources_are_one_line_errors(tmp_path, cfg, match):
    with pytest.raises(ShardError, match=match) as err:
        write_shard_set(cfg, str(tmp_path / "out"), STORAGE)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_folder_without_classes_or_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="no class subdirectories"):
        write_shard_set(
            ShardsConfig(source=f"folder:{tmp_path / 'empty'}"), str(tmp_path / "o"), STORAGE
        )
    (tmp_path / "empty" / "cls").mkdir()
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("no images here")
    with pytest.raises(ShardError, match="has no train images"):
        write_shard_set(
            ShardsConfig(source=f"folder:{tmp_path / 'empty'}"), str(tmp_path / "o"), STORAGE
        )


def test_missing_and_invalid_manifests(tmp_path):
    with pytest.raises(ShardError, match="no shard set at"):
        read_manifest(str(tmp_path), STORAGE)
    (tmp_path / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(ShardError, match=r"1 \.tar files but no manifest"):
        read_manifest(str(tmp_path), STORAGE)
    (tmp_path / MANIFEST_NAME).write_text('{"count": 3}')
    with pytest.raises(ShardError, match="not a valid ray-ssl manifest"):
        read_manifest(str(tmp_path), STORAGE)


def test_unreachable_s3_endpoint_is_a_storage_error(tmp_path):
    import socket

    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    storage = StorageConfig(
        endpoint_url=f"http://127.0.0.1:{port}", connect_retries=2, connect_timeout_s=0.5
    )
    with pytest.raises(StorageError, match="unreachable after 2 tries") as err:
        write_shard_set(ShardsConfig(source="digits"), "s3://bucket/shards", storage)
    assert "\n" not in str(err.value)


def _digits(samples_per_shard: int) -> ShardsConfig:
    return ShardsConfig(source="digits", split="test", samples_per_shard=samples_per_shard)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_overwrite_keeps_the_old_set_valid_until_the_new_one_is(request, tmp_path, where):
    root = (
        str(tmp_path / "set") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/set"
    )
    old = write_shard_set(_digits(100), root, STORAGE)
    loc = resolve(root, STORAGE)
    with pytest.raises(ShardError, match="pass --overwrite") as err:
        write_shard_set(_digits(50), root, STORAGE)
    assert "\n" not in str(err.value) and read_manifest(root, STORAGE) == old

    _make_folder(tmp_path / "imgs", per_class=3, bad="2_broken.jpg")  # fails mid-way
    broken = ShardsConfig(source=f"folder:{tmp_path / 'imgs'}", split="train", samples_per_shard=1)
    broken_test = ShardsConfig(source=broken.source, split="test", samples_per_shard=1)
    for attempt in (broken, broken_test):
        try:
            write_shard_set(attempt, root, STORAGE, overwrite=True)
        except ShardError:
            break
    else:
        pytest.fail("the broken image was in neither split")
    assert read_manifest(root, STORAGE) == old and inspect_shard_set(root, STORAGE).ok
    assert sorted(n.rsplit("/", 1)[-1] for n in loc.fs.ls(loc.path, detail=False)) == sorted(
        [MANIFEST_NAME, *[s.name for s in old.shards]]
    )

    new = write_shard_set(_digits(50), root, STORAGE, overwrite=True)
    assert not {s.name for s in new.shards} & {s.name for s in old.shards}  # written beside
    assert read_manifest(root, STORAGE) == new and inspect_shard_set(root, STORAGE).ok
    names = sorted(n.rsplit("/", 1)[-1] for n in loc.fs.ls(loc.path, refresh=True, detail=False))
    assert names == sorted([MANIFEST_NAME, *[s.name for s in new.shards]])  # old ones deleted


def test_interrupted_overwrite_after_the_shards_leaves_the_old_set(tmp_path, monkeypatch):
    import ray_ssl.data.shards as shards_module

    old = write_shard_set(_digits(100), str(tmp_path), STORAGE)
    real_write = shards_module.write_bytes_atomic

    def die_on_manifest(loc, data):
        if loc.path.endswith(MANIFEST_NAME):
            raise KeyboardInterrupt  # the user stops the run just before the swap
        real_write(loc, data)

    monkeypatch.setattr(shards_module, "write_bytes_atomic", die_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        write_shard_set(_digits(50), str(tmp_path), STORAGE, overwrite=True)
    assert (
        read_manifest(str(tmp_path), STORAGE) == old
        and inspect_shard_set(str(tmp_path), STORAGE).ok
    )


def test_cli_overwrite(tmp_path, capsys):
    out = str(tmp_path / "d")
    main(["shards", "write", "--source", "digits", "--split", "test", "--out", out])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["shards", "write", "--source", "synthetic", "--out", out])
    assert exit_info.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and "'digits'" in err[0]
    main(["shards", "write", "--source", "synthetic", "--out", out, "--overwrite",
          "shards.synthetic_count=20", "shards.synthetic_size=8"])  # fmt: skip
    assert "wrote 20 samples" in capsys.readouterr().out
    assert read_manifest(out, STORAGE).requested_source == "synthetic"
