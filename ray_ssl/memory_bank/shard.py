"""One row range of the InstDisc memory bank (Wu et al., arXiv 1805.01978, sec. 3.2).

:class:`BankShard` is a plain class so that it can be tested in-process; ``bank.py`` runs it as a
Ray actor (``ray.remote(BankShard)``). Rows are always *global* indices into the N x D bank; the
shard owns ``[lo, hi)``. Snapshots are ``.npy`` files written atomically (complete or absent).

A shard starts *empty*: it holds rows only after a whole-bank operation, :meth:`reset` (the
seeded initialisation) or :meth:`restore` (a snapshot), which also stamps it with the bank's
``generation``. Ray re-runs ``__init__`` when it restarts a dead actor, so a restarted shard is
empty again and refuses to serve until the whole bank is reset or restored to one snapshot: it
never re-initialises or rolls back on its own. Every serving call returns the shard's
:class:`ShardState` first, so the client can see a restart (new ``incarnation``) or a
restore by another client (new ``generation``) before it uses any row.
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
from typing import NamedTuple

import numpy as np

from ray_ssl.config import StorageConfig
from ray_ssl.errors import UserError
from ray_ssl.storage import atomic_write, resolve

log = logging.getLogger(__name__)

SNAPSHOT_PATTERN = re.compile(r"step-(\d+)\.npy$")
INIT_CHUNK_ROWS = 1 << 18  # rows initialised per chunk; bounds the float32 scratch to 128 MiB
TOPK_CHUNK_ROWS = 1 << 17  # bank rows per similarity block in topk
NORM_EPS = 1e-12  # guards the L2 normalisation of an all-zero row
DTYPES = {"float16": np.float16, "float32": np.float32}
TOKEN_BITS = 63  # incarnations and generations are random non-negative int64 values


class MemoryBankError(UserError, ValueError):
    """The memory bank cannot serve correct rows (bad input, a dead or restarted shard, a layout
    mismatch); the one-line message says what happened and how to go on."""


class BankFaultError(MemoryBankError):
    """A shard died or restarted, so the bank lost rows: not bad input. A training run restarts
    from its checkpoint, which restores every shard (``transient``: Ray Train retries it)."""

    transient = True


class ShardState(NamedTuple):
    """What a call result was computed from: the serving process and the bank-wide state.

    ``incarnation`` is drawn afresh whenever the shard process (re)starts; ``generation`` is
    set on every shard by one whole-bank :meth:`BankShard.reset` or :meth:`BankShard.restore`.
    """

    incarnation: int
    generation: int


def new_token() -> int:
    """A random identifier for an incarnation or a generation."""
    return secrets.randbits(TOKEN_BITS)


def snapshot_name(step: int) -> str:
    return f"step-{step:012d}.npy"


def l2_normalize(rows: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float32."""
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), NORM_EPS)


def momentum_update(old: np.ndarray, new: np.ndarray, momentum: float) -> np.ndarray:
    """v <- normalize(m v + (1 - m) f), the memory-bank update of the paper (sec. 3.2)."""
    return l2_normalize(momentum * old.astype(np.float32) + (1.0 - momentum) * new)


def initial_rows(lo: int, hi: int, dim: int, seed: int, dtype: type = np.float32) -> np.ndarray:
    """Rows ``[lo, hi)`` of the seeded initial bank: uniform in [-sqrt(3/D), sqrt(3/D)], then
    L2-normalised (lemniscate's NCEAverage init); the same rows on every call."""
    out = np.empty((hi - lo, dim), dtype=dtype)
    rng = np.random.default_rng([seed, lo])
    bound = math.sqrt(3.0 / dim)
    for start in range(0, hi - lo, INIT_CHUNK_ROWS):
        stop = min(start + INIT_CHUNK_ROWS, hi - lo)
        chunk = rng.uniform(-bound, bound, size=(stop - start, dim)).astype(np.float32)
        out[start:stop] = l2_normalize(chunk)
    return out


class BankShard:
    """Rows ``[lo, hi)`` of an N x D memory bank, in float16 or float32.

    Args:
        lo, hi: the global row range this shard owns.
        dim: feature dimension D.
        dtype: ``"float16"`` or ``"float32"`` storage.
        seed: initialisation seed of :meth:`reset` (combined with ``lo`` so shards differ).
        snapshot_prefix: URI under which this shard's step snapshots live (for :meth:`prune`).
        storage: endpoint/region for ``s3://`` prefixes.
    """

    def __init__(
        self,
        lo: int,
        hi: int,
        dim: int,
        dtype: str = "float32",
        seed: int = 0,
        snapshot_prefix: str | None = None,
        storage: StorageConfig | None = None,
    ) -> None:
        if not 0 <= lo < hi:
            raise MemoryBankError(f"bank shard range [{lo}, {hi}) is empty or negative")
        if dim < 1:
            raise MemoryBankError(f"bank feature dim must be >= 1, got {dim}")
        if dtype not in DTYPES:
            raise MemoryBankError(f"bank dtype '{dtype}' is not one of {', '.join(DTYPES)}")
        self.lo, self.hi, self.dim, self.seed = lo, hi, dim, seed
        self.dtype = DTYPES[dtype]
        self.storage = storage or StorageConfig()
        self.snapshot_prefix = snapshot_prefix.rstrip("/") if snapshot_prefix else None
        self.incarnation = new_token()
        self.generation: int | None = None  # None: no rows (new, or restarted by Ray)
        self.features: np.ndarray | None = None
        self.rows_updated = 0  # rows written by update() since the last reset/restore
        self.source: str | None = None  # snapshot the rows were restored from, if any

    # -- state -------------------------------------------------------------------------------
    def _serving(self) -> tuple[ShardState, np.ndarray]:
        """The state stamp of a result, or the one-line refusal of an empty shard."""
        if self.generation is None or self.features is None:  # a fault, not bad input
            raise BankFaultError(
                f"bank shard [{self.lo}, {self.hi}) (process {os.getpid()}) holds no rows: it "
                "was restarted and lost them; reset the bank or restore every shard from one "
                "snapshot (a run resumes from its checkpoint)"
            )
        return ShardState(self.incarnation, self.generation), self.features

    def info(self) -> dict:
        """Layout, state and counters; ``pid`` is the serving process (for fault tests)."""
        return {
            "pid": os.getpid(),
            "lo": self.lo,
            "hi": self.hi,
            "dim": self.dim,
            "dtype": np.dtype(self.dtype).name,
            "incarnation": self.incarnation,
            "generation": self.generation,
            "rows_updated": self.rows_updated,
            "source": self.source,
        }

    def reset(self, generation: int) -> ShardState:
        """Set the rows to the seeded initial bank (:func:`initial_rows`) under ``generation``."""
        self.features = initial_rows(self.lo, self.hi, self.dim, self.seed, self.dtype)
        self.generation, self.source, self.rows_updated = generation, None, 0
        return ShardState(self.incarnation, generation)

    def restore(self, uri: str, generation: int) -> ShardState:
        """Replace the rows with the snapshot at ``uri``, under ``generation``."""
        loc = resolve(uri, self.storage)
        if not loc.exists():
            raise MemoryBankError(f"bank snapshot {uri} does not exist")
        with loc.fs.open(loc.path, "rb") as fh:
            data = np.load(fh, allow_pickle=False)
        if data.shape != (self.hi - self.lo, self.dim):
            raise MemoryBankError(
                f"bank snapshot {uri} holds {list(data.shape)} but this shard owns rows "
                f"[{self.lo}, {self.hi}) of dim {self.dim}; the bank layout (N, D, shards) "
                "must match the run that wrote it"
            )
        self.features = np.ascontiguousarray(data, dtype=self.dtype)
        self.generation, self.source, self.rows_updated = generation, uri, 0
        return ShardState(self.incarnation, generation)

    # -- validation ---------------------------------------------------------------------------
    def _local(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            raise MemoryBankError(
                f"bank rows must be a 1-D integer array, got {rows.dtype}{list(rows.shape)}"
            )
        if rows.size and (rows.min() < self.lo or rows.max() >= self.hi):
            bad = rows[(rows < self.lo) | (rows >= self.hi)][0]
            raise MemoryBankError(
                f"bank row {int(bad)} is outside shard range [{self.lo}, {self.hi}); "
                "rows are global dataset indices"
            )
        return rows.astype(np.int64) - self.lo

    def _check_features(self, feats: np.ndarray, count: int) -> np.ndarray:
        feats = np.asarray(feats)
        if feats.ndim != 2 or feats.shape[1] != self.dim or feats.shape[0] != count:
            raise MemoryBankError(
                f"bank features have shape {list(feats.shape)}; expected [{count}, {self.dim}] "
                f"(one D={self.dim} row per index)"
            )
        return feats

    # -- serving operations: each result starts with the ShardState it was computed in ----------
    def gather(self, rows: np.ndarray) -> tuple[ShardState, np.ndarray]:
        """The stored features of ``rows`` (global indices), shape [len(rows), D]."""
        state, features = self._serving()
        return state, features[self._local(rows)]

    def sample(self, k: int, seed: int) -> tuple[ShardState, np.ndarray, np.ndarray]:
        """``k`` rows drawn uniformly with replacement (noise P_n, sec. 3.2), with features."""
        state, features = self._serving()
        if k < 0:
            raise MemoryBankError(f"cannot sample {k} negatives; k must be >= 0")
        rng = np.random.default_rng([seed, self.lo])
        local = rng.integers(0, self.hi - self.lo, size=k)
        return state, local + self.lo, features[local]

    def update(
        self, rows: np.ndarray, feats: np.ndarray, momentum: float, generation: int
    ) -> tuple[ShardState, int]:
        """v <- normalize(m v + (1 - m) f) for each row, repeated rows applied in order.

        Applied only if the shard still holds ``generation`` (the writer's view of the bank), so
        an update from a client that missed a restore never lands on the restored rows.
        Returns the state and the number of rows written.
        """
        state, features = self._serving()
        if generation != state.generation:
            raise MemoryBankError(
                f"bank shard [{self.lo}, {self.hi}) was reset or restored (generation "
                f"{generation} -> {state.generation}); the update was not applied: reattach"
            )
        local = self._local(rows)
        feats = self._check_features(feats, local.size).astype(np.float32, copy=False)
        if not 0.0 <= momentum <= 1.0:
            raise MemoryBankError(f"bank momentum {momentum} must be within [0, 1]")
        # A row that appears r times needs r sequential updates: pass p applies each row's
        # p-th occurrence, so every pass has unique rows and can be vectorised.
        order = np.argsort(local, kind="stable")
        sorted_rows = local[order]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_rows)) + 1]
        occurrence = np.arange(local.size) - np.repeat(starts, np.diff(np.r_[starts, local.size]))
        rank = np.empty_like(occurrence)
        rank[order] = occurrence
        for p in range(int(rank.max()) + 1 if local.size else 0):
            sel = np.flatnonzero(rank == p)
            idx = local[sel]
            features[idx] = momentum_update(features[idx], feats[sel], momentum)
        self.rows_updated += int(local.size)
        return state, int(local.size)

    def topk(self, queries: np.ndarray, k: int) -> tuple[ShardState, np.ndarray, np.ndarray]:
        """Cosine top-``k`` of each query over this shard: (state, sims [Q, k'], rows [Q, k'])."""
        import torch

        state, features = self._serving()
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise MemoryBankError(
                f"topk queries have shape {list(queries.shape)}; expected [Q, {self.dim}]"
            )
        q = torch.from_numpy(l2_normalize(queries))  # a fresh, writable array
        k = min(k, self.hi - self.lo)
        best_sims = torch.full((q.shape[0], 0), -math.inf)
        best_rows = torch.empty((q.shape[0], 0), dtype=torch.int64)
        for start in range(0, self.hi - self.lo, TOPK_CHUNK_ROWS):
            block = torch.from_numpy(features[start : start + TOPK_CHUNK_ROWS]).float()
            sims = q @ block.T
            top = sims.topk(min(k, sims.shape[1]), dim=1)
            cand_sims = torch.cat([best_sims, top.values], dim=1)
            cand_rows = torch.cat([best_rows, top.indices + (start + self.lo)], dim=1)
            keep = cand_sims.topk(min(k, cand_sims.shape[1]), dim=1)
            best_sims, best_rows = keep.values, cand_rows.gather(1, keep.indices)
        return state, best_sims.numpy(), best_rows.numpy()

    # -- snapshots ----------------------------------------------------------------------------
    def snapshot(self, uri: str) -> tuple[ShardState, str]:
        """Write the shard's rows to ``uri`` atomically (complete or absent)."""
        state, features = self._serving()
        with atomic_write(resolve(uri, self.storage)) as fh:
            np.save(fh, features, allow_pickle=False)
        return state, uri

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` step snapshots under the prefix."""
        if self.snapshot_prefix is None:
            return []
        prefix = resolve(self.snapshot_prefix, self.storage)
        if not prefix.exists():
            return []
        steps = []
        for path in prefix.fs.ls(prefix.path, detail=False, refresh=True):
            match = SNAPSHOT_PATTERN.search(path)
            if match:
                steps.append((int(match.group(1)), f"{self.snapshot_prefix}/{match.group(0)}"))
        removed = []
        for step, uri in sorted(steps)[: max(0, len(steps) - keep)]:
            loc = resolve(uri, self.storage)
            loc.fs.rm(loc.path)
            removed.append(uri)
            log.debug("pruned bank snapshot %s (step %d)", uri, step)
        return removed
