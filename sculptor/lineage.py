"""The lineage's one owner: every way a version becomes known to the fleet or starts serving.

- `announce_candidate`: a job saved a candidate (gateways fetch it ahead while it is gated);
- `promote_candidate`: its gates passed;
- `force_promote`: an admin serves a rejected candidate anyway;
- `activate`: an admin rolls back or forward to a recorded version;
- `register_base`: a fresh install serves the base model as v0.

Each moves the head with a compare-and-set (VersionStore), so a rollback is never undone by a job that
started before it, and the lineage never forks. The errors say what the caller can do next.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from sculptor import checkpoints
from sculptor.gate_report import GateSummary
from sculptor.records import HeadMoved, JobRecord, JobStore, ModelVersion, VersionStore
from sculptor.storage import ObjectStore

log = logging.getLogger("sculptor.lineage")

BASE_VERSION = "v0"


class CannotPromote(RuntimeError):
    """A promotion that is refused; `code` names why (not_rejected, lineage_moved, checkpoint_missing)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def announce_candidate(versions: VersionStore, version: str) -> None:
    versions.announce_candidate(version)


def promote_candidate(versions: VersionStore, store: ObjectStore, job: JobRecord, version: str,
                      gate_summary: GateSummary, forced: bool = False) -> ModelVersion:
    """Make `version` (trained by `job` on its parent) current; HeadMoved if the head is no longer that parent."""
    record = ModelVersion(version=version, parent=job.parent_version, task_id=job.task_id, job_id=job.job_id,
                          checkpoint_uri=store.uri(checkpoints.prefix(version)), forced=forced,
                          gate_summary=gate_summary)
    versions.promote(record)
    log.info("promoted %s (job %s, task %s%s)", version, job.job_id, job.task_id, ", forced" if forced else "")
    return record


def force_promote(versions: VersionStore, jobs: JobStore, store: ObjectStore, job: JobRecord) -> JobRecord:
    """Serve a rejected job's candidate, recorded as forced; CannotPromote when it cannot be."""
    if job.status != "rejected" or not job.candidate_version:
        raise CannotPromote("not_rejected", f"job {job.job_id} is {job.status}; only a rejected candidate "
                            "can be forced")
    head = versions.current()
    if head != job.parent_version:
        raise CannotPromote("lineage_moved", f"the serving lineage moved on from {job.parent_version} to {head}; "
                            "resubmit the task to train on the current version")
    if not checkpoints.is_committed(store, job.candidate_version):
        raise CannotPromote("checkpoint_missing", f"candidate {job.candidate_version} has no committed checkpoint")
    gates = job.gates
    summary = GateSummary(passed=False, forced=True, summary=gates and gates.summary, failed=gates and gates.failed)
    try:  # a compare-and-set on the head: the check above may be stale by now
        promote_candidate(versions, store, job, job.candidate_version, summary, forced=True)
    except HeadMoved as moved:
        raise CannotPromote("lineage_moved", f"{moved}; resubmit the task to train on {moved.head}") from None
    return jobs.update(job.job_id, reopen=True, status="promoted",
                       gates=gates and gates.model_copy(update={"forced": True}))


def activate(versions: VersionStore, name: str, expected_head: str | None) -> ModelVersion:
    """Make a recorded version current again, only if the head is still `expected_head` (HeadMoved otherwise)."""
    return versions.activate(name, expected_head=expected_head)


def register_base(versions: VersionStore, store: ObjectStore, base_dir: Callable[[], Path]) -> str:
    """The serving version; on a fresh install, publish the base model (`base_dir()`, called only then) as v0."""
    current = versions.current()
    if current:
        return current
    if not checkpoints.is_committed(store, BASE_VERSION):
        checkpoints.publish_dir(store, base_dir(), BASE_VERSION)
    versions.promote(ModelVersion(version=BASE_VERSION, checkpoint_uri=store.uri(checkpoints.prefix(BASE_VERSION))))
    return BASE_VERSION
