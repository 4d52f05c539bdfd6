"""What routes receive: the shared context and the serving model (set up in service/app.py)."""

from __future__ import annotations

from fastapi import Request

from sculptor.context import Context
from service.hotswap import ServingModel


# async, though they do not await: a sync dependency takes a threadpool thread per request, and routes
# blocked on a hung Redis may hold all of them.
async def get_ctx(request: Request) -> Context:
    return request.app.state.ctx


async def get_serving(request: Request) -> ServingModel:
    return request.app.state.serving
