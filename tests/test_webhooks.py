"""Webhook delivery against a real HTTP server on loopback (http.server in a thread).

Loopback is no webhook target (sculptor/webhooks.py): these deliveries name it in allow_hosts, as
SCULPTOR_WEBHOOK_ALLOW_HOSTS would.
"""

from __future__ import annotations

from sculptor.records import JobRecord, Progress, TaskRecord
from sculptor.redis_server import free_port
from sculptor.webhooks import notify_terminal as deliver
from tests.webhook_receiver import receivers  # noqa: F401  (the fixture)

LOOPBACK = ["127.0.0.1"]


def notify_terminal(task, job, **kwargs):
    return deliver(task, job, allow_hosts=LOOPBACK, **kwargs)


def task_with(url: str | None) -> TaskRecord:
    return TaskRecord(task_id="task_1", name="demo", digest="d", dataset_uri="file:///x", num_examples=3,
                      size_bytes=10, webhook_url=url, webhook_secret="whsec_test")


GATES = {"passed": True, "summary": "ok", "new_task_id": "task_1", "failed": [], "gates": [], "thresholds": {},
         "candidate": {}, "parent": {}}
JOB = JobRecord(job_id="job_1", task_id="task_1", status="promoted", parent_version="v0", candidate_version="v1",
                progress=Progress(step=4, total_steps=4, loss=0.5), gates=GATES)


def test_first_attempt_fails_then_succeeds(receivers):
    receiver = receivers(statuses=[503, 200])
    delays: list[float] = []
    assert notify_terminal(task_with(receiver.url), JOB, first_delay_s=0.25, sleep=delays.append) is True
    assert len(receiver.requests) == 2 and delays == [0.25]
    headers, _ = receiver.requests[-1]
    assert receiver.json_bodies()[-1] == JOB.model_dump(mode="json")
    assert headers["X-Sculptor-Event"] == "job.promoted" and headers["X-Sculptor-Job"] == "job_1"


def test_retries_are_bounded_with_exponential_backoff(receivers):
    receiver = receivers(statuses=[500])
    delays: list[float] = []
    assert notify_terminal(task_with(receiver.url), JOB, attempts=4, first_delay_s=0.5, sleep=delays.append) is False
    assert len(receiver.requests) == 4 and delays == [0.5, 1.0, 2.0]


def test_client_error_is_final(receivers):
    receiver = receivers(statuses=[404, 200])
    assert notify_terminal(task_with(receiver.url), JOB, sleep=lambda s: None) is False
    assert len(receiver.requests) == 1


def test_unreachable_receiver_never_raises():
    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    delays: list[float] = []
    assert notify_terminal(task_with(url), JOB, attempts=3, first_delay_s=0.01, timeout_s=2,
                           sleep=delays.append) is False
    assert delays == [0.01, 0.02]
    assert notify_terminal(task_with("not a url"), JOB, attempts=2, sleep=lambda s: None) is False


def test_real_backoff_sleeps(receivers):
    receiver = receivers(statuses=[502, 204])
    assert notify_terminal(task_with(receiver.url), JOB, first_delay_s=0.05) is True
    assert len(receiver.requests) == 2


def test_no_url_sends_nothing():
    assert notify_terminal(task_with(None), JOB) is False
