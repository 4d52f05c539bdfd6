"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models, /tokenize, /detokenize.

On a vLLM engine a request is parsed into vLLM's own protocol model and answered by vLLM's own
serving layer (service/engines/vllm_openai.py), so the whole surface vLLM's server has works here.
What Sculptor adds around that call:
- auth, rate limits and the bounds on what one request may ask (`_bound`);
- the replica that serves it: `model` may be `current`, the base model's name, or a version that a
  replica holds (404 `model_not_found` otherwise, naming the versions this gateway can serve);
- admission during a swap (the replica pool), and ending the engine request when the client leaves;
- the version label: `X-Model-Version`, `model` (written by vLLM: a replica is served under the name of
  the version it holds) and `model_version`, on every answer and every stream chunk.
On the transformers engine, the subset it can honour is answered by service/api/openai_fallback.py.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Annotated, Any, Awaitable, Callable

from fastapi import APIRouter, Body, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from sculptor.config import Settings
from sculptor.context import Context
from service.api import openai_fallback as fallback
from service.api.deps import get_ctx, get_serving
from service.api.disconnect import cancel_on_disconnect
from service.api.errors import ApiError
from service.api.security import require
from service.generation import acquire_replica, check_max_tokens, check_ready, check_request_size, check_text
from service.hotswap import ServingModel

router = APIRouter(prefix="/v1", tags=["openai"])
tokens_router = APIRouter(tags=["openai"])  # vLLM serves /tokenize and /detokenize without the /v1 prefix
generation = [require("generate", limit="generate", hold_slot=True)]
JsonObject = Annotated[dict[str, Any], Body()]
# The answers of the routes below are vLLM's own protocol models (vllm.entrypoints.openai.*.protocol:
# ChatCompletionResponse, CompletionResponse, TokenizeResponse, ...; on the transformers engine the
# subset openai_fallback.py writes): their schema is vLLM's, so the routes declare response_model=None
# and document the content types, JSON or (with `stream: true`) server-sent events of chunk objects.
JSON_OR_SSE = {200: {"description": "the OpenAI answer as vLLM's protocol writes it (JSON), or with `stream: "
                     "true` server-sent events, each `data` a chunk object, then `[DONE]`",
                     "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}}}}
VLLM_JSON = {200: {"description": "vLLM's own answer (vllm.entrypoints.serve.tokenize.protocol)",
                   "content": {"application/json": {"schema": {"type": "object"}}}}}


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "sculptor"
    parent: str | None = None
    model_version: str | None  # the version this id names (`current`: the one serving now)
    served: bool  # whether a replica of this gateway holds it, so that requests naming it are answered


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


@router.get("/models", dependencies=[require("generate")], response_model=ModelList)
async def list_models(ctx: Context = Depends(get_ctx), serving: ServingModel = Depends(get_serving)) -> ModelList:
    """`current` and every promoted version; `served` says which ones a replica here holds."""
    versions = await asyncio.to_thread(ctx.versions.all, False)
    held = serving.pool.versions()
    cards = [ModelCard(id="current", created=int(time.time()), model_version=serving.version, served=serving.ready)]
    cards += [ModelCard(id=v.version, created=int(v.promoted_at or v.created_at), parent=v.parent,
                        model_version=v.version, served=v.version in held) for v in versions]
    return ModelList(data=cards)


@router.post("/chat/completions", dependencies=generation, response_model=None, responses=JSON_OR_SSE)
@cancel_on_disconnect
async def chat_completions(body: JsonObject, request: Request, serving: ServingModel = Depends(get_serving)):
    if serving.engine.openai is None:
        return await fallback.chat_completions(serving, body)
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    req = _parse(ChatCompletionRequest, body)
    _bound(serving.ctx.settings, req, texts=[_message_text(m) for m in req.messages], messages=req.messages,
           prompts=1)
    return await _serve(serving, req, lambda layer: layer.chat(req, request))


@router.post("/completions", dependencies=generation, response_model=None, responses=JSON_OR_SSE)
@cancel_on_disconnect
async def completions(body: JsonObject, request: Request, serving: ServingModel = Depends(get_serving)):
    if serving.engine.openai is None:
        return await fallback.completions(serving, body)
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    req = _parse(CompletionRequest, body)
    prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) \
        else [req.prompt]
    _bound(serving.ctx.settings, req, texts=[p for p in prompts if isinstance(p, str)], messages=None,
           prompts=len(prompts))
    return await _serve(serving, req, lambda layer: layer.completion(req, request))


@tokens_router.post("/tokenize", dependencies=[require("generate")], response_model=None, responses=VLLM_JSON)
async def tokenize(body: JsonObject, request: Request, serving: ServingModel = Depends(get_serving)):
    _vllm_only(serving, "/tokenize")  # before importing vLLM, which a transformers-only install may lack
    from vllm.entrypoints.serve.tokenize.protocol import TokenizeChatRequest, TokenizeCompletionRequest

    req = _parse(TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest, body)
    texts = [_message_text(m) for m in req.messages] if "messages" in body else [req.prompt]
    check_request_size(serving.ctx.settings, texts, len(texts) if "messages" in body else None, [])
    return await _serve(serving, req, lambda layer: layer.tokenize(req, request))


@tokens_router.post("/detokenize", dependencies=[require("generate")], response_model=None, responses=VLLM_JSON)
async def detokenize(body: JsonObject, request: Request, serving: ServingModel = Depends(get_serving)):
    _vllm_only(serving, "/detokenize")
    from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest

    req = _parse(DetokenizeRequest, body)
    return await _serve(serving, req, lambda layer: layer.detokenize(req, request))


def _vllm_only(serving: ServingModel, route: str) -> None:
    if serving.engine.openai is None:
        raise ApiError(400, "unsupported_route", f"{route} is served on vLLM engines only; this gateway runs the "
                       "transformers engine (SCULPTOR_ENGINE)")


def _parse(model: type[BaseModel], body: dict):
    """vLLM's protocol model, with its validation errors answered like every other route's (422)."""
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise RequestValidationError(err.errors(include_url=False, include_context=False)) from None


def _message_text(message) -> str:
    """A chat message's text: its content as a string, or its text parts joined."""
    content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else []
    return "".join(p.get("text") or "" for p in parts if isinstance(p, dict))


def _bound(settings: Settings, req, texts: list[str], messages: list | None, prompts: int) -> None:
    """What one request may ask of the engine, checked before vLLM renders or tokenizes anything."""
    check_text(texts)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    check_request_size(settings, texts, None if messages is None else len(messages), stop)
    completions = (req.n or 1) * prompts
    if completions > settings.max_completions_per_request:
        raise ApiError(400, "too_many_completions", f"the request asks for {completions} completions (n times "
                       f"the prompts); the limit is {settings.max_completions_per_request} "
                       "(SCULPTOR_MAX_COMPLETIONS_PER_REQUEST)")
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if asked is None:
        req.max_tokens = settings.default_max_tokens
    else:
        check_max_tokens(settings, asked)


async def _serve(serving: ServingModel, req, call: Callable[[Any], Awaitable[Any]]):
    """Run `call` on vLLM's layer of a replica that holds the requested version, and label its answer."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    check_ready(serving)
    replica = await acquire_replica(serving, req.model)
    req.model = None  # vLLM then answers under the replica's served name: the version it holds
    if hasattr(req, "cache_salt"):  # a cached block is reused only under the weights that computed it
        req.cache_salt = f"w{replica.engine.weights_load}" + (f"-{req.cache_salt}" if req.cache_salt else "")
    try:
        answer = await call(replica.engine.openai)
        if hasattr(answer, "__anext__"):
            return await _stream(answer, lambda: serving.pool.release(replica))
    except BaseException:
        serving.pool.release(replica)
        raise
    serving.pool.release(replica)
    if isinstance(answer, ErrorResponse):
        raise ApiError(answer.error.code, _error_code(answer.error.type), answer.error.message)
    version = getattr(answer, "model", None) or replica.version
    return JSONResponse({**answer.model_dump(), "model_version": version}, headers={"X-Model-Version": version})


_MODEL_FIELD = re.compile(r'"model":"([^"]*)"')


async def _stream(chunks, release: Callable[[], None]) -> StreamingResponse:
    """vLLM's SSE lines with `model_version` added to each; the label is the one vLLM put in `model`."""
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = ""
    found = _MODEL_FIELD.search(first)
    version = found.group(1) if found else ""
    label = f'data: {{"model_version":"{version}",'

    async def labelled():
        try:
            yield first.replace("data: {", label, 1)
            async for line in chunks:
                yield line.replace("data: {", label, 1)
        finally:
            await chunks.aclose()  # the client gone: vLLM's generator ends, and with it the engine request
            release()

    return StreamingResponse(labelled(), media_type="text/event-stream", headers={"X-Model-Version": version})


def _error_code(kind: str) -> str:
    """vLLM's error type (`BadRequestError`) as the snake_case code the gateway's errors carry."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", kind.removesuffix("Error")).lower() or "error"
