"""Requests that name a version go to a replica holding it (mid-rolling-swap, replicas hold different ones),
whatever the engine; one no replica holds is a LookupError (the routes' 404), never another version."""

import asyncio
from pathlib import Path

import pytest

from service.replicas import ReplicaPool


def pool_holding(*versions: str) -> ReplicaPool:
    pool = ReplicaPool([object() for _ in versions])
    for replica, version in zip(pool.replicas, versions):
        replica.hold(version, Path(version))
        pool.put_back(replica)
    return pool


def test_a_named_version_goes_to_a_replica_holding_it_even_when_that_one_is_busier():
    async def scenario():
        pool = pool_holding("v0", "v1")
        busy = await pool.acquire("v1")
        again = await pool.acquire("v1")  # the v0 replica is idle, but holds another version
        assert busy.version == again.version == "v1" and (await pool.acquire()).version == "v0"
        with pytest.raises(LookupError):
            await pool.acquire("v9")

    asyncio.run(scenario())


def test_a_named_version_whose_replica_is_out_of_rotation_waits_for_it():
    async def scenario():
        pool = pool_holding("v0", "v1")
        v1 = next(r for r in pool.replicas if r.version == "v1")
        pool.take_out(v1)
        waiting = asyncio.create_task(pool.acquire("v1"))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # the v0 replica admits requests, but is not the version asked for
        pool.put_back(v1)
        assert (await asyncio.wait_for(waiting, 5)) is v1

    asyncio.run(scenario())
