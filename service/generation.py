"""One generation request against the serving model: encode, check limits, stream, count."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from service import metrics
from service.api.errors import ApiError
from service.engines.base import Chunk, EmptyPrompt, PromptTooLong, SamplingOptions
from service.hotswap import ServingModel


@dataclass
class Stream:
    version: str
    request_id: str
    chunks: AsyncIterator[Chunk]

    @staticmethod
    def usage(last: Chunk) -> dict:
        return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                "total_tokens": last.prompt_tokens + last.completion_tokens}


async def open_stream(serving: ServingModel, prompt: str | None, messages: list[dict] | None,
                      options: SamplingOptions) -> Stream:
    if not serving.ready:
        raise ApiError(503, "engine_not_ready", "the model is still loading; retry in a few seconds")
    cap = serving.ctx.settings.max_tokens_cap
    if options.max_tokens > cap:
        raise ApiError(400, "max_tokens_too_large", f"max_tokens is {options.max_tokens}; the limit is {cap}")
    try:
        ids = serving.encode(prompt, messages, options.max_tokens)
    except PromptTooLong as err:
        raise ApiError(400, "context_length_exceeded", str(err)) from None
    except EmptyPrompt as err:
        raise ApiError(400, "empty_prompt", str(err)) from None
    replica = await serving.pool.acquire()  # during a swap, waits for a replica that admits requests
    request_id = uuid.uuid4().hex
    chunks = replica.engine.generate(ids, options, request_id)
    return Stream(replica.version, request_id, _counted(chunks, lambda: serving.pool.release(replica)))


async def _counted(chunks: AsyncIterator[Chunk], release: Callable[[], None]) -> AsyncIterator[Chunk]:
    try:
        async for chunk in chunks:
            if chunk.finish_reason:
                metrics.TOKENS.labels(kind="prompt").inc(chunk.prompt_tokens)
                metrics.TOKENS.labels(kind="completion").inc(chunk.completion_tokens)
            yield chunk
    finally:  # also when the client goes away mid-stream
        release()


async def collect(stream: Stream) -> tuple[str, Chunk]:
    text, last = [], None
    async for chunk in stream.chunks:
        text.append(chunk.text)
        last = chunk
    return "".join(text), last
