"""Webhooks: when a job ends, POST its record to the task's `webhook_url`.

The body is the job JSON (what `GET /jobs/{id}` answers), with headers naming the event
(`X-Sculptor-Event: job.promoted`, ...) and the job. A failed delivery (connection error,
timeout, 408, 429 or 5xx) is retried with exponential backoff, a bounded number of times;
other 4xx answers are final. Delivery never raises into the caller: a receiver that is down
must not fail the job that already finished.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import httpx

from sculptor.records import JobRecord, TaskRecord

log = logging.getLogger("sculptor.webhooks")

RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))


def announce(task: TaskRecord | None, job: JobRecord) -> None:
    """`notify_terminal` in a background thread: a slow receiver must not hold up its caller."""
    if task and task.webhook_url:
        threading.Thread(target=notify_terminal, args=(task, job), daemon=True, name=f"webhook-{job.job_id}").start()


def notify_terminal(task: TaskRecord, job: JobRecord, *, attempts: int = 4, first_delay_s: float = 1.0,
                    timeout_s: float = 10.0, sleep: Callable[[float], None] = time.sleep) -> bool:
    """POST `job` to `task.webhook_url`; True when a receiver answered 2xx. Never raises.

    Waits first_delay_s, 2x, 4x, ... between attempts (1 + 2 + 4 = 7 s in all by default).
    """
    if not task.webhook_url:
        return False
    try:
        return _deliver(task.webhook_url, job, attempts, first_delay_s, timeout_s, sleep)
    except Exception:  # a bug here must not fail the job either
        log.exception("webhook for job %s failed unexpectedly", job.job_id)
        return False


def _deliver(url: str, job: JobRecord, attempts: int, first_delay_s: float, timeout_s: float,
             sleep: Callable[[float], None]) -> bool:
    headers = {"X-Sculptor-Event": f"job.{job.status}", "X-Sculptor-Job": job.job_id,
               "User-Agent": "sculptor-webhook/1"}
    body = job.model_dump(mode="json")
    with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
        for attempt in range(1, attempts + 1):
            outcome = _post_once(client, url, body, headers)
            if outcome is True:
                log.info("webhook for job %s delivered to %s (attempt %d)", job.job_id, url, attempt)
                return True
            if outcome == "final" or attempt == attempts:
                break
            sleep(first_delay_s * 2 ** (attempt - 1))
    log.warning("webhook for job %s to %s not delivered after %d attempt(s)", job.job_id, url, attempt)
    return False


def _post_once(client: httpx.Client, url: str, body: dict, headers: dict) -> bool | str:
    """True on 2xx, "final" on an answer not worth retrying, False on a retryable failure."""
    try:
        response = client.post(url, json=body, headers=headers)
    except httpx.HTTPError as err:
        log.info("webhook POST to %s failed: %s", url, err)
        return False
    if response.is_success:
        return True
    log.info("webhook POST to %s answered %d", url, response.status_code)
    return False if response.status_code in RETRYABLE_STATUS else "final"
