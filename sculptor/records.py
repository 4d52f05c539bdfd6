"""Records shared by the gateway and the workers: tasks, jobs and model versions, kept in Redis.

Every record is one JSON string under a `sculptor:` key, written from its model and validated by it
when read (a record that does not fit raises CorruptRecord, naming the key and the fields), with a sorted set per kind for
listing in order of creation, and for tasks and jobs one per owner (jobs also one per status and per
task), so listings, metrics and recovery read ranges of indexes instead of every record. Job updates go
through `JobStore.update`, which also appends an event and publishes it, so `GET /jobs/{id}/events` sees
every transition and progress update.

Bounded growth: a job keeps its newest `max_job_events` events (each numbered, `seq`, so a follower
resumes after the last one it saw even when older ones were trimmed), and `JobStore.sweep_ended` deletes
jobs that ended more than the retention ago, with their events and index entries.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Literal, get_args

import redis
from pydantic import BaseModel, Field

from sculptor.datasets import Hyperparameters, Metric
from sculptor.gate_report import GateSummary, JobGates
from sculptor.progress import Progress
from sculptor.stored_records import CorruptRecord, parse  # noqa: F401  (CorruptRecord: what a bad record raises)
from sculptor.stored_secret import STORE_CONTEXT, StoredSecret
from sculptor.training_summary import TrainingSummary

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
    gates: JobGates | None = None  # the gate report, once the candidate was gated
    training: TrainingSummary | None = None  # what training did, once it finished
    error: str | None = None
    error_code: str | None = None  # a failed job's reason for programs, e.g. "capacity_exhausted"
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
    gate_summary: GateSummary | None = None


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

    def owner_index(self, owner: str) -> str:
        return f"{self._index()}:owner:{owner}"

    def put(self, ident: str, record: BaseModel, created_at: float, indexes: tuple[str, ...] = ()) -> None:
        pipe = self.r.pipeline()
        pipe.set(self._key(ident), record.model_dump_json(context=STORE_CONTEXT))
        for index in (self._index(), *indexes):
            pipe.zadd(index, {ident: created_at}, nx=True)
        pipe.execute()

    def get(self, ident: str):
        raw = self.r.get(self._key(ident))
        return None if raw is None else parse(self.model, raw, self._key(ident))

    def ids(self, offset: int = 0, limit: int = -1, newest_first: bool = True) -> list[str]:
        end = -1 if limit < 0 else offset + limit - 1
        fetch = self.r.zrevrange if newest_first else self.r.zrange
        return fetch(self._index(), offset, end)

    def all(self, newest_first: bool = True) -> list:
        return self._records(self.ids(newest_first=newest_first))

    def _records(self, ids: list[str]) -> list:
        raws = self.r.mget([self._key(i) for i in ids]) if ids else []
        return [parse(self.model, raw, self._key(i)) for i, raw in zip(ids, raws) if raw is not None]

    def count(self) -> int:
        return self.r.zcard(self._index())

    def page(self, offset: int, limit: int, within: list[str] | None = None) -> tuple[list, int]:
        """(records offset..offset+limit newest first, how many there are) among those in every index of
        `within` (all records when empty). Redis intersects the indexes: no record is read but the page's."""
        within = within or [self._index()]
        if len(within) == 1:
            key, temporary = within[0], None
        else:
            key = temporary = f"{PREFIX}:tmp:{uuid.uuid4().hex}"
            self.r.zinterstore(temporary, within, aggregate="MIN")  # the scores are all creation times
        try:
            pipe = self.r.pipeline()
            pipe.zcard(key)
            pipe.zrevrange(key, offset, offset + limit - 1)
            total, ids = pipe.execute()
        finally:
            if temporary:
                self.r.delete(temporary)
        return self._records(ids), total


class TaskStore(_JsonStore):
    kind, model = "task", TaskRecord

    def add(self, task: TaskRecord) -> None:
        self.put(task.task_id, task, task.created_at, indexes=(self.owner_index(task.owner),))

    def page_for(self, offset: int, limit: int, owner: str | None = None) -> tuple[list[TaskRecord], int]:
        return self.page(offset, limit, [self.owner_index(owner)] if owner is not None else None)


# Appends one event with the next sequence number, keeps the newest ARGV[2], and publishes it, atomically: a
# worker and a gateway (a cancel) may emit for one job at once, and the list must stay in `seq` order.
# KEYS: the event list, its sequence counter; ARGV: the event as a JSON object, the cap, the channel.
_EMIT = """
local seq = redis.call('INCR', KEYS[2])
local event = '{"seq": ' .. seq .. ', ' .. string.sub(ARGV[1], 2)
redis.call('RPUSH', KEYS[1], event)
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('PUBLISH', ARGV[3], event)
return seq
"""
INDEX_VERSION = "2"  # per-owner, per-status and ended indexes (ensure_indexes builds them once)


class JobStore(_JsonStore):
    kind, model = "job", JobRecord

    def __init__(self, client: redis.Redis, max_events: int = 1000):
        super().__init__(client)
        self.max_events = max_events
        self._emit_script = client.register_script(_EMIT)

    def events_key(self, job_id: str) -> str:
        return f"{self._key(job_id)}:events"

    def channel(self, job_id: str) -> str:
        return f"{PREFIX}:job-events:{job_id}"

    def status_index(self, status: str) -> str:
        return f"{self._index()}:status:{status}"

    def task_index(self, task_id: str) -> str:
        return f"{self._index()}:task:{task_id}"

    @property
    def ended_index(self) -> str:
        """Jobs that reached a terminal status, scored by when: what the retention sweep reads."""
        return f"{self._index()}:ended"

    @property
    def gated_key(self) -> str:
        """A hash counting recorded jobs whose candidate was gated: `passed`, `failed`."""
        return f"{self._index()}:gated"

    def add(self, job: JobRecord) -> None:
        job.timestamps.setdefault(job.status, job.created_at)
        self.put(job.job_id, job, job.created_at, indexes=(
            self.task_index(job.task_id), self.status_index(job.status), self.owner_index(job.owner)))
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
                    old = parse(JobRecord, raw, key)
                    if old.finished and changes.get("status", old.status) != old.status and not reopen:
                        raise JobEnded(f"job {job_id} already ended as {old.status}")
                    job = JobRecord.model_validate({**old.model_dump(), **changes})  # changes' types checked
                    if job.status != old.status:
                        job.timestamps[job.status] = now()
                    pipe.multi()
                    pipe.set(key, job.model_dump_json())
                    self._reindex(pipe, old, job)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        if job.status != old.status:
            self._emit(job_id, {"type": "status", "status": job.status, "at": job.timestamps[job.status],
                                "error": job.error})
        if "progress" in changes:
            self._emit(job_id, {"type": "progress", **dataclasses.asdict(job.progress), "at": now()})
        return job

    def _reindex(self, pipe, old: JobRecord, job: JobRecord) -> None:
        if job.status != old.status:
            pipe.zrem(self.status_index(old.status), job.job_id)
            pipe.zadd(self.status_index(job.status), {job.job_id: job.created_at})
            if job.finished:
                pipe.zadd(self.ended_index, {job.job_id: job.timestamps[job.status]})
            elif old.finished:
                pipe.zrem(self.ended_index, job.job_id)
        if job.gates and not old.gates:
            pipe.hincrby(self.gated_key, _gate_outcome(job), 1)

    def _emit(self, job_id: str, event: dict) -> None:
        self._emit_script(keys=[self.events_key(job_id), self._seq_key(job_id)],
                          args=[json.dumps(event), self.max_events, self.channel(job_id)])

    def _seq_key(self, job_id: str) -> str:
        return f"{self.events_key(job_id)}:seq"

    def events(self, job_id: str, after: int = 0) -> list[dict]:
        """The job's kept events (its newest `max_events`), those numbered above `after` only."""
        events = [json.loads(e) for e in self.r.lrange(self.events_key(job_id), 0, -1)]
        for position, event in enumerate(events, start=1):
            event.setdefault("seq", position)  # recorded before events were numbered: none was trimmed then
        return [e for e in events if e["seq"] > after]

    def for_task(self, task_id: str) -> list[str]:
        return self.r.zrange(self.task_index(task_id), 0, -1)

    # -- reading by index: no call below reads every record

    def page_for(self, offset: int, limit: int, status: str | None = None, task_id: str | None = None,
                 owner: str | None = None) -> tuple[list[JobRecord], int]:
        within = [self.task_index(task_id)] if task_id else []
        within += [self.status_index(status)] if status else []
        within += [self.owner_index(owner)] if owner is not None else []
        return self.page(offset, limit, within)

    def with_status(self, *statuses: str, created_before: float | None = None) -> list[JobRecord]:
        """Jobs now in any of `statuses` (oldest first), created before `created_before` if given."""
        top = f"({created_before}" if created_before is not None else "+inf"
        pipe = self.r.pipeline()
        for status in statuses:
            pipe.zrangebyscore(self.status_index(status), "-inf", top)
        ids = [i for found in pipe.execute() for i in found]
        return sorted(self._records(ids), key=lambda j: j.created_at)

    def status_counts(self) -> dict[str, int]:
        pipe = self.r.pipeline()
        for status in get_args(JobStatus):
            pipe.zcard(self.status_index(status))
        return dict(zip(get_args(JobStatus), pipe.execute()))

    def gate_outcomes(self) -> dict[str, int]:
        counts = self.r.hgetall(self.gated_key)
        return {outcome: int(counts.get(outcome, 0)) for outcome in ("passed", "failed")}

    def latest_ended(self, limit: int) -> list[JobRecord]:
        return self._records(self.r.zrevrange(self.ended_index, 0, limit - 1))

    # -- retention

    def sweep_ended(self, retention_s: float, batch: int = 500) -> int:
        """Delete up to `batch` jobs that ended more than `retention_s` ago: record, events, index entries."""
        ids = self.r.zrangebyscore(self.ended_index, "-inf", now() - retention_s, start=0, num=batch)
        jobs = self._records(ids)
        pipe = self.r.pipeline()
        for job in jobs:
            pipe.delete(self._key(job.job_id), self.events_key(job.job_id), self._seq_key(job.job_id))
            for index in (self._index(), self.task_index(job.task_id), self.status_index(job.status),
                          self.owner_index(job.owner)):
                pipe.zrem(index, job.job_id)
            if job.gates:
                pipe.hincrby(self.gated_key, _gate_outcome(job), -1)
        if ids:
            pipe.zrem(self.ended_index, *ids)
        pipe.execute()
        return len(jobs)


def _gate_outcome(job: JobRecord) -> str:
    return "passed" if job.gates.passed else "failed"


def ensure_indexes(tasks: TaskStore, jobs: JobStore) -> None:
    """Build the per-owner, per-status and ended indexes and the gate counters once for records written
    before they existed (a deployment upgraded in place): one pass over the records, then never again."""
    flag = f"{PREFIX}:index-version"
    if jobs.r.get(flag) == INDEX_VERSION:
        return
    gated = {"passed": 0, "failed": 0}
    pipe = jobs.r.pipeline()
    for task in tasks.all():
        pipe.zadd(tasks.owner_index(task.owner), {task.task_id: task.created_at})
    for job in jobs.all():
        pipe.zadd(jobs.status_index(job.status), {job.job_id: job.created_at})
        pipe.zadd(jobs.owner_index(job.owner), {job.job_id: job.created_at})
        if job.finished:
            pipe.zadd(jobs.ended_index, {job.job_id: job.timestamps.get(job.status, job.created_at)})
        if job.gates:
            gated[_gate_outcome(job)] += 1
    pipe.hset(jobs.gated_key, mapping=gated)
    pipe.set(flag, INDEX_VERSION)
    pipe.execute()


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

    def announce_candidate(self, version: str) -> None:
        """Tell every gateway that a candidate was saved, so they fetch it while it is gated."""
        self.r.publish(CANDIDATES_CHANNEL, json.dumps({"version": version}))

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
