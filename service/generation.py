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
from service.replicas import Replica
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


def check_request_size(settings: Settings, texts: list[str], messages: int | None, stop: list[str]) -> None:
    """Bounds on what one request may ask of the engine, checked before anything is tokenized: `texts` is the
    prompt's text, or each message's (`messages` of them; None for a prompt)."""
    if messages is not None and messages > settings.max_chat_messages:
        raise ApiError(400, "too_many_messages", f"the request has {messages} messages; the limit is "
                       f"{settings.max_chat_messages} (SCULPTOR_MAX_CHAT_MESSAGES)")
    size = sum(len(text.encode()) for text in texts)
    if size > settings.max_prompt_bytes:
        what = "the prompt" if messages is None else "the messages' text"
        raise ApiError(413, "prompt_too_large", f"{what} is {size} bytes of UTF-8; the limit is "
                       f"{settings.max_prompt_bytes} (SCULPTOR_MAX_PROMPT_BYTES)")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise ApiError(400, "too_many_stop_sequences",
                       f"'stop' has {len(stop)} sequences; the limit is {MAX_STOP_SEQUENCES}")
    long = next((i for i, s in enumerate(stop) if len(s) > MAX_STOP_CHARS), None)
    if long is not None:
        raise ApiError(400, "stop_sequence_too_long", f"stop sequence {long} is {len(stop[long])} characters; "
                       f"the limit is {MAX_STOP_CHARS}")


def check_ready(serving: ServingModel) -> None:
    if not serving.ready:
        raise ApiError(503, "engine_not_ready", "the model is still loading; retry in a few seconds")


def check_max_tokens(settings: Settings, max_tokens: int) -> None:
    if max_tokens > settings.max_tokens_cap:
        raise ApiError(400, "max_tokens_too_large", f"max_tokens is {max_tokens}; the limit is {settings.max_tokens_cap}")


def pinned_version(serving: ServingModel, model: str | None) -> str | None:
    """The version a request's `model` names: None for any (None, `current` or the base model's name), else
    that version, which a replica must hold (404 `model_not_found` otherwise, never another version's answer)."""
    pinned = None if model in (None, "", "current", serving.ctx.settings.base_model_name) else model
    if pinned is not None and pinned not in serving.pool.versions():
        raise _not_found(serving, model)
    return pinned


async def acquire_replica(serving: ServingModel, model: str | None = None) -> Replica:
    """A replica that admits requests and holds the version `model` names (see pinned_version)."""
    try:
        return await serving.pool.acquire(pinned_version(serving, model))  # mid-swap: waits for one
    except LookupError:  # its replicas were swapped to another version while this request waited
        raise _not_found(serving, model) from None


def _not_found(serving: ServingModel, model: str | None) -> ApiError:
    held = ", ".join(sorted(serving.pool.versions()))
    return ApiError(404, "model_not_found", f"the model {model!r} is not served here: this gateway serves "
                    f"'current' ({serving.version}) and {held}; GET /v1/models lists every version")


async def open_stream(serving: ServingModel, prompt: str | None, messages: list[dict] | None,
                      options: SamplingOptions, model: str | None = None) -> Stream:
    pinned_version(serving, model)  # a version no replica holds is 404 before any other check
    texts = [prompt] if messages is None else [m["content"] for m in messages]
    check_request_size(serving.ctx.settings, texts, None if messages is None else len(messages), options.stop)
    check_ready(serving)  # before encoding: the tokenizer comes with the first version
    check_max_tokens(serving.ctx.settings, options.max_tokens)
    try:
        ids = await asyncio.to_thread(encode_prompt, serving.tokenizer, prompt, messages, options.max_tokens,
                                    serving.engine.max_model_len)
    except PromptTooLong as err:
        raise ApiError(400, "context_length_exceeded", str(err)) from None
    except EmptyPrompt as err:
        raise ApiError(400, "empty_prompt", str(err)) from None
    replica = await acquire_replica(serving, model)
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
