"""The serving model: which version each engine replica holds, and the hot-swap to another one.

A swap (on a promotion event or an admin's activate) runs in this order:
1. fetch the checkpoint into the local cache and verify it (commit marker, checksums,
   safetensors headers, same tensor layout) — no replica is touched until this succeeds — and
   find the tensors that differ from the serving version's, so a reload loads only those;
2. take the fleet lock in Redis, so the gateways of a fleet swap one at a time (Redis away:
   swap without it after a short wait, logged);
3. roll the replicas one at a time: out of rotation → drain → pause → reload weights (+ prefix
   cache reset) → resume → back in rotation. With one replica there is nothing to drain to:
   new requests wait and those in flight are kept or waited for (`swap_pause_mode`);
4. if a reload fails, that replica gets its previous weights back before it serves again, the
   replicas already swapped are rolled back, and the swap is reported failed: the old version
   keeps serving everywhere.
Which version to swap to comes from the promotion listener (service/promotions.py); prompts are
encoded by service/prompts.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

from sculptor import checkpoints
from sculptor.context import Context
from sculptor.locks import LockBusy, held_lock
from service import metrics
from service.engines.base import Engine
from service.replicas import Replica, ReplicaPool

log = logging.getLogger("sculptor.gateway")

FLEET_LOCK = "gateway-swap"
FLEET_LOCK_TTL_S = 30  # renewed while held; a gateway that dies mid-swap blocks the others this long at most
DRAIN_TIMEOUT_S = 300.0  # a replica whose requests outlast this is swapped under them (logged)


class SwapFailed(RuntimeError):
    pass


@dataclass
class SwapRecord:
    version: str
    previous: str | None
    ok: bool
    fetch_s: float
    stall_s: float  # how long no replica admitted new requests
    error: str | None = None
    lock_wait_s: float = 0.0
    drain_s: float = 0.0  # summed over replicas
    pause_s: float = 0.0  # waiting for the engine's running step to end, summed over replicas
    reload_s: float = 0.0  # reload + resume, summed over replicas
    roll_s: float = 0.0  # first replica out of rotation to last one back
    changed_tensors: int = 0  # tensors that differ from the previous version's: what each reload loaded
    at: float = field(default_factory=time.time)


@dataclass
class RollTimes:
    drain_s: float = 0.0
    pause_s: float = 0.0
    reload_s: float = 0.0


class ServingModel:
    def __init__(self, ctx: Context, engines: Engine | list[Engine]):
        self.ctx = ctx
        self.pool = ReplicaPool(engines if isinstance(engines, list) else [engines])
        self.version: str | None = None  # the version the whole pool holds once no swap is under way
        self.model_dir: Path | None = None
        self.tokenizer = None
        self.swaps: list[SwapRecord] = []
        self.refused: set[str] = set()  # versions whose swap failed: not retried by the catch-up loop
        self._lock = asyncio.Lock()

    @property
    def engine(self) -> Engine:
        """The first replica's engine (the only one in a one-replica gateway)."""
        return self.pool.replicas[0].engine

    @property
    def ready(self) -> bool:
        return self.version is not None

    def status(self) -> list[dict]:
        return [r.status() for r in self.pool.replicas]

    async def start(self, version: str) -> None:
        from transformers import AutoTokenizer

        model_dir = await asyncio.to_thread(self.fetch, version)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        for replica in self.pool.replicas:
            await replica.engine.start(model_dir)
            replica.hold(version, model_dir)
            self.pool.put_back(replica)
        self.version, self.model_dir = version, model_dir
        metrics.set_serving_version(version)

    async def shutdown(self) -> None:
        await self.pool.shutdown()

    def fetch(self, version: str) -> Path:
        return checkpoints.fetch(self.ctx.store, version, self.ctx.settings.checkpoint_cache_dir)

    async def swap_to(self, version: str) -> SwapRecord:
        async with self._lock:
            if version == self.version:
                return SwapRecord(version, version, True, 0.0, 0.0)
            started = time.monotonic()
            try:
                model_dir = await asyncio.to_thread(self.fetch, version)
                checkpoints.check_same_layout(model_dir, self.model_dir)
                changed = await asyncio.to_thread(checkpoints.changed_tensors, model_dir, self.model_dir)
            except Exception as err:
                return self._record(SwapRecord(version, self.version, False, time.monotonic() - started, 0.0,
                                               f"refused checkpoint {version}: {err}"))
            fetched = time.monotonic()
            async with self._fleet_lock():
                locked = time.monotonic()
                times = RollTimes()
                error = await self._roll(version, model_dir, changed, times)
            rolled = time.monotonic() - locked
            previous = self.version
            if error is None:
                self.version, self.model_dir = version, model_dir
            stall = rolled if len(self.pool) == 1 else 0.0
            return self._record(SwapRecord(version, previous, error is None, fetched - started, stall, error,
                                           locked - fetched, times.drain_s, times.pause_s, times.reload_s, rolled,
                                           len(changed)))

    async def _roll(self, version: str, model_dir: Path, changed: set[str], times: RollTimes) -> str | None:
        """Swap the replicas one at a time; on a failure, put the swapped ones back on the old version.

        `changed` is measured against the pool's version; a replica left on another one by a failed
        rollback reloads everything."""
        swapped: list[Replica] = []
        for replica in self.pool.least_busy_first():
            try:
                await self._swap_replica(replica, version, model_dir, times,
                                         changed if replica.model_dir == self.model_dir else None)
            except Exception as err:
                for done in reversed(swapped):
                    await self._undo(done, times)
                return f"reload of {version} failed on replica {replica.index}: {err}"
            swapped.append(replica)
        return None

    async def _undo(self, replica: Replica, times: RollTimes) -> None:
        try:
            await self._swap_replica(replica, self.version, self.model_dir, times)
        except Exception as err:  # it keeps the new version, and says so in its label
            log.error("rollback of replica %d to %s failed: %s", replica.index, self.version, err)

    async def _swap_replica(self, replica: Replica, version: str, model_dir: Path, times: RollTimes,
                            changed: set[str] | None = None) -> None:
        """One replica out of rotation, drained (other replicas serve meanwhile), reloaded, back in.
        A reload that fails is followed by a full reload of the previous weights."""
        self.pool.take_out(replica)
        started = time.monotonic()
        if len(self.pool) > 1 and not await self.pool.drain(replica, DRAIN_TIMEOUT_S):
            log.warning("replica %d still has %d requests after %.0fs; swapping under them",
                        replica.index, replica.in_flight, DRAIN_TIMEOUT_S)
        drained = time.monotonic()
        await replica.engine.pause()
        paused = time.monotonic()
        try:
            await replica.engine.reload(model_dir, changed)
            replica.hold(version, model_dir)
        except Exception:
            await replica.engine.reload(replica.model_dir)  # the previous weights, before it serves again
            raise
        finally:
            await replica.engine.resume()
            self.pool.put_back(replica)
            times.drain_s += drained - started
            times.pause_s += paused - drained
            times.reload_s += time.monotonic() - paused

    @asynccontextmanager
    async def _fleet_lock(self):
        """Gateways of a fleet swap one at a time, so the fleet never loses all its capacity at once."""
        wait_s = self.ctx.settings.swap_lock_wait_s
        held = held_lock(self.ctx.redis, FLEET_LOCK, FLEET_LOCK_TTL_S, wait_s)
        try:
            await asyncio.to_thread(held.__enter__)
        except LockBusy:
            log.warning("another gateway held the swap lock for over %.0fs; swapping without it", wait_s)
            held = None
        except redis.RedisError as err:
            log.warning("swap lock unavailable (%s); swapping without it", err)
            held = None
        try:
            yield
        finally:
            if held is not None:
                await asyncio.to_thread(held.__exit__, None, None, None)

    def _record(self, record: SwapRecord) -> SwapRecord:
        self.swaps = (self.swaps + [record])[-50:]
        metrics.SWAPS.labels(outcome="ok" if record.ok else "failed").inc()
        if record.ok:
            metrics.SWAP_SECONDS.observe(record.fetch_s + record.lock_wait_s + record.roll_s)
            metrics.set_serving_version(record.version)
            log.info("now serving %s (fetch %.2fs, stall %.3fs, lock wait %.3fs, drain %.3fs, pause %.3fs, "
                     "reload %.3fs, %d replicas, %d tensors changed)", record.version, record.fetch_s, record.stall_s,
                     record.lock_wait_s, record.drain_s, record.pause_s, record.reload_s, len(self.pool),
                     record.changed_tensors)
        else:
            self.refused.add(record.version)
            log.error("swap to %s failed, still serving %s: %s", record.version, self.version, record.error)
        return record
