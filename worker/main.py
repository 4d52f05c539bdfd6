"""Run one training worker: `python -m worker.main` (queue "train", one job at a time)."""

from __future__ import annotations

from sculptor.config import get_settings
from worker.celery_app import app


def main() -> None:
    settings = get_settings()
    app.worker_main([
        "worker", "--queues", settings.train_queue, "--pool", "solo", "--concurrency", "1",
        "--loglevel", "INFO", "--without-gossip", "--without-mingle",
        "--hostname", f"sculptor-worker-{__import__('os').getpid()}@%h",
    ])


if __name__ == "__main__":
    main()
