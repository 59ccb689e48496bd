"""The curation pipeline's input error: one line saying what is wrong and what to do."""

from __future__ import annotations

from ray_ssl.errors import UserError


class CurationError(UserError, ValueError):
    """Bad curation input: too many clusters for the points, no embeddings, mismatched dims..."""
