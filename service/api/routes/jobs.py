"""GET /jobs, GET /jobs/{id}, GET /jobs/{id}/events (JSON or SSE), POST /jobs/{id}/cancel.

A key that is not admin sees and touches only its own jobs; another key's job answers 404, as if absent.
"""

from __future__ import annotations

import asyncio
import json
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from sse_starlette.sse import EventSourceResponse

from pydantic import BaseModel, ConfigDict

from sculptor import lineage
from sculptor.context import Context
from sculptor.records import TERMINAL, JobRecord
from sculptor.webhooks import announce
from service.api.deps import get_ctx
from service.api.errors import ApiError
from service.api.security import Caller, require

router = APIRouter(tags=["jobs"])  # plain `def` routes: FastAPI runs them in its threadpool, off the event loop
status_reader = require("tasks")
SSE = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or with `Accept: text/event-stream` a "
             "stream of the same events (`event`: the type, `id`: its seq)"}}


class JobPage(BaseModel):
    jobs: list[JobRecord]
    total: int
    offset: int


class JobEvent(BaseModel):
    """One recorded event: a status change (status, error) or a progress update (Progress's fields)."""

    model_config = ConfigDict(extra="allow")
    seq: int
    type: Literal["status", "progress"]
    at: float
    status: str | None = None
    error: str | None = None


class JobEvents(BaseModel):
    job_id: str
    events: list[JobEvent]


def _job_or_404(ctx: Context, job_id: str, caller: Caller) -> JobRecord:
    job = ctx.jobs.get(job_id)
    if job is None or not caller.may_see(job.owner):
        raise ApiError(404, "job_not_found", f"no job {job_id!r}")
    return job


@router.get("/jobs", response_model=JobPage)
def list_jobs(offset: int = Query(0, ge=0, le=10**9), limit: int = Query(50, ge=1, le=500), status: str | None = None,
              task_id: str | None = None, ctx: Context = Depends(get_ctx), caller: Caller = status_reader):
    owner = None if caller.is_admin else caller.name
    jobs, total = ctx.jobs.page_for(offset, limit, status=status, task_id=task_id, owner=owner)
    return {"jobs": [j.model_dump() for j in jobs], "total": total, "offset": offset}


@router.get("/jobs/{job_id}", name="get_job", response_model=JobRecord)
def get_job(job_id: str, ctx: Context = Depends(get_ctx), caller: Caller = status_reader):
    return _job_or_404(ctx, job_id, caller).model_dump()


@router.get("/jobs/{job_id}/events", response_model=JobEvents, response_model_exclude_unset=True, responses=SSE)
def job_events(job_id: str, request: Request, ctx: Context = Depends(get_ctx), caller: Caller = status_reader):
    _job_or_404(ctx, job_id, caller)
    if "text/event-stream" not in request.headers.get("accept", ""):
        return {"job_id": job_id, "events": ctx.jobs.events(job_id)}
    return EventSourceResponse(_stream_events(ctx, job_id, request))


async def _stream_events(ctx: Context, job_id: str, request: Request):
    """Replay the stored events, then follow new ones until the job ends or the client leaves."""
    resumed = request.headers.get("last-event-id", "")
    sent = int(resumed) if resumed.isdigit() else 0  # the last event's `seq` (a reconnecting client sends it)
    while not await request.is_disconnected():
        events = await asyncio.to_thread(ctx.jobs.events, job_id, sent)
        for event in events:
            yield {"event": event["type"], "id": str(event["seq"]), "data": json.dumps(event)}
            sent = event["seq"]
        if any(e["type"] == "status" and e["status"] in TERMINAL for e in events):
            return
        await asyncio.sleep(0.5)


@router.post("/jobs/{job_id}/cancel", response_model=JobRecord)
def cancel_job(job_id: str, ctx: Context = Depends(get_ctx), caller: Caller = status_reader):
    job = _job_or_404(ctx, job_id, caller)
    if job.finished:
        raise ApiError(409, "job_finished", f"job {job_id} already ended as {job.status}; nothing to cancel")
    if job.status in ("validating", "queued"):
        job = ctx.jobs.update(job_id, cancel_requested=True, status="cancelled", error="cancelled while queued")
        announce(ctx.tasks.get(job.task_id), job)
    else:
        job = ctx.jobs.update(job_id, cancel_requested=True)  # the worker stops at its next step
    return job.model_dump()


class PromoteRequest(BaseModel):
    force: bool = False


@router.post("/jobs/{job_id}/promote", response_model=JobRecord)
def force_promote(job_id: str, body: PromoteRequest, ctx: Context = Depends(get_ctx),
                  caller: Caller = require("admin")):
    """Serve a rejected candidate anyway (admin). Recorded as forced in the lineage."""
    job = _job_or_404(ctx, job_id, caller)
    if not body.force:
        raise ApiError(400, "force_required", 'promoting past failed gates needs {"force": true}')
    return promote_rejected(ctx, job).model_dump()


def promote_rejected(ctx: Context, job: JobRecord) -> JobRecord:
    """Make a rejected job's candidate current, recorded as forced (ApiError 409 when it cannot be)."""
    try:
        return lineage.force_promote(ctx.versions, ctx.jobs, ctx.store, job)
    except lineage.CannotPromote as err:
        raise ApiError(409, err.code, str(err)) from None
