"""The ``ray-ssl`` command: shards | train | eval | rasa | curate | tune.

Each subcommand parses its own arguments and hands a resolved :class:`~ray_ssl.config.Config`
to the module that does the work; errors in input become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from ray_ssl.config import load_config
from ray_ssl.errors import UserError
from ray_ssl.tune.command import add_tune_arguments

log = logging.getLogger("ray_ssl")

EXIT_BAD_INPUT = 2


def _add_config_args(parser: argparse.ArgumentParser, default_preset: str = "local") -> None:
    parser.add_argument("--preset", default=default_preset, help="preset name or YAML path")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, e.g. train.epochs=2",
    )


def _cmd_shards_write(args: argparse.Namespace) -> None:
    from ray_ssl.data.shards import write_shard_set

    overrides = [*args.overrides, f"shards.source={args.source}", f"shards.split={args.split}"]
    if args.samples_per_shard is not None:
        overrides.append(f"shards.samples_per_shard={args.samples_per_shard}")
    if args.pairs is not None:
        overrides.append(f"shards.pairs={args.pairs}")
    if args.pairs_file is not None:
        overrides.append(f"shards.pairs_file={json.dumps(args.pairs_file)}")  # a string, verbatim
    config = load_config(args.preset, overrides)
    manifest = write_shard_set(config.shards, args.out, config.storage, args.overwrite)
    paired = f" with semantic pairs ({manifest.pairs})" if manifest.pairs else ""
    print(f"wrote {manifest.count} samples in {len(manifest.shards)} shards to {args.out}{paired}")


def _cmd_shards_inspect(args: argparse.Namespace) -> None:
    from ray_ssl.data.errors import ShardError
    from ray_ssl.data.shards import inspect_shard_set

    config = load_config(args.preset, args.overrides)
    report = inspect_shard_set(args.uri, config.storage, strict=False, decode=not args.fast)
    print(report.summary())
    if not report.ok:
        raise ShardError(f"shard set {args.uri} is damaged: {report.one_line()}")


def _cmd_train(args: argparse.Namespace) -> None:
    from ray_ssl.train.trainer import run_training

    run_training(load_config(args.preset, args.overrides))


def _cmd_rasa(args: argparse.Namespace) -> None:
    from ray_ssl.train.rasa_job import run_rasa

    eval_data = args.eval_data or "null"
    overrides = [f"data.uri={args.data}", f"data.eval_uri={eval_data}", *args.overrides]
    outcome = run_rasa(args.export, load_config(args.preset, overrides))
    mse, knn = outcome.report["position_mse"], outcome.report["knn"]
    print(f"position MSE {mse['before']:.5f} -> {mse['after']:.5f} (chance {mse['chance']:.5f})")
    if knn is not None:
        print(f"kNN top-1 (mean patch token) {knn['before']:.4f} -> {knn['after']:.4f}")
    print(f"wrote {outcome.basis_uri} and {outcome.report_uri}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from ray_ssl.data.shards import read_manifest
    from ray_ssl.eval.suite import StructureRequest, check_inputs, eval_output_uri

    config = load_config(args.preset, args.overrides)
    check_inputs(args.export, args.rasa, config)
    manifests = [read_manifest(uri, config.storage) for uri in (args.data, args.eval_data)]
    structure = None
    if args.global_structure:
        structure = StructureRequest(manifests[1].classes, _class_tree(args, manifests[1].classes))
    print(f"evaluating {args.export}; results go to {eval_output_uri(args.export, config)}")

    from ray_ssl.data.stream import load_labelled_arrays
    from ray_ssl.eval.suite import run_eval

    outcome = run_eval(
        config, args.export, args.data, args.eval_data, load_labelled_arrays, args.rasa, structure
    )
    knn = outcome.report["knn"]["top1"]
    linear = outcome.report["linear"]
    print("weighted kNN top-1: " + ", ".join(f"k={k} {v:.4f}" for k, v in knn.items()))
    print(
        f"linear probe top-1: {linear['test_top1']:.4f} ({linear['best_head']}, "
        f"held-out {linear['holdout_top1']:.4f})"
    )
    if structure is not None:
        found = outcome.report["global_structure"]
        rows = {**found["label_free"], **found.get("tree", {})}
        print("global structure: " + ", ".join(f"{k} {v:.4f}" for k, v in rows.items()))
    print(f"wrote {outcome.report_uri}" + (f" and {outcome.pca_uri}" if outcome.pca_uri else ""))


def _class_tree(args: argparse.Namespace, classes: list[str]) -> str | None:
    """The class tree to compare with: ``--class-tree``, else the shipped tree whose leaves are
    exactly the test split's classes, else none (the label-free metric only)."""
    from ray_ssl.eval.class_tree import load_class_tree, shipped_trees

    if args.class_tree is not None:
        load_class_tree(args.class_tree).distance_matrix(classes)  # a mismatch fails now
        return args.class_tree
    return next(
        (name for name in shipped_trees() if set(load_class_tree(name).paths) == set(classes)),
        None,
    )


def _cmd_curate(args: argparse.Namespace) -> None:
    config = load_config(args.preset, args.overrides)
    if args.plan:  # a dry run: imports no Ray, starts nothing
        from ray_ssl.curation.plan import plan_curation

        plan = plan_curation(config, args.nodes, args.cpus_per_node, args.points, args.dim)
        print(plan.text())
        return
    from ray_ssl.curation.pipeline import run_curation

    run_curation(config)


def _cmd_tune(args: argparse.Namespace) -> None:
    from ray_ssl.tune.command import tune_command

    tune_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-ssl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    shards = sub.add_parser("shards", help="write or inspect WebDataset shard sets")
    shards_sub = shards.add_subparsers(dest="shards_command", required=True)
    write = shards_sub.add_parser("write", help="write a shard set and its manifest")
    write.add_argument(
        "--source", required=True, help="fashion-mnist | digits | folder:PATH | synthetic"
    )
    write.add_argument("--split", default="train", help="train | test")
    write.add_argument(
        "--out", required=True, help="output URI: path, file:// or s3://bucket/prefix"
    )
    write.add_argument("--samples-per-shard", type=int, default=None)
    write.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a shard set already at --out (the old one stays valid until the new one is)",
    )
    pairs = write.add_mutually_exclusive_group()
    pairs.add_argument(
        "--pairs",
        choices=["none", "same-class"],
        default=None,
        help="give every sample a semantic partner: another image of its class (seeded by "
        "shards.seed), stored inside the sample (arXiv 2510.08722)",
    )
    pairs.add_argument(
        "--pairs-file",
        default=None,
        metavar="CSV",
        help="semantic partners as key,partner_key rows (header optional), one per sample",
    )
    _add_config_args(write)
    write.set_defaults(func=_cmd_shards_write)
    inspect = shards_sub.add_parser(
        "inspect",
        help="verify every shard and sample (counts, idx, labels, images); exit 2 when bad",
    )
    inspect.add_argument("uri")
    inspect.add_argument(
        "--fast", action="store_true", help="skip decoding the images (fields and counts only)"
    )
    _add_config_args(inspect)
    inspect.set_defaults(func=_cmd_shards_inspect)

    train = sub.add_parser("train", help="pretrain with Ray Train + DeepSpeed")
    _add_config_args(train)
    train.set_defaults(func=_cmd_train)

    rasa = sub.add_parser(
        "rasa", help="fit RASA (remove absolute position) for an exported backbone"
    )
    rasa.add_argument("export", help="export directory or .safetensors file of a training run")
    rasa.add_argument("--data", required=True, metavar="URI", help="shard set URI to fit on")
    rasa.add_argument(
        "--eval-data",
        metavar="URI",
        help="labelled held-out shard set (default: a split of --data)",
    )
    _add_config_args(rasa)
    rasa.set_defaults(func=_cmd_rasa)

    evaluate = sub.add_parser(
        "eval", help="kNN, linear probe (Ray Train) and PCA pictures of an exported backbone"
    )
    evaluate.add_argument(
        "export", help="exported backbone: a .safetensors file (JSON sidecar beside it) or its dir"
    )
    evaluate.add_argument("--data", required=True, help="labelled training shards (URI)")
    evaluate.add_argument("--eval-data", required=True, help="labelled test shards (URI)")
    evaluate.add_argument("--rasa", default=None, help="RASA basis (.safetensors) to remove")
    evaluate.add_argument(
        "--global-structure",
        action="store_true",
        help="also the global-structure metric (label-free, and against a class tree)",
    )
    evaluate.add_argument(
        "--class-tree",
        default=None,
        help="class tree YAML (default: the shipped tree matching the classes, e.g. fashion_mnist)",
    )
    _add_config_args(evaluate)
    evaluate.set_defaults(func=_cmd_eval)

    curate = sub.add_parser("curate", help="hierarchical k-means curation of a shard set")
    _add_config_args(curate, default_preset="curate_local")
    curate.add_argument(
        "--plan",
        action="store_true",
        help="print per level the tasks, bytes moved and estimated time; run nothing",
    )
    curate.add_argument("--nodes", type=int, default=1, help="--plan: nodes in the cluster")
    curate.add_argument(
        "--cpus-per-node", type=int, default=None, help="--plan: CPUs per node (default: here)"
    )
    curate.add_argument(
        "--points", type=int, default=None, help="--plan: pool size (default: data.uri's manifest)"
    )
    curate.add_argument(
        "--dim", type=int, default=None, help="--plan: embedding size (default: the backbone's)"
    )
    curate.set_defaults(func=_cmd_curate)

    tune = sub.add_parser("tune", help="Ray Tune sweep over whole training runs")
    add_tune_arguments(tune)
    _add_config_args(tune)
    tune.set_defaults(func=_cmd_tune)
    return parser


def looks_like_override(token: str) -> bool:
    """``section.key=value`` (a dotted key, no leading dash)."""
    key, eq, _ = token.partition("=")
    return bool(eq) and not token.startswith("-") and "." in key


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    """Option strings that take no value, in ``parser`` and all its subcommands."""
    found: set[str] = set()
    for action in parser._actions:
        if action.option_strings and action.nargs == 0:
            found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _flags(sub)
    return found


def parse_with_overrides(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    """Parse ``argv``, accepting ``key.sub=value`` overrides anywhere among the other arguments.

    argparse fills a ``nargs="*"`` positional from one run of positional tokens only, so an
    override after an option (``shards write --out X key=value``) or before a positional
    (``eval key=value --data D EXPORT``) would be "unrecognized" or taken for the positional.
    So every override-shaped token that is not the value of the option before it is taken out
    first, in order, and the rest is parsed strictly.
    """
    tokens = list(sys.argv[1:] if argv is None else argv)
    flags = _flags(parser)
    overrides, rest = [], []
    for i, token in enumerate(tokens):
        before = tokens[i - 1] if i else ""
        is_value = before.startswith("-") and "=" not in before and before not in flags
        (overrides if looks_like_override(token) and not is_value else rest).append(token)
    args = parser.parse_args(rest)
    if overrides and not hasattr(args, "overrides"):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def run_with_errors(func: Callable[[], None]) -> None:
    """Run ``func``; a known input error becomes one line on stderr and exit code 2."""
    try:
        func()
    except UserError as err:
        print(f"ray-ssl: error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def job_main(
    doc: str,
    default_preset: str,
    run: Callable[[str, Sequence[str]], None],
    argv: Sequence[str] | None = None,
    preset_help: str = "preset name or YAML path",
) -> None:
    """The command line of a ``jobs/*.py`` script: ``[--preset NAME] [key.sub=value ...]``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--preset", default=default_preset, help=preset_help)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parse_with_overrides(parser, argv)
    _configure_logging()
    run_with_errors(lambda: run(args.preset, args.overrides))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_with_overrides(build_parser(), argv)
    _configure_logging(args.verbose)
    run_with_errors(lambda: args.func(args))


if __name__ == "__main__":
    main()
