"""Relative paths in a config, made absolute against the directory the user ran from.

Ray runs code in other working directories than the user's shell: Train workers, Tune trials
(each in its own ``working_dirs/<trial>``) and ``ray job submit`` entrypoints (in Ray's temporary
copy of ``--working-dir``). So every path-like config value is resolved once, where the user ran
the command, before any of that code starts.

Inside a Ray job the user's directory is unknown (``ray job submit`` does not send the client's
working directory), so a relative path there is an error unless ``RAY_SSL_BASE_DIR`` names the
directory to resolve against (e.g. ``--runtime-env-json '{"env_vars": {"RAY_SSL_BASE_DIR":
"/abs/dir"}}'`` on a single machine or a shared filesystem).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ray_ssl.config import Config, ConfigError

BASE_DIR_ENV = "RAY_SSL_BASE_DIR"
# Set by Ray's job supervisor in the environment of a `ray job submit` entrypoint.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Dotted config keys that hold a local path or a URI. A key whose section or field a config
# lacks is skipped (method plug-ins own their sections).
PATH_KEYS = (
    "data.uri",
    "data.eval_uri",
    "eval.knn_train_uri",
    "train.storage_path",
    "curation.embeddings_uri",
    "curation.output_uri",
    "curation.backbone_export",
    "shards.fashion_mnist_dir",
    "shards.pairs_file",
)
FOLDER_SOURCE = "folder:"  # shards.source=folder:PATH


def is_relative_path(value: str | None) -> bool:
    """A local path that is neither absolute nor a URI (``s3://``, ``file:///abs``)."""
    if not value:
        return False
    if value.startswith("file://"):
        value = value[len("file://") :]
    elif "://" in value:
        return False
    return not Path(value).expanduser().is_absolute()


def in_ray_job() -> bool:
    """Whether this process is the entrypoint of a Ray job (``ray job submit``)."""
    return RAY_JOB_ENV in os.environ


def base_dir() -> str | None:
    """Where relative paths resolve: ``$RAY_SSL_BASE_DIR``, else the working directory, except
    inside a Ray job, whose working directory is Ray's temporary copy (then None)."""
    base = os.environ.get(BASE_DIR_ENV)
    if base:
        if not Path(base).is_absolute():
            raise ConfigError(f"{BASE_DIR_ENV}={base} must be an absolute directory")
        return base
    return None if in_ray_job() else os.getcwd()


def _get(config: Config, key: str) -> tuple[object, str] | None:
    section_name, field_name = key.split(".")
    section = getattr(config, section_name, None)
    if section is None or not hasattr(section, field_name):
        return None
    return section, field_name


def relative_paths(config: Config) -> dict[str, str]:
    """``{dotted key: value}`` of every relative path in ``config``."""
    found: dict[str, str] = {}
    for key in PATH_KEYS:
        slot = _get(config, key)
        if slot is not None and is_relative_path(getattr(*slot)):
            found[key] = getattr(*slot)
    source = getattr(getattr(config, "shards", None), "source", "")
    if source.startswith(FOLDER_SOURCE) and is_relative_path(source[len(FOLDER_SOURCE) :]):
        found["shards.source"] = source
    return found


def _absolute(value: str, base: str) -> str:
    if value.startswith(FOLDER_SOURCE):
        return FOLDER_SOURCE + _absolute(value[len(FOLDER_SOURCE) :], base)
    value = os.path.expanduser(value.removeprefix("file://"))
    return os.path.normpath(os.path.join(base, value))


def absolute_path(value: str) -> str:
    """``value`` (a path or URI given on the command line) made absolute as config paths are."""
    if not is_relative_path(value):
        return value
    base = base_dir()
    if base is None:
        raise ConfigError(
            f"relative path {value} in a Ray job would land in Ray's temporary copy of the "
            f"working dir; pass an absolute path or s3:// URI, or set {BASE_DIR_ENV}"
        )
    return _absolute(value, base)


def resolve_config_paths(config: Config, base: str | None = None) -> Config:
    """A copy of ``config`` with every relative path made absolute against ``base``
    (default: :func:`base_dir`). Inside a Ray job without ``RAY_SSL_BASE_DIR`` a relative path
    is a :class:`ConfigError` saying what to pass instead."""
    found = relative_paths(config)
    if not found:
        return config
    base = base or base_dir()
    if base is None:
        keys = ", ".join(f"{k}={v}" for k, v in found.items())
        raise ConfigError(
            f"relative paths in a Ray job ({keys}) would land in Ray's temporary copy of the "
            f"working dir; pass absolute paths or s3:// URIs, or set {BASE_DIR_ENV} to an "
            "absolute directory in the job's runtime env (docs/running.md)"
        )
    sections: dict[str, dict[str, str]] = {}
    for key, value in found.items():
        section_name, field_name = key.split(".")
        sections.setdefault(section_name, {})[field_name] = _absolute(value, base)
    changes = {
        name: dataclasses.replace(getattr(config, name), **fields)
        for name, fields in sections.items()
    }
    return dataclasses.replace(config, **changes)
