"""`ray job submit` of jobs/franca_g.py to a private Ray head with token authentication.

The head is a real `ray start --head` (own ports and temp dir, the venv on PATH, RAY_AUTH_MODE=token
with the token in RAY_AUTH_TOKEN); the job goes through the Jobs API with the repository as its
working dir. With RAY_SSL_BASE_DIR in the job's env, the preset's relative paths land in that
directory (docs/running.md); without it, the job fails with the one-line error that says so.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.test_franca_job import FASHION_MNIST_DIR, write_fashion_subset

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
POLL_S = 2.0  # seconds between status polls (no limit: a dead head fails the poll)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
TINY_RUN = [
    "shards.fashion_mnist_dir=fashion",  # relative too: resolved against RAY_SSL_BASE_DIR
    "data.batch_size=32",
    "model.depth=1",
    "train.epochs=1",
    "train.steps_per_epoch=4",
    "train.checkpoint_every=4",
    "train.log_every=2",
    "optim.warmup_epochs=0",
    "eval.knn_every=0",
    "eval.knn_max_train=500",
    "eval.knn_max_test=200",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_tree(process: subprocess.Popen, temp_dir: str) -> None:
    """Stop the processes of this head only: the `ray start --block` process, its descendants
    and anything else started with its temp dir (never `ray stop`, which stops every head)."""
    own = [psutil.Process(process.pid)]
    own += own[0].children(recursive=True)
    for proc in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in proc.info["cmdline"] or ()):
            own.append(proc)
    for proc in own:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(own, timeout=15)
    for proc in alive:
        proc.kill()


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, str]]:
    """(dashboard URL, auth token) of a private head; stopped after the module."""
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST idx files are not installed")
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")  # short: Ray's socket paths
    token = uuid.uuid4().hex
    dashboard = _free_port()
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",  # the job's `python` is the venv's
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_TRAIN_V2_ENABLED": "1",
        "DS_ACCELERATOR": "cpu",
    }
    env.pop("RAY_ADDRESS", None)
    ports = {
        "--port": _free_port(),
        "--dashboard-port": dashboard,
        "--node-manager-port": _free_port(),
        "--object-manager-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--ray-client-server-port": _free_port(),
    }
    command = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--temp-dir", temp_dir]
    command += ["--num-cpus", "4", "--dashboard-host", "127.0.0.1", "--include-dashboard", "true"]
    command += ["--disable-usage-stats"]
    command += [f"{flag}={port}" for flag, port in ports.items()]
    head = subprocess.Popen(command, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_job_server(url, token, head)
        yield url, token
    finally:
        _stop_tree(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _client(url: str, token: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})


def _wait_for_job_server(url: str, token: str, head: subprocess.Popen) -> None:
    from ray.exceptions import AuthenticationError

    while True:
        assert head.poll() is None, "ray start --head exited"
        try:
            _client(url, token).list_jobs()
            return
        except AuthenticationError:
            raise  # the token is wrong: waiting would not help
        except Exception:  # noqa: BLE001 - the dashboard is not up yet
            time.sleep(POLL_S)


def _run_job(url: str, token: str, env_vars: dict[str, str]) -> tuple[str, str]:
    client = _client(url, token)
    entrypoint = " ".join(["python jobs/franca_g.py --preset local", *TINY_RUN])
    job = client.submit_job(
        entrypoint=entrypoint, runtime_env={"working_dir": str(REPO), "env_vars": env_vars}
    )
    while (status := client.get_job_status(job).value) not in TERMINAL:
        time.sleep(POLL_S)
    return status, client.get_job_logs(job)


def test_submitted_job_writes_where_the_docs_say(ray_head: tuple[str, str], tmp_path: Path) -> None:
    write_fashion_subset(tmp_path / "fashion")
    status, logs = _run_job(*ray_head, {"RAY_SSL_BASE_DIR": str(tmp_path)})
    assert status == "SUCCEEDED", logs[-3000:]
    run = tmp_path / "ray_results" / "franca-local"  # the preset's train.storage_path/run_name
    assert (run / "report.json").is_file() and (run / "curves.png").is_file()
    assert (run / "export" / "teacher_backbone.safetensors").is_file()
    assert (tmp_path / "data" / "shards" / "fashion-mnist" / "train" / "manifest.json").is_file()
    assert f"run directory: {run}" in logs


def test_relative_paths_without_a_base_dir_are_one_line(ray_head: tuple[str, str]) -> None:
    status, logs = _run_job(*ray_head, {})
    assert status == "FAILED"
    errors = [line for line in logs.splitlines() if line.startswith("ray-ssl: error:")]
    assert len(errors) == 1 and "relative paths in a Ray job" in errors[0], logs[-2000:]
    assert "RAY_SSL_BASE_DIR" in errors[0]
