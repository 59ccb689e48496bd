"""The Franca job with the local preset: it learns, exports for timm, reports; bad input fails fast.

The data is real Fashion-MNIST, cut to a few thousand images (written as idx files, the format of
the Debian package) so that the job's own shard writing and a short run fit the test budget.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from jobs.franca_g import main as job_main
from tests.test_gpu_check import JOB_SECONDS, read_report

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SUBSET = {"train": ("train", 3000), "t10k": ("test", 600)}
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049
KNN_GAIN = 0.05  # teacher kNN must beat its random initialisation by 5 points


def _read_idx(path: Path, header: str) -> tuple[tuple[int, ...], np.ndarray]:
    raw = gzip.decompress(path.read_bytes())
    size = struct.calcsize(header)
    dims = struct.unpack(header, raw[:size])
    return dims, np.frombuffer(raw[size:], np.uint8)


def write_fashion_subset(out: Path) -> Path:
    """The first images of each Fashion-MNIST split, as gzipped idx files under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for prefix, (_, count) in SUBSET.items():
        (_, _, rows, cols), images = _read_idx(
            FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz", ">IIII"
        )
        _, labels = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz", ">II")
        image_bytes = images[: count * rows * cols].tobytes()
        (out / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">IIII", IDX_IMAGES_MAGIC, count, rows, cols) + image_bytes)
        )
        (out / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">II", IDX_LABELS_MAGIC, count) + labels[:count].tobytes())
        )
    return out


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST idx files are not installed")
    return write_fashion_subset(tmp_path_factory.mktemp("fashion-mnist"))


def local_overrides(fashion: Path, runs: Path, run_name: str) -> list[str]:
    return [
        f"shards.fashion_mnist_dir={fashion}",
        f"data.uri={runs.parent}/shards/train",
        f"data.eval_uri={runs.parent}/shards/test",
        "data.batch_size=32",
        "model.depth=2",
        "train.epochs=1",
        "train.steps_per_epoch=24",
        "train.checkpoint_every=24",
        "train.log_every=8",
        f"train.storage_path={runs}",
        f"train.run_name={run_name}",
        "optim.warmup_epochs=0",
        "eval.knn_every=0",
        "eval.knn_max_train=3000",
        "eval.knn_max_test=600",
    ]


@pytest.fixture(scope="module")
def finished_run(fashion_dir: Path, tmp_path_factory: pytest.TempPathFactory, ray_local: None):
    runs = tmp_path_factory.mktemp("job") / "runs"
    job_main(["--preset", "local", *local_overrides(fashion_dir, runs, "local")])
    return fashion_dir, runs, runs / "local"


def test_local_job_learns_and_reports(finished_run: tuple[Path, Path, Path]) -> None:
    _, _, run = finished_run
    report = json.loads((run / "report.json").read_text())
    knn = report["knn"]
    assert knn["teacher_top1_final"] > knn["teacher_top1_initial"] + KNN_GAIN
    assert 0.5 < knn["pixel_baseline_top1"] < 0.95  # raw pixels on 3000/600 images
    assert (knn["k"], knn["temperature"]) == (20, 0.07)
    assert report["config"]["train"]["run_name"] == "local"
    assert report["final_metrics"]["step"] == 24.0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The resolved config lives with the run and with every checkpoint.
    saved = json.loads((run / "ray_ssl_config.json").read_text())
    assert saved == json.loads((run / "step_00000024" / "config.json").read_text())
    assert saved["data"]["uri"].startswith("/")  # absolute: workers have another cwd


def test_gpu_check_reads_the_run_report(finished_run: tuple[Path, Path, Path]) -> None:
    """``benchmarks/gpu_check.sh``'s report reader on a real run: first pass, final kNN."""
    _, _, run = finished_run
    final = json.loads((run / "report.json").read_text())["knn"]["teacher_top1_final"]
    never = read_report(run / "report.json", "--pixels", "1.0")
    assert never.returncode == 0, never.stderr
    assert never.stdout.splitlines() == [
        f"kNN never passed raw pixels (1.000) in 24 steps, {JOB_SECONDS} s",
        f"final_knn_top1={final:.4f}",
    ]
    at_init = read_report(run / "report.json", "--pixels", "0.0").stdout.splitlines()
    assert at_init[0].startswith("kNN passed raw pixels (0.000) at step 0 of 24: about 0 s")


def test_export_loads_into_timm(finished_run: tuple[Path, Path, Path]) -> None:
    import timm
    import torch
    from safetensors.torch import load_file

    _, _, run = finished_run
    meta = json.loads((run / "export" / "teacher_backbone.json").read_text())
    state = load_file(run / "export" / meta["weights"])
    model = timm.create_model(meta["timm_name"], pretrained=False, **meta["timm_kwargs"])
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # strict: every key and shape matches
    assert any(not torch.equal(fresh[k], state[k]) for k in state)
    features = model.forward_features(torch.rand(2, 1, 28, 28))
    assert features.shape[0] == 2 and torch.isfinite(features).all()


def _fails_with(capsys: pytest.CaptureFixture[str], args: list[str], fragment: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        job_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["train.num_workers=3"], "not divisible by train.num_workers=3"),
        (["train.zero_stage=4"], "not a DeepSpeed ZeRO stage"),
        (["views.global_size=56", "views.local_size=16"], "larger than the 28x28 images"),
        (["views.global_size=30"], "not divisible by views.patch_size"),
        (["views.local_size=32"], "local crops must not exceed global crops"),
        (["train.precision=bf16"], "needs train.use_gpu=true"),
        (["data.batch_size=4096"], "larger than the 3000 samples"),
    ],
)
def test_bad_config_is_one_line_before_any_worker(
    finished_run: tuple[Path, Path, Path],
    capsys: pytest.CaptureFixture[str],
    overrides: list[str],
    fragment: str,
) -> None:
    fashion, runs, _ = finished_run
    args = ["--preset", "local", *local_overrides(fashion, runs, "bad"), *overrides]
    _fails_with(capsys, args, fragment)
    assert not (runs / "bad").exists()  # nothing written


def test_unknown_preset_and_missing_data(
    finished_run: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fashion, runs, _ = finished_run
    _fails_with(capsys, ["--preset", "no_such_preset"], "unknown preset 'no_such_preset'")
    args = [
        "--preset",
        "local",
        *local_overrides(fashion, runs, "missing"),
        "shards.source=folder:/nonexistent",
        f"data.uri={tmp_path}/nothing-here",
    ]
    _fails_with(capsys, args, "nothing-here")
    assert not (runs / "missing").exists()


def test_checkpoint_of_another_model_is_refused(
    finished_run: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    fashion, runs, run = finished_run
    before = (run / "ray_ssl_config.json").read_bytes()
    args = ["--preset", "local", *local_overrides(fashion, runs, "local"), "model.depth=3"]
    _fails_with(capsys, args, "another model")
    assert (run / "ray_ssl_config.json").read_bytes() == before
