"""The Celery app: one queue ("train"), one job at a time per worker, late acknowledgement.

Start a worker with `python -m worker.main` (or `celery -A worker.celery_app worker -Q train
--pool solo --concurrency 1`). Flower works against it: `celery -A worker.celery_app flower`.
"""

from __future__ import annotations

from celery import Celery

from sculptor.config import get_settings

TRAIN_TASK = "sculptor.train"  # implemented in worker/jobs.py


def make_celery() -> Celery:
    settings = get_settings()
    broker = settings.redis_url or "redis://127.0.0.1:6379/0"
    app = Celery("sculptor", broker=broker, include=["worker.jobs"])
    app.conf.update(
        task_default_queue=settings.train_queue,
        task_acks_late=True,  # a job whose worker dies is delivered again, not lost
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # one job at a time: training owns the accelerator
        task_track_started=False,
        task_ignore_result=True,  # results live in the job record, not in a Celery backend
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.job_visibility_timeout_s},
        worker_hijack_root_logger=False,
        worker_send_task_events=True,  # Flower shows task history from these events
        task_send_sent_event=True,
    )
    return app


app = make_celery()


def enqueue(job_id: str, queue: str, broker_url: str) -> None:
    """Queue a job by task name (the gateway never imports the training code).

    The job id doubles as the Celery task id.
    """
    with app.connection_for_write(broker_url) as connection:
        app.send_task(TRAIN_TASK, args=[job_id], queue=queue, task_id=job_id, connection=connection, retry=False)
