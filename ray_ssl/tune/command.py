"""``ray-ssl tune``: its arguments, and what it prints and exits with.

Exit codes: 0 when every trial completed or was stopped by the scheduler; 2 (one line on stderr)
for bad input or failed trials; 130 when the sweep was interrupted (Ctrl-C) before its trials
finished (no "best" is printed then: an unfinished trial's kNN is not a result).
"""

from __future__ import annotations

import argparse
import sys

from ray_ssl.tune.spec import SCHEDULERS

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="key=kind:args",
        help="search dimension, e.g. optim.base_lr=loguniform:1e-4:1e-2 or "
        "views.mask=grid:cyclic,block",
    )
    parser.add_argument(
        "--spec", metavar="FILE", help="YAML ablation spec: params (grid/choice/...) + overrides"
    )
    parser.add_argument("--samples", type=int, default=1, help="samples per grid point")
    parser.add_argument("--metric", default="knn_top1", help="reported metric that ranks trials")
    parser.add_argument("--mode", choices=("max", "min"), default="max")
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="trials at once (default: as many as the cluster's CPUs/GPUs fit)",
    )
    parser.add_argument("--name", default="sweep", help="sweep directory under train.storage_path")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="fifo")
    parser.add_argument(
        "--grace-period",
        type=int,
        default=None,
        help="ASHA: steps before a trial can be stopped (default eval.knn_every)",
    )
    parser.add_argument("--reduction-factor", type=int, default=2, help="ASHA: keep 1/N per rung")


def tune_command(args: argparse.Namespace) -> None:
    """Run the sweep described by the parsed arguments and report it."""
    from ray_ssl.paths import base_dir
    from ray_ssl.train.trainer import RUN_CONFIG_FILE
    from ray_ssl.tune.results import CURVES_PNG, TABLE_MARKDOWN
    from ray_ssl.tune.spec import SweepSpec, load_spec_file, parse_dimension, value_overrides
    from ray_ssl.tune.sweep import SweepError, failure_message, run_sweep

    dimensions, spec_overrides = load_spec_file(args.spec) if args.spec else ({}, ())
    dimensions.update(parse_dimension(p) for p in args.param)
    spec = SweepSpec(
        preset=args.preset,
        overrides=(*spec_overrides, *args.overrides),
        dimensions=dimensions,
        metric=args.metric,
        mode=args.mode,
        num_samples=args.samples,
        max_concurrent=args.max_concurrent,
        name=args.name,
        scheduler=args.scheduler,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        base_dir=base_dir(),
    )
    try:
        outcome = run_sweep(spec)
    except KeyboardInterrupt:
        print("ray-ssl: error: sweep interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sweep = outcome.sweep_uri
    print(f"results: {outcome.table_uri}, {sweep}/{TABLE_MARKDOWN}, curves: {sweep}/{CURVES_PNG}")
    for row in outcome.rows:
        measured = f"{spec.metric}={row.value} at step {row.value_step}"
        print(f"  trial {row.trial_id}: {row.status}, {measured}")
    if outcome.interrupted:
        print(
            f"ray-ssl: error: sweep interrupted before its trials finished; partial results in "
            f"{sweep}",
            file=sys.stderr,
        )
        sys.exit(EXIT_INTERRUPTED)
    best = outcome.best
    if best is not None:
        measured = f"{spec.metric}={best.value:.4f} at step {best.value_step:g}"
        print(f"best {measured}: trial {best.trial_id}")
        print(f"best config: {' '.join(value_overrides(best.params)) or '(the preset)'}")
        print(f"  rerun: ray-ssl train --preset {spec.preset} {' '.join(outcome.best_overrides)}")
        print(f"  resolved config: {best.run_uri}/{RUN_CONFIG_FILE}")
    if outcome.failed:
        raise SweepError(failure_message(outcome))
    if best is None:
        raise SweepError(f"no trial measured {spec.metric} after step 0; see {sweep}")
