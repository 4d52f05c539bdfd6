"""The /v1 routes on the transformers engine: the subset of the OpenAI API that engine can honour.

Written by hand because vLLM's serving layer (what the routes use on vLLM engines) needs a vLLM engine,
and this engine runs where vLLM does not. It answers text chat and text completions, one choice, with
content parts and the `developer` role. A request for anything else it would have to drop silently
(tools, logprobs, structured outputs, `n` > 1, `echo`, token-id prompts ...) is refused with 400
`unsupported_parameter`, naming the parameter.
"""

from __future__ import annotations

import json
import time
from contextlib import aclosing
from typing import Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette.sse import EventSourceResponse

from sculptor.text import Text
from service.api.errors import ApiError
from service.engines.base import SamplingOptions
from service.generation import Stream, collect, open_stream
from service.hotswap import ServingModel


def _set(value) -> bool:
    return value not in (None, False, [], {}, "", 0)


# parameter -> whether the value asks for something this engine cannot do
UNSUPPORTED = {
    "tools": _set, "functions": _set,
    "tool_choice": lambda v: v not in (None, "none"), "function_call": lambda v: v not in (None, "none"),
    "logprobs": lambda v: v not in (None, False), "top_logprobs": _set, "prompt_logprobs": lambda v: v is not None,
    "response_format": lambda v: v is not None and not (isinstance(v, dict) and v.get("type") == "text"),
    "structured_outputs": _set, "guided_json": _set, "guided_regex": _set, "guided_choice": _set,
    "guided_grammar": _set, "n": lambda v: v not in (None, 1), "best_of": lambda v: v not in (None, 1),
    "echo": _set, "suffix": _set, "logit_bias": _set, "use_beam_search": _set,
}


def refuse_unsupported(body: dict) -> None:
    for name, unsupported in UNSUPPORTED.items():
        if name in body and unsupported(body[name]):
            raise ApiError(400, "unsupported_parameter", f"'{name}' is not supported by the transformers engine "
                           "this gateway runs: remove it, or serve with vLLM (SCULPTOR_ENGINE=vllm)")


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields that change nothing here (user, ...)
    model: Text = "current"
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[Text] | Text | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # what the engines take (a signed 64-bit integer)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def options(self, default_max_tokens: int) -> SamplingOptions:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingOptions(self.max_completion_tokens or self.max_tokens or default_max_tokens,
                               self.temperature, self.top_p, stop, self.seed)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] = Field(description="one prompt (a list holding one string is accepted)")

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, "unsupported_parameter", "'prompt' must be one string on the transformers engine "
                           "this gateway runs (one completion per request): send one, or serve with vLLM")
        return self.prompt[0]


def _parse(model: type[BaseModel], body: dict):
    refuse_unsupported(body)
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise RequestValidationError(err.errors(include_url=False, include_context=False)) from None


async def chat_completions(serving: ServingModel, body: dict):
    req = _parse(ChatRequest, body)
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    stream = await open_stream(serving, None, messages, req.options(serving.ctx.settings.default_max_tokens),
                               model=req.model)
    return await _answer(stream, req, chat=True)


async def completions(serving: ServingModel, body: dict):
    req = _parse(CompletionRequest, body)
    stream = await open_stream(serving, req.text(), None, req.options(serving.ctx.settings.default_max_tokens),
                               model=req.model)
    return await _answer(stream, req, chat=False)


async def _answer(stream: Stream, req: _Sampling, chat: bool):
    kind = "chat.completion" if chat else "text_completion"
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{stream.request_id}", "created": int(time.time()),
            "model": stream.version, "model_version": stream.version}
    if req.stream:
        return EventSourceResponse(_sse(stream, head, chat, req), headers={"X-Model-Version": stream.version})
    text, last = await collect(stream)
    choice = {"index": 0, "finish_reason": last.finish_reason}
    choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
    return JSONResponse({**head, "object": kind, "choices": [choice], "usage": stream.usage(last)},
                        headers={"X-Model-Version": stream.version})


async def _sse(stream: Stream, head: dict, chat: bool, req: _Sampling):
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
            if chunk.finish_reason and req.stream_options and req.stream_options.include_usage:
                yield {"data": json.dumps({**head, "object": chunk_kind, "choices": [],
                                           "usage": stream.usage(chunk)})}
    yield {"data": "[DONE]"}
