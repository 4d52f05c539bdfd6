"""POST /tasks through the real gateway app (transformers engine on the tiny model, real Redis)."""

import json

import pytest
from fastapi.testclient import TestClient

from sculptor.bootstrap import ensure_initial_version
from sculptor.config import Settings
from sculptor.context import Context
from service.app import create_app

EXAMPLE = {"messages": [{"role": "user", "content": "reverse abc"}, {"role": "assistant", "content": "cba"}]}


@pytest.fixture
def gateway(tmp_path, redis_url, redis_client, tiny_model_dir):
    settings = Settings(var_dir=tmp_path / "var", redis_url=redis_url, base_model_dir=str(tiny_model_dir),
                        engine="transformers", engine_dtype="float32", max_upload_bytes=20_000,
                        engine_max_model_len=256)
    ctx = Context.from_settings(settings)
    ensure_initial_version(settings, ctx.redis, ctx.store)
    with TestClient(create_app(settings)) as client:
        yield client, ctx


def stored_datasets(ctx):
    return ctx.store.list("datasets")


def test_json_task_is_stored_and_queued(gateway):
    client, ctx = gateway
    body = {"name": "reverse", "examples": [EXAMPLE] * 30, "metric": "exact_match",
            "hyperparameters": {"epochs": 1, "learning_rate": 1e-3}}
    r = client.post("/tasks", json=body)
    assert r.status_code == 202, r.text
    out = r.json()
    assert out["status"] == "queued" and out["status_url"].endswith(f"/jobs/{out['job_id']}")
    task = client.get(f"/tasks/{out['task_id']}").json()
    assert task["num_examples"] + task["num_eval_examples"] == 30 and task["num_eval_examples"] >= 1
    assert len(stored_datasets(ctx)) == 2  # train + eval split
    job = client.get(f"/jobs/{out['job_id']}").json()
    assert job["status"] == "queued"
    assert [e["status"] for e in client.get(f"/jobs/{out['job_id']}/events").json()["events"]] == ["validating", "queued"]
    assert ctx.redis.llen("train") == 1  # the Celery message waits in the "train" queue
    scraped = client.get("/metrics").text
    assert 'sculptor_jobs{status="queued"} 1.0' in scraped and "sculptor_queue_depth 1.0" in scraped


def test_jsonl_upload_with_prompt_completion(gateway):
    client, _ = gateway
    lines = "\n".join(json.dumps({"prompt": f"say {i}", "completion": str(i)}) for i in range(25))
    r = client.post("/tasks", files={"file": ("t.jsonl", lines, "application/jsonl")}, data={"name": "say"})
    assert r.status_code == 202, r.text


@pytest.mark.parametrize("payload, code, line", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops', 422, 2),
    ('{"messages": [{"role": "user", "content": "hi"}]}', 422, 1),
    ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}', 422, 1),
    ("\n\n", 422, None),
])
def test_bad_jsonl_is_rejected_and_nothing_is_stored(gateway, payload, code, line):
    client, ctx = gateway
    r = client.post("/tasks", files={"file": ("t.jsonl", payload, "application/jsonl")})
    assert r.status_code == code, r.text
    err = r.json()["error"]
    assert err["message"] and err.get("line") == line
    assert stored_datasets(ctx) == [] and ctx.tasks.count() == 0 and ctx.jobs.count() == 0
    assert ctx.redis.llen("train") == 0


def test_empty_json_dataset_and_bad_hyperparameters(gateway):
    client, ctx = gateway
    r = client.post("/tasks", json={"name": "x", "examples": []})
    assert r.status_code == 422 and "empty" in r.json()["error"]["message"]
    r = client.post("/tasks", json={"name": "x", "examples": [EXAMPLE], "hyperparameters": {"epochs": 0}})
    assert r.status_code == 422 and "epochs" in r.json()["error"]["message"]
    r = client.post("/tasks", json={"name": "x", "examples": [EXAMPLE], "hyperparameters": {
        "gate_thresholds": {"retention_max_dorp": 0.1}}})
    assert r.status_code == 422 and "retention_max_dorp" in r.json()["error"]["message"]
    assert ctx.tasks.count() == 0


def test_size_limit_and_content_type(gateway):
    client, ctx = gateway
    r = client.post("/tasks", json={"name": "big", "examples": [EXAMPLE] * 1000})
    assert r.status_code == 413, r.text
    r = client.post("/tasks", content=b"name=x", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "multipart" in r.json()["error"]["message"]
    assert ctx.tasks.count() == 0


def test_generate_reports_the_serving_version(gateway):
    client, _ = gateway
    r = client.post("/generate", json={"prompt": "hello", "max_tokens": 5})
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == "v0" and r.headers["x-model-version"] == "v0"
    assert r.json()["usage"]["completion_tokens"] <= 5
    r = client.post("/generate", json={"prompt": "hello " * 300, "max_tokens": 5})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert client.post("/generate", json={"messages": [], "max_tokens": 5}).status_code == 422  # found by fuzzing
    assert client.post("/generate", json={"prompt": "", "max_tokens": 5}).json()["error"]["code"] == "empty_prompt"
    assert client.get("/readyz").json()["ready"] is True
