"""The base of every input error that the CLI and jobs report as one line instead of a traceback.

Each module raises its own subclass (``ConfigError``, ``StorageError``, ``ShardError``, ...) with a
message that says what is wrong and how to fix it. Catching :class:`UserError` needs no import of
those modules, so the CLI starts without pulling in torch or Ray.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or environment: the message is one line naming the problem and the fix.

    ``transient`` marks a fault that a restart can clear (e.g. a lost memory-bank shard): Ray
    Train retries it. Any other UserError is the input's fault: a training run ends at the first
    one, with that line (``ray_ssl.train.input_errors``), instead of retrying it.
    """

    transient = False
