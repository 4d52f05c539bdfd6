"""Webhook delivery against a real HTTP server on loopback (http.server in a thread).

Loopback is no webhook target (sculptor/webhooks.py): these deliveries name it in allow_hosts, as
SCULPTOR_WEBHOOK_ALLOW_HOSTS would.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sculptor.records import JobRecord, Progress, TaskRecord
from sculptor.redis_server import free_port
from sculptor.webhooks import notify_terminal as deliver

LOOPBACK = ["127.0.0.1"]


def notify_terminal(task, job, **kwargs):
    return deliver(task, job, allow_hosts=LOOPBACK, **kwargs)


class Receiver:
    """Answers each POST with the next status in `statuses` (the last one repeats) and keeps what came."""

    def __init__(self, statuses: list[int]):
        self.statuses = list(statuses)
        self.requests: list[tuple[dict, dict]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.requests.append((dict(self.headers), body))
                status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_factory():
    made: list[Receiver] = []

    def make(statuses: list[int]) -> Receiver:
        made.append(Receiver(statuses))
        return made[-1]

    yield make
    for r in made:
        r.close()


def task_with(url: str | None) -> TaskRecord:
    return TaskRecord(task_id="task_1", name="demo", digest="d", dataset_uri="file:///x", num_examples=3,
                      size_bytes=10, webhook_url=url, webhook_secret="whsec_test")


JOB = JobRecord(job_id="job_1", task_id="task_1", status="promoted", parent_version="v0", candidate_version="v1",
                progress=Progress(step=4, total_steps=4, loss=0.5), gates={"passed": True, "summary": "ok"})


def test_first_attempt_fails_then_succeeds(receiver_factory):
    receiver = receiver_factory([503, 200])
    delays: list[float] = []
    assert notify_terminal(task_with(receiver.url), JOB, first_delay_s=0.25, sleep=delays.append) is True
    assert len(receiver.requests) == 2 and delays == [0.25]
    headers, body = receiver.requests[-1]
    assert body == JOB.model_dump(mode="json")
    assert headers["X-Sculptor-Event"] == "job.promoted" and headers["X-Sculptor-Job"] == "job_1"


def test_retries_are_bounded_with_exponential_backoff(receiver_factory):
    receiver = receiver_factory([500])
    delays: list[float] = []
    assert notify_terminal(task_with(receiver.url), JOB, attempts=4, first_delay_s=0.5, sleep=delays.append) is False
    assert len(receiver.requests) == 4 and delays == [0.5, 1.0, 2.0]


def test_client_error_is_final(receiver_factory):
    receiver = receiver_factory([404, 200])
    assert notify_terminal(task_with(receiver.url), JOB, sleep=lambda s: None) is False
    assert len(receiver.requests) == 1


def test_unreachable_receiver_never_raises():
    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    delays: list[float] = []
    assert notify_terminal(task_with(url), JOB, attempts=3, first_delay_s=0.01, timeout_s=2,
                           sleep=delays.append) is False
    assert delays == [0.01, 0.02]
    assert notify_terminal(task_with("not a url"), JOB, attempts=2, sleep=lambda s: None) is False


def test_real_backoff_sleeps(receiver_factory):
    receiver = receiver_factory([502, 204])
    assert notify_terminal(task_with(receiver.url), JOB, first_delay_s=0.05) is True
    assert len(receiver.requests) == 2


def test_no_url_sends_nothing():
    assert notify_terminal(task_with(None), JOB) is False
