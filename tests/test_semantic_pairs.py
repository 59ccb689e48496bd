"""Semantic positive pairs (Alkhalefi et al., arXiv 2510.08722): the writer gives every sample a
partner of its class (or the pairs file's), the partner's image travels inside the sample, the
real Ray Data stream builds the second view of a pair from it (always, or with p under mixed),
`shards inspect` and the stream count a sample whose partner is missing or does not decode as
corrupt, and each semantic preset trains end to end under Ray Train + DeepSpeed."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_bad_data import _rewrite, _with
from test_franca_job import FASHION_MNIST_DIR, write_fashion_subset

from jobs.pretrain import main as pretrain_main
from ray_ssl.cli import EXIT_BAD_INPUT, main
from ray_ssl.config import (
    ConfigError,
    DataConfig,
    ShardsConfig,
    StorageConfig,
    ViewConfig,
    load_config,
)
from ray_ssl.data.errors import ShardError
from ray_ssl.data.pairs import read_pairs_file, same_class_partners
from ray_ssl.data.shards import (
    MANIFEST_NAME,
    ensure_shard_set,
    inspect_shard_set,
    iter_shard,
    read_manifest,
    write_shard_set,
)
from ray_ssl.data.stream import WorkerBatchIterator, build_train_dataset
from ray_ssl.data.views import ViewBuilder
from ray_ssl.storage import resolve
from ray_ssl.train.trainer import plan_run

STORAGE = StorageConfig()
CPU = torch.device("cpu")
DIGITS_TEST = 359
KEYS = [f"test-{i:08d}" for i in range(DIGITS_TEST)]
# Pair views with every augmentation off: each crop is the whole 8x8 image, so a crop can be
# compared with the image it was cut from.
IDENTITY_PAIR = dict(
    kind="pair", channels=1, global_size=8, global_scale=(1.0, 1.0), patch_size=4, flip_p=0.0,
    jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0), solarize_p=0.0,
)  # fmt: skip


def _samples(uri: str) -> list:
    manifest = read_manifest(uri, STORAGE)
    loc = resolve(uri, STORAGE)
    return [s for info in manifest.shards for s in iter_shard(loc.join(info.name))]


@pytest.fixture(scope="module")
def paired_digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The digits test split with same-class partners, written by the CLI from another
    directory with a relative --out."""
    where = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(where)
        main(["shards", "write", "--source", "digits", "--split", "test", "--out", "paired",
              "--samples-per-shard", "100", "--pairs", "same-class"])  # fmt: skip
    return str(where / "paired")


def test_same_class_partners_are_other_members_of_the_class() -> None:
    labels = np.repeat(np.arange(4), [2, 3, 50, 7])
    partners = same_class_partners(labels, seed=0)
    assert (labels[partners] == labels).all() and (partners != np.arange(len(labels))).all()
    np.testing.assert_array_equal(partners, same_class_partners(labels, seed=0))  # seeded
    assert (partners != same_class_partners(labels, seed=1)).any()
    big = np.flatnonzero(labels == 2)
    assert len(set(partners[big].tolist())) > len(big) / 2  # drawn across the class, not cycled
    assert list(partners[:2]) == [1, 0]  # a class of two: each is the other's partner
    with pytest.raises(ShardError, match="class 5 has a single sample"):
        same_class_partners(np.array([1, 1, 5]), seed=0)


def test_cli_writes_every_sample_with_a_same_class_partner(
    paired_digits: str, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = read_manifest(paired_digits, STORAGE)
    assert manifest.pairs == "same-class seed=0" and manifest.count == DIGITS_TEST
    samples = _samples(paired_digits)
    by_key = {s.key: s for s in samples}
    for sample in samples:
        partner = by_key[sample.fields["pair"].decode()]
        assert partner.key != sample.key
        assert partner.int_field("cls") == sample.int_field("cls")
        assert int(sample.fields["pair.idx"]) == partner.int_field("idx")
        assert sample.fields["pair.png"] == partner.image  # the partner travels in the sample
    capsys.readouterr()
    main(["shards", "inspect", paired_digits])
    out = capsys.readouterr().out
    assert "semantic pairs: same-class seed=0" in out and "verified" in out


def test_pairs_file_round_trip_from_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wanted = {key: KEYS[(i + 5) % DIGITS_TEST] for i, key in enumerate(KEYS)}  # any pairing
    with open(tmp_path / "pairs.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["key", "partner_key"])
        writer.writerows(reversed(list(wanted.items())))  # row order does not matter
    monkeypatch.chdir(tmp_path)
    main(["shards", "write", "--source", "digits", "--split", "test", "--out", "set",
          "--pairs-file", "pairs.csv"])  # fmt: skip
    samples = _samples(str(tmp_path / "set"))
    assert {s.key: s.fields["pair"].decode() for s in samples} == wanted
    images = {s.key: s.image for s in samples}
    assert all(s.fields["pair.png"] == images[wanted[s.key]] for s in samples)
    spec = read_manifest(str(tmp_path / "set"), STORAGE).pairs
    assert spec.startswith("file pairs.csv sha256=")
    # The same file by its absolute path names the same pairs: the set is reused as it is.
    absolute = ShardsConfig(source="digits", split="test", pairs_file=str(tmp_path / "pairs.csv"))
    assert ensure_shard_set(absolute, str(tmp_path / "set"), STORAGE).pairs == spec


@pytest.mark.parametrize(
    "rows, message",
    [
        ([["test-00000000", "test-99999999"]], "line 1: unknown key 'test-99999999'"),
        ([["test-00000001", "test-00000001"]], "line 1 pairs 'test-00000001' with itself"),
        ([["test-00000000", "test-00000001"], ["test-00000000", "test-00000002"]], "already has"),
        ([["test-00000000", "test-00000001", "x"]], "has 3 fields"),
        ([["test-00000000", "test-00000001"]], "no partner for 358 of 359 samples"),
    ],
)
def test_bad_pairs_file_is_one_line_error(tmp_path: Path, rows: list, message: str) -> None:
    with open(tmp_path / "bad.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    with pytest.raises(ShardError, match=message.replace("(", r"\(")) as err:
        read_pairs_file(tmp_path / "bad.csv", KEYS)
    assert "\n" not in str(err.value)


def test_cli_bad_pairs_file_fails_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.csv").write_text("test-00000000,nope\n")
    monkeypatch.chdir(tmp_path)
    for pairs, message in (("bad.csv", "unknown key 'nope'"), ("absent.csv", "absent.csv")):
        with pytest.raises(SystemExit) as exit_info:
            main(["shards", "write", "--source", "digits", "--split", "test", "--out", "set",
                  "--pairs-file", pairs])  # fmt: skip
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == EXIT_BAD_INPUT and len(lines) == 1 and message in lines[0]
        assert not (tmp_path / "set").exists() or not any((tmp_path / "set").iterdir())


def _decoded(samples: list) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """idx -> image [8,8,1] and idx -> label, from the shards themselves."""
    images = {
        s.int_field("idx"): np.asarray(Image.open(io.BytesIO(s.image)))[:, :, None] for s in samples
    }
    return images, {s.int_field("idx"): s.int_field("cls") for s in samples}


def _stream(uri: str, views: ViewConfig, reader: str = "blocks") -> WorkerBatchIterator:
    dataset = build_train_dataset(
        DataConfig(uri=uri, shuffle_seed=1, reader=reader), views, STORAGE
    )
    return WorkerBatchIterator(dataset.iterator(), 32, views, CPU, 0.5, drop_last=False)


def _pairs_in(batches: WorkerBatchIterator, images: dict[int, np.ndarray]) -> list:
    """(idx, pair_idx) per sample, checking that view 1 shows idx and view 2 shows pair_idx."""
    pairs = []
    for batch in batches:
        b = len(batch["idx"])
        first, second = batch["global_crops"][:b], batch["global_crops"][b:]  # crop-major
        shown = batch["pair_idx"] if "pair_idx" in batch else batch["idx"]
        for row, (i, j) in enumerate(zip(batch["idx"].tolist(), shown.tolist(), strict=True)):
            np.testing.assert_array_equal(first[row].permute(1, 2, 0).numpy(), images[i])
            np.testing.assert_array_equal(second[row].permute(1, 2, 0).numpy(), images[j])
            pairs.append((i, j))
    return pairs


def test_semantic_batches_pair_two_images_of_one_class(ray_local, paired_digits: str) -> None:
    images, labels = _decoded(_samples(paired_digits))
    views = ViewConfig(positives="semantic", **IDENTITY_PAIR)
    for reader in ("blocks", "ray_webdataset"):
        pairs = _pairs_in(_stream(paired_digits, views, reader), images)
        assert sorted(i for i, _ in pairs) == list(range(DIGITS_TEST))
        assert all(i != j and labels[i] == labels[j] for i, j in pairs)  # 100% semantic pairs

    mixed = ViewConfig(positives="mixed", semantic_p=0.5, **IDENTITY_PAIR)
    semantic = [(i, j) for i, j in _pairs_in(_stream(paired_digits, mixed), images) if i != j]
    assert all(labels[i] == labels[j] for i, j in semantic)
    assert 0.4 < len(semantic) / DIGITS_TEST < 0.6  # binomial(359, 0.5): 0.4..0.6 is > 3.5 sd

    plain = list(_stream(paired_digits, ViewConfig(positives="augment", **IDENTITY_PAIR)))
    assert "pair_idx" not in plain[0]
    assert all(i == j for i, j in _pairs_in(plain, images))  # augmentation pairs: one image


def _bad_partners(paired: str, root: Path) -> str:
    """A copy of the paired set: sample 3's partner image does not decode, sample 7 has no
    pair.idx, sample 150 names itself."""
    uri = str(root / "bad-partners")
    shutil.copytree(paired, uri)
    shard = [Path(uri) / f"shard-{n:06d}.tar" for n in range(2)]
    broken = {3: {"pair.png": b"\x89PNG broken"}, 7: {"pair.idx": None}}
    _rewrite(shard[0], lambda i, s: [_with(s, **broken[i]) if i in broken else s])
    _rewrite(shard[1], lambda i, s: [_with(s, **{"pair.idx": b"150"}) if i == 50 else s])
    return uri


def test_partners_that_are_missing_or_do_not_decode_are_corrupt(
    ray_local, paired_digits: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = _bad_partners(paired_digits, tmp_path)
    report = inspect_shard_set(uri, STORAGE, strict=False)
    assert report.bad_counts == {"undecodable partner image": 1, "no semantic partner": 2}
    assert "test-00000003" in report.bad_examples[0]
    with pytest.raises(SystemExit) as exit_info:
        main(["shards", "inspect", uri])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == EXIT_BAD_INPUT and len(err) == 1 and "partner" in err[0]
    fast = inspect_shard_set(uri, STORAGE, strict=False, decode=False)  # fields only
    assert fast.bad_counts == {"no semantic partner": 2}

    views = ViewConfig(positives="semantic", **IDENTITY_PAIR)
    for reader in ("blocks", "ray_webdataset"):
        it = _stream(uri, views, reader)
        delivered = [i for batch in it for i in batch["idx"].tolist()]
        assert sorted(delivered) == sorted(set(range(DIGITS_TEST)) - {3, 7, 150})
        assert it.stats.corrupt == 3 and any("partner" in p for p in it.stats.problems)
    plain = _stream(uri, ViewConfig(positives="augment", **IDENTITY_PAIR))
    assert sum(len(b["idx"]) for b in plain) == DIGITS_TEST  # partners unread: all train


def test_each_view_keeps_its_own_augmentation() -> None:
    views = ViewConfig(kind="pair", channels=1, global_size=8, patch_size=4, positives="semantic")
    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    builder = ViewBuilder(views)
    out = [builder(image, np.random.default_rng(s), partner=image)["global_crops"] for s in (0, 1)]
    assert not np.array_equal(out[0][0], out[0][1])  # same image, still two augmentations
    assert not np.array_equal(out[0], out[1])


def test_semantic_positives_need_a_paired_set_and_pair_views(tmp_path: Path) -> None:
    uri = str(tmp_path / "plain")
    write_shard_set(ShardsConfig(source="digits", split="test"), uri, STORAGE)
    with pytest.raises(ShardError, match="needs semantic pairs but the shard set .* has none"):
        build_train_dataset(DataConfig(uri=uri), ViewConfig(positives="semantic", **IDENTITY_PAIR),
                            STORAGE)  # fmt: skip
    config = load_config("simclr_semantic_local", [f"data.uri={uri}", "views.positives=mixed"])
    with pytest.raises(ShardError, match="views.positives=mixed needs semantic pairs"):
        plan_run(config)  # the driver's checks, before any worker starts
    with pytest.raises(ConfigError, match="views.positives=mixed needs views.kind=pair"):
        load_config("local", ["views.positives=mixed", "views.kind=multicrop"])
    with pytest.raises(ShardError, match="holds shards with semantic pairs None, not same-class"):
        ensure_shard_set(ShardsConfig(source="digits", split="test", pairs="same-class"), uri,
                         STORAGE)  # fmt: skip
    with pytest.raises(ConfigError, match="set only one"):
        load_config("local", ["shards.pairs=same-class", "shards.pairs_file=p.csv"])
    with pytest.raises(ConfigError, match="views.semantic_p"):
        load_config("local", ["views.kind=pair", "views.positives=mixed", "views.semantic_p=1.5"])
    assert json.loads((tmp_path / "plain" / MANIFEST_NAME).read_text())["pairs"] is None


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST idx files are not installed")
    return write_fashion_subset(tmp_path_factory.mktemp("fashion-mnist"))


STEPS, BATCH = 2, 32
PRESETS = {
    "vicreg_semantic_local": ["vicreg.expander_dims=[64,64,64]"],
    "simclr_semantic_local": ["simclr.projection_hidden_dim=64"],
}


def _job(preset: str, fashion: Path, root: Path, epochs: int) -> None:
    pretrain_main([
        "--preset", preset, *PRESETS[preset], f"shards.fashion_mnist_dir={fashion}",
        f"data.uri={root}/shards/train-pairs", f"data.eval_uri={root}/shards/test",
        f"data.batch_size={BATCH}", f"train.epochs={epochs}", f"train.steps_per_epoch={STEPS}",
        f"train.checkpoint_every={STEPS}", "train.log_every=1", f"train.storage_path={root}/runs",
        "train.run_name=run", "optim.warmup_epochs=0", "eval.knn_max_train=500",
        "eval.knn_max_test=200",
    ])  # fmt: skip


def _history(run: Path, step: int) -> list[dict[str, float]]:
    return json.loads((run / f"step_{step:08d}" / "train_state.json").read_text())["history"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_semantic_preset_trains_end_to_end(
    ray_local: None, fashion_dir: Path, tmp_path: Path, preset: str
) -> None:
    """A few steps under Ray Train + DeepSpeed on Fashion-MNIST; the job writes the paired train
    set and a plain test set first. (Resuming is the plain presets' code path, tested with them
    in test_method_jobs.py.)"""
    run = tmp_path / "runs" / "run"
    _job(preset, fashion_dir, tmp_path, epochs=1)
    history = _history(run, STEPS)
    assert [h["step"] for h in history] == [float(s) for s in range(STEPS + 1)]
    assert all(math.isfinite(h["loss"]) for h in history[1:])
    saved = json.loads((run / "ray_ssl_config.json").read_text())
    assert saved["views"]["positives"] == "semantic"
    assert (run / "export" / "teacher_backbone.safetensors").is_file()
    assert read_manifest(f"{tmp_path}/shards/train-pairs", STORAGE).pairs == "same-class seed=0"
    assert read_manifest(f"{tmp_path}/shards/test", STORAGE).pairs is None
