"""Curate a shard set: hierarchical k-means with resampling, balanced sampling (arXiv 2405.15613).

    ray job submit --working-dir . -- python jobs/curate.py --preset web      # web-scale preset
    python jobs/curate.py --preset local                                      # Fashion-MNIST, CPU
    python jobs/curate.py --preset local curation.target_size=3000 curation.write_shards=true

``--preset local`` / ``web`` name the ``curate_local`` / ``curate_web`` presets (any preset name or
YAML path works too). The job embeds ``data.uri`` (writing the Fashion-MNIST shards first when
they are missing) - the local preset with the backbone a local training run exported, when there
is one, else pixels - and curates a long-tailed (Zipf) subsample of its classes; it builds the
k-means hierarchy on the Ray cluster, samples ``curation.target_size`` samples and writes the
curated manifest (``curated.parquet`` + ``curated.json``), ``report.json`` and ``report.png``
(class balance and balance per level against a random subset and a flat-k-means balanced sample
of the same size) under ``curation.output_uri``. Rerunning resumes the embedding where it
stopped. Input errors are one line on stderr and exit code 2. Size a cluster for the web preset
first with ``ray-ssl curate --preset curate_web --plan --points N``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ray_ssl.cli import job_main
from ray_ssl.config import load_config
from ray_ssl.paths import resolve_config_paths

PRESET_ALIASES = {"local": "curate_local", "web": "curate_web"}
DEFAULT_PRESET = "local"


def curate(preset: str, overrides: Sequence[str]) -> None:
    from ray_ssl.curation.pipeline import run_curation

    config = load_config(PRESET_ALIASES.get(preset, preset), list(overrides))
    outcome = run_curation(resolve_config_paths(config))
    top = outcome.report["levels"][-1]
    sizes, curated = top["sizes"], top["curated_sizes"]
    print(f"curated {outcome.selected} of {outcome.report['n_points']} samples")
    print(f"embedding: {outcome.report['embedding']}")
    classes = outcome.report.get("classes")
    if classes is not None:
        baselines = classes["baselines"]
        others = ", ".join(f"{name} {b['kl_to_uniform']:.3f}" for name, b in baselines.items())
        print(
            f"classes, KL to uniform (lower = more balanced): pool "
            f"{classes['kl_to_uniform_before']:.3f}, curated {classes['kl_to_uniform_after']:.3f}"
            + (f"; same-size baselines: {others}" if others else "")
        )
    print(
        f"top level: {sizes['n_clusters']} clusters, KL to uniform {sizes['kl_to_uniform']:.3f} "
        f"(curated sample {curated['kl_to_uniform']:.3f})"
    )
    print(f"manifest: {outcome.output_uri}/curated.parquet")
    print(f"report: {outcome.output_uri}/report.json, {outcome.output_uri}/report.png")


def main(argv: Sequence[str] | None = None) -> None:
    job_main(
        __doc__,
        DEFAULT_PRESET,
        curate,
        argv,
        preset_help="local | web | a preset name or YAML path",
    )


if __name__ == "__main__":
    main(sys.argv[1:])
