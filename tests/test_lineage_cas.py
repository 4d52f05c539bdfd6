"""Promotion is a compare-and-set on the serving head (real Redis; the rollback case with the real gateway
and the real job pipeline on the tiny model): a job whose parent is no longer the head ends `superseded`
and leaves the head alone, so an admin's rollback is never silently undone and the lineage never forks."""

import threading
import time

import httpx
import pytest
from gateway_helpers import running_gateway, tiny_settings

from sculptor import checkpoints
from sculptor.config import ApiKey
from sculptor.records import PROMOTIONS_CHANNEL, TERMINAL, HeadMoved, ModelVersion, VersionStore
from worker import pipeline

ADMIN = {"authorization": "Bearer ops-secret"}
SMALL_GATES = dict(gate_harmful_items=4, gate_benign_items=4, gate_ifeval_items=4, gate_general_text_items=4)


def version(name: str, parent: str | None) -> ModelVersion:
    return ModelVersion(version=name, parent=parent, checkpoint_uri=f"file:///checkpoints/{name}")


def test_promotion_is_a_compare_and_set_on_the_head(redis_client):
    versions = VersionStore(redis_client)
    versions.promote(version("v0", None))
    versions.promote(version("v1", "v0"))
    announcements = redis_client.pubsub(ignore_subscribe_messages=True)
    announcements.subscribe(PROMOTIONS_CHANNEL)
    announcements.get_message(timeout=1)  # the subscription's confirmation

    with pytest.raises(HeadMoved) as moved:
        versions.promote(version("v2", "v0"))  # trained on v0, but v1 is serving now
    assert (moved.value.expected, moved.value.head) == ("v0", "v1") and "from v0 to v1" in str(moved.value)
    assert versions.current() == "v1" and versions.get("v2") is None and versions.count() == 2
    assert announcements.get_message(timeout=0.5) is None  # no gateway was told to swap
    announcements.close()


def test_activate_checks_the_head_it_was_asked_against(redis_client):
    versions = VersionStore(redis_client)
    for name, parent in (("v0", None), ("v1", "v0"), ("v2", "v1")):
        versions.promote(version(name, parent))
    with pytest.raises(HeadMoved):
        versions.activate("v0", expected_head="v1")  # a promotion of v2 landed meanwhile
    assert versions.current() == "v2"
    versions.activate("v0", expected_head="v2")
    assert versions.current() == "v0"
    versions.activate("v2")  # no expectation: an unconditional roll forward
    assert versions.current() == "v2"


def test_concurrent_promotions_of_one_parent_never_fork(redis_client):
    versions = VersionStore(redis_client)
    versions.promote(version("v0", None))
    for round_ in range(10):
        head = versions.current()
        start, outcomes = threading.Barrier(2), []

        def promote(name: str):
            start.wait()
            try:
                versions.promote(version(name, head))
                outcomes.append(name)
            except HeadMoved:
                outcomes.append(None)

        names = [f"a{round_}", f"b{round_}"]
        threads = [threading.Thread(target=promote, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [n for n in outcomes if n]
        assert len(winners) == 1, outcomes
        assert versions.current() == winners[0] and versions.get(winners[0]).parent == head


def test_a_rollback_during_a_job_supersedes_the_job(tmp_path, redis_url, tiny_learner_dir, monkeypatch):
    """v0 -> v1 serving; a job starts on v1; an admin rolls back to v0; the job passes its gates but
    must not undo the rollback."""
    settings = tiny_settings(tmp_path / "var", redis_url, tiny_learner_dir, **SMALL_GATES,
                             api_keys=[ApiKey(name="ops", key="ops-secret", scopes=["admin"])])
    with running_gateway(settings) as (url, ctx):
        v1 = ctx.versions.next_name()
        checkpoints.publish_dir(ctx.store, tiny_learner_dir, v1)  # what an earlier job promoted
        ctx.versions.promote(ModelVersion(version=v1, parent="v0", checkpoint_uri=ctx.store.uri(checkpoints.prefix(v1))))
        examples = [{"prompt": f"say the greeting {i}", "completion": "hello world"} for i in range(40)]
        hyper = {"epochs": 5, "learning_rate": 1e-2, "batch_size": 8, "max_seq_len": 48}
        r = httpx.post(f"{url}/tasks", json={"name": "greet", "examples": examples, "hyperparameters": hyper},
                       headers=ADMIN, timeout=30)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        ctx.redis.delete(ctx.settings.train_queue)  # this process runs the job; no Celery worker takes it

        rollback, rolled_back = {}, threading.Event()
        # The rollback must land while the job runs, however slow the machine: the job's gate step waits
        # for it (the real gates then run as usual).
        real_gate = pipeline.gate_step.evaluate_candidate

        def gate_after_the_rollback(*args, **kwargs):
            assert rolled_back.wait(300), "the rollback never finished"
            return real_gate(*args, **kwargs)

        monkeypatch.setattr(pipeline.gate_step, "evaluate_candidate", gate_after_the_rollback)

        def roll_back_once_running():
            deadline = time.monotonic() + 120
            while ctx.jobs.get(job_id).status != "running" and time.monotonic() < deadline:
                time.sleep(0.05)
            answer = httpx.post(f"{url}/models/v0/activate", headers=ADMIN, timeout=120)
            rollback.update(code=answer.status_code, body=answer.text,
                            job_status=ctx.jobs.get(job_id).status)
            rolled_back.set()

        admin = threading.Thread(target=roll_back_once_running)
        admin.start()
        done = pipeline.run_job(ctx, job_id)
        admin.join()

        assert rollback["code"] == 200 and rollback["job_status"] not in TERMINAL, rollback
        assert done.status == "superseded", done.error
        assert done.parent_version == v1 and done.gates.passed is True
        assert f"moved from {v1} to v0" in done.error and "resubmit" in done.error
        assert ctx.versions.current() == "v0" and ctx.versions.get(done.candidate_version) is None
        statuses = [e["status"] for e in ctx.jobs.events(job_id) if e["type"] == "status"]
        assert statuses[-1] == "superseded"
        job = httpx.get(f"{url}/jobs/{job_id}", headers=ADMIN, timeout=30).json()
        assert job["status"] == "superseded"
        lineage = httpx.get(f"{url}/models", headers=ADMIN, timeout=30).json()
        assert lineage["current"] == "v0" and [v["version"] for v in lineage["versions"]] == ["v0", v1]
