"""ShardedMemoryBank: the InstDisc memory bank held by a pool of Ray actors, sharded by row range.

Published InstDisc code keeps the whole N x D bank on every GPU, so one device caps the dataset.
Here S :class:`~ray_ssl.memory_bank.shard.BankShard` actors, spread over the cluster by a SPREAD
placement group, each own rows ``[bounds[s], bounds[s + 1])``. Every operation issues one call
per shard, concurrently, and assembles the answers. Reads come back from the object store
zero-copy (read-only numpy views); the client copies once, into the assembled array.

**The promise: the bank never serves wrong rows silently.** Every row a client returns was read
from one consistent bank state, or the call raises a one-line :class:`MemoryBankError`:

- Order. Calls from one caller to one (non-async, ``max_concurrency=1``) actor execute in
  submission order while the actor lives. Every actor call of a client is submitted by the
  client's one I/O thread, in the order the client's methods were called, so an update enqueued
  before a gather or sample is visible to it and per-row updates apply in order. Calls are never
  retried (``max_task_retries=0``): a retry after a restart could reorder or repeat updates.
  An update carries the client's generation; a shard applies it only in that generation.
- Incarnation and generation. Every shard result carries the shard's
  :class:`~ray_ssl.memory_bank.shard.ShardState`: its ``incarnation`` (new whenever its process
  starts) and ``generation`` (set on all shards by one whole-bank :meth:`ShardedMemoryBank.reset`
  or :meth:`ShardedMemoryBank.restore`). The client checks it against the state it attached to
  before it uses the result; a change means a shard restarted or another client rolled the bank
  back, and the call fails.
- Restarts. Ray restarts a dead shard (``max_restarts``) *empty*: it refuses every call until
  the whole bank is reset or restored to one snapshot step, so it never re-initialises or rolls
  back alone, and shards never mix rows of different steps. Updates in flight at the death are
  lost with the rest of its rows; there is no replay. The remedy is a rollback of the whole bank:
  a training run fails, and Ray Train (``max_failures``) resumes it from its latest checkpoint,
  whose bank snapshot was taken at the same step as the model
  (``ray_ssl.methods.instdisc``). After a failure this client refuses everything until it
  resets, restores or :meth:`reattach`\\ es to a consistent pool.

I/O. The I/O thread also takes submission (argument serialisation, ~0.5 ms per call) and the
collection of reads off the training step: a step waits only for results it needs and that are
not ready yet. Updates are fire-and-forget up to ``max_inflight_updates`` outstanding; only a
full queue blocks, and an update's failure surfaces at the latest on the next :meth:`flush`.

The shards are named actors (``<name>-shard-<i>-of-<S>`` in ``namespace``), so every Ray Train
worker attaches to the same pool; creation is idempotent (``get_if_exists``) and ends with a
:meth:`reset`. Attaching to a pool of another layout or dtype is a one-line error.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import get_placement_group, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ray_ssl.config import StorageConfig
from ray_ssl.memory_bank.shard import (
    DTYPES,
    BankFaultError,
    BankShard,
    MemoryBankError,
    ShardState,
    new_token,
    snapshot_name,
)
from ray_ssl.storage import resolve

log = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 120.0  # how long shard resources may take to appear before we give up
ATTACH_TIMEOUT_S = 120.0  # how long a non-creating worker waits for the creator's shards
ATTACH_POLL_S = 0.2


@dataclass(frozen=True)
class BankSpec:
    """What a bank is: its size and layout, where it snapshots, and how it is named."""

    size: int  # N, one row per dataset index
    dim: int  # D
    num_shards: int = 2
    dtype: str = "float32"
    name: str = "memory-bank"
    namespace: str = "ray-ssl"
    snapshot_uri: str | None = None  # run storage prefix for shard snapshots
    seed: int = 0
    max_restarts: int = 3  # Ray restarts of a dead shard, empty until the bank is restored
    max_inflight_updates: int = 4
    cpus_per_shard: float = 0.5
    # A custom Ray resource every shard also takes one unit of: the shards run only on nodes
    # that offer it (``ray start --resources='{"<name>": <shards>}'``), e.g. high-memory nodes.
    resource: str | None = None
    keep_snapshots: int = 3  # per shard; older step snapshots are pruned after each snapshot
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> None:
        if self.size < 1 or self.dim < 1:
            raise MemoryBankError(f"bank size N={self.size} and dim D={self.dim} must be >= 1")
        if not 1 <= self.num_shards <= self.size:
            raise MemoryBankError(
                f"bank shards={self.num_shards} must be within [1, N={self.size}]"
            )
        if self.dtype not in DTYPES:
            raise MemoryBankError(f"bank dtype '{self.dtype}' is not one of {', '.join(DTYPES)}")
        if self.max_inflight_updates < 1:
            raise MemoryBankError("max_inflight_updates must be >= 1")


def shard_bounds(size: int, num_shards: int) -> np.ndarray:
    """Row boundaries [S + 1] splitting N rows into S near-equal contiguous ranges."""
    return np.array([s * size // num_shards for s in range(num_shards + 1)], dtype=np.int64)


@dataclass
class Negatives:
    """Noise samples shared by one training step: global rows [K] and features [K, D]."""

    rows: np.ndarray
    features: np.ndarray


class PendingRead:
    """A read in flight on the I/O thread; :meth:`result` waits for the assembled array."""

    def __init__(self, future: Future) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> np.ndarray:
        return self._future.result()


class PendingNegatives:
    """A :meth:`ShardedMemoryBank.prefetch_negatives` call in flight on the I/O thread."""

    def __init__(self, future: Future) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> Negatives:
        return self._future.result()


ShardCalls = list[tuple[int, Any]]  # (shard index, ObjectRef of its result)


class ShardedMemoryBank:
    """Client of the shard pool: route, gather, sample negatives, update, top-k, snapshot.

    Args:
        spec: the bank's layout and names.
        create: create the shards (idempotently) when they do not all exist, then reset them.
            With ``False`` wait until another process (rank 0, the driver) has created and
            initialised all of them, then attach.
    """

    def __init__(self, spec: BankSpec, create: bool = True) -> None:
        spec.validate()
        self.spec = spec
        self.size, self.dim, self.num_shards = spec.size, spec.dim, spec.num_shards
        self.dtype = DTYPES[spec.dtype]
        self.bounds = shard_bounds(spec.size, spec.num_shards)
        self.snapshot_uri = (
            resolve(spec.snapshot_uri, spec.storage).uri.rstrip("/") if spec.snapshot_uri else None
        )
        self._inflight: deque[Future] = deque()  # update submissions -> their shard calls
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{spec.name}-io")
        self._placement_group = None
        self._expected: list[ShardState] = []  # the state of every shard this client serves
        # Why this client refuses to serve (a BankFaultError for a fault), or None: it serves.
        self._broken: MemoryBankError | None = MemoryBankError("not attached yet")
        handles = self._existing_handles()
        if handles is None and create:
            self.handles: list[Any] = self._create_handles()
            self._check_layout()
            self.reset()
            return
        self.handles = handles if handles is not None else self._wait_for_handles()
        self._check_layout()
        if create:
            self._attach(raise_if_inconsistent=False)  # a restore or reset will mend it
        else:
            self._wait_until_consistent()

    # -- pool lifecycle ------------------------------------------------------------------------
    def shard_name(self, index: int) -> str:
        return f"{self.spec.name}-shard-{index:03d}-of-{self.num_shards:03d}"

    def shard_prefix(self, index: int) -> str | None:
        if self.snapshot_uri is None:
            return None
        return f"{self.snapshot_uri}/shard-{index:03d}-of-{self.num_shards:03d}"

    def _existing_handles(self) -> list[Any] | None:
        handles = []
        for i in range(self.num_shards):
            try:
                handles.append(ray.get_actor(self.shard_name(i), namespace=self.spec.namespace))
            except ValueError:
                return None
        return handles

    def _wait_for_handles(self) -> list[Any]:
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        while time.monotonic() < deadline:
            handles = self._existing_handles()
            if handles is not None:
                return handles
            time.sleep(ATTACH_POLL_S)
        raise MemoryBankError(
            f"memory bank '{self.spec.name}' (namespace '{self.spec.namespace}') was not created "
            f"within {ATTACH_TIMEOUT_S:.0f}s; the creating process (rank 0) must start it"
        )

    def _wait_until_consistent(self) -> None:
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        while not self._attach(raise_if_inconsistent=time.monotonic() > deadline):
            time.sleep(ATTACH_POLL_S)

    def _placement(self) -> Any:
        pg_name = f"{self.spec.name}-placement"
        try:
            pg = get_placement_group(pg_name)
        except ValueError:
            bundles = [self._shard_resources() for _ in range(self.num_shards)]
            return placement_group(bundles, strategy="SPREAD", name=pg_name)
        if len(pg.bundle_specs) != self.num_shards:
            raise MemoryBankError(
                f"memory bank '{self.spec.name}' already exists with {len(pg.bundle_specs)} "
                f"shards, not {self.num_shards}; use another bank name or the original layout"
            )
        return pg

    def _shard_resources(self) -> dict[str, float]:
        """The Ray resources of one shard (its placement group bundle)."""
        resources = {"CPU": self.spec.cpus_per_shard}
        if self.spec.resource is not None:
            resources[self.spec.resource] = 1.0
        return resources

    def _create_handles(self) -> list[Any]:
        pg = self._placement()
        if not pg.wait(PLACEMENT_TIMEOUT_S):
            raise MemoryBankError(
                f"memory bank placement group needs {self.num_shards} x "
                f"{self._shard_resources()} and could not be placed in "
                f"{PLACEMENT_TIMEOUT_S:.0f}s; lower instdisc.bank_shards or add nodes"
            )
        self._placement_group = pg
        actor_cls = ray.remote(BankShard)
        handles = []
        for i in range(self.num_shards):
            lo, hi = int(self.bounds[i]), int(self.bounds[i + 1])
            handles.append(
                actor_cls.options(
                    name=self.shard_name(i),
                    namespace=self.spec.namespace,
                    get_if_exists=True,
                    max_restarts=self.spec.max_restarts,  # it restarts empty (see module doc)
                    max_task_retries=0,  # no blind retries: a retry may reorder or repeat updates
                    max_concurrency=1,  # one call at a time: per-caller order, atomic updates
                    num_cpus=self.spec.cpus_per_shard,
                    resources={self.spec.resource: 1.0} if self.spec.resource else None,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        pg, placement_group_bundle_index=i
                    ),
                ).remote(
                    lo,
                    hi,
                    self.dim,
                    self.spec.dtype,
                    self.spec.seed,
                    self.shard_prefix(i),
                    self.spec.storage,
                )
            )
        return handles

    def _check_layout(self) -> None:
        for i, info in enumerate(self.info()):
            lo, hi = int(self.bounds[i]), int(self.bounds[i + 1])
            have = (info["lo"], info["hi"], info["dim"], info["dtype"])
            if have != (lo, hi, self.dim, self.spec.dtype):
                raise MemoryBankError(
                    f"memory bank '{self.spec.name}' already exists with shard {i} covering "
                    f"[{info['lo']}, {info['hi']}) x D={info['dim']} in {info['dtype']}, but "
                    f"N={self.size}, D={self.dim}, shards={self.num_shards}, "
                    f"dtype={self.spec.dtype} asks for [{lo}, {hi}) x D={self.dim}; "
                    "use another bank name or the original layout"
                )

    def _attach(self, raise_if_inconsistent: bool) -> bool:
        """Serve the pool's current state if it is consistent (all shards hold rows of one
        generation); otherwise refuse to serve until a reset or restore."""
        infos = self.info()
        generations = {info["generation"] for info in infos}
        if None in generations:
            empty = [i for i, info in enumerate(infos) if info["generation"] is None]
            problem = f"shards {empty} hold no rows (new, or restarted after a failure)"
        elif len(generations) > 1:
            problem = "its shards hold rows of different resets or restores"
        else:
            self._expected = [ShardState(i["incarnation"], i["generation"]) for i in infos]
            self._broken = None
            return True
        refusal = self._refuse(
            BankFaultError(
                f"memory bank '{self.spec.name}' is not consistent: {problem}; reset it or "
                "restore every shard from one snapshot (a run resumes from its checkpoint)"
            )
        )
        if raise_if_inconsistent:
            raise refusal
        return False

    def reattach(self) -> None:
        """Serve the pool as it is now, if it is consistent (e.g. after a training run, whose
        workers reset or restored the bank); raises :class:`MemoryBankError` if it is not."""
        self.flush_quietly()
        self._attach(raise_if_inconsistent=True)

    def info(self) -> list[dict]:
        """Each shard's ``BankShard.info()``."""
        return self._run(lambda: self._control("info", lambda s: (), bounded=True))

    def _shards(self) -> list[tuple[int, Any]]:
        return list(enumerate(self.handles))

    def _run(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the I/O thread after every earlier call of this client; wait for it."""
        return self._io.submit(fn).result()

    def shutdown(self) -> None:
        """End the shard actors and their placement group; pending updates are dropped.

        Raises nothing for dead shards, so that it can run in a ``finally`` without masking
        the exception that ended the run.
        """
        self._broken = MemoryBankError("this memory bank was shut down")
        self._io.shutdown(wait=False, cancel_futures=True)
        self._inflight.clear()
        for handle in self.handles:
            ray.kill(handle, no_restart=True)
        pg = self._placement_group
        if pg is None:
            try:
                pg = get_placement_group(f"{self.spec.name}-placement")
            except ValueError:
                pg = None
        if pg is not None:
            ray.util.remove_placement_group(pg)

    # -- results: translate failures, check every shard's state ---------------------------------
    def _collect(self, calls: ShardCalls, expect: bool = False) -> list[Any]:
        """The results of ``calls`` (without their state when ``expect``), or MemoryBankError.

        With ``expect`` each result starts with the shard's state, which must be the one this
        client attached to; any failure leaves the client refusing to serve.
        """
        results = []
        for shard, ref in calls:
            try:
                value = ray.get(ref)
            except RayActorError as err:
                raise self._refuse(
                    BankFaultError(
                        f"memory bank '{self.spec.name}' shard {shard} of {self.num_shards} died "
                        f"({type(err).__name__}); its rows and in-flight updates are lost: "
                        "restore every shard from one snapshot (a run resumes from its checkpoint)"
                    )
                ) from None
            except RayTaskError as err:
                if isinstance(err.cause, MemoryBankError):
                    if expect:
                        raise self._refuse(err.cause) from None
                    raise type(err.cause)(str(err.cause)) from None
                raise
            if expect:
                state, *payload = value
                if state != self._expected[shard]:
                    refusal = BankFaultError(
                        f"memory bank '{self.spec.name}' shard {shard} changed under this client "
                        f"(incarnation {self._expected[shard].incarnation} -> "
                        f"{state.incarnation}, generation {self._expected[shard].generation} -> "
                        f"{state.generation}): it restarted or the bank was restored elsewhere; "
                        "reattach after a consistent restore"
                    )
                    raise self._refuse(refusal)
                value = payload[0] if len(payload) == 1 else tuple(payload)
            results.append(value)
        return results

    def _control(
        self, method: str, args_of: Callable[[int], tuple], bounded: bool = False
    ) -> list[Any]:
        """Call an idempotent shard method (info, reset, restore) on every shard.

        A shard that Ray is restarting (``ActorUnavailableError``) is asked again until
        ``ATTACH_TIMEOUT_S``: running such a call twice does no harm, unlike an update. With
        ``bounded`` a shard waiting to be placed (its node gone, no other node with its
        resources) fails the call after ``ATTACH_TIMEOUT_S`` too, rather than waiting for a node
        that may never come; a restore of a large shard may take longer, so it is not bounded.
        """

        def submit(shard: int) -> Any:
            return getattr(self.handles[shard], method).remote(*args_of(shard))

        def unavailable(shard: int) -> BankFaultError:  # a fault (a node gone), not bad input
            return BankFaultError(
                f"memory bank '{self.spec.name}' shard {shard} stayed unavailable for "
                f"{ATTACH_TIMEOUT_S:.0f}s; check that the Ray cluster has nodes with "
                f"{self._shard_resources()} per shard"
            )

        refs = [submit(s) for s in range(self.num_shards)]
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        results = []
        for shard in range(self.num_shards):
            while True:
                timeout = max(0.0, deadline - time.monotonic()) if bounded else None
                try:
                    results.append(ray.get(refs[shard], timeout=timeout))
                    break
                except GetTimeoutError:
                    raise unavailable(shard) from None
                except ActorUnavailableError:
                    if time.monotonic() > deadline:
                        raise unavailable(shard) from None
                    time.sleep(ATTACH_POLL_S)
                    refs[shard] = submit(shard)
                except (RayActorError, RayTaskError):
                    results.extend(self._collect([(shard, refs[shard])]))
                    break
        return results

    def _serving(self) -> None:
        if self._broken is not None:
            raise self._refuse(self._broken)

    def _refuse(self, error: MemoryBankError) -> MemoryBankError:
        """Refuse to serve with ``error`` from now on; returns a fresh copy of it to raise."""
        self._broken = error
        return type(error)(str(error))

    # -- validation and routing ------------------------------------------------------------------
    def _rows(self, rows: Any) -> np.ndarray:
        rows = np.asarray(rows)
        if rows.ndim != 1 or not (rows.size == 0 or np.issubdtype(rows.dtype, np.integer)):
            raise MemoryBankError(
                f"bank rows must be a 1-D integer array, got {rows.dtype}{list(rows.shape)}"
            )
        rows = rows.astype(np.int64, copy=False)
        if rows.size and (rows.min() < 0 or rows.max() >= self.size):
            bad = int(rows[(rows < 0) | (rows >= self.size)][0])
            raise MemoryBankError(
                f"bank row {bad} is outside [0, N={self.size}); rows are dense dataset indices "
                "(the 'idx' field); check instdisc.num_instances against the shard set"
            )
        return rows

    def _features(self, feats: Any, count: int) -> np.ndarray:
        feats = np.asarray(feats, dtype=np.float32)
        if feats.shape != (count, self.dim):
            raise MemoryBankError(
                f"bank features have shape {list(feats.shape)}; expected [{count}, {self.dim}] "
                f"(one D={self.dim} row per index)"
            )
        return feats

    def _route(self, rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(shard, positions into ``rows``) for every shard that owns some of ``rows``."""
        shard_of = np.searchsorted(self.bounds, rows, side="right") - 1
        order = np.argsort(shard_of, kind="stable")  # stable: keeps each shard's rows in order
        cuts = np.searchsorted(shard_of[order], np.arange(self.num_shards + 1))
        return [
            (s, order[cuts[s] : cuts[s + 1]])
            for s in range(self.num_shards)
            if cuts[s + 1] > cuts[s]
        ]

    # -- reads (submitted and collected on the I/O thread) --------------------------------------
    def _read_rows(self, rows: np.ndarray) -> np.ndarray:
        self._serving()
        route = self._route(rows)
        values = self._collect(
            [(s, self.handles[s].gather.remote(rows[pos])) for s, pos in route], expect=True
        )
        out = np.empty((rows.size, self.dim), dtype=self.dtype)
        for (_, positions), value in zip(route, values, strict=True):
            out[positions] = value  # the one copy: zero-copy object-store view -> assembled array
        return out

    def _sample_rows(self, k: int, seed: int) -> Negatives:
        self._serving()
        sizes = np.diff(self.bounds)
        counts = np.random.default_rng([seed, self.size]).multinomial(k, sizes / self.size)
        calls = [(s, h.sample.remote(int(counts[s]), seed)) for s, h in self._shards() if counts[s]]
        parts = self._collect(calls, expect=True)
        if not parts:
            return Negatives(np.empty(0, np.int64), np.empty((0, self.dim), self.dtype))
        return Negatives(
            np.concatenate([r for r, _ in parts]), np.concatenate([f for _, f in parts])
        )

    def gather_async(self, rows: Any) -> PendingRead:
        """Start fetching ``rows``; overlap it with compute, then call ``.result()``."""
        rows = self._rows(rows)
        return PendingRead(self._io.submit(self._read_rows, rows))

    def gather(self, rows: Any) -> np.ndarray:
        """Features of ``rows`` (global indices), [len(rows), D] in the bank dtype."""
        return self.gather_async(rows).result()

    def read_all(self) -> np.ndarray:
        """The whole bank [N, D] (for the exact softmax on small N, and for tests)."""
        return self.gather(np.arange(self.size))

    def prefetch_negatives(self, k: int, seed: int) -> PendingNegatives:
        """Start drawing ``k`` rows uniformly over all N (P_n = 1/N), shared by a whole step.

        Each shard's share is multinomial in its size, so every row is equally likely.
        """
        if k < 0:
            raise MemoryBankError(f"cannot sample {k} negatives; k must be >= 0")
        return PendingNegatives(self._io.submit(self._sample_rows, k, seed))

    def sample_negatives(self, k: int, seed: int) -> Negatives:
        """``k`` noise rows and their features [K, D] (not B x K x D: one set per step)."""
        return self.prefetch_negatives(k, seed).result()

    def topk(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosine top-``k`` over the whole bank by map (per shard) and reduce (here).

        Returns (similarities [Q, k], global rows [Q, k]), best first.
        """
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise MemoryBankError(
                f"topk queries have shape {list(queries.shape)}; expected [Q, {self.dim}]"
            )
        k = min(k, self.size)

        def map_reduce() -> tuple[np.ndarray, np.ndarray]:
            self._serving()
            query_ref = ray.put(queries)  # one copy in the object store, read by every shard
            parts = self._collect(
                [(s, h.topk.remote(query_ref, k)) for s, h in self._shards()], expect=True
            )
            sims = np.concatenate([p[0] for p in parts], axis=1)
            rows = np.concatenate([p[1] for p in parts], axis=1)
            best = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(sims, best, 1), np.take_along_axis(rows, best, 1)

        return self._run(map_reduce)

    # -- writes ------------------------------------------------------------------------------
    def _submit_update(self, rows: np.ndarray, feats: np.ndarray, momentum: float) -> ShardCalls:
        self._serving()
        gen = self._expected[0].generation  # conditional write: refused after a restore elsewhere
        return [
            (s, self.handles[s].update.remote(rows[pos], feats[pos], momentum, gen))
            for s, pos in self._route(rows)
        ]

    def update(self, rows: Any, feats: Any, momentum: float) -> None:
        """Enqueue v <- normalize(m v + (1 - m) f) for ``rows``; returns without waiting.

        Blocks only while ``max_inflight_updates`` earlier updates are still outstanding.
        """
        self._serving()
        rows = self._rows(rows)
        feats = self._features(feats, rows.size)
        while len(self._inflight) >= self.spec.max_inflight_updates:
            self._collect(self._inflight.popleft().result(), expect=True)
        self._inflight.append(self._io.submit(self._submit_update, rows, feats, momentum))

    def flush(self) -> int:
        """Wait until every enqueued update has been applied; returns how many were pending."""
        pending = len(self._inflight)
        while self._inflight:
            self._collect(self._inflight.popleft().result(), expect=True)
        return pending

    def flush_quietly(self) -> None:
        """Drop the pending updates' outcomes (before a whole-bank reset/restore replaces them)."""
        while self._inflight:
            try:
                self._collect(self._inflight.popleft().result())
            except MemoryBankError as err:
                log.info("dropped a failed bank update before a reset/restore: %s", err)

    @property
    def inflight_updates(self) -> int:
        return len(self._inflight)

    # -- whole-bank state: reset, snapshot, restore ----------------------------------------------
    def _set_everywhere(self, method: str, args_of: Callable[[int], tuple]) -> None:
        """Call ``method(*args_of(shard), generation)`` on every shard, with one new generation."""
        self.flush_quietly()
        generation = new_token()

        def run() -> list[ShardState]:
            return self._control(method, lambda s: (*args_of(s), generation))

        self._broken = BankFaultError(f"memory bank '{self.spec.name}' is being reset or restored")
        self._expected = self._run(run)  # stays broken if a shard fails on the way
        self._broken = None

    def reset(self) -> None:
        """Set every shard to the seeded initial bank (the state of a run at step 0)."""
        self._set_everywhere("reset", lambda s: ())

    def snapshot(self, step: int) -> dict:
        """Flush, then write every shard at ``step`` under the snapshot prefix, concurrently.

        Returns a manifest (layout + one URI per shard) for :meth:`restore`.
        """
        if self.snapshot_uri is None:
            raise MemoryBankError("this bank has no snapshot_uri; set one to snapshot it")
        self._serving()
        self.flush()
        uris = [f"{self.shard_prefix(i)}/{snapshot_name(step)}" for i in range(self.num_shards)]

        def write() -> None:
            calls = [(s, h.snapshot.remote(uris[s])) for s, h in self._shards()]
            self._collect(calls, expect=True)
            keep = self.spec.keep_snapshots
            self._collect([(s, h.prune.remote(keep)) for s, h in self._shards()])

        self._run(write)
        return {**self.layout(), "step": step, "uris": uris}

    def layout(self) -> dict:
        return {"size": self.size, "dim": self.dim, "num_shards": self.num_shards}

    def restore(self, manifest: dict) -> None:
        """Load the snapshot a :meth:`snapshot` manifest names into every shard (one step)."""
        if {k: manifest.get(k) for k in ("size", "dim", "num_shards")} != self.layout():
            raise MemoryBankError(
                f"bank snapshot layout N={manifest.get('size')}, D={manifest.get('dim')}, "
                f"shards={manifest.get('num_shards')} does not match this bank's N={self.size}, "
                f"D={self.dim}, shards={self.num_shards}"
            )
        uris: Sequence[str] = manifest["uris"]
        self._set_everywhere("restore", lambda s: (uris[s],))
