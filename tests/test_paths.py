"""Relative config paths resolve against the user's directory, and are refused inside a Ray job
unless RAY_SSL_BASE_DIR says where that is."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_ssl.config import ConfigError, load_config
from ray_ssl.paths import BASE_DIR_ENV, RAY_JOB_ENV, relative_paths, resolve_config_paths

OVERRIDES = [
    "data.uri=data/train",
    "data.eval_uri=s3://bucket/test",
    "eval.knn_train_uri=file://rel/knn",
    "train.storage_path=~/runs",
    "shards.source=folder:images",
    "curation.output_uri=/abs/curated",
]


@pytest.fixture
def outside_a_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    monkeypatch.delenv(BASE_DIR_ENV, raising=False)


def test_relative_paths_resolve_against_the_base_and_nothing_else_changes(
    outside_a_job: None,
) -> None:
    config = load_config("local", OVERRIDES)
    assert set(relative_paths(config)) == {
        "data.uri",
        "eval.knn_train_uri",
        "shards.source",
        "curation.embeddings_uri",  # the preset's default, data/curation/embeddings
    }
    resolved = resolve_config_paths(config, "/home/me/project")
    assert resolved.data.uri == "/home/me/project/data/train"
    assert resolved.eval.knn_train_uri == "/home/me/project/rel/knn"
    assert resolved.shards.source == "folder:/home/me/project/images"
    assert resolved.curation.embeddings_uri == "/home/me/project/data/curation/embeddings"
    assert resolved.data.eval_uri == "s3://bucket/test"  # URIs and absolute paths stay
    assert resolved.train.storage_path == "~/runs"  # ~ is absolute to the user
    assert resolved.curation.output_uri == "/abs/curated"
    assert config.data.uri == "data/train"  # the input is not modified


def test_default_base_is_the_working_directory(
    outside_a_job: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_config_paths(load_config("local")).train.storage_path == str(
        tmp_path / "ray_results"
    )


def test_inside_a_ray_job_relative_paths_need_the_base_dir(
    outside_a_job: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(RAY_JOB_ENV, "{}")  # what Ray's job supervisor sets for the entrypoint
    config = load_config("local")
    with pytest.raises(ConfigError, match="relative paths in a Ray job .*data.uri=data/shards"):
        resolve_config_paths(config)
    monkeypatch.setenv(BASE_DIR_ENV, "/shared/project")
    assert (
        resolve_config_paths(config).data.uri == "/shared/project/data/shards/fashion-mnist/train"
    )
    monkeypatch.setenv(BASE_DIR_ENV, "relative/dir")
    with pytest.raises(ConfigError, match="must be an absolute directory"):
        resolve_config_paths(config)
    absolute = [f"{k}=/abs/{k}" for k in ("data.uri", "data.eval_uri", "train.storage_path")]
    absolute += ["curation.embeddings_uri=/e", "curation.output_uri=/o"]
    monkeypatch.delenv(BASE_DIR_ENV)
    assert resolve_config_paths(load_config("local", absolute)).data.uri == "/abs/data.uri"
