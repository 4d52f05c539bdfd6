"""POST /tasks: validate a dataset, store it, record a job, enqueue it. GET /tasks[/{id}].

A rejected upload stores nothing and enqueues nothing: every check runs before the first write.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from sculptor import datasets
from sculptor.context import Context
from sculptor.datasets import DatasetError, Example, Hyperparameters, Metric
from sculptor.records import JobRecord, TaskRecord, new_id
from service.api.deps import get_ctx
from service.api.errors import ApiError
from service.api.security import require
from worker.celery_app import enqueue
from worker.gates.splits import split_eval

router = APIRouter(tags=["tasks"])


class TaskBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    examples: list[Any]
    eval_examples: list[Any] | None = None
    metric: Metric = "exact_match"
    hyperparameters: dict[str, Any] | None = None
    webhook_url: str | None = None


class TaskSubmission(BaseModel):
    """A dataset that passed validation, before anything is stored."""

    name: str
    examples: list[Example]
    eval_examples: list[Example] | None
    metric: Metric
    hyperparameters: Hyperparameters
    webhook_url: str | None
    size_bytes: int


UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": TaskBody.model_json_schema(ref_template="#/components/schemas/{model}")},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "JSONL, one example per line"},
        "eval_file": {"type": "string", "format": "binary"}, "name": {"type": "string"},
        "metric": {"type": "string", "enum": ["exact_match", "contains", "rougeL"]},
        "hyperparameters": {"type": "string", "description": "JSON object"},
        "webhook_url": {"type": "string"}}}},
}}}


@router.post("/tasks", status_code=202, dependencies=[require("tasks", limit="upload")], openapi_extra=UPLOAD_SCHEMA)
async def create_task(request: Request, ctx: Context = Depends(get_ctx)):
    submission = await read_submission(request, ctx.settings.max_upload_bytes, ctx.settings.max_examples)
    task, job = store_and_enqueue(ctx, submission)
    return JSONResponse(
        {"task_id": task.task_id, "job_id": job.job_id, "status": job.status,
         "status_url": str(request.url_for("get_job", job_id=job.job_id))},
        status_code=202,
    )


async def read_submission(request: Request, max_bytes: int, max_examples: int) -> TaskSubmission:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, "upload_too_large", f"the upload is {int(declared)} bytes; the limit is {max_bytes}")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if content_type == "application/json":
            submission = parse_json_body(await _read_limited(request, max_bytes))
        elif content_type == "multipart/form-data":
            submission = await parse_multipart(request, max_bytes)
        else:
            raise ApiError(415, "unsupported_media_type",
                           "send the dataset as application/json or as a multipart/form-data upload with a "
                           f"JSONL `file` field (got {content_type or 'no content type'!r})")
    except DatasetError as err:
        raise ApiError(422, err.code, err.message, err.line) from None
    if submission.webhook_url and urlsplit(submission.webhook_url).scheme not in ("http", "https"):
        raise ApiError(422, "invalid_webhook_url", "webhook_url must be an http:// or https:// URL")
    if len(submission.examples) > max_examples:
        raise ApiError(413, "too_many_examples",
                       f"the dataset has {len(submission.examples)} examples; the limit is {max_examples}")
    return submission


async def _read_limited(request: Request, max_bytes: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > max_bytes:
            raise ApiError(413, "upload_too_large", f"the upload exceeds the limit of {max_bytes} bytes")
    return bytes(body)


def parse_json_body(raw: bytes) -> TaskSubmission:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DatasetError(f"the body is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})",
                           err.lineno, code="invalid_json") from None
    try:
        body = TaskBody.model_validate(obj)
    except ValidationError as err:
        raise DatasetError(datasets._describe(err), code="invalid_request") from None
    return TaskSubmission(
        name=body.name, metric=body.metric, webhook_url=body.webhook_url, size_bytes=len(raw),
        examples=datasets.parse_examples(body.examples),
        eval_examples=datasets.parse_examples(body.eval_examples, "eval_examples") if body.eval_examples else None,
        hyperparameters=datasets.parse_hyperparameters(body.hyperparameters),
    )


async def parse_multipart(request: Request, max_bytes: int) -> TaskSubmission:
    form = await request.form(max_part_size=max_bytes)
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise DatasetError("the multipart upload needs a `file` field holding JSONL", code="missing_file")
    raw = await upload.read()
    eval_upload = form.get("eval_file")
    eval_raw = await eval_upload.read() if eval_upload is not None and not isinstance(eval_upload, str) else b""
    if len(raw) + len(eval_raw) > max_bytes:
        raise ApiError(413, "upload_too_large", f"the upload exceeds the limit of {max_bytes} bytes")
    try:
        hyper = json.loads(form.get("hyperparameters") or "{}")
    except json.JSONDecodeError as err:
        raise DatasetError(f"the `hyperparameters` field is not valid JSON: {err.msg}",
                           code="invalid_hyperparameters") from None
    metric = form.get("metric") or "exact_match"
    if metric not in ("exact_match", "contains", "rougeL"):
        raise DatasetError(f"unknown metric {metric!r}: use exact_match, contains or rougeL", code="invalid_metric")
    return TaskSubmission(
        name=str(form.get("name") or getattr(upload, "filename", None) or "task"),
        metric=metric, webhook_url=form.get("webhook_url") or None, size_bytes=len(raw) + len(eval_raw),
        examples=datasets.parse_jsonl(raw),
        eval_examples=datasets.parse_jsonl(eval_raw) if eval_raw else None,
        hyperparameters=datasets.parse_hyperparameters(hyper),
    )


def store_and_enqueue(ctx: Context, sub: TaskSubmission) -> tuple[TaskRecord, JobRecord]:
    ctx.redis.ping()  # Redis away: answer 503 before writing anything to the object store
    train, evals = split_eval(sub.examples, sub.eval_examples, seed=sub.hyperparameters.seed)
    train_bytes, eval_bytes = datasets.to_jsonl(train), datasets.to_jsonl(evals)
    digest = datasets.digest(train_bytes + b"\0" + eval_bytes)
    dataset_uri = ctx.store.put_bytes(f"datasets/{digest}/train.jsonl", train_bytes)
    eval_uri = ctx.store.put_bytes(f"datasets/{digest}/eval.jsonl", eval_bytes)
    task = TaskRecord(
        task_id=new_id("task"), name=sub.name, metric=sub.metric, digest=digest, dataset_uri=dataset_uri,
        eval_uri=eval_uri, num_examples=len(train), num_eval_examples=len(evals), size_bytes=sub.size_bytes,
        hyperparameters=sub.hyperparameters, webhook_url=sub.webhook_url,
    )
    job = JobRecord(job_id=new_id("job"), task_id=task.task_id)
    ctx.tasks.add(task)
    ctx.jobs.add(job)
    try:
        enqueue(job.job_id, ctx.settings.train_queue, ctx.settings.redis_url)
    except Exception as err:
        ctx.jobs.update(job.job_id, status="failed", error=f"could not enqueue the job: {err}")
        raise ApiError(503, "queue_unavailable", "the training queue is unreachable; the task was recorded "
                       f"as {task.task_id} but its job failed to enqueue: retry later") from None
    job = ctx.jobs.update(job.job_id, status="queued")
    return task, job


@router.get("/tasks", dependencies=[require("tasks")])
async def list_tasks(offset: int = Query(0, ge=0, le=10**9), limit: int = Query(50, ge=1, le=500),
                     ctx: Context = Depends(get_ctx)):
    ids = ctx.tasks.ids(offset, limit)
    return {"tasks": [ctx.tasks.get(i).model_dump() for i in ids], "total": ctx.tasks.count(),
            "offset": offset}


@router.get("/tasks/{task_id}", dependencies=[require("tasks")])
async def get_task(task_id: str, ctx: Context = Depends(get_ctx)):
    task = ctx.tasks.get(task_id)
    if task is None:
        raise ApiError(404, "task_not_found", f"no task {task_id!r}")
    return {**task.model_dump(), "jobs": ctx.jobs.for_task(task_id)}
