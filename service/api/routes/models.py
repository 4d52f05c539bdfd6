"""GET /models (the lineage), POST /models/{version}/activate (rollback or roll forward)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from sculptor import lineage
from sculptor.context import Context
from sculptor.records import HeadMoved, ModelVersion
from service.api.deps import get_ctx, get_serving
from service.api.errors import ApiError
from service.api.security import require
from service.hotswap import ServingModel, SwapRecord
from service.replicas import ReplicaStatus

router = APIRouter(tags=["models"])


class VersionView(ModelVersion):
    current: bool  # the lineage's head
    serving: bool  # a replica of this gateway holds it


class Lineage(BaseModel):
    current: str | None  # the lineage's head
    serving: str | None  # what this gateway's replicas hold once no swap is under way
    replicas: list[ReplicaStatus]
    versions: list[VersionView]  # oldest first


class Activated(BaseModel):
    serving: str | None
    swap: SwapRecord


@router.get("/models", dependencies=[require("tasks")], response_model=Lineage)
def list_models(ctx: Context = Depends(get_ctx), serving: ServingModel = Depends(get_serving)):
    current = ctx.versions.current()
    held = serving.pool.versions()  # more than one while a swap rolls through the replicas
    versions = [{**v.model_dump(), "current": v.version == current, "serving": v.version in held}
                for v in ctx.versions.all(newest_first=False)]
    return {"current": current, "serving": serving.version, "replicas": serving.status(), "versions": versions}


@router.post("/models/{version}/activate", dependencies=[require("admin")], response_model=Activated)
async def activate(version: str, ctx: Context = Depends(get_ctx), serving: ServingModel = Depends(get_serving)):
    if await asyncio.to_thread(ctx.versions.get, version) is None:
        raise ApiError(404, "model_not_found", f"no promoted version {version!r}; see GET /models")
    head = await asyncio.to_thread(ctx.versions.current)
    serving.refused.discard(version)
    record = await serving.swap_to(version)
    if not record.ok:
        raise ApiError(409, "swap_failed", f"{record.error}; still serving {serving.version}")
    try:  # a compare-and-set: a promotion that landed during the swap is not silently overwritten
        # other gateways follow through the promotion channel
        await asyncio.to_thread(lineage.activate, ctx.versions, version, head)
    except HeadMoved as moved:
        raise ApiError(409, "lineage_moved", f"{moved} while this gateway swapped to it; the gateway follows "
                       f"{moved.head} again within seconds: see GET /models, then activate {version} again "
                       "if it should still serve") from None
    return {"serving": serving.version, "swap": record.__dict__}
