"""GET /healthz (process alive), GET /readyz (Redis reachable, engine loaded), GET /metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from sculptor.context import Context
from sculptor.worker_heartbeat import alive_workers
from service import metrics
from service.api.deps import get_ctx, get_serving
from service.hotswap import ServingModel
from service.replicas import ReplicaStatus

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    """GET /readyz: 200 when ready, 503 with the same fields when not."""

    ready: bool
    engine_loaded: bool
    serving_version: str | None
    admitting: bool  # some replica admits new requests (not all of them mid-swap)
    replicas: list[ReplicaStatus]
    redis: bool
    training_workers: list[str] | None = None  # workers with a live heartbeat (when Redis answered)
    redis_error: str | None = None  # why Redis did not answer


@router.get("/healthz", response_model=Health)
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, response_model_exclude_unset=True,
            responses={503: {"model": Readiness, "description": "not ready: Redis away, no engine, or mid-swap"}})
def readyz(response: Response, ctx: Context = Depends(get_ctx), serving: ServingModel = Depends(get_serving)):
    checks = {"engine_loaded": serving.ready, "serving_version": serving.version,
              "admitting": serving.pool.admitting, "replicas": serving.status()}
    try:
        checks["redis"] = bool(ctx.redis.ping())
        # Training workers do not gate readiness (serving works without them), but their absence shows.
        checks["training_workers"] = alive_workers(ctx.redis)
    except Exception as err:
        checks["redis"] = False
        checks["redis_error"] = str(err)
    # Not admitting (the only replica is mid-swap): 503, so a load balancer sends new requests elsewhere.
    ready = checks["redis"] and serving.ready and serving.pool.admitting
    response.status_code = 200 if ready else 503
    return {"ready": ready, **checks}


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format"}})
async def prometheus_metrics(ctx: Context = Depends(get_ctx), serving: ServingModel = Depends(get_serving)):
    metrics.refresh_engine_gauges(serving)
    try:
        await asyncio.to_thread(metrics.refresh_job_gauges, ctx)
    except Exception:  # Redis away: serve the process metrics anyway
        pass
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
