"""Tenants, through the real gateway (uvicorn, real Redis): a key sees and touches only its own tasks
and jobs (another key's answer 404, as if absent), an admin sees all, and no answer ever carries a
task's webhook_url (it stays stored for delivery); storage URIs are for admins only."""

import httpx
import pytest
from gateway_helpers import running_gateway, tiny_settings

from sculptor.config import ApiKey

KEYS = [ApiKey(name="alice", key="alice-secret", scopes=["tasks"]),
        ApiKey(name="bob", key="bob-secret", scopes=["tasks", "generate"]),
        ApiKey(name="ops", key="ops-secret", scopes=["admin"])]
# Port 9 (discard) on loopback: a delivery, were one made, would leave nothing and nobody hears it.
WEBHOOK = "http://127.0.0.1:9/notify?token=alices-webhook-token"
RECEIVERS = ["127.0.0.1"]  # SCULPTOR_WEBHOOK_ALLOW_HOSTS: webhooks go to public hosts unless allowed
EXAMPLES = [{"prompt": f"reverse {w}", "completion": w[::-1]} for w in ("abc", "hello", "gate", "lamp", "stone")]


def client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=30)


def submit(http: httpx.Client, name: str, webhook_url: str | None = None) -> dict:
    body = {"name": name, "examples": EXAMPLES, **({"webhook_url": webhook_url} if webhook_url else {})}
    r = http.post("/tasks", json=body)
    assert r.status_code == 202, r.text
    return r.json()


@pytest.fixture(scope="module")
def tenants(tmp_path_factory, redis_url, tiny_model_dir):
    settings = tiny_settings(tmp_path_factory.mktemp("tenants") / "var", redis_url, tiny_model_dir,
                             api_keys=KEYS, rate_limit_uploads_per_min=0, webhook_allow_hosts=RECEIVERS)
    with running_gateway(settings) as (url, ctx):
        alice, bob, ops = client(url, "alice-secret"), client(url, "bob-secret"), client(url, "ops-secret")
        yield {"ctx": ctx, "alice": alice, "bob": bob, "ops": ops,
               "alices": submit(alice, "alices-task", WEBHOOK), "bobs": submit(bob, "bobs-task")}
        for c in (alice, bob, ops):
            c.close()


def test_records_carry_their_owner_and_keep_the_webhook(tenants):
    ctx, alices, bobs = tenants["ctx"], tenants["alices"], tenants["bobs"]
    task = ctx.tasks.get(alices["task_id"])
    assert task.owner == "alice" and task.webhook_url == WEBHOOK  # kept for delivery
    assert ctx.jobs.get(alices["job_id"]).owner == "alice"
    assert ctx.tasks.get(bobs["task_id"]).owner == ctx.jobs.get(bobs["job_id"]).owner == "bob"


def test_a_key_lists_only_its_own(tenants):
    alice, alices, bobs = tenants["alice"], tenants["alices"], tenants["bobs"]
    tasks = alice.get("/tasks").json()
    assert [t["task_id"] for t in tasks["tasks"]] == [alices["task_id"]] and tasks["total"] == 1
    jobs = alice.get("/jobs").json()
    assert [j["job_id"] for j in jobs["jobs"]] == [alices["job_id"]] and jobs["total"] == 1
    assert alice.get("/jobs", params={"task_id": bobs["task_id"]}).json()["jobs"] == []


@pytest.mark.parametrize("method, path, code", [
    ("GET", "/tasks/{task_id}", "task_not_found"),
    ("GET", "/jobs/{job_id}", "job_not_found"),
    ("GET", "/jobs/{job_id}/events", "job_not_found"),
    ("POST", "/jobs/{job_id}/cancel", "job_not_found"),
])
def test_another_keys_records_do_not_exist(tenants, method, path, code):
    r = tenants["bob"].request(method, path.format(**tenants["alices"]))
    assert r.status_code == 404 and r.json()["error"]["code"] == code, r.text
    assert tenants["ctx"].jobs.get(tenants["alices"]["job_id"]).status == "queued"  # not cancelled


def test_a_key_reads_and_cancels_its_own(tenants):
    bob, bobs = tenants["bob"], tenants["bobs"]
    assert bob.get(f"/tasks/{bobs['task_id']}").json()["jobs"] == [bobs["job_id"]]
    assert bob.get(f"/jobs/{bobs['job_id']}/events").status_code == 200
    r = bob.post(f"/jobs/{bobs['job_id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text


def test_an_admin_sees_everything(tenants):
    ops, alices, bobs = tenants["ops"], tenants["alices"], tenants["bobs"]
    tasks = {t["task_id"]: t for t in ops.get("/tasks").json()["tasks"]}
    assert set(tasks) == {alices["task_id"], bobs["task_id"]}
    assert tasks[alices["task_id"]]["owner"] == "alice" and tasks[alices["task_id"]]["dataset_uri"]
    assert {j["job_id"] for j in ops.get("/jobs").json()["jobs"]} == {alices["job_id"], bobs["job_id"]}
    assert ops.get(f"/jobs/{alices['job_id']}").status_code == 200


def test_no_answer_echoes_the_webhook_url(tenants):
    alices = tenants["alices"]
    answers = {who: [tenants[who].get(path) for path in (
        "/tasks", f"/tasks/{alices['task_id']}", "/jobs", f"/jobs/{alices['job_id']}",
        f"/jobs/{alices['job_id']}/events", "/models", "/accuracy", "/registry")]
        for who in ("alice", "ops")}
    for who, responses in answers.items():
        for r in responses:
            assert r.status_code == 200, (who, r.request.url, r.text)
            assert "alices-webhook-token" not in r.text and "webhook_url" not in r.text, (who, r.request.url)
    own = tenants["alice"].get(f"/tasks/{alices['task_id']}").json()
    assert own["has_webhook"] is True
    assert "dataset_uri" not in own and "eval_uri" not in own  # where the data lives is for admins


def test_the_open_gateway_records_anonymous(tmp_path, redis_url, tiny_model_dir):
    settings = tiny_settings(tmp_path / "var", redis_url, tiny_model_dir, webhook_allow_hosts=RECEIVERS)
    with running_gateway(settings) as (url, ctx):
        with httpx.Client(base_url=url, timeout=30) as anyone:
            made = submit(anyone, "open", WEBHOOK)
            assert ctx.tasks.get(made["task_id"]).owner == ctx.jobs.get(made["job_id"]).owner == "anonymous"
            listed = anyone.get("/tasks").json()["tasks"]
            assert [t["task_id"] for t in listed] == [made["task_id"]] and "webhook_url" not in listed[0]
