"""A long-tailed pool from a labelled one: the demo's stand-in for uncurated web data."""

from __future__ import annotations

import numpy as np

from ray_ssl.curation.errors import CurationError


def zipf_subsample(labels: np.ndarray, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted row ids of a Zipf-profiled subsample: the classes get a random order (rank r = 0,
    1, ...) and class of rank r keeps round((r + 1)^-exponent * its size) rows (at least one),
    drawn uniformly without replacement."""
    if len(labels) == 0 or np.any(labels < 0):
        raise CurationError(
            "curation.pool_zipf_exponent > 0 needs a class label on every sample; set it to 0 "
            "for an unlabelled shard set"
        )
    classes = np.unique(labels)
    ranks = rng.permutation(len(classes))
    keep = []
    for cls, rank in zip(classes, ranks, strict=True):
        members = np.flatnonzero(labels == cls)
        count = max(1, int(round(len(members) * (rank + 1.0) ** -exponent)))
        keep.append(rng.choice(members, count, replace=False))
    return np.sort(np.concatenate(keep))
