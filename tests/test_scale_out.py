"""Two Celery workers on one Redis: a burst of 10 tasks is processed exactly once each, in order of
arrival, and the lineage stays linear (each promoted version builds on the previous one)."""

import pytest
from test_faults import start_worker, submit, wait_for

from sculptor import redis_server
from sculptor.bootstrap import ensure_initial_version
from sculptor.config import Settings
from sculptor.context import Context

pytestmark = pytest.mark.e2e

SMALL = {"gate_harmful_items": 2, "gate_benign_items": 2, "gate_ifeval_items": 2, "gate_general_text_items": 2,
         "job_lock_ttl_s": 5}


def test_two_workers_take_a_burst_exactly_once_in_order(tmp_path, tiny_learner_dir):
    proc, url = redis_server.start_redis(tmp_path / "redis")
    settings = Settings(var_dir=tmp_path / "var", redis_url=url, base_model_dir=str(tiny_learner_dir), **SMALL)
    ctx = Context.from_settings(settings)
    ensure_initial_version(settings, ctx.redis, ctx.store)
    workers = [start_worker(settings, tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        jobs = [submit(ctx, f"burst task {i}", epochs=3) for i in range(10)]
        finished = [wait_for(lambda j=j: (r := ctx.jobs.get(j.job_id)).finished and r, 600, f"job {j.job_id}")
                    for j in jobs]
    finally:
        for w in workers:
            w.kill()
            w.wait()
        redis_server.stop(proc)
    assert all(j.status in ("promoted", "rejected") for j in finished), [(j.status, j.error) for j in finished]
    assert all(j.attempts == 1 for j in finished)  # exactly once: no job ran twice
    started = [j.timestamps["running"] for j in finished]
    assert started == sorted(started)  # in order of arrival
    promoted = [j for j in finished if j.status == "promoted"]
    assert promoted, "no job was promoted"
    parents = ["v0"] + [j.candidate_version for j in promoted[:-1]]
    assert [j.parent_version for j in promoted] == parents  # the lineage is linear
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert all("succeeded" in log for log in logs)  # both workers took jobs
