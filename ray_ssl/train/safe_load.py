"""The checkpoint error, and why reading a checkpoint runs no code from it.

A checkpoint directory may sit on shared storage that others can write, and a pickle can run any
code while it is read. ray-ssl's checkpoints therefore hold no pickle at all: tensors are
safetensors files (the consolidated model and optimizer state, each rank's RNG state with its
JSON metadata) and everything else is JSON (``ray_ssl.train.checkpoint``). A file that is not
what it should be (e.g. a pickle renamed ``.safetensors``) is refused with a one-line
:class:`CheckpointError` by the safetensors reader, which never unpickles.
"""

from __future__ import annotations

from ray_ssl.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used for this run; the message says why and what to do."""
