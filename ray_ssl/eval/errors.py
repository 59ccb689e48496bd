"""Input errors of evaluation: one line saying what is wrong and what to do (no torch import)."""

from __future__ import annotations

from ray_ssl.errors import UserError


class RasaError(UserError, ValueError):
    """A RASA basis, export or input that cannot be used; the message says why and what to do."""
