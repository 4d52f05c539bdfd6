"""GET /jobs, GET /jobs/{id}, GET /jobs/{id}/events (JSON or SSE), POST /jobs/{id}/cancel.

A key that is not admin sees and touches only its own jobs; another key's job answers 404, as if absent.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Query, Request
from sse_starlette.sse import EventSourceResponse

from pydantic import BaseModel

from sculptor import checkpoints
from sculptor.context import Context
from sculptor.records import TERMINAL, HeadMoved, JobRecord, ModelVersion
from sculptor.webhooks import announce
from service.api.deps import get_ctx
from service.api.errors import ApiError
from service.api.security import Caller, require

router = APIRouter(tags=["jobs"])  # plain `def` routes: FastAPI runs them in its threadpool, off the event loop
status_reader = require("tasks")


def _job_or_404(ctx: Context, job_id: str, caller: Caller) -> JobRecord:
    job = ctx.jobs.get(job_id)
    if job is None or not caller.may_see(job.owner):
        raise ApiError(404, "job_not_found", f"no job {job_id!r}")
    return job


@router.get("/jobs")
def list_jobs(offset: int = Query(0, ge=0, le=10**9), limit: int = Query(50, ge=1, le=500), status: str | None = None,
              task_id: str | None = None, ctx: Context = Depends(get_ctx), caller: Caller = status_reader):
    owner = None if caller.is_admin else caller.name
    jobs, total = ctx.jobs.page_for(offset, limit, status=status, task_id=task_id, owner=owner)
    return {"jobs": [j.model_dump() for j in jobs], "total": total, "offset": offset}


@router.get("/jobs/{job_id}", name="get_job")
def get_job(job_id: str, ctx: Context = Depends(get_ctx), caller: Caller = status_reader):
    return _job_or_404(ctx, job_id, caller).model_dump()


@router.get("/jobs/{job_id}/events")
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


@router.post("/jobs/{job_id}/cancel")
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


@router.post("/jobs/{job_id}/promote")
def force_promote(job_id: str, body: PromoteRequest, ctx: Context = Depends(get_ctx),
                  caller: Caller = require("admin")):
    """Serve a rejected candidate anyway (admin). Recorded as forced in the lineage."""
    job = _job_or_404(ctx, job_id, caller)
    if not body.force:
        raise ApiError(400, "force_required", 'promoting past failed gates needs {"force": true}')
    return promote_rejected(ctx, job).model_dump()


def promote_rejected(ctx: Context, job: JobRecord) -> JobRecord:
    """Make a rejected job's candidate current, recorded as forced (ApiError 409 when it cannot be)."""
    job_id = job.job_id
    if job.status != "rejected" or not job.candidate_version:
        raise ApiError(409, "not_rejected", f"job {job_id} is {job.status}; only a rejected candidate can be forced")
    if ctx.versions.current() != job.parent_version:
        raise ApiError(409, "lineage_moved", f"the serving lineage moved on from {job.parent_version} to "
                       f"{ctx.versions.current()}; resubmit the task to train on the current version")
    if not checkpoints.is_committed(ctx.store, job.candidate_version):
        raise ApiError(409, "checkpoint_missing", f"candidate {job.candidate_version} has no committed checkpoint")
    gates = job.gates or {}
    try:  # a compare-and-set on the head: the check above may be stale by now
        ctx.versions.promote(ModelVersion(
            version=job.candidate_version, parent=job.parent_version, task_id=job.task_id, job_id=job_id,
            checkpoint_uri=ctx.store.uri(checkpoints.prefix(job.candidate_version)), forced=True,
            gate_summary={"passed": False, "forced": True, "summary": gates.get("summary"),
                          "failed": gates.get("failed")},
        ))
    except HeadMoved as moved:
        raise ApiError(409, "lineage_moved", f"{moved}; resubmit the task to train on {moved.head}") from None
    return ctx.jobs.update(job_id, reopen=True, status="promoted", gates={**gates, "forced": True})
