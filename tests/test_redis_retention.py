"""Redis stays bounded (issue 15, item 12): a job keeps its newest events, numbered so a follower resumes
after trimming; jobs that ended past the retention are deleted with their events and index entries; the job
listing, the metrics scrape and recovery read index ranges, not every record; a full Redis answers 503.
Real Redis throughout (the session's, or one of its own where a test changes Redis's configuration)."""

import re

import httpx
import pytest
import redis
from prometheus_client import REGISTRY
from gateway_helpers import running_gateway, tiny_settings

from sculptor import redis_server
from sculptor.config import Settings
from sculptor.context import Context
from sculptor.records import PREFIX, JobRecord, JobStore, Progress, TaskStore, ensure_indexes, now
from sculptor.recovery import recover_orphans
from service import metrics

DAY_S = 86400


def job(job_id: str, owner: str = "anonymous", task_id: str = "task_1") -> JobRecord:
    return JobRecord(job_id=job_id, task_id=task_id, owner=owner)


def test_a_job_keeps_its_newest_events_numbered(redis_client):
    jobs = JobStore(redis_client, max_events=20)
    jobs.add(job("job_a"))
    for step in range(1, 51):
        jobs.update("job_a", progress=Progress(step=step, total_steps=50))
    assert redis_client.llen(jobs.events_key("job_a")) == 20
    kept = jobs.events("job_a")
    assert [e["seq"] for e in kept] == list(range(32, 52))  # 1 status event + 50 progress events, newest 20
    assert kept[-1]["step"] == 50
    assert [e["seq"] for e in jobs.events("job_a", after=49)] == [50, 51]  # a follower resumes by number


def gates(passed: bool) -> dict:
    """The least gate report a job record takes."""
    return {"passed": passed, "new_task_id": "task_1", "failed": [], "summary": "", "gates": [], "thresholds": {},
            "candidate": {}, "parent": {}}


def test_jobs_that_ended_past_the_retention_are_deleted(redis_client):
    jobs = JobStore(redis_client)
    for job_id in ("job_old", "job_recent", "job_running"):
        jobs.add(job(job_id))
    jobs.update("job_old", status="rejected", gates=gates(False))
    jobs.update("job_recent", status="promoted", gates=gates(True))
    jobs.update("job_running", status="running")
    redis_client.zadd(jobs.ended_index, {"job_old": now() - 31 * DAY_S})  # it ended a month ago
    assert jobs.gate_outcomes() == {"passed": 1, "failed": 1}

    assert jobs.sweep_ended(retention_s=30 * DAY_S) == 1
    assert jobs.get("job_old") is None and not redis_client.exists(jobs.events_key("job_old"))
    assert {j.job_id for j in jobs.all()} == {"job_recent", "job_running"}
    assert jobs.for_task("task_1") == ["job_recent", "job_running"]
    assert jobs.status_counts()["rejected"] == 0 and jobs.gate_outcomes() == {"passed": 1, "failed": 0}
    assert not [k for k in redis_client.keys("*") if "job_old" in k and k != jobs.ended_index]
    assert jobs.sweep_ended(retention_s=30 * DAY_S) == 0
    assert Settings().job_retention_days == 30 and Settings().max_job_events == 1000


def record_reads(redis_url: str, action) -> int:
    """How many job records Redis served (GET or MGET of sculptor:job:<id>) while `action` ran, seen by MONITOR."""
    watcher = redis.Redis.from_url(redis_url, decode_responses=True)
    marker = "end-of-action"
    with watcher.monitor() as monitor:
        action()
        redis.Redis.from_url(redis_url).echo(marker)
        reads = 0
        for command in monitor.listen():
            if marker in command["command"]:
                return reads
            words = command["command"].split()
            if words[0].upper() in ("GET", "MGET"):
                reads += sum(bool(re.fullmatch(r"sculptor:job:job_\d+", w)) for w in words[1:])


@pytest.fixture
def many_jobs(tmp_path, redis_url, redis_client):
    """300 jobs of two owners: 2 running, the rest ended."""
    ctx = Context.from_settings(Settings(var_dir=tmp_path / "var", redis_url=redis_url))
    for i in range(300):
        ctx.jobs.add(job(f"job_{i:03d}", owner="alice" if i % 3 else "bob"))
        ctx.jobs.update(f"job_{i:03d}", status="running" if i in (7, 8) else "failed")
    return ctx


def test_listing_metrics_and_recovery_read_a_page_not_every_record(many_jobs, redis_url):
    ctx = many_jobs
    page: list = []
    assert record_reads(redis_url, lambda: page.extend(ctx.jobs.page_for(0, 10, owner="bob"))) <= 10
    jobs, total = page
    assert total == 100 and [j.job_id for j in jobs][:2] == ["job_297", "job_294"]
    assert record_reads(redis_url, lambda: metrics.refresh_job_gauges(ctx)) <= metrics.LATEST_JOBS_READ
    assert REGISTRY.get_sample_value("sculptor_jobs", {"status": "failed"}) == 298
    assert REGISTRY.get_sample_value("sculptor_jobs", {"status": "running"}) == 2
    redis_client = ctx.redis
    redis_client.set("sculptor:lock:job:job_007", "alive", ex=60)
    recovered: list = []
    assert record_reads(redis_url, lambda: recovered.extend(recover_orphans(ctx))) <= 4
    assert recovered == ["job_008"]
    assert not redis_client.keys(f"{PREFIX}:tmp:*"), "the intersection of indexes is not left behind"


def test_indexes_are_built_once_for_records_from_before_them(redis_client):
    legacy = job("job_legacy", owner="carol").model_copy(update={"status": "failed"})
    redis_client.set(f"{PREFIX}:job:job_legacy", legacy.model_dump_json())  # written by the previous version:
    redis_client.zadd(f"{PREFIX}:jobs", {"job_legacy": legacy.created_at})  # a record and the one index
    jobs = JobStore(redis_client)
    assert jobs.status_counts()["failed"] == 0
    ensure_indexes(TaskStore(redis_client), jobs)
    assert jobs.status_counts()["failed"] == 1 and jobs.page_for(0, 5, owner="carol")[1] == 1
    assert jobs.latest_ended(5)[0].job_id == "job_legacy"


def test_a_full_redis_refuses_uploads_with_503(tmp_path, tiny_model_dir):
    proc, url = redis_server.start_redis(tmp_path / "redis")
    try:
        settings = tiny_settings(tmp_path / "var", url, tiny_model_dir)
        with running_gateway(settings) as (base, ctx), httpx.Client(base_url=base, timeout=60) as client:
            ctx.redis.config_set("maxmemory-policy", "noeviction")
            ctx.redis.config_set("maxmemory", "1")  # below what it holds: every write is refused
            answer = client.post("/tasks", json={"name": "t", "examples": [{"prompt": "q", "completion": "a"}]})
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "redis_full", answer.text
            assert answer.headers["retry-after"]
            assert client.post("/generate", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    finally:
        redis_server.stop(proc)
