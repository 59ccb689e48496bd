"""The cluster definitions are valid for the Ray version we ship with."""

from __future__ import annotations

import shlex
from pathlib import Path

import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
REPO = CLUSTER.parent


def test_autoscaler_yaml_passes_rays_schema() -> None:
    config = prepare_config(yaml.safe_load((CLUSTER / "aws-a100.yaml").read_text()))
    validate_config(config)
    gpu = config["available_node_types"]["gpu_a100"]["node_config"]
    assert gpu["InstanceType"] in {"p4d.24xlarge", "p4de.24xlarge"}


def test_kuberay_job_runs_an_existing_job_on_our_ray_version() -> None:
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    argv = shlex.split(job["spec"]["entrypoint"])
    script = next(a for a in argv if a.endswith(".py"))
    assert (REPO / script.removeprefix("/opt/ray-ssl/")).is_file()
    preset = argv[argv.index("--preset") + 1]
    assert (REPO / "ray_ssl" / "presets" / f"{preset}.yaml").is_file()
