"""The training queue: the Celery app (built on first use), the task's name, and `enqueue`.

Both sides use it: the gateway and recovery queue jobs by task name, and worker/celery_app.py takes
the same app and registers the task (worker/consumer.py) on it. Nothing here imports the training code.
The module is not called `queue`, so a script run from this folder never shadows the standard library's.
"""

from __future__ import annotations

import threading

from celery import Celery

from sculptor.config import get_settings

TRAIN_TASK = "sculptor.train"  # implemented in worker/consumer.py

_app: Celery | None = None
_app_lock = threading.Lock()


def make_celery() -> Celery:
    settings = get_settings()
    broker = settings.redis_url or "redis://127.0.0.1:6379/0"
    app = Celery("sculptor", broker=broker)
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


def celery_app() -> Celery:
    """The process's one Celery app, built (from the settings of that moment) on first use."""
    global _app
    with _app_lock:
        if _app is None:
            _app = make_celery()
        return _app


def enqueue(job_id: str, queue: str, broker_url: str) -> None:
    """Queue a job by task name (the gateway never imports the training code).

    The job id doubles as the Celery task id.
    """
    app = celery_app()
    with app.connection_for_write(broker_url) as connection:
        app.send_task(TRAIN_TASK, args=[job_id], queue=queue, task_id=job_id, connection=connection, retry=False)
