"""Fault injection against real processes: a real redis-server, real Celery worker processes.

- SIGKILL the worker mid-training: the job is re-queued within a bounded time, retried from the
  start by a new worker, and promoted once; nothing half-trained is ever promoted.
- Restart Redis with jobs queued: the job records and the queue survive (AOF), and the jobs run.
"""

import os
import signal
import subprocess
import sys

import pytest
from waiting import wait_for

from sculptor import redis_server
from sculptor.bootstrap import ensure_initial_version
from sculptor.config import Settings
from sculptor.context import Context
from sculptor.recovery import recover_orphans
from tests.test_pipeline import examples
from tests.test_pipeline import submit as submit_task

pytestmark = pytest.mark.e2e

SMALL = {"gate_harmful_items": 4, "gate_benign_items": 4, "gate_ifeval_items": 4, "gate_general_text_items": 4,
         "job_lock_ttl_s": 3}


def env_for(settings: Settings) -> dict:
    env = dict(os.environ, REDIS_URL=settings.redis_url, SCULPTOR_VAR_DIR=str(settings.var_dir),
               SCULPTOR_BASE_MODEL_DIR=settings.base_model_dir, HF_HUB_OFFLINE="1")
    env.update({f"SCULPTOR_{k.upper()}": str(v) for k, v in SMALL.items()})
    return env


def start_worker(settings: Settings, log_path) -> subprocess.Popen:
    log = open(log_path, "a")
    return subprocess.Popen([sys.executable, "-m", "worker.main"], env=env_for(settings), stdout=log,
                            stderr=subprocess.STDOUT)


def submit(ctx: Context, name: str, epochs: int = 5):
    return submit_task(ctx, name, examples(name, "hello world"), epochs=epochs)[1]


@pytest.fixture
def stack(tmp_path, tiny_learner_dir):
    redis_dir = tmp_path / "redis"
    port = redis_server.free_port()
    proc, url = redis_server.start_redis(redis_dir, port)
    settings = Settings(var_dir=tmp_path / "var", redis_url=url, base_model_dir=str(tiny_learner_dir), **SMALL)
    ctx = Context.from_settings(settings)
    ensure_initial_version(settings, ctx.redis, ctx.store)
    state = {"redis": proc, "workers": []}
    yield settings, ctx, state, redis_dir, port
    for worker in state["workers"]:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    redis_server.stop(state["redis"])


def test_worker_killed_mid_training_is_retried_and_promoted_once(stack, tmp_path):
    settings, ctx, state, _, _ = stack
    job = submit(ctx, "kill-me", epochs=30)
    worker = start_worker(settings, tmp_path / "worker1.log")
    state["workers"].append(worker)
    wait_for(lambda: ctx.jobs.get(job.job_id).status in ("running", "evaluating"), 180, "the job to start")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    killed_during = ctx.jobs.get(job.job_id).status
    assert killed_during in ("running", "evaluating")

    # The gateway's periodic recovery: once the dead worker's lock expires, the job goes back to the queue.
    requeued = wait_for(lambda: recover_orphans(ctx), 30, "the orphaned job to be recovered")
    assert requeued == [job.job_id]
    record = ctx.jobs.get(job.job_id)
    assert record.status == "queued" and f"stopped during {killed_during}" in record.error
    assert ctx.versions.current() == "v0" and ctx.versions.count() == 1  # nothing half-trained was promoted

    state["workers"].append(start_worker(settings, tmp_path / "worker2.log"))
    done = wait_for(lambda: (j := ctx.jobs.get(job.job_id)).finished and j, 400, "the retried job to finish")
    assert done.status == "promoted", (done.error, (tmp_path / "worker2.log").read_text()[-3000:])
    assert done.attempts == 2 and ctx.versions.current() == "v1" and ctx.versions.count() == 2


def test_redis_restart_with_jobs_queued_loses_nothing(stack, tmp_path):
    settings, ctx, state, redis_dir, port = stack
    jobs = [submit(ctx, "first"), submit(ctx, "second")]
    assert ctx.redis.llen("train") == 2
    redis_server.stop(state["redis"])  # SIGTERM: redis flushes its append-only file
    state["redis"], _ = redis_server.start_redis(redis_dir, port)

    assert [ctx.jobs.get(j.job_id).status for j in jobs] == ["queued", "queued"]
    state["workers"].append(start_worker(settings, tmp_path / "worker.log"))
    for j in jobs:
        done = wait_for(lambda: (r := ctx.jobs.get(j.job_id)).finished and r, 400, f"job {j.job_id}")
        assert done.status == "promoted", (done.error, (tmp_path / "worker.log").read_text()[-3000:])
    assert [v.version for v in ctx.versions.all(newest_first=False)] == ["v0", "v1", "v2"]
    assert ctx.versions.get("v2").parent == "v1"  # the lineage stays linear
