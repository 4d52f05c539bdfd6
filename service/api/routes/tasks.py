"""POST /tasks: validate a dataset, store it, record a job, enqueue it. GET /tasks[/{id}].

A rejected upload stores nothing and enqueues nothing: every check runs before the first write.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import FormData

from sculptor import datasets, webhooks
from sculptor.config import Settings
from sculptor.context import Context
from sculptor.datasets import DatasetError, Example, Hyperparameters, Metric
from sculptor.gate_report import GateThresholds
from sculptor.records import ANONYMOUS, JobRecord, JobStatus, TaskRecord, new_id
from sculptor.splits import split_eval
from sculptor.train_queue import enqueue
from service.api.deps import get_ctx
from service.api.errors import ApiError
from service.api.uploads import file_field, json_field, load_json, read_body, read_form, text_field
from service.api.security import Caller, require

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


class TaskAccepted(BaseModel):
    """POST /tasks: the task and its job, queued."""

    task_id: str
    job_id: str
    status: JobStatus
    status_url: str  # GET /jobs/{job_id}
    webhook_secret: str | None = None  # with a webhook_url only, and only in this answer: it signs the webhooks


class TaskView(BaseModel):
    """A task as the API shows it: webhook settings are write-only, where the datasets are stored is for admins."""

    task_id: str
    name: str
    metric: Metric
    digest: str
    dataset_uri: str | None = None  # admins only
    eval_uri: str | None = None  # admins only
    num_examples: int
    num_eval_examples: int
    size_bytes: int
    hyperparameters: Hyperparameters
    owner: str
    created_at: float
    has_webhook: bool


class TaskDetail(TaskView):
    jobs: list[str]  # the task's job ids, oldest first


class TaskPage(BaseModel):
    tasks: list[TaskView]
    total: int
    offset: int


@router.post("/tasks", status_code=202, openapi_extra=UPLOAD_SCHEMA, response_model=TaskAccepted)
async def create_task(request: Request, ctx: Context = Depends(get_ctx),
                      caller: Caller = require("tasks", limit="upload")):
    submission = await read_submission(request, ctx.settings)
    check_gate_overrides(caller, submission.hyperparameters, ctx.settings.gate_thresholds)
    task, job = await asyncio.to_thread(store_and_enqueue, ctx, submission, owner=caller.name)
    answer = {"task_id": task.task_id, "job_id": job.job_id, "status": job.status,
              "status_url": str(request.url_for("get_job", job_id=job.job_id))}
    if task.webhook_secret:  # shown this once: it signs the task's webhooks (README.md, Webhooks)
        answer["webhook_secret"] = task.webhook_secret.get_secret_value()
    return JSONResponse(answer, status_code=202)


def check_gate_overrides(caller: Caller, hp: Hyperparameters, configured: dict) -> None:
    """Gate thresholds decide what gets served: only an admin may set them per task, and only stricter
    than the configured ones (`configured`: SCULPTOR_GATE_THRESHOLDS)."""
    if not hp.gate_thresholds:
        return
    if not caller.is_admin:
        raise ApiError(403, "gate_thresholds_forbidden",
                       f"only an admin key may set hyperparameters.gate_thresholds (they decide whether a candidate "
                       f"is promoted); the key {caller.name!r} has scopes {sorted(caller.scopes)}: leave the field "
                       "out to use the configured gates")
    loosened = GateThresholds(**configured).loosened(hp.gate_thresholds)
    if loosened:
        raise ApiError(400, "gate_threshold_loosened",
                       "; ".join(loosened) + ". A task may only make a gate stricter; a looser gate for every job "
                       "is set with SCULPTOR_GATE_THRESHOLDS")


async def read_submission(request: Request, settings: Settings) -> TaskSubmission:
    max_bytes = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, "upload_too_large", f"the upload is {int(declared)} bytes; the limit is {max_bytes}")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if content_type == "application/json":
            submission = parse_json_body(await read_body(request, max_bytes))
        elif content_type == "multipart/form-data":
            submission = await parse_multipart(request, max_bytes)
        else:
            raise ApiError(415, "unsupported_media_type",
                           "send the dataset as application/json or as a multipart/form-data upload with a "
                           f"JSONL `file` field (got {content_type or 'no content type'!r})")
    except DatasetError as err:
        raise ApiError(422, err.code, err.message, err.line) from None
    check_dataset_bounds(submission, settings)
    if submission.webhook_url:
        await check_webhook(submission.webhook_url, settings.webhook_allow_hosts)
    return submission


def check_dataset_bounds(sub: TaskSubmission, settings: Settings) -> None:
    """What one task may ask of a job beyond its byte size: examples, eval examples (each is generated in the
    gates) and messages per example."""
    if len(sub.examples) > settings.max_examples:
        raise ApiError(413, "too_many_examples",
                       f"the dataset has {len(sub.examples)} examples; the limit is {settings.max_examples}")
    evals = sub.eval_examples or []
    if len(evals) > settings.max_eval_examples:
        raise ApiError(413, "too_many_eval_examples", f"the task has {len(evals)} eval examples; the limit is "
                       f"{settings.max_eval_examples} (SCULPTOR_MAX_EVAL_EXAMPLES)")
    for what, examples in (("examples", sub.examples), ("eval_examples", evals)):
        for number, example in enumerate(examples, start=1):
            if len(example.messages) > settings.max_example_messages:
                raise ApiError(422, "too_many_messages",
                               f"example {number} of {what!r} has {len(example.messages)} messages; the limit is "
                               f"{settings.max_example_messages} (SCULPTOR_MAX_EXAMPLE_MESSAGES)")


async def check_webhook(url: str, allow_hosts: list[str]) -> None:
    """Refuse a webhook aimed inside the deployment (resolving its host: in a thread)."""
    try:
        await asyncio.to_thread(webhooks.check_target, url, allow_hosts)
    except webhooks.WebhookTargetError as err:
        raise ApiError(422, "invalid_webhook_url", str(err)) from None


def parse_json_body(raw: bytes) -> TaskSubmission:
    obj = load_json(raw, "the body")
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
    form = await read_form(request, max_bytes)  # stops with 413 at the first byte over max_bytes
    try:
        return await _submission_from_form(form)
    finally:
        await form.close()  # the parser's spooled files


async def _submission_from_form(form: FormData) -> TaskSubmission:
    raw = await file_field(form, "file")
    if raw is None:
        raise DatasetError("the multipart upload needs a `file` part holding JSONL (curl -F file=@tasks.jsonl)",
                           code="missing_file")
    eval_raw = await file_field(form, "eval_file") or b""
    hyper = json_field(form, "hyperparameters")
    metric = text_field(form, "metric") or "exact_match"
    if metric not in ("exact_match", "contains", "rougeL"):
        raise DatasetError(f"unknown metric {metric!r}: use exact_match, contains or rougeL", code="invalid_metric")
    return TaskSubmission(
        name=text_field(form, "name") or getattr(form.get("file"), "filename", None) or "task",
        metric=metric, webhook_url=text_field(form, "webhook_url") or None, size_bytes=len(raw) + len(eval_raw),
        examples=datasets.parse_jsonl(raw),
        eval_examples=datasets.parse_jsonl(eval_raw) if eval_raw else None,
        hyperparameters=datasets.parse_hyperparameters(hyper),
    )


def store_and_enqueue(ctx: Context, sub: TaskSubmission, owner: str = ANONYMOUS) -> tuple[TaskRecord, JobRecord]:
    ctx.redis.ping()  # Redis away: answer 503 before writing anything to the object store
    train, evals = split_eval(sub.examples, sub.eval_examples, seed=sub.hyperparameters.seed)
    train_bytes, eval_bytes = datasets.to_jsonl(train), datasets.to_jsonl(evals)
    digest = datasets.digest(train_bytes + b"\0" + eval_bytes)
    dataset_uri = ctx.store.put_bytes(f"datasets/{digest}/train.jsonl", train_bytes)
    eval_uri = ctx.store.put_bytes(f"datasets/{digest}/eval.jsonl", eval_bytes)
    task = TaskRecord(
        task_id=new_id("task"), name=sub.name, metric=sub.metric, digest=digest, dataset_uri=dataset_uri,
        eval_uri=eval_uri, num_examples=len(train), num_eval_examples=len(evals), size_bytes=sub.size_bytes,
        hyperparameters=sub.hyperparameters, webhook_url=sub.webhook_url, owner=owner,
        webhook_secret=webhooks.new_secret() if sub.webhook_url else None,
    )
    job = JobRecord(job_id=new_id("job"), task_id=task.task_id, owner=owner)
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


def task_view(task: TaskRecord, caller: Caller) -> dict:
    """A task as `caller` may see it: webhook settings are write-only (a URL may carry a token), and
    where the datasets are stored is for admins."""
    hidden = {name for name in TaskRecord.model_fields if name.startswith("webhook")}
    if not caller.is_admin:
        hidden |= {"dataset_uri", "eval_uri"}
    return {**task.model_dump(exclude=hidden), "has_webhook": bool(task.webhook_url)}


@router.get("/tasks", response_model=TaskPage, response_model_exclude_unset=True)
def list_tasks(offset: int = Query(0, ge=0, le=10**9), limit: int = Query(50, ge=1, le=500),
               ctx: Context = Depends(get_ctx), caller: Caller = require("tasks")):
    tasks, total = ctx.tasks.page_for(offset, limit, owner=None if caller.is_admin else caller.name)
    return {"tasks": [task_view(t, caller) for t in tasks], "total": total, "offset": offset}


@router.get("/tasks/{task_id}", response_model=TaskDetail, response_model_exclude_unset=True)
def get_task(task_id: str, ctx: Context = Depends(get_ctx), caller: Caller = require("tasks")):
    task = ctx.tasks.get(task_id)
    if task is None or not caller.may_see(task.owner):
        raise ApiError(404, "task_not_found", f"no task {task_id!r}")
    return {**task_view(task, caller), "jobs": ctx.jobs.for_task(task_id)}
