"""Engine replicas behind one gateway: which replica serves a request, and taking one out of rotation.

A request goes to the admitted replica with the fewest requests in flight and holds it until its
stream ends. The swap protocol (service/hotswap.py) takes replicas out one at a time, drains them
and puts them back; while none is admitted (one replica, mid-swap), new requests wait here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from service import metrics
from service.engines.base import Engine


class ReplicaStatus(BaseModel):
    """One replica as GET /models and GET /readyz show it (`Replica.status`)."""

    replica: int
    version: str | None  # the version it holds
    admitted: bool  # in rotation: it takes new requests
    in_flight: int


@dataclass(eq=False)
class Replica:
    index: int
    engine: Engine
    version: str | None = None
    model_dir: Path | None = None
    admitted: bool = False
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while nothing is in flight

    def __post_init__(self):
        self.idle.set()

    def hold(self, version: str, model_dir: Path) -> None:
        """Record the version the engine now holds; vLLM's OpenAI layer then names it in every answer."""
        self.version, self.model_dir = version, model_dir
        if getattr(self.engine, "openai", None) is not None:
            self.engine.openai.serve_as(version)

    def status(self) -> dict:
        return {"replica": self.index, "version": self.version, "admitted": self.admitted,
                "in_flight": self.in_flight}


class ReplicaPool:
    def __init__(self, engines: list[Engine]):
        if not engines:
            raise ValueError("a replica pool needs at least one engine")
        self.replicas = [Replica(i, engine) for i, engine in enumerate(engines)]
        self._any_admitted = asyncio.Event()

    def __len__(self) -> int:
        return len(self.replicas)

    @property
    def admitting(self) -> bool:
        return self._any_admitted.is_set()

    def versions(self) -> set[str]:
        return {r.version for r in self.replicas if r.version}

    def least_busy_first(self) -> list[Replica]:
        return sorted(self.replicas, key=lambda r: r.in_flight)

    async def acquire(self, version: str | None = None) -> Replica:
        """The admitted replica with the fewest requests in flight (of those holding `version`, if given);
        waits while none is admitted. LookupError if no replica holds `version`."""
        while True:
            if version is not None and version not in self.versions():
                raise LookupError(version)
            admitted = [r for r in self.replicas if r.admitted and version in (None, r.version)]
            if admitted:
                replica = min(admitted, key=lambda r: r.in_flight)
                replica.in_flight += 1
                replica.idle.clear()
                metrics.REPLICA_IN_FLIGHT.labels(str(replica.index)).set(replica.in_flight)
                return replica
            if version is None:
                await self._any_admitted.wait()
            else:  # the replicas holding it are being swapped (rare, short): look again shortly
                await asyncio.sleep(0.05)

    def release(self, replica: Replica) -> None:
        replica.in_flight -= 1
        if replica.in_flight == 0:
            replica.idle.set()
        metrics.REPLICA_IN_FLIGHT.labels(str(replica.index)).set(replica.in_flight)

    def take_out(self, replica: Replica) -> None:
        replica.admitted = False
        if not any(r.admitted for r in self.replicas):
            self._any_admitted.clear()
        metrics.set_replica(replica.index, replica.version, admitted=False)

    def put_back(self, replica: Replica) -> None:
        replica.admitted = True
        self._any_admitted.set()
        metrics.set_replica(replica.index, replica.version, admitted=True)

    async def drain(self, replica: Replica, timeout_s: float) -> bool:
        """Wait until the replica's requests in flight have finished; False if some still run after timeout_s."""
        try:
            await asyncio.wait_for(replica.idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def shutdown(self) -> None:
        for replica in self.replicas:
            replica.admitted = False
            await replica.engine.shutdown()
