"""One generation request against the serving model: encode, check limits, stream, count."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from sculptor.config import Settings
from sculptor.text import HOW_TO_FIX, lone_surrogate
from service import metrics
from service.api.errors import ApiError
from service.engines.base import Chunk, EmptyPrompt, PromptTooLong, SamplingOptions
from service.hotswap import ServingModel
from service.prompts import encode_prompt


@dataclass
class Stream:
    version: str
    request_id: str
    chunks: AsyncIterator[Chunk]

    @staticmethod
    def usage(last: Chunk) -> dict:
        return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                "total_tokens": last.prompt_tokens + last.completion_tokens}


MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256


def check_text(texts: list[str]) -> None:
    """Text that no tokenizer can encode (a lone UTF-16 surrogate) is refused, saying where it is."""
    for i, text in enumerate(texts):
        at = lone_surrogate(text)
        if at is not None:
            raise ApiError(400, "invalid_text", f"text {i} of the request holds a lone UTF-16 surrogate "
                           f"(\\u{ord(text[at]):04x}) at character {at}: {HOW_TO_FIX}")


def check_request_size(settings: Settings, prompt: str | None, messages: list[dict] | None, stop: list[str]) -> None:
    """Bounds on what one request may ask of the engine, checked before anything is tokenized."""
    if messages is not None and len(messages) > settings.max_chat_messages:
        raise ApiError(400, "too_many_messages", f"the request has {len(messages)} messages; the limit is "
                       f"{settings.max_chat_messages} (SCULPTOR_MAX_CHAT_MESSAGES)")
    texts = [prompt] if prompt is not None else [m["content"] for m in messages or []]
    size = sum(len(text.encode()) for text in texts)
    if size > settings.max_prompt_bytes:
        what = "the prompt" if prompt is not None else "the messages' text"
        raise ApiError(413, "prompt_too_large", f"{what} is {size} bytes of UTF-8; the limit is "
                       f"{settings.max_prompt_bytes} (SCULPTOR_MAX_PROMPT_BYTES)")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise ApiError(400, "too_many_stop_sequences",
                       f"'stop' has {len(stop)} sequences; the limit is {MAX_STOP_SEQUENCES}")
    long = next((i for i, s in enumerate(stop) if len(s) > MAX_STOP_CHARS), None)
    if long is not None:
        raise ApiError(400, "stop_sequence_too_long", f"stop sequence {long} is {len(stop[long])} characters; "
                       f"the limit is {MAX_STOP_CHARS}")


async def open_stream(serving: ServingModel, prompt: str | None, messages: list[dict] | None,
                      options: SamplingOptions) -> Stream:
    check_request_size(serving.ctx.settings, prompt, messages, options.stop)
    if not serving.ready:
        raise ApiError(503, "engine_not_ready", "the model is still loading; retry in a few seconds")
    cap = serving.ctx.settings.max_tokens_cap
    if options.max_tokens > cap:
        raise ApiError(400, "max_tokens_too_large", f"max_tokens is {options.max_tokens}; the limit is {cap}")
    try:
        ids = await asyncio.to_thread(encode_prompt, serving.tokenizer, prompt, messages, options.max_tokens,
                                    serving.engine.max_model_len)
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
        async with aclosing(chunks):  # closing the engine's stream ends its request (client gone mid-stream)
            async for chunk in chunks:
                if chunk.finish_reason:
                    metrics.TOKENS.labels(kind="prompt").inc(chunk.prompt_tokens)
                    metrics.TOKENS.labels(kind="completion").inc(chunk.completion_tokens)
                yield chunk
    finally:
        release()


async def collect(stream: Stream) -> tuple[str, Chunk]:
    text, last = [], None
    async with aclosing(stream.chunks) as chunks:
        async for chunk in chunks:
            text.append(chunk.text)
            last = chunk
    return "".join(text), last
