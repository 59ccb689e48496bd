"""Part 2 of ``gpu_check.sh``: when a pretraining's teacher kNN first passed raw pixels.

Reads the run's ``report.json`` (``ray_ssl/eval/report.py``: a ``history`` of logged steps, the
ones with a kNN evaluation carrying ``knn_top1``) and the job's wall seconds, and prints the step
and the share of the wall time at which the kNN first passed raw pixels, then
``final_knn_top1=<the last kNN>`` as the last line. Exits non-zero, in one line, when the report
is missing (the job did not finish) or holds no kNN evaluation.
Usage: ``python benchmarks/gpu_check_report.py RUN_DIR/report.json SECONDS [--pixels 0.846]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ray_ssl.eval.report import KNN_KEY
from ray_ssl.eval.report import PIXEL_KNN_FASHION_MNIST_FULL as RAW_PIXELS_KNN


def summarize(report: dict, seconds: float, pixels: float = RAW_PIXELS_KNN) -> list[str]:
    """The lines the GPU check prints for one finished run's report."""
    history = report["history"]
    evaluated = [h for h in history if KNN_KEY in h]
    if not evaluated:
        raise ValueError("the report holds no kNN evaluation: set eval.knn_every > 0")
    last_step = max(h["step"] for h in history)
    passed = next((h for h in evaluated if h[KNN_KEY] > pixels), None)
    if passed is None:
        first = (
            f"kNN never passed raw pixels ({pixels:.3f}) in {last_step:.0f} steps, {seconds:.0f} s"
        )
    else:
        share = passed["step"] / last_step
        first = (
            f"kNN passed raw pixels ({pixels:.3f}) at step {passed['step']:.0f} of "
            f"{last_step:.0f}: about {share * seconds:.0f} s of the {seconds:.0f} s job "
            "(start-up included)"
        )
    return [first, f"final_knn_top1={evaluated[-1][KNN_KEY]:.4f}"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="the run's report.json")
    parser.add_argument("seconds", type=float, help="the job's wall time")
    parser.add_argument("--pixels", type=float, default=RAW_PIXELS_KNN, help="raw-pixel kNN")
    args = parser.parse_args(argv)
    if not args.report.is_file():
        sys.exit(f"no report at {args.report}: the pretraining did not finish in time")
    try:
        lines = summarize(json.loads(args.report.read_text()), args.seconds, args.pixels)
    except (ValueError, KeyError) as err:
        sys.exit(f"{args.report}: {err}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
