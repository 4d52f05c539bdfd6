"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

`model` may be the serving version's id (as listed by /v1/models), the alias `current`, or the
base model's name; anything else is 404 `model_not_found`. Every answer names the version that
produced it, in `model_version` and the `X-Model-Version` header.
"""

from __future__ import annotations

import json
import time
from contextlib import aclosing
from typing import Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse

from sculptor.text import Text
from service.api.deps import get_serving
from service.api.disconnect import cancel_on_disconnect
from service.api.errors import ApiError
from service.api.security import require
from service.engines.base import SamplingOptions
from service.generation import Stream, collect, open_stream
from service.hotswap import ServingModel

router = APIRouter(prefix="/v1", tags=["openai"])
generation = [require("generate", limit="generate", hold_slot=True)]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
    model: Text = "current"
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[Text] | Text | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # what the engines take (a signed 64-bit integer)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def options(self) -> SamplingOptions:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingOptions(self.max_completion_tokens or self.max_tokens or 256, self.temperature, self.top_p,
                               stop, self.seed)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: Text


def _check_model(serving: ServingModel, name: str) -> None:
    if name not in ("current", serving.version, serving.ctx.settings.base_model_name, *serving.pool.versions()):
        raise ApiError(404, "model_not_found",
                       f"the model {name!r} does not exist: use 'current' or {serving.version!r} (see GET /v1/models)")


@router.get("/models", dependencies=[require("generate")])
async def list_models(serving: ServingModel = Depends(get_serving)):
    created = int(time.time())
    return {"object": "list", "data": [
        {"id": mid, "object": "model", "created": created, "owned_by": "sculptor", "model_version": serving.version}
        for mid in (serving.version, "current") if mid]}


@router.post("/chat/completions", dependencies=generation)
@cancel_on_disconnect
async def chat_completions(body: ChatRequest, request: Request, response: Response,
                           serving: ServingModel = Depends(get_serving)):
    _check_model(serving, body.model)
    stream = await open_stream(serving, None, [m.model_dump() for m in body.messages], body.options())
    return await _answer(stream, body, response, chat=True)


@router.post("/completions", dependencies=generation)
@cancel_on_disconnect
async def completions(body: CompletionRequest, request: Request, response: Response,
                      serving: ServingModel = Depends(get_serving)):
    _check_model(serving, body.model)
    stream = await open_stream(serving, body.prompt, None, body.options())
    return await _answer(stream, body, response, chat=False)


async def _answer(stream: Stream, body: _Sampling, response: Response, chat: bool):
    kind = "chat.completion" if chat else "text_completion"
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{stream.request_id}", "created": int(time.time()),
            "model": stream.version, "model_version": stream.version}
    if body.stream:
        return EventSourceResponse(_sse(stream, head, kind, chat, body), headers={"X-Model-Version": stream.version})
    text, last = await collect(stream)
    response.headers["X-Model-Version"] = stream.version
    choice = {"index": 0, "finish_reason": last.finish_reason}
    choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
    return {**head, "object": kind, "choices": [choice], "usage": stream.usage(last)}


async def _sse(stream: Stream, head: dict, kind: str, chat: bool, body: _Sampling):
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choice: dict, **extra) -> dict:
        return {"data": json.dumps({**head, "object": chunk_kind, "choices": [choice], **extra})}

    if chat:
        yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    async with aclosing(stream.chunks) as chunks:  # the client gone: the engine request ends
        async for chunk in chunks:
            piece = {"delta": {"content": chunk.text}} if chat else {"text": chunk.text}
            if chunk.text or chunk.finish_reason:
                yield event({"index": 0, **piece, "finish_reason": chunk.finish_reason})
            if chunk.finish_reason and body.stream_options and body.stream_options.include_usage:
                yield {"data": json.dumps({**head, "object": chunk_kind, "choices": [],
                                           "usage": stream.usage(chunk)})}
    yield {"data": "[DONE]"}
