"""The cluster definitions pass the checks of the tools that consume them.

- ``cluster/aws-a100.yaml``: Ray's own ``ray up`` preparation — schema validation, then the AWS
  bootstrap (network interfaces, subnets, security groups, key pair, AMI) against a moto-mocked
  EC2/IAM account holding the resources docs/running.md says to create once.
- ``cluster/kuberay-rayjob.yaml``: KubeRay's RayJob CRD schema (v1.7.0, vendored in tests/data),
  strict as ``kubectl apply --validate=strict`` (an unknown field is an error).
"""

from __future__ import annotations

import copy
import gzip
import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
REPO = CLUSTER.parent
RAYJOB_SCHEMA = Path(__file__).parent / "data" / "kuberay-v1.7.0-rayjob-v1-schema.json.gz"
SUBNET_PLACEHOLDER, SG_PLACEHOLDER = "subnet-REPLACE_ME", "sg-REPLACE_ME"
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"


def _aws_yaml() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "aws-a100.yaml").read_text())


def test_autoscaler_yaml_passes_rays_schema_and_is_consistent() -> None:
    raw = _aws_yaml()
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    types = config["available_node_types"]
    assert types["gpu_a100"]["node_config"]["InstanceType"] in {"p4d.24xlarge", "p4de.24xlarge"}
    worker_maxima = sum(t.get("max_workers", 0) for n, t in types.items() if n != "head")
    assert config["max_workers"] >= worker_maxima  # no node type capped by the cluster limit
    assert config["docker"]["image"] == RAY_IMAGE
    amis = {t["node_config"].get("ImageId") for t in types.values()}
    assert len(amis) == 1 and next(iter(amis)).startswith("ami-")  # pinned, the same everywhere
    excluded = set(config["rsync_exclude"])
    assert {".venv", "data", "ray_results"} <= excluded and ".gitignore" in config["rsync_filter"]
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM {RAY_IMAGE}" in dockerfile


def _with_ids(raw: dict[str, Any], subnet: str, group: str) -> dict[str, Any]:
    text = json.dumps(raw).replace(SUBNET_PLACEHOLDER, subnet).replace(SG_PLACEHOLDER, group)
    return json.loads(text)


@pytest.fixture
def aws_account(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A moto account in the cluster's region with the one-time setup of docs/running.md
    (not the placement group: moto lacks it, and `ray up` does not look it up)."""
    from moto import mock_aws

    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("HOME", str(tmp_path))  # `ray up` writes its SSH key under ~/.ssh
    with mock_aws():
        import boto3

        region = _aws_yaml()["provider"]["region"]
        zone = _aws_yaml()["provider"]["availability_zone"]
        ec2 = boto3.client("ec2", region_name=region)
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.0.0/20", AvailabilityZone=zone)
        subnet_id = subnet["Subnet"]["SubnetId"]
        ec2.modify_subnet_attribute(SubnetId=subnet_id, MapPublicIpOnLaunch={"Value": True})
        group = ec2.create_security_group(GroupName="ray-ssl", Description="efa", VpcId=vpc)
        iam = boto3.client("iam", region_name=region)
        for profile in ("ray-ssl-head", "ray-ssl-worker"):
            iam.create_instance_profile(InstanceProfileName=profile)
        yield subnet_id, group["GroupId"]


def test_ray_up_bootstrap_accepts_the_aws_yaml(aws_account: tuple[str, str]) -> None:
    from ray.autoscaler._private.aws.config import bootstrap_aws

    subnet, group = aws_account
    config = prepare_config(_with_ids(_aws_yaml(), subnet, group))
    validate_config(config)
    booted = bootstrap_aws(config)  # the step that failed: NetworkInterfaces without a subnet
    for name, node_type in booted["available_node_types"].items():
        node = node_type["node_config"]
        assert set(node["SubnetIds"]) == {subnet}, name
        assert set(node["SecurityGroupIds"]) == {group}, name
        assert (
            node["ImageId"] == _aws_yaml()["available_node_types"][name]["node_config"]["ImageId"]
        )
    assert Path(booted["auth"]["ssh_private_key"]).is_file()


def test_placeholders_left_in_the_yaml_are_reported_by_ray_up(
    aws_account: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from ray.autoscaler._private.aws.config import bootstrap_aws

    with pytest.raises(Exception):  # noqa: B017 - Ray's cli_logger aborts with a bare error
        bootstrap_aws(prepare_config(_aws_yaml()))
    assert "configured SecurityGroupIds" in capsys.readouterr().err


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused where Kubernetes would prune or reject them."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def test_kuberay_job_matches_the_rayjob_crd_and_overrides_every_location() -> None:
    import jsonschema

    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    schema = _strict(json.loads(gzip.decompress(RAYJOB_SCHEMA.read_bytes())))
    body = {k: v for k, v in job.items() if k != "metadata"}  # metadata: ObjectMeta, not in it
    jsonschema.validate(body, schema)
    typo = copy.deepcopy(body)
    typo["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(jsonschema.ValidationError, match="rayStartParam"):
        jsonschema.validate(typo, schema)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in pods:
        image = group["template"]["spec"]["containers"][0]["image"]
        assert "/" in image.split(":")[0] and "." in image.split("/")[0], image  # a registry host
    argv = shlex.split(job["spec"]["entrypoint"])
    script = next(a for a in argv if a.endswith(".py"))
    assert (REPO / script.removeprefix("/opt/ray-ssl/")).is_file()
    preset = argv[argv.index("--preset") + 1]
    assert (REPO / "ray_ssl" / "presets" / f"{preset}.yaml").is_file()
    overridden = {a.split("=", 1)[0] for a in argv if "=" in a}
    locations = {"data.uri", "data.eval_uri", "eval.knn_train_uri", "train.storage_path"}
    assert locations | {"storage.region"} <= overridden
