"""A worker that loses its job lock stops that job (issue 15, item 10), so recovery's re-queued attempt never
trains beside it. Real Redis, the real pipeline on the tiny model."""

import threading
import time

import pytest
import waiting
import redis

from sculptor import redis_server
from sculptor.config import Settings
from sculptor.context import Context
from sculptor.locks import LockLost, held_lock
from tests.test_pipeline import SMALL_GATES, ctx, examples, submit  # noqa: F401  (ctx: the fixture)
from worker.consumer import run_delivery

TTL_S = 1  # renewed every TTL/3


def wait_for(condition, within_s: float, what: str) -> float:
    """Seconds until `condition` held (polled every 20 ms)."""
    started = time.monotonic()
    waiting.wait_for(condition, within_s, what, poll_s=0.02)
    return time.monotonic() - started


def test_a_lock_another_holder_took_is_reported_lost(redis_client):
    with held_lock(redis_client, "job:x", TTL_S) as held:
        held.check()
        redis_client.set("sculptor:lock:job:x", "another-worker", ex=60)  # recovery's new attempt, say
        wait_for(held.lost.is_set, 2 * TTL_S, "the renewal notices")
        with pytest.raises(LockLost, match="job:x"):
            held.check()
    assert redis_client.get("sculptor:lock:job:x") == "another-worker", "the new holder's lock is not released"


def test_a_lock_redis_could_not_renew_for_its_ttl_is_lost(tmp_path):
    proc, url = redis_server.start_redis(tmp_path / "redis")
    client = redis.Redis.from_url(url, socket_timeout=0.2, socket_connect_timeout=0.2)
    try:
        with held_lock(client, "job:y", TTL_S) as held:
            redis_server.stop(proc)  # the key may expire while Redis cannot be reached
            wait_for(held.lost.is_set, 3 * TTL_S, "a lock unrenewed for its TTL counts as lost")
            assert "not renewed" in held.reason
    finally:
        redis_server.stop(proc)


def test_a_worker_that_loses_its_job_lock_stops_training_and_leaves_the_record(ctx):
    bounded = Context.from_settings(Settings(**{**ctx.settings.model_dump(), **SMALL_GATES, "job_lock_ttl_s": TTL_S}))
    # over 1,000 steps (the eval split aside): minutes of training, unless it stops
    _, job = submit(bounded, "greet", examples("say the greeting", "hello world", n=200), epochs=64, general_replay=0)
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("status", run_delivery(bounded, job.job_id)))
    worker.start()
    # Training has begun once the first progress report is in (the loop reports every 2 s).
    wait_for(lambda: bounded.jobs.get(job.job_id).progress.step > 0, 120, "training starts")
    bounded.redis.set(f"sculptor:lock:job:{job.job_id}", "recovery-requeued-attempt", ex=60)
    stopped_in = wait_for(lambda: not worker.is_alive(), 3 * TTL_S + 2, "the worker stops the job")
    record = bounded.jobs.get(job.job_id)
    assert outcome["status"] is None, "no verdict from a worker that lost the job"
    assert record.status == "running" and record.error is None and record.candidate_version is None
    # stopped long before the end (how many steps fit before the theft depends on the machine's speed)
    assert record.progress.total_steps > 1000 and record.progress.step < record.progress.total_steps // 4
    assert bounded.versions.current() == "v0"
    print(f"stopped {stopped_in:.2f} s after the lock was taken (last progress report: step {record.progress.step})")
