"""End a run at the first input error a Train worker meets, without Ray Train's restarts.

A worker that meets bad input (a non-transient :class:`~ray_ssl.errors.UserError`) records it
in the run directory (:func:`input_error_record`, written by ``ray_ssl.train.loop``) before it
raises. Ray Train
would then restart the worker group up to ``train.max_failures`` times, each restart failing at
once on the record. :class:`StopOnInputError` runs in Ray Train's controller and raises when a
worker failure comes with such a record: a controller error is not retried, so the run ends at
the first failure, and the driver raises the recorded one-line error.
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from ray_ssl.config import StorageConfig
from ray_ssl.storage import Location, resolve

# An input error (a UserError) met by a worker, kept in the run directory: no restart can get
# past it, so the run ends at that failure and the driver names it.
INPUT_ERROR_FILE = "input_error.txt"


def input_error_record(run_uri: str, storage: StorageConfig) -> Location:
    """Where a run's recorded input error lives (absent when there is none)."""
    return resolve(run_uri, storage).join(INPUT_ERROR_FILE)


class InputErrorStop(RuntimeError):
    """Raised in the controller to end a run whose worker met bad input."""


class StopOnInputError(UserCallback):
    """Ray Train callback: no restart after a recorded input error (see the module doc)."""

    def __init__(self, run_uri: str, storage: StorageConfig) -> None:
        self.run_uri, self.storage = run_uri, storage

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        recorded = input_error_record(self.run_uri, self.storage)
        if recorded.exists():
            raise InputErrorStop(
                f"a worker met bad input ({recorded.uri}); restarting cannot get past it"
            )
