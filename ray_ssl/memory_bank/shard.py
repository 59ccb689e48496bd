"""One row range of the InstDisc memory bank (Wu et al., arXiv 1805.01978, sec. 3.2).

:class:`BankShard` is a plain class so that it can be tested in-process; ``bank.py`` runs it as a
Ray actor (``ray.remote(BankShard)``). Rows are always *global* indices into the N x D bank; the
shard owns ``[lo, hi)``. Snapshots are ``.npy`` files written atomically under the shard's
snapshot prefix, with a ``LATEST`` pointer so that a restarted actor finds its newest state.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re

import numpy as np

from ray_ssl.config import StorageConfig
from ray_ssl.errors import UserError
from ray_ssl.storage import atomic_write, read_bytes, resolve, write_bytes_atomic

log = logging.getLogger(__name__)

LATEST_POINTER = "LATEST"
SNAPSHOT_PATTERN = re.compile(r"step-(\d+)\.npy$")
INIT_CHUNK_ROWS = 1 << 18  # rows initialised per chunk; bounds the float32 scratch to 128 MiB
TOPK_CHUNK_ROWS = 1 << 17  # bank rows per similarity block in topk
NORM_EPS = 1e-12  # guards the L2 normalisation of an all-zero row
DTYPES = {"float16": np.float16, "float32": np.float32}


class MemoryBankError(UserError, ValueError):
    """Bad input to the memory bank (rows, dimensions, layout); the message says how to fix it."""


def snapshot_name(step: int) -> str:
    return f"step-{step:012d}.npy"


def l2_normalize(rows: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float32."""
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), NORM_EPS)


def momentum_update(old: np.ndarray, new: np.ndarray, momentum: float) -> np.ndarray:
    """v <- normalize(m v + (1 - m) f), the memory-bank update of the paper (sec. 3.2)."""
    return l2_normalize(momentum * old.astype(np.float32) + (1.0 - momentum) * new)


class BankShard:
    """Rows ``[lo, hi)`` of an N x D memory bank, in float16 or float32.

    Args:
        lo, hi: the global row range this shard owns.
        dim: feature dimension D.
        dtype: ``"float16"`` or ``"float32"`` storage.
        seed: initialisation seed (combined with ``lo`` so shards differ).
        snapshot_prefix: URI under which this shard's snapshots live; when it holds a
            ``LATEST`` pointer the shard starts from that snapshot (this is how an actor that
            Ray restarts recovers its state).
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
        self.lo, self.hi, self.dim = lo, hi, dim
        self.dtype = DTYPES[dtype]
        self.storage = storage or StorageConfig()
        self.snapshot_prefix = snapshot_prefix.rstrip("/") if snapshot_prefix else None
        self.rows_updated = 0  # rows written by update(); lets tests count lost updates
        self.source: str | None = None  # snapshot this state was restored from, if any
        self.features = np.empty((hi - lo, dim), dtype=self.dtype)
        latest = self._latest_snapshot()
        if latest is not None:
            self.restore(latest)
            log.info("bank shard [%d, %d) restored from %s", lo, hi, latest)
        else:
            self._init_random(seed)

    # -- initialisation ---------------------------------------------------------------------
    def _init_random(self, seed: int) -> None:
        """Uniform in [-sqrt(3/D), sqrt(3/D)] then L2-normalised (lemniscate's NCEAverage init)."""
        rng = np.random.default_rng([seed, self.lo])
        bound = math.sqrt(3.0 / self.dim)
        for start in range(0, self.hi - self.lo, INIT_CHUNK_ROWS):
            stop = min(start + INIT_CHUNK_ROWS, self.hi - self.lo)
            chunk = rng.uniform(-bound, bound, size=(stop - start, self.dim)).astype(np.float32)
            self.features[start:stop] = l2_normalize(chunk)

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

    # -- operations ---------------------------------------------------------------------------
    def info(self) -> dict:
        """Layout, counters and the serving process (``pid`` changes when Ray restarts a shard)."""
        return {
            "pid": os.getpid(),
            "lo": self.lo,
            "hi": self.hi,
            "dim": self.dim,
            "dtype": np.dtype(self.dtype).name,
            "rows_updated": self.rows_updated,
            "source": self.source,
        }

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The stored features of ``rows`` (global indices), shape [len(rows), D]."""
        return self.features[self._local(rows)]

    def sample(self, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``k`` rows drawn uniformly with replacement (noise P_n, sec. 3.2), with features."""
        if k < 0:
            raise MemoryBankError(f"cannot sample {k} negatives; k must be >= 0")
        rng = np.random.default_rng([seed, self.lo])
        local = rng.integers(0, self.hi - self.lo, size=k)
        return local + self.lo, self.features[local]

    def update(self, rows: np.ndarray, feats: np.ndarray, momentum: float) -> int:
        """v <- normalize(m v + (1 - m) f) for each row, repeated rows applied in order.

        Returns the number of rows written.
        """
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
            self.features[idx] = momentum_update(self.features[idx], feats[sel], momentum)
        self.rows_updated += int(local.size)
        return int(local.size)

    def assign(self, rows: np.ndarray, feats: np.ndarray) -> int:
        """Overwrite ``rows`` with L2-normalised ``feats`` (initialisation from a feature pass)."""
        local = self._local(rows)
        self.features[local] = l2_normalize(self._check_features(feats, local.size))
        return int(local.size)

    def topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosine top-``k`` of each query over this shard: (sims [Q, k'], global rows [Q, k'])."""
        import torch

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
            block = torch.from_numpy(self.features[start : start + TOPK_CHUNK_ROWS]).float()
            sims = q @ block.T
            top = sims.topk(min(k, sims.shape[1]), dim=1)
            cand_sims = torch.cat([best_sims, top.values], dim=1)
            cand_rows = torch.cat([best_rows, top.indices + (start + self.lo)], dim=1)
            keep = cand_sims.topk(min(k, cand_sims.shape[1]), dim=1)
            best_sims, best_rows = keep.values, cand_rows.gather(1, keep.indices)
        return best_sims.numpy(), best_rows.numpy()

    # -- snapshots ----------------------------------------------------------------------------
    def snapshot(self, uri: str) -> str:
        """Write the shard to ``uri`` atomically (complete or absent); returns ``uri``.

        Afterwards the prefix's ``LATEST`` pointer names ``uri``, so a restart resumes from it.
        """
        with atomic_write(resolve(uri, self.storage)) as fh:
            np.save(fh, self.features, allow_pickle=False)
        self.source = uri
        self._point_latest(uri)
        return uri

    def restore(self, uri: str) -> str:
        """Replace the shard's rows with the snapshot at ``uri``; returns ``uri``."""
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
        self.source = uri
        self._point_latest(uri)
        return uri

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` step snapshots under the prefix (never LATEST's)."""
        if self.snapshot_prefix is None:
            return []
        steps = sorted(self._snapshots())
        latest = self._read_latest()
        removed = []
        for step, uri in steps[: max(0, len(steps) - keep)]:
            if uri != latest:
                loc = resolve(uri, self.storage)
                loc.fs.rm(loc.path)
                removed.append(uri)
                log.debug("pruned bank snapshot %s (step %d)", uri, step)
        return removed

    def _snapshots(self) -> list[tuple[int, str]]:
        prefix = resolve(self.snapshot_prefix, self.storage)
        if not prefix.exists():
            return []
        found = []
        for path in prefix.fs.ls(prefix.path, detail=False, refresh=True):
            match = SNAPSHOT_PATTERN.search(path)
            if match:
                found.append((int(match.group(1)), f"{self.snapshot_prefix}/{match.group(0)}"))
        return found

    def _point_latest(self, uri: str) -> None:
        if self.snapshot_prefix is None:
            return
        pointer = resolve(f"{self.snapshot_prefix}/{LATEST_POINTER}", self.storage)
        write_bytes_atomic(pointer, json.dumps({"uri": uri}).encode())

    def _read_latest(self) -> str | None:
        if self.snapshot_prefix is None:
            return None
        pointer = resolve(f"{self.snapshot_prefix}/{LATEST_POINTER}", self.storage)
        if not pointer.exists():
            return None
        return json.loads(read_bytes(pointer))["uri"]

    def _latest_snapshot(self) -> str | None:
        """The snapshot a (re)started shard should load: LATEST's target, else the newest step."""
        latest = self._read_latest()
        if latest is not None:
            return latest
        steps = self._snapshots() if self.snapshot_prefix else []
        return max(steps)[1] if steps else None
