"""GET /jobs, GET /jobs/{id}, GET /jobs/{id}/events (JSON or SSE), POST /jobs/{id}/cancel."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Request
from sse_starlette.sse import EventSourceResponse

from sculptor.context import Context
from sculptor.records import TERMINAL
from service.api.deps import get_ctx
from service.api.errors import ApiError
from service.api.security import require

router = APIRouter(tags=["jobs"], dependencies=[require("tasks")])


def _job_or_404(ctx: Context, job_id: str):
    job = ctx.jobs.get(job_id)
    if job is None:
        raise ApiError(404, "job_not_found", f"no job {job_id!r}")
    return job


@router.get("/jobs")
async def list_jobs(offset: int = 0, limit: int = 50, status: str | None = None, task_id: str | None = None,
                    ctx: Context = Depends(get_ctx)):
    jobs = ctx.jobs.all()
    if status:
        jobs = [j for j in jobs if j.status == status]
    if task_id:
        jobs = [j for j in jobs if j.task_id == task_id]
    limit = max(1, min(limit, 500))
    return {"jobs": [j.model_dump() for j in jobs[offset:offset + limit]], "total": len(jobs), "offset": offset}


@router.get("/jobs/{job_id}", name="get_job")
async def get_job(job_id: str, ctx: Context = Depends(get_ctx)):
    return _job_or_404(ctx, job_id).model_dump()


@router.get("/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request, ctx: Context = Depends(get_ctx)):
    _job_or_404(ctx, job_id)
    if "text/event-stream" not in request.headers.get("accept", ""):
        return {"job_id": job_id, "events": ctx.jobs.events(job_id)}
    return EventSourceResponse(_stream_events(ctx, job_id, request))


async def _stream_events(ctx: Context, job_id: str, request: Request):
    """Replay the stored events, then follow new ones until the job ends or the client leaves."""
    sent = 0
    while not await request.is_disconnected():
        events = await asyncio.to_thread(ctx.jobs.events, job_id, sent)
        for event in events:
            yield {"event": event["type"], "data": json.dumps(event)}
        sent += len(events)
        if any(e["type"] == "status" and e["status"] in TERMINAL for e in events):
            return
        await asyncio.sleep(0.5)


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, ctx: Context = Depends(get_ctx)):
    job = _job_or_404(ctx, job_id)
    if job.finished:
        raise ApiError(409, "job_finished", f"job {job_id} already ended as {job.status}; nothing to cancel")
    if job.status in ("validating", "queued"):
        job = ctx.jobs.update(job_id, cancel_requested=True, status="cancelled", error="cancelled while queued")
    else:
        job = ctx.jobs.update(job_id, cancel_requested=True)  # the worker stops at its next step
    return job.model_dump()
