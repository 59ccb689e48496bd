"""Hand-made broken shard sets, served from a local directory and from the moto S3 server: every
bad sample is counted with its shard, key and reason, the good ones are all delivered once,
unlabelled samples stay out of kNN, `ray-ssl shards inspect` finds every problem, and the
corrupt-sample limit is judged against the pass (issue 13, items 1-6)."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ray_ssl.cli import EXIT_BAD_INPUT, main
from ray_ssl.config import DataConfig, ShardsConfig, StorageConfig, ViewConfig, load_config
from ray_ssl.data.datasource import shard_order
from ray_ssl.data.errors import CorruptDataError
from ray_ssl.data.shards import inspect_shard_set, write_shard_set
from ray_ssl.data.stream import (
    WorkerBatchIterator,
    build_train_dataset,
    corrupt_limit_exceeded,
    load_eval_set,
)
from ray_ssl.data.tario import TarSample, TruncatedShardError, iter_tar, write_tar
from ray_ssl.storage import resolve
from ray_ssl.train.online_eval import pixel_knn_accuracy

STORAGE = StorageConfig()
CPU = torch.device("cpu")
VIEWS = ViewConfig(kind="pair", channels=1, global_size=8, global_scale=(0.5, 1.0), patch_size=4)
PER_SHARD = 60
TRUNCATED_AT = 30  # position in shard 4 of the first sample whose first member is cut

# digits test: 359 samples, idx 0..358, 6 shards of 60 (the last 59).
BAD_IMAGE = {5}  # undecodable bytes
UNLABELLED = {63, 64, 66}  # cls missing, not an integer, out of the 10 classes
BAD_IDX = {127, 128}  # idx 10000 (>= count) and idx 0 (another shard's range)
EXTRA = 1  # a 61st sample in shard 3, beyond the manifest's 60
MISSING = set(range(240 + TRUNCATED_AT, 300))  # cut off by the truncation of shard 4
NOT_DELIVERED = BAD_IMAGE | BAD_IDX | MISSING
CORRUPT = len(BAD_IMAGE) + len(BAD_IDX) + EXTRA + len(MISSING)


def _rewrite(path: Path, edit) -> None:
    with open(path, "rb") as fh:
        samples = list(iter_tar(fh))
    with open(path, "wb") as fh:
        write_tar(fh, [s for i, s in enumerate(samples) for s in edit(i, s)])


def _with(sample: TarSample, **fields: bytes | None) -> TarSample:
    kept = {k: v for k, v in sample.fields.items() if k not in fields}
    return TarSample(sample.key, {**kept, **{k: v for k, v in fields.items() if v is not None}})


def _truncate_inside(path: Path, position: int) -> None:
    """Cut the tar inside the first member of the sample at ``position``."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members))
    first = next(m for m in members if m.name.split(".", 1)[0] == keys[position])
    path.write_bytes(path.read_bytes()[: first.offset_data + 10])


def _broken_set(root: Path) -> str:
    uri = str(root / "broken")
    cfg = ShardsConfig(source="digits", split="test", samples_per_shard=PER_SHARD)
    write_shard_set(cfg, uri, STORAGE)
    shard = [Path(uri) / f"shard-{n:06d}.tar" for n in range(6)]
    _rewrite(shard[0], lambda i, s: [_with(s, png=b"\xff\xd8 not an image") if i == 5 else s])
    labels = {3: None, 4: b"x", 6: b"99"}
    _rewrite(shard[1], lambda i, s: [_with(s, cls=labels[i]) if i in labels else s])
    idx = {7: b"10000", 8: b"0"}
    _rewrite(shard[2], lambda i, s: [_with(s, idx=idx[i]) if i in idx else s])
    extra = lambda i, s: [s, TarSample("test-extra", dict(s.fields))] if i == 59 else [s]  # noqa: E731
    _rewrite(shard[3], extra)
    _truncate_inside(shard[4], TRUNCATED_AT)
    return uri


@pytest.fixture(scope="module")
def broken_local(tmp_path_factory) -> str:
    return _broken_set(tmp_path_factory.mktemp("bad"))


@pytest.fixture(params=["local", "s3"])
def broken(request, broken_local) -> str:
    """The broken set on the local disk or uploaded as-is to a fresh moto S3 bucket."""
    if request.param == "local":
        return broken_local
    bucket = request.getfixturevalue("s3_bucket")
    uri = f"{bucket}/broken"
    loc = resolve(uri, STORAGE)
    for path in sorted(Path(broken_local).iterdir()):
        with loc.join(path.name).fs.open(loc.join(path.name).path, "wb") as fh:
            fh.write(path.read_bytes())
    return uri


def _drain(it: WorkerBatchIterator) -> tuple[list[int], dict[int, int]]:
    idx, labels = [], {}
    for batch in it:
        idx += batch["idx"].tolist()
        labels.update(zip(batch["idx"].tolist(), batch["label"].tolist(), strict=True))
    return idx, labels


def test_broken_set_delivers_every_good_sample_once(ray_local, broken):
    dataset = build_train_dataset(DataConfig(uri=broken), VIEWS, STORAGE)
    it = WorkerBatchIterator(dataset.iterator(), 32, VIEWS, CPU, 0.5, drop_last=False,
                             pass_size=359, uri=broken)  # fmt: skip
    idx, labels = _drain(it)
    assert sorted(idx) == sorted(set(range(359)) - NOT_DELIVERED)  # no idx >= 359, no repeats
    assert 269 in idx  # the last whole sample before the truncated member (item 6)
    assert {i for i, label in labels.items() if label == -1} == UNLABELLED
    assert (it.stats.seen, it.stats.corrupt) == (len(idx) + CORRUPT, CORRUPT)


def test_corrupt_error_names_the_set_and_the_bad_keys(ray_local, broken):
    dataset = build_train_dataset(DataConfig(uri=broken), VIEWS, STORAGE)
    it = WorkerBatchIterator(dataset.iterator(), 32, VIEWS, CPU, 0.001, pass_size=359, uri=broken)
    with pytest.raises(CorruptDataError) as err:
        _drain(it)
    message = str(err.value)
    assert "\n" not in message and "URI" not in message
    assert broken in message and "max_corrupt_fraction=0.001" in message
    # whichever block arrives first: a numbered sample, the extra "test-extra" or a position
    assert re.search(r"first: shard-00000\d\.tar:(test-(\d{8}|extra)|#\d+) \(", message)
    assert any(reason in message for reason in ("undecodable", "idx", "beyond", "truncated"))


def test_eval_set_excludes_and_counts_unlabelled(broken_local):
    data = load_eval_set(broken_local, STORAGE)
    assert data.unlabelled == len(UNLABELLED) and data.corrupt == CORRUPT
    assert (data.labels >= 0).all() and (data.labels < 10).all()
    expected = sorted(set(range(359)) - NOT_DELIVERED - UNLABELLED)
    assert sorted(data.idx.tolist()) == expected and len(data.images) == len(expected)
    config = load_config(
        "local",
        [f"data.uri={broken_local}", f"data.eval_uri={broken_local}", "views.global_size=8",
         "views.local_size=4", "model.img_size=8"],
    )  # fmt: skip
    assert 0.0 <= pixel_knn_accuracy(config, num_classes=10) <= 1.0  # was: index -1 out of bounds


def test_inspect_decodes_and_checks_labels(broken, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["shards", "inspect", broken])
    assert exit_info.value.code == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    out, err = captured.out, captured.err.strip().splitlines()
    assert "undecodable image: 1" in out and "bad label: 3" in out
    assert "idx out of range: 2" in out and "beyond the manifest: 1" in out
    assert "missing (truncated or absent): 30" in out
    assert "test-00000005" in out and "test-00000063" in out  # first bad keys
    assert len(err) == 1 and err[0].startswith("ray-ssl: error:") and broken in err[0]
    with pytest.raises(SystemExit):
        main(["shards", "inspect", "--fast", broken])
    fast = capsys.readouterr().out
    assert "undecodable image" not in fast and "bad label: 3" in fast
    assert "images not decoded (--fast)" in fast


def test_inspect_report_counts(broken_local):
    report = inspect_shard_set(broken_local, STORAGE, strict=False)
    assert not report.ok
    assert report.bad_counts == {
        "undecodable image": 1,
        "bad label": 3,
        "idx out of range": 2,
        "beyond the manifest": 1,
        "missing (truncated or absent)": 30,
    }


def _keys_until_cut(path: Path) -> list[str]:
    keys = []
    with open(path, "rb") as fh, pytest.raises(TruncatedShardError):
        for sample in iter_tar(fh):
            keys.append(sample.key)
    return keys


@pytest.mark.parametrize("cut_sample, delivered", [(3, ["k0", "k1", "k2"]), (2, ["k0", "k1"])])
def test_last_complete_sample_before_a_cut_member_is_delivered(tmp_path, cut_sample, delivered):
    samples = [TarSample(f"k{i}", {"png": bytes(500), "cls": b"1", "idx": b"%d" % i})
               for i in range(4)]  # fmt: skip
    path = tmp_path / "s.tar"
    with open(path, "wb") as fh:
        write_tar(fh, samples)
    _truncate_inside(path, cut_sample)  # k2 whole, k3 cut; or k2's own image cut
    assert _keys_until_cut(path) == delivered


def test_corrupt_limit_rule():
    # 4 bad of a 512-sample pass at 1%: never over, however early they come.
    assert not corrupt_limit_exceeded(corrupt=4, pass_size=512, max_fraction=0.01)
    assert corrupt_limit_exceeded(corrupt=6, pass_size=512, max_fraction=0.01)
    assert not corrupt_limit_exceeded(corrupt=0, pass_size=10, max_fraction=0.0)
    assert corrupt_limit_exceeded(corrupt=1, pass_size=10, max_fraction=0.0)


def _synthetic_with_bad(root: Path, bad_per_shard: dict[int, int]) -> str:
    uri = str(root / "syn")
    cfg = ShardsConfig(source="synthetic", synthetic_count=512, synthetic_size=8,
                       samples_per_shard=64)  # fmt: skip
    write_shard_set(cfg, uri, STORAGE)
    for shard, bad in bad_per_shard.items():
        _rewrite(Path(uri) / f"shard-{shard:06d}.tar",
                 lambda i, s: [_with(s, png=b"junk") if i < bad else s])  # noqa: B023  # fmt: skip
    return uri


SYN_VIEWS = ViewConfig(kind="pair", channels=3, global_size=8, global_scale=(0.5, 1.0),
                       patch_size=4)  # fmt: skip


def test_clustered_bad_samples_under_the_limit_do_not_stop(ray_local, tmp_path):
    first = shard_order(8, 0, 0)[0]  # read first: the old rule judged 4 of 256 = 1.6% > 1%
    uri = _synthetic_with_bad(tmp_path, {first: 4})
    dataset = build_train_dataset(DataConfig(uri=uri), SYN_VIEWS, STORAGE)
    it = WorkerBatchIterator(dataset.iterator(), 32, SYN_VIEWS, CPU, 0.01, pass_size=512, uri=uri)
    idx, _ = _drain(it)
    assert len(idx) == 508 - 508 % 32 and it.stats.corrupt == 4


def test_bad_samples_over_the_limit_stop_promptly(ray_local, tmp_path):
    order = shard_order(8, 0, 0)
    uri = _synthetic_with_bad(tmp_path, {order[0]: 64, order[1]: 64})  # 25% of the pass
    dataset = build_train_dataset(DataConfig(uri=uri), SYN_VIEWS, STORAGE)
    it = WorkerBatchIterator(dataset.iterator(), 32, SYN_VIEWS, CPU, 0.01, pass_size=512, uri=uri)
    with pytest.raises(CorruptDataError, match=r"exceed 1% of the 512 samples"):
        _drain(it)
    assert it.stats.seen < 512  # judged as soon as the count is over, not at the pass's end


def test_images_decode_in_the_fixture(broken_local):
    """The fixture's good images are real PNGs (so 'bad' means what the test says)."""
    loc = resolve(broken_local, STORAGE)
    with loc.join("shard-000005.tar").fs.open(loc.join("shard-000005.tar").path, "rb") as fh:
        sample = next(iter_tar(fh))
    assert np.asarray(Image.open(io.BytesIO(sample.image))).shape == (8, 8)


def test_bad_input_in_a_worker_ends_the_run_and_is_recorded(ray_local, tmp_path):
    """Corrupt samples over the limit, met inside a Train worker: the run ends at that first
    failure with the one-line error (Ray Train's controller stopped it: no restart of the
    ``train.max_failures=3``), which the run directory's input-error file holds."""
    from ray.train import ControllerError
    from test_elastic_resume import TINY_FRANCA

    from ray_ssl.errors import UserError
    from ray_ssl.train.input_errors import INPUT_ERROR_FILE
    from ray_ssl.train.trainer import run_training

    uri = _synthetic_with_bad(tmp_path, {shard: 16 for shard in range(8)})  # 25% of every shard
    config = load_config(
        "local",
        [
            f"data.uri={uri}",
            "data.eval_uri=null",
            "data.batch_size=32",
            *TINY_FRANCA,
            "train.steps_per_epoch=4",
            "train.max_failures=3",
            "train.torch_threads=1",
            f"train.storage_path={tmp_path}/runs",
            "train.run_name=bad",
        ],
    )
    with pytest.raises(UserError, match=r"exceed 1% of the 512 samples") as raised:
        run_training(config)
    message = str(raised.value)
    assert "\n" not in message
    run = tmp_path / "runs" / "bad"
    assert (run / INPUT_ERROR_FILE).read_text() == message
    assert isinstance(raised.value.__cause__, ControllerError)  # not retries run out
    assert not list(run.glob("step_*"))
