"""The Celery task that runs a training job.

Two locks make a job safe to deliver more than once (acks_late re-delivers a job whose worker
died or outlived the visibility timeout): a per-job lock, so the same job never runs twice at
once, and the lineage lock, so jobs build on each other one at a time and the lineage stays linear.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from celery.signals import setup_logging, worker_ready, worker_shutdown

from sculptor import logs
from sculptor.config import get_settings
from sculptor.context import Context
from sculptor.records import JobRecord, ensure_indexes
from sculptor.recovery import job_lock_held, recover_orphans
from sculptor.webhooks import announce
from sculptor.worker_heartbeat import start_heartbeat
from sculptor.locks import LockBusy, LockLost, held_lock
from worker import pipeline
from worker.celery_app import TRAIN_TASK, app

log = logging.getLogger("sculptor.worker")

_ctx: Context | None = None


def context() -> Context:
    global _ctx
    if _ctx is None:
        _ctx = Context.from_settings()
    return _ctx


@setup_logging.connect
def _logging(**_) -> None:
    logs.setup(get_settings())


_heartbeat_stop = None


@worker_ready.connect
def _at_start(sender=None, **_) -> None:
    global _heartbeat_stop
    threads = get_settings().train_threads or (1 if (os.cpu_count() or 1) <= 4 else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    name = getattr(sender, "hostname", None) or f"pid-{os.getpid()}"
    _heartbeat_stop = start_heartbeat(context().redis, name, get_settings().worker_heartbeat_ttl_s)
    ensure_indexes(context().tasks, context().jobs)  # once, for records from before the indexes
    recover_orphans(context())


@worker_shutdown.connect
def _at_stop(**_) -> None:
    if _heartbeat_stop is not None:
        _heartbeat_stop.set()


def wait_for_older_jobs(ctx: Context, job: JobRecord, poll_s: float = 0.2) -> None:
    """Jobs build on each other in order of arrival: let any older job that another worker holds go first.

    Only jobs whose own lock is held count (a worker has them in hand), so a job whose message was lost
    cannot block the ones after it; `job_order_wait_s` bounds the wait in any case.
    """
    deadline = time.monotonic() + ctx.settings.job_order_wait_s
    while time.monotonic() < deadline:
        older = [j for j in ctx.jobs.with_status("queued", created_before=job.created_at)
                 if job_lock_held(ctx, j.job_id)]
        if not older:
            return
        time.sleep(poll_s)


@app.task(name=TRAIN_TASK, bind=True)
def train_job(self, job_id: str) -> str | None:
    return run_delivery(context(), job_id)


def run_delivery(ctx: Context, job_id: str) -> str | None:
    """One delivery of a job's message: run it under its locks, unless it ended or runs elsewhere already."""
    logs.current_job.set(job_id)
    ttl = ctx.settings.job_lock_ttl_s
    before = ctx.jobs.get(job_id)
    if before is None or before.finished:
        return None  # unknown, or a re-delivery of a job that already ended
    try:
        with held_lock(ctx.redis, f"job:{job_id}", ttl, wait_s=0) as job_lock:
            wait_for_older_jobs(ctx, before)
            with held_lock(ctx.redis, "lineage", ttl, wait_s=None):
                job = pipeline.run_job(ctx, job_id, check_lock=job_lock.check)
    except LockBusy:
        log.warning("job %s is already running elsewhere; dropping this duplicate delivery", job_id)
        return None
    except LockLost as err:
        # No verdict: the record belongs to whoever holds the job now (recovery re-queued it once the lock
        # lapsed, and another attempt runs it), and a job that nobody holds is recovery's to retry or fail.
        # Writing "failed" here would overwrite the new attempt's record.
        log.warning("job %s stopped: %s; its record is left to the job's current holder", job_id, err)
        return None
    except Exception as err:  # anything unexpected: the job fails with the reason, nothing is promoted
        log.exception("job %s failed", job_id)
        job = ctx.jobs.update(job_id, status="failed", error=f"{type(err).__name__}: {err}")
    if job and job.finished:
        announce(ctx.tasks.get(job.task_id), job)
    return job.status if job else None

