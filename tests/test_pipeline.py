"""The worker's job pipeline in-process (real Redis, real object store, tiny model): train → save →
gate → promote, the lineage and accuracy matrix it records, and the failure paths that must leave
the serving version untouched."""

import shutil
import threading
import time

import pytest
from safetensors.torch import load_file, save_file

from sculptor import checkpoints
from sculptor.accuracy import load_scores, save_scores
from sculptor.bootstrap import ensure_initial_version
from sculptor.config import Settings
from sculptor.context import Context
from sculptor.datasets import Example, parse_hyperparameters
from service.api.routes.tasks import TaskSubmission, store_and_enqueue
from worker import pipeline

SMALL_GATES = dict(gate_harmful_items=4, gate_benign_items=4, gate_ifeval_items=4, gate_general_text_items=4)


def examples(prefix: str, answer: str, n: int = 40) -> list[Example]:
    return [Example.model_validate({"prompt": f"{prefix} {i}", "completion": answer}) for i in range(n)]


def submit(ctx, name, exs, **hyper):
    hp = {"epochs": 5, "learning_rate": 1e-2, "batch_size": 8, "max_seq_len": 48, **hyper}
    sub = TaskSubmission(name=name, examples=exs, eval_examples=None, metric="exact_match",
                         hyperparameters=parse_hyperparameters(hp), webhook_url=None, size_bytes=1)
    task, job = store_and_enqueue(ctx, sub)
    return task, job


@pytest.fixture
def ctx(tmp_path, redis_url, redis_client, tiny_learner_dir):
    settings = Settings(var_dir=tmp_path / "var", redis_url=redis_url, base_model_dir=str(tiny_learner_dir),
                        **SMALL_GATES)
    context = Context.from_settings(settings)
    ensure_initial_version(settings, context.redis, context.store)
    return context


def test_job_trains_gates_and_promotes(ctx):
    task, job = submit(ctx, "greet", examples("say the greeting", "hello world"))
    done = pipeline.run_job(ctx, job.job_id)
    assert done.status == "promoted", done.error
    assert done.parent_version == "v0" and done.candidate_version == "v1" and ctx.versions.current() == "v1"
    assert done.progress.step == done.progress.total_steps > 0 and done.progress.loss is not None
    assert done.training.method == "osft"
    assert done.gates.passed and done.gates.lineage.R["v1"][task.task_id] > 0.5
    statuses = [e["status"] for e in ctx.jobs.events(job.job_id) if e["type"] == "status"]
    assert statuses == ["validating", "queued", "running", "evaluating", "promoted"]
    assert checkpoints.is_committed(ctx.store, "v1")
    assert load_scores(ctx, "v0").tasks[task.task_id].mean == 0.0  # the parent scored on the new task


def test_a_later_job_is_also_gated_against_the_lineage_root(ctx):
    _, first = submit(ctx, "greet", examples("say the greeting", "hello world"))
    done = pipeline.run_job(ctx, first.job_id)
    assert done.status == "promoted", done.error
    assert all(g.subject != "root_answers_nll" for g in done.gates.gates)  # its parent is the root
    stored = load_scores(ctx, "v0")
    stored.general_chat = None  # e.g. the suite changed since: the gate answers the prompts with v0 again
    save_scores(ctx, "v0", stored)
    _, second = submit(ctx, "farewell", examples("say the farewell", "goodbye now"))
    done = pipeline.run_job(ctx, second.job_id)
    drift = next(g for g in done.gates.gates if g.subject == "root_answers_nll")
    assert not drift.skipped and drift.n_items > 0 and "root's answers" in drift.reason
    assert load_scores(ctx, "v0").general_chat is not None and load_scores(ctx, "v2").chat_vs_root is not None


def test_non_finite_loss_fails_the_job_and_keeps_serving(ctx, tmp_path):
    parent = checkpoints.fetch(ctx.store, "v0", ctx.settings.checkpoint_cache_dir)
    broken = tmp_path / "nan-model"
    broken.mkdir()
    for f in parent.iterdir():
        if f.name != checkpoints.MARKER:
            (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(broken / "model.safetensors")
    name = next(k for k in weights if "q_proj" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    checkpoints.publish_dir(ctx.store, broken, "v0")  # the parent itself is poisoned
    shutil.rmtree(ctx.settings.checkpoint_cache_dir)

    # method "full": no SVD of the poisoned weights first, so the loss itself is what turns non-finite
    _, job = submit(ctx, "greet", examples("say the greeting", "hello world"), method="full")
    done = pipeline.run_job(ctx, job.job_id)
    assert done.status == "failed" and "loss became nan" in done.error
    assert ctx.versions.current() == "v0" and ctx.versions.count() == 1


def test_cancel_while_running_stops_without_promoting(ctx):
    _, job = submit(ctx, "greet", examples("say the greeting", "hello world"), epochs=50)

    def cancel_once_running():
        deadline = time.monotonic() + 60
        while ctx.jobs.get(job.job_id).status != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        ctx.jobs.update(job.job_id, cancel_requested=True)  # what POST /jobs/{id}/cancel does

    canceller = threading.Thread(target=cancel_once_running)
    canceller.start()
    done = pipeline.run_job(ctx, job.job_id)
    canceller.join()
    assert done.status == "cancelled" and "cancelled at step" in done.error
    assert ctx.versions.current() == "v0" and ctx.versions.count() == 1


def test_rejected_candidate_can_be_force_promoted_and_rolled_back(ctx):
    from fastapi.testclient import TestClient

    from service.app import create_app

    _, job = submit(ctx, "barely", examples("say the greeting", "hello world"), learning_rate=1e-7, epochs=1)
    done = pipeline.run_job(ctx, job.job_id)
    assert done.status == "rejected" and "new_task" in done.error and ctx.versions.current() == "v0"

    settings = ctx.settings.model_copy(update={"engine": "transformers", "engine_dtype": "float32",
                                               "engine_max_model_len": 256})
    with TestClient(create_app(settings)) as client:
        assert client.post(f"/jobs/{job.job_id}/promote", json={}).status_code == 400
        forced = client.post(f"/jobs/{job.job_id}/promote", json={"force": True})
        assert forced.status_code == 200 and forced.json()["status"] == "promoted"
        lineage = client.get("/models").json()
        assert lineage["current"] == "v1" and lineage["versions"][-1]["forced"] is True
        assert client.post(f"/jobs/{job.job_id}/promote", json={"force": True}).status_code == 409
        back = client.post("/models/v0/activate")
        assert back.status_code == 200 and back.json()["serving"] == "v0"
        assert client.post("/generate", json={"prompt": "hi", "max_tokens": 2}).json()["model_version"] == "v0"
