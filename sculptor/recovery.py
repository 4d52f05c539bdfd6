"""Jobs whose worker died: retried from the start, or failed with the reason, within a bounded time.

A running job holds its job lock (sculptor/locks.py), renewed every few seconds while its worker
lives. A job that says "running" or "evaluating" but whose lock has expired lost its worker
(SIGKILL, OOM, a lost machine). The gateway runs `recover_orphans` periodically and each worker
runs it at start; Celery's own re-delivery (acks_late) comes much later and then finds the job ended.
"""

from __future__ import annotations

import logging

from sculptor.context import Context
from sculptor.records import JobEnded
from sculptor.train_queue import enqueue
from sculptor.webhooks import announce

log = logging.getLogger("sculptor.recovery")

ACTIVE = ("running", "evaluating")


def job_lock_held(ctx: Context, job_id: str) -> bool:
    return bool(ctx.redis.exists(f"sculptor:lock:job:{job_id}"))


def recover_orphans(ctx: Context) -> list[str]:
    """Re-queue (or fail, after `job_max_attempts`) every active job that lost its worker."""
    recovered = []
    for job in ctx.jobs.with_status(*ACTIVE):
        if job_lock_held(ctx, job.job_id):
            continue
        reason = f"the worker running attempt {job.attempts} stopped during {job.status}"
        try:
            if job.cancel_requested:
                ctx.jobs.update(job.job_id, status="cancelled", error=f"{reason}; it was being cancelled")
            elif job.attempts >= ctx.settings.job_max_attempts:
                ctx.jobs.update(job.job_id, status="failed", error=f"{reason}; gave up after {job.attempts} attempts")
            else:
                ctx.jobs.update(job.job_id, status="queued", error=f"{reason}; retrying from the start")
                enqueue(job.job_id, ctx.settings.train_queue, ctx.settings.redis_url)
        except JobEnded:
            continue
        record = ctx.jobs.get(job.job_id)
        if record.finished:
            announce(ctx.tasks.get(job.task_id), record)
        log.warning("job %s: %s", job.job_id, reason)
        recovered.append(job.job_id)
    return recovered
