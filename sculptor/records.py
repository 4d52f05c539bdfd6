"""Records shared by the gateway and the workers: tasks, jobs and model versions, kept in Redis.

Every record is one JSON string under a `sculptor:` key, with a sorted set per kind for
listing in order of creation. Job updates go through `JobStore.update`, which also appends an
event and publishes it, so `GET /jobs/{id}/events` sees every transition and progress update.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

import redis
from pydantic import BaseModel, Field

from sculptor.datasets import Hyperparameters, Metric
from sculptor.stored_secret import STORE_CONTEXT, StoredSecret

# superseded: the candidate passed its gates, but the serving head had moved off its parent meanwhile.
JobStatus = Literal["validating", "queued", "running", "evaluating", "promoted", "rejected", "failed", "cancelled",
                    "superseded"]
TERMINAL: frozenset[str] = frozenset({"promoted", "rejected", "failed", "cancelled", "superseded"})
ANONYMOUS = "anonymous"  # the owner of what the open gateway (no API keys) records

PREFIX = "sculptor"
PROMOTIONS_CHANNEL = f"{PREFIX}:promotions"
CANDIDATES_CHANNEL = f"{PREFIX}:candidates"  # a candidate checkpoint was saved: gateways may prefetch it


def now() -> float:
    return round(time.time(), 3)


def new_id(kind: str) -> str:
    return f"{kind}_{uuid.uuid4().hex[:16]}"


class TaskRecord(BaseModel):
    task_id: str
    name: str
    metric: Metric = "exact_match"
    digest: str
    dataset_uri: str
    eval_uri: str | None = None
    num_examples: int
    num_eval_examples: int = 0
    size_bytes: int
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    webhook_url: str | None = None  # write-only: kept for delivery, never in an API answer
    webhook_secret: StoredSecret = None  # signs its webhooks; shown once by POST /tasks, masked everywhere else
    owner: str = ANONYMOUS  # the API key's name
    created_at: float = Field(default_factory=now)


class Progress(BaseModel):
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None


class JobRecord(BaseModel):
    job_id: str
    task_id: str
    owner: str = ANONYMOUS  # the API key's name, as on its task
    status: JobStatus = "validating"
    created_at: float = Field(default_factory=now)
    timestamps: dict[str, float] = Field(default_factory=dict)
    progress: Progress = Field(default_factory=Progress)
    parent_version: str | None = None
    candidate_version: str | None = None
    gates: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    error: str | None = None
    cancel_requested: bool = False
    attempts: int = 0

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


class ModelVersion(BaseModel):
    version: str
    parent: str | None = None
    task_id: str | None = None
    job_id: str | None = None
    checkpoint_uri: str
    created_at: float = Field(default_factory=now)
    promoted_at: float | None = None
    forced: bool = False
    gate_summary: dict[str, Any] | None = None


class JobEnded(RuntimeError):
    """A status change to a job that already reached a terminal state (e.g. cancelled meanwhile)."""


class HeadMoved(RuntimeError):
    """A promotion or activation found another serving head than the one it was decided against."""

    def __init__(self, version: str, expected: str | None, head: str | None):
        super().__init__(f"the serving head moved from {expected} to {head} (an admin activated another version, "
                         f"or another job promoted), so {version} was not made current")
        self.version, self.expected, self.head = version, expected, head


class _JsonStore:
    kind: str
    model: type[BaseModel]

    def __init__(self, client: redis.Redis):
        self.r = client

    def _key(self, ident: str) -> str:
        return f"{PREFIX}:{self.kind}:{ident}"

    def _index(self) -> str:
        return f"{PREFIX}:{self.kind}s"

    def put(self, ident: str, record: BaseModel, created_at: float) -> None:
        pipe = self.r.pipeline()
        pipe.set(self._key(ident), record.model_dump_json(context=STORE_CONTEXT))
        pipe.zadd(self._index(), {ident: created_at}, nx=True)
        pipe.execute()

    def get(self, ident: str):
        raw = self.r.get(self._key(ident))
        return None if raw is None else self.model.model_validate_json(raw)

    def ids(self, offset: int = 0, limit: int = -1, newest_first: bool = True) -> list[str]:
        end = -1 if limit < 0 else offset + limit - 1
        fetch = self.r.zrevrange if newest_first else self.r.zrange
        return fetch(self._index(), offset, end)

    def all(self, newest_first: bool = True) -> list:
        ids = self.ids(newest_first=newest_first)
        raws = self.r.mget([self._key(i) for i in ids]) if ids else []
        return [self.model.model_validate_json(raw) for raw in raws if raw is not None]

    def count(self) -> int:
        return self.r.zcard(self._index())


class TaskStore(_JsonStore):
    kind, model = "task", TaskRecord

    def add(self, task: TaskRecord) -> None:
        self.put(task.task_id, task, task.created_at)


class JobStore(_JsonStore):
    kind, model = "job", JobRecord

    def events_key(self, job_id: str) -> str:
        return f"{self._key(job_id)}:events"

    def channel(self, job_id: str) -> str:
        return f"{PREFIX}:job-events:{job_id}"

    def add(self, job: JobRecord) -> None:
        job.timestamps.setdefault(job.status, job.created_at)
        self.put(job.job_id, job, job.created_at)
        self.r.zadd(f"{PREFIX}:jobs:task:{job.task_id}", {job.job_id: job.created_at})
        self._emit(job.job_id, {"type": "status", "status": job.status, "at": job.created_at})

    def update(self, job_id: str, reopen: bool = False, **changes) -> JobRecord:
        """Apply `changes` atomically (optimistic lock) and emit the matching events.

        A job that ended keeps its status unless `reopen` (an admin's force-promotion of a rejected job).
        """
        key = self._key(job_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise KeyError(job_id)
                    job = JobRecord.model_validate_json(raw)
                    old_status = job.status
                    if old_status in TERMINAL and changes.get("status", old_status) != old_status and not reopen:
                        raise JobEnded(f"job {job_id} already ended as {old_status}")
                    job = job.model_copy(update=changes)
                    job = JobRecord.model_validate(job.model_dump())
                    if job.status != old_status:
                        job.timestamps[job.status] = now()
                    pipe.multi()
                    pipe.set(key, job.model_dump_json())
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        if job.status != old_status:
            self._emit(job_id, {"type": "status", "status": job.status, "at": job.timestamps[job.status],
                                "error": job.error})
        if "progress" in changes:
            self._emit(job_id, {"type": "progress", **job.progress.model_dump(), "at": now()})
        return job

    def _emit(self, job_id: str, event: dict) -> None:
        payload = json.dumps(event)
        pipe = self.r.pipeline()
        pipe.rpush(self.events_key(job_id), payload)
        pipe.publish(self.channel(job_id), payload)
        pipe.execute()

    def events(self, job_id: str, start: int = 0) -> list[dict]:
        return [json.loads(e) for e in self.r.lrange(self.events_key(job_id), start, -1)]

    def for_task(self, task_id: str) -> list[str]:
        return self.r.zrange(f"{PREFIX}:jobs:task:{task_id}", 0, -1)


class VersionStore(_JsonStore):
    """The lineage: every promoted (or force-promoted) version, and which one is serving."""

    kind, model = "version", ModelVersion
    current_key = f"{PREFIX}:current"

    def add(self, version: ModelVersion) -> None:
        self.put(version.version, version, version.created_at)

    def next_name(self) -> str:
        return f"v{self.r.incr(f'{PREFIX}:version-seq')}"

    def current(self) -> str | None:
        return self.r.get(self.current_key)

    def promote(self, version: ModelVersion) -> None:
        """Record `version` in the lineage, make it current, and tell every gateway.

        A compare-and-set: the head must still be `version.parent` (what the candidate was trained and
        gated against), else HeadMoved and nothing changes. So a rollback is never undone by a job that
        started before it, and the lineage never forks.
        """
        version.promoted_at = now()

        def write(pipe) -> None:
            pipe.set(self._key(version.version), version.model_dump_json())
            pipe.zadd(self._index(), {version.version: version.created_at}, nx=True)

        self._set_head(version, version.parent, write)

    def activate(self, name: str, expected_head: str | None = None) -> ModelVersion:
        """Make a recorded version current (rollback or roll forward); with `expected_head`, only if the
        head is still that version (HeadMoved otherwise)."""
        version = self.get(name)
        if version is None:
            raise KeyError(name)
        self._set_head(version, expected_head, check=expected_head is not None)
        return version

    def _set_head(self, version: ModelVersion, expected: str | None, write=None, check: bool = True) -> None:
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self.current_key)
                    head = pipe.get(self.current_key)
                    if check and head != expected:
                        raise HeadMoved(version.version, expected, head)
                    pipe.multi()
                    if write:
                        write(pipe)
                    pipe.set(self.current_key, version.version)
                    pipe.publish(PROMOTIONS_CHANNEL, json.dumps({"version": version.version,
                                                                 "checkpoint_uri": version.checkpoint_uri}))
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue


def connect(url: str) -> redis.Redis:
    # Timeouts: a Redis that hangs must not hang the gateway (it keeps serving and reports not-ready).
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30, socket_timeout=5,
                                socket_connect_timeout=2)
