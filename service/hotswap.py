"""The serving model: which version the engine holds, and the hot-swap to another one.

A swap (on a promotion event or an admin's activate) runs in this order:
1. fetch the checkpoint into the local cache and verify it (commit marker, checksums,
   safetensors headers) — the engine is not touched until this succeeds;
2. under one lock: pause (in-flight requests are kept) → reload weights → resume;
3. if the reload fails, reload the previous version before resuming: the old one keeps serving.
Promotions arrive on Redis pub/sub; a periodic check of the `current` key catches any
message missed while Redis was away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from sculptor import checkpoints
from sculptor.context import Context
from sculptor.records import CANDIDATES_CHANNEL, PROMOTIONS_CHANNEL, VersionStore
from service import metrics
from service.engines.base import EmptyPrompt, Engine, PromptTooLong

log = logging.getLogger("sculptor.gateway")


class SwapFailed(RuntimeError):
    pass


@dataclass
class SwapRecord:
    version: str
    previous: str | None
    ok: bool
    fetch_s: float
    stall_s: float
    error: str | None = None
    at: float = field(default_factory=time.time)


class ServingModel:
    def __init__(self, ctx: Context, engine: Engine):
        self.ctx = ctx
        self.engine = engine
        self.version: str | None = None
        self.model_dir: Path | None = None
        self.tokenizer = None
        self.swaps: list[SwapRecord] = []
        self.refused: set[str] = set()
        self._prefetches: set[asyncio.Task] = set()  # versions whose swap failed: not retried by the catch-up loop
        self._lock = asyncio.Lock()
        # Cleared while a swap is in progress: new requests wait, then run on (and are labelled with)
        # the version that serves them. Requests already in flight continue on the new weights.
        self.admitting = asyncio.Event()
        self.admitting.set()

    @property
    def ready(self) -> bool:
        return self.version is not None

    async def start(self, version: str) -> None:
        from transformers import AutoTokenizer

        model_dir = await asyncio.to_thread(self._fetch, version)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        await self.engine.start(model_dir)
        self.version, self.model_dir = version, model_dir
        metrics.set_serving_version(version)

    def _fetch(self, version: str) -> Path:
        return checkpoints.fetch(self.ctx.store, version, self.ctx.settings.checkpoint_cache_dir)

    async def swap_to(self, version: str) -> SwapRecord:
        async with self._lock:
            if version == self.version:
                return SwapRecord(version, version, True, 0.0, 0.0)
            started = time.monotonic()
            try:
                model_dir = await asyncio.to_thread(self._fetch, version)
                checkpoints.check_same_layout(model_dir, self.model_dir)
            except Exception as err:
                return self._record(SwapRecord(version, self.version, False, time.monotonic() - started, 0.0,
                                               f"refused checkpoint {version}: {err}"))
            fetched = time.monotonic()
            self.admitting.clear()
            await self.engine.pause()
            try:
                await self.engine.reload(model_dir)
                previous, self.version, self.model_dir = self.version, version, model_dir
                error = None
            except Exception as err:
                previous, error = self.version, f"reload of {version} failed: {err}"
                await self.engine.reload(self.model_dir)  # put the old weights back before resuming
            finally:
                await self.engine.resume()
                self.admitting.set()
            record = SwapRecord(version, previous, error is None, fetched - started, time.monotonic() - fetched, error)
            return self._record(record)

    def _record(self, record: SwapRecord) -> SwapRecord:
        self.swaps = (self.swaps + [record])[-50:]
        metrics.SWAPS.labels(outcome="ok" if record.ok else "failed").inc()
        if record.ok:
            metrics.SWAP_SECONDS.observe(record.fetch_s + record.stall_s)
            metrics.set_serving_version(record.version)
            log.info("now serving %s (fetch %.2fs, stall %.3fs)", record.version, record.fetch_s, record.stall_s)
        else:
            self.refused.add(record.version)
            log.error("swap to %s failed, still serving %s: %s", record.version, self.version, record.error)
        return record

    def encode(self, prompt: str | None, messages: list[dict] | None, max_tokens: int) -> list[int]:
        if messages is not None:
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise EmptyPrompt("the prompt is empty: give at least one token of text")
        if len(ids) + max_tokens > self.engine.max_model_len:
            raise PromptTooLong(
                f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}, but the model's context "
                f"is {self.engine.max_model_len} tokens: shorten the prompt or lower max_tokens"
            )
        return ids

    async def follow_promotions(self, poll_s: float = 5.0) -> None:
        """Swap to every promoted version, for as long as the gateway runs."""
        import redis.asyncio as aioredis

        while True:
            try:
                client = aioredis.Redis.from_url(self.ctx.settings.redis_url, decode_responses=True)
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(PROMOTIONS_CHANNEL, CANDIDATES_CHANNEL)
                    await self._catch_up(client)
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=poll_s)
                        if message is None:
                            await self._catch_up(client)
                        elif message["channel"] == CANDIDATES_CHANNEL:
                            self._prefetch(json.loads(message["data"])["version"])
                        else:
                            await self.swap_to(json.loads(message["data"])["version"])
            except asyncio.CancelledError:
                raise
            except Exception as err:  # Redis away: keep serving, retry shortly
                log.warning("promotion listener: %s; retrying", err)
                await asyncio.sleep(poll_s)

    def _prefetch(self, version: str) -> None:
        """Fetch and verify a candidate while it is being gated, so its swap does not wait on the copy."""
        async def fetch():
            try:
                await asyncio.to_thread(self._fetch, version)
            except Exception as err:
                log.warning("prefetch of %s failed (the swap will fetch again): %s", version, err)

        task = asyncio.create_task(fetch())
        self._prefetches.add(task)
        task.add_done_callback(self._prefetches.discard)

    async def _catch_up(self, client) -> None:
        current = await client.get(VersionStore.current_key)
        if current and current != self.version and current not in self.refused:
            await self.swap_to(current)
