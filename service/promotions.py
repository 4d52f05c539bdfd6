"""The promotion listener: swap the serving model to every promoted version, for as long as the gateway runs.

Promotions arrive on Redis pub/sub; a periodic check of the `current` key catches any message missed
while Redis was away. Candidates announced while they are gated are fetched ahead (prefetch), so their
swap does not wait on the copy.
"""

from __future__ import annotations

import asyncio
import json
import logging

from sculptor.records import CANDIDATES_CHANNEL, PROMOTIONS_CHANNEL, VersionStore
from service.hotswap import ServingModel

log = logging.getLogger("sculptor.gateway")


class PromotionListener:
    def __init__(self, serving: ServingModel, poll_s: float = 5.0):
        self.serving = serving
        self.poll_s = poll_s
        self._prefetches: set[asyncio.Task] = set()

    async def run(self) -> None:
        import redis.asyncio as aioredis

        while True:
            try:
                client = aioredis.Redis.from_url(self.serving.ctx.settings.redis_url, decode_responses=True)
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(PROMOTIONS_CHANNEL, CANDIDATES_CHANNEL)
                    await self._catch_up(client)
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.poll_s)
                        if message is None:
                            await self._catch_up(client)
                        elif message["channel"] == CANDIDATES_CHANNEL:
                            self._prefetch(json.loads(message["data"])["version"])
                        else:
                            announced = json.loads(message["data"])["version"]
                            await self.serving.swap_to(await self._newest(client, announced))
            except asyncio.CancelledError:
                raise
            except Exception as err:  # Redis away: keep serving, retry shortly
                log.warning("promotion listener: %s; retrying", err)
                await asyncio.sleep(self.poll_s)

    def _prefetch(self, version: str) -> None:
        """Fetch and verify a candidate while it is being gated."""
        async def fetch():
            try:
                await asyncio.to_thread(self.serving.fetch, version)
            except Exception as err:
                log.warning("prefetch of %s failed (the swap will fetch again): %s", version, err)

        task = asyncio.create_task(fetch())
        self._prefetches.add(task)
        task.add_done_callback(self._prefetches.discard)

    async def _newest(self, client, announced: str) -> str:
        """The current version, which may be newer than the one announced: promotions that arrived
        during a long swap are skipped over rather than swapped in one after another."""
        return await client.get(VersionStore.current_key) or announced

    async def _catch_up(self, client) -> None:
        current = await client.get(VersionStore.current_key)
        if current and current != self.serving.version and current not in self.serving.refused:
            await self.serving.swap_to(current)
