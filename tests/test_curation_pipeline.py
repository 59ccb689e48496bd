"""End to end: digits shards on S3 (moto) -> embeddings (Ray Data actors) -> hierarchy ->
curated manifest, report and shard set; resumable embedding; backbones; one-line errors."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from ray_ssl.cli import main as cli_main
from ray_ssl.config import Config, StorageConfig, load_config
from ray_ssl.curation.blocks import LocalExecutor
from ray_ssl.curation.embed import Backbone, EmbedSpec, embed_shard_set
from ray_ssl.curation.errors import CurationError
from ray_ssl.curation.export import write_curated_shards
from ray_ssl.curation.pipeline import read_curated, run_curation
from ray_ssl.curation.table import load_embeddings
from ray_ssl.data.shards import Manifest, iter_shard, read_manifest, write_shard_set
from ray_ssl.storage import read_bytes, resolve

STORAGE = StorageConfig()
PNG_MAGIC = b"\x89PNG"


def digits_config(base: str, *overrides: str) -> Config:
    return load_config(
        "curate_local",
        [
            f"data.uri={base}/shards",
            f"curation.embeddings_uri={base}/embeddings",
            f"curation.output_uri={base}/curated",
            "shards.source=digits",
            "shards.samples_per_shard=300",
            "curation.pixels_size=8",
            "curation.n_clusters=[40,8]",
            "curation.n_resampling_steps=[1,2]",
            "curation.sample_size=[10,2]",
            "curation.lloyd_iterations=10",
            "curation.target_size=300",
            "curation.num_partitions=3",
            "curation.embed_concurrency=1",
            "curation.backbone_export=",
            "curation.pool_zipf_exponent=0",
            "curation.flat_baseline=true",
            *overrides,
        ],
    )


def test_curate_digits_on_s3_and_resume(ray_local: None, s3_bucket: str) -> None:
    config = digits_config(s3_bucket, "curation.write_shards=true")
    outcome = run_curation(config)  # writes the digits shards first: none exist yet
    source = read_manifest(config.data.uri, STORAGE)
    assert outcome.selected == 300 and outcome.output_uri == f"{s3_bucket}/curated"

    table = read_curated(outcome.output_uri)
    assert table.num_rows == 300 == len(set(table.column("key").to_pylist()))
    assert set(table.column("idx").to_pylist()) <= set(range(source.count))
    assert {"cluster_level1", "cluster_level2", "label"} <= set(table.column_names)
    out = resolve(outcome.output_uri)
    report = json.loads(read_bytes(out.join("report.json")))
    assert [lvl["sizes"]["n_clusters"] for lvl in report["levels"]] == [40, 8]
    assert report["levels"][0]["flat_kmeans_sizes"]["n_clusters"] == 40
    assert sum(report["classes"]["after"]) == 300
    assert read_bytes(out.join("report.png")).startswith(PNG_MAGIC)
    assert json.loads(read_bytes(out.join("curated.json")))["count"] == 300

    # the curated shard set: dense idx 0..299, the chosen samples' original bytes
    curated = read_manifest(f"{outcome.output_uri}/shards", STORAGE)
    assert curated.count == 300 and curated.requested_source == "curated"
    shards_loc = resolve(f"{outcome.output_uri}/shards")
    samples = [s for info in curated.shards for s in iter_shard(shards_loc.join(info.name))]
    assert [s.int_field("idx") for s in samples] == list(range(300))
    assert sorted(s.key for s in samples) == sorted(table.column("key").to_pylist())
    originals = {
        s.key: s.image
        for info in source.shards
        for s in iter_shard(resolve(config.data.uri).join(info.name))
    }
    assert all(originals[s.key] == s.image for s in samples)

    # curating again into the same place swaps in a new generation, then drops the old shards
    fewer = np.sort(table.column("idx").to_numpy())[:100]
    write_curated_shards(config.data.uri, source, fewer, shards_loc.uri, STORAGE, 64)
    replaced = read_manifest(shards_loc.uri, STORAGE)
    assert (replaced.count, replaced.generation) == (100, 1)
    names = {path.rsplit("/", 1)[-1] for path in shards_loc.fs.ls(shards_loc.path, detail=False)}
    assert names == {"manifest.json", "g001-shard-000000.tar", "g001-shard-000001.tar"}

    # resume: nothing to embed; a deleted shard output is rebuilt identically, alone
    cfg = config.curation
    assert embed_shard_set(config.data.uri, source, cfg, STORAGE).embedded_shards == 0
    emb = resolve(cfg.embeddings_uri)
    before = read_bytes(emb.join("shard-000002.parquet"))
    emb.fs.rm(emb.join("shard-000002.parquet").path)
    again = embed_shard_set(config.data.uri, source, cfg, STORAGE)
    assert (again.embedded_shards, again.embedded_rows) == (1, source.shards[2].count)
    reread = pq.read_table(io.BytesIO(read_bytes(emb.join("shard-000002.parquet"))))
    assert reread.equals(pq.read_table(io.BytesIO(before)))

    other = digits_config(s3_bucket, "curation.pixels_size=4")
    with pytest.raises(CurationError, match="made differently"):
        embed_shard_set(config.data.uri, source, other.curation, STORAGE)


def write_embeddings(path: pathlib.Path, name: str, rows: int, dim: int) -> None:
    emb = np.ones((rows, dim), np.float32)
    flat = pa.array(emb.reshape(-1), pa.float32())
    table = pa.table(
        {
            "key": pa.array([f"k{i}" for i in range(rows)], pa.string()),
            "idx": pa.array(np.arange(rows, dtype=np.int64)),
            "label": pa.array(np.zeros(rows, np.int64)),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    )
    pq.write_table(table, path / name)


def test_bad_embeddings_are_one_line_errors(tmp_path: pathlib.Path) -> None:
    write_embeddings(tmp_path, "a.parquet", 5, 4)
    write_embeddings(tmp_path, "b.parquet", 5, 6)
    write_embeddings(tmp_path, "empty.parquet", 0, 4)
    cases = [
        (["a.parquet", "b.parquet"], "different dimensions \\[4, 6\\]"),
        (["empty.parquet"], "hold no samples"),
        ([], "no embeddings at"),
        (["a.parquet", "missing.parquet"], "no embeddings at .* for \\['missing.parquet'\\]"),
    ]
    for names, message in cases:
        with pytest.raises(CurationError, match=message) as err:
            load_embeddings(str(tmp_path), names, STORAGE, LocalExecutor(), 2)
        assert "\n" not in str(err.value)
    table = load_embeddings(
        str(tmp_path), ["a.parquet", "empty.parquet"], STORAGE, LocalExecutor(), 2
    )
    assert table.points.n == 5 and table.points.dim == 4


def digits_images(n: int = 6) -> np.ndarray:
    from sklearn.datasets import load_digits

    images = load_digits().images[:n] * (255 / 16)
    return np.round(images).astype(np.uint8)[..., None]  # [n, 8, 8, 1]


def test_pixels_backbone_is_downsampled_normalised_pixels() -> None:
    images = digits_images()
    spec = EmbedSpec("src", "pixels", 4, False)
    out = Backbone(spec, 1, STORAGE, "cpu")(images)
    pooled = images[..., 0].reshape(-1, 4, 2, 4, 2).mean((2, 4)) / 255.0
    expected = pooled.reshape(len(images), -1)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_exported_and_timm_backbones(tmp_path: pathlib.Path) -> None:
    import timm
    from safetensors.torch import save_file

    from ray_ssl.models.vit import normalize_images

    kwargs = {
        "img_size": 8,
        "patch_size": 4,
        "in_chans": 1,
        "embed_dim": 32,
        "depth": 1,
        "num_heads": 2,
        "num_classes": 0,
    }
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    save_file(model.state_dict(), str(tmp_path / "backbone.safetensors"))
    meta = {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": kwargs}
    (tmp_path / "backbone.json").write_text(json.dumps(meta))
    images = digits_images()
    spec = EmbedSpec("src", str(tmp_path / "backbone.safetensors"), 16, False)
    out = Backbone(spec, 1, STORAGE, "cpu")(images)
    with torch.no_grad():
        pixels = normalize_images(torch.from_numpy(images).permute(0, 3, 1, 2))
        direct = F.normalize(model(pixels), dim=1).numpy()
    np.testing.assert_allclose(out, direct, rtol=1e-4, atol=1e-5)

    resnet = Backbone(EmbedSpec("src", "resnet10t", 16, False), 1, STORAGE, "cpu")
    features = resnet(images[:2])  # gray -> 3 channels, 8 px -> 224 px
    assert features.shape == (2, resnet.dim) and resnet.in_chans == 3
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(CurationError, match="not 'pixels', a timm model name"):
        Backbone(EmbedSpec("src", "no_such_model_xyz", 16, False), 1, STORAGE, "cpu")


def test_cli_and_job_report_bad_input_in_one_line(
    ray_local: None, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = digits_config(str(tmp_path))
    write_shard_set(config.shards, config.data.uri, STORAGE)
    common = [f"data.uri={config.data.uri}", f"curation.embeddings_uri={tmp_path}/emb"]
    with pytest.raises(SystemExit) as code:
        cli_main(["curate", *common, "curation.n_clusters=[5000,10,5]"])
    assert code.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "level 1 asks for 5000 clusters of only" in err and "\n" not in err

    empty = tmp_path / "empty"
    empty.mkdir()
    manifest = Manifest(0, [], [], "digits", "digits", "train", "png", 1)
    (empty / "manifest.json").write_bytes(manifest.to_json())
    with pytest.raises(SystemExit) as code:
        cli_main(["curate", f"data.uri={empty}", f"curation.embeddings_uri={tmp_path}/emb0"])
    err = capsys.readouterr().err.strip()
    assert code.value.code == 2 and "clusters of only 0 embeddings" in err and "\n" not in err

    spec = importlib.util.spec_from_file_location("curate_job", "jobs/curate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    with pytest.raises(SystemExit) as code:
        job.main(["--preset", "local", *common])
    assert code.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "curation.target_size=5000 exceeds" in err and "\n" not in err  # curate_local's


def load_job(name: str):  # noqa: ANN201 - a module
    spec = importlib.util.spec_from_file_location(f"{name}_job", f"jobs/{name}.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def write_tiny_export(path: pathlib.Path) -> None:
    """A tiny timm ViT for 8 x 8 gray images as ``ray_ssl.train.checkpoint`` exports it."""
    import timm
    from safetensors.torch import save_file

    kwargs = {"img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 16, "depth": 1}
    kwargs.update({"num_heads": 2, "num_classes": 0})
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    path.parent.mkdir(parents=True)
    save_file(model.state_dict(), str(path))
    meta = {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": kwargs}
    path.with_suffix(".json").write_text(json.dumps(meta))


def test_local_demo_job_curates_a_long_tailed_pool(
    ray_local: None,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """jobs/curate.py --preset local, run from another directory on digits: a Zipf pool, pixel
    embeddings (no export yet), the report's baselines; then again once an export exists."""
    job = load_job("curate")
    monkeypatch.chdir(tmp_path)
    args = [
        "--preset",
        "local",
        "shards.source=digits",
        "data.uri=shards",
        "curation.embeddings_uri=emb",
        "curation.output_uri=out",
        "curation.backbone_export=run/export/teacher_backbone.safetensors",
        "curation.pixels_size=8",
        "curation.n_clusters=[30,6]",
        "curation.n_resampling_steps=[1,2]",
        "curation.sample_size=[5,2]",
        "curation.lloyd_iterations=10",
        "curation.target_size=150",
        "curation.num_partitions=2",
        "curation.embed_concurrency=1",
    ]
    job.main(args)
    assert "curated 150 of" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    missing = f"pixels (no pretrained export at {tmp_path}/run/export/teacher_backbone.safetensors)"
    assert report["embedding"] == missing
    source_count = report["pool"]["source_count"]  # digits' train split
    assert report["pool"]["zipf_exponent"] == 1.0 and source_count > 1000
    classes = report["classes"]
    before = np.array(classes["before"])
    assert report["n_points"] == before.sum() < 0.4 * source_count  # sum of 1/r, r = 1..10
    assert before.max() > 5 * before.min()
    assert classes["names"] == [str(c) for c in range(10)]
    baselines = classes["baselines"]
    assert set(baselines) == {"random", "flat_kmeans_balanced"}
    assert all(sum(b["counts"]) == 150 for b in baselines.values()) and sum(classes["after"]) == 150
    # curation balances the classes of the long tail better than a random subset does
    assert classes["kl_to_uniform_after"] < baselines["random"]["kl_to_uniform"]
    for level in report["levels"]:
        kl = level["samples_kl_to_uniform"]
        assert set(kl) == {"random", "flat_kmeans_balanced", "curated"}
        assert kl["curated"] < kl["random"]
        assert "flat_kmeans_sizes" not in level  # curate_local: flat_baseline off
    assert (tmp_path / "out" / "report.png").read_bytes().startswith(PNG_MAGIC)
    assert (tmp_path / "emb" / "backbone" / "embeddings.json").exists()

    write_tiny_export(tmp_path / "run" / "export" / "teacher_backbone.safetensors")
    job.main(args)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["embedding"] == f"export {tmp_path}/run/export/teacher_backbone.safetensors"
    meta = json.loads((tmp_path / "emb" / "export" / "embeddings.json").read_text())
    assert meta["backbone"].endswith("teacher_backbone.safetensors")


def test_resampling_one_point_per_cluster_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as code:
        cli_main(["curate", "curation.sample_size=[30,1,2]"])
    err = capsys.readouterr().err.strip()
    assert code.value.code == 2 and "\n" not in err
    assert "curation.sample_size is 1 at level 2 with n_resampling_steps=5" in err
    load_config("curate_web")  # level 1: sample_size 1 without resampling is fine


def test_plan_prints_levels_without_ray(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = (
        "import sys; from ray_ssl.cli import main; main(sys.argv[1:]); "
        "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules), 'Ray imported'"
    )
    args = ["--preset", "curate_web", "--plan", "--points", "100000000", "--nodes", "8"]
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path.cwd())}
    out = subprocess.run(
        [sys.executable, "-c", code, "curate", *args, "--cpus-per-node", "16"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = out.splitlines()
    assert (
        "100000000 points (--points) x 1024 dims" in lines[0] and "8 node(s) x 16 CPUs" in lines[0]
    )
    assert "GMAC/s per core" in lines[1]
    rows = {line.split()[0] + line.split()[1]: line.split() for line in lines[3:-1]}
    assert list(rows) == ["level1", "split10000000", "level2", "level3", "level4"]
    # k-means||: subsample, first row, 6 passes, 5 draws; 51 Lloyd and resampling waves
    assert int(rows["level1"][4]) == 1 + 1 + 6 + 5 + 51
    assert lines[-1].startswith("total")
    assert not list(tmp_path.iterdir())  # wrote nothing

    with pytest.raises(SystemExit) as exit_code:
        cli_main(["curate", "--preset", "curate_web", "--plan"])
    err = capsys.readouterr().err.strip()
    assert exit_code.value.code == 2 and "pass --points N" in err and "\n" not in err
