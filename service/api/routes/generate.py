"""POST /generate: the simple form of generation. Answers carry the version that produced them."""

from __future__ import annotations

import json
from contextlib import aclosing
from typing import Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sse_starlette.sse import EventSourceResponse

from sculptor.text import Text
from service.api.deps import get_serving
from service.api.disconnect import cancel_on_disconnect
from service.api.security import require
from service.generation import collect, open_stream
from service.engines.base import SamplingOptions
from service.hotswap import ServingModel

router = APIRouter(tags=["generate"])
SSE = {200: {"content": {"text/event-stream": {}}, "description": "JSON; with `stream: true` server-sent events, "
             "each `data` a JSON object {text, model_version} (the last one with finish_reason and usage), then "
             "`[DONE]`"}}


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[Text] | Text | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # what the engines take (a signed 64-bit integer)
    stream: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    def options(self) -> SamplingOptions:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingOptions(self.max_tokens, self.temperature, self.top_p, stop, self.seed)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateAnswer(BaseModel):
    text: str
    model_version: str  # the version that produced it (also the X-Model-Version header)
    finish_reason: str | None
    usage: Usage


@router.post("/generate", dependencies=[require("generate", limit="generate", hold_slot=True)],
             response_model=GenerateAnswer, responses=SSE)
@cancel_on_disconnect
async def generate(body: GenerateRequest, request: Request, response: Response,
                   serving: ServingModel = Depends(get_serving)):
    messages = [m.model_dump() for m in body.messages] if body.messages is not None else None
    stream = await open_stream(serving, body.prompt, messages, body.options())
    if body.stream:
        async def events():
            async with aclosing(stream.chunks) as chunks:  # the client gone: the engine request ends
                async for chunk in chunks:
                    data = {"text": chunk.text, "model_version": stream.version}
                    if chunk.finish_reason:
                        data |= {"finish_reason": chunk.finish_reason, "usage": stream.usage(chunk)}
                    yield {"data": json.dumps(data)}
            yield {"data": "[DONE]"}

        return EventSourceResponse(events(), headers={"X-Model-Version": stream.version})
    text, last = await collect(stream)
    response.headers["X-Model-Version"] = stream.version
    return {"text": text, "model_version": stream.version, "finish_reason": last.finish_reason,
            "usage": stream.usage(last)}
