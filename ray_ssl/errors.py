"""The input errors that the CLI and jobs report as one line instead of a traceback.

Each module raises its own subclass of ``ValueError``/``RuntimeError`` with a message that says
what is wrong and how to fix it; this tuple is the list of them.
"""

from __future__ import annotations

from ray_ssl.config import ConfigError
from ray_ssl.curation.errors import CurationError
from ray_ssl.data.errors import CorruptDataError, ShardError
from ray_ssl.data.storage import StorageError
from ray_ssl.memory_bank.shard import MemoryBankError
from ray_ssl.train.checkpoint import CheckpointError

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    StorageError,
    ShardError,
    CorruptDataError,
    MemoryBankError,
    CheckpointError,
    CurationError,
)
