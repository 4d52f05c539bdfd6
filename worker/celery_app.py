"""The worker's Celery app: one queue ("train"), one job at a time per worker, late acknowledgement.

The app itself is sculptor/train_queue.py's (the gateway enqueues on the same one); the worker adds
the module that implements the task, loaded when a worker starts.

Start a worker with `python -m worker.main` (or `celery -A worker.celery_app worker -Q train
--pool solo --concurrency 1`). Flower works against it: `celery -A worker.celery_app flower`.
"""

from __future__ import annotations

from sculptor.train_queue import TRAIN_TASK, celery_app

__all__ = ["TRAIN_TASK", "app"]

app = celery_app()
app.conf.include = ["worker.consumer"]
