"""Status API, CLI and dashboard against the real gateway (uvicorn thread, transformers engine,
tiny model, real Redis). No worker runs: submitted jobs stay queued, and a finished history
(promoted and rejected jobs with real gate reports, scores, versions) is written into Redis with
the stores the worker itself uses. The dashboard is rendered by headless Chromium.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from waiting import wait_for
from gateway_helpers import running_gateway, tiny_settings

from sculptor import checkpoints, cli
from sculptor.accuracy import save_scores
from sculptor.context import Context
from sculptor.locks import held_lock
from sculptor.records import JobRecord, ModelVersion, Progress, TaskRecord
from worker import gates

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_INSTALL = "apt-get install -y chromium"


# ---------- the gateway ----------
@pytest.fixture(scope="module")
def gateway(tmp_path_factory, redis_url, tiny_model_dir):
    settings = tiny_settings(tmp_path_factory.mktemp("status"), redis_url, tiny_model_dir)
    with running_gateway(settings) as (url, ctx):
        yield url, ctx


@pytest.fixture(scope="module")
def url(gateway) -> str:
    return gateway[0]


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


@pytest.fixture
def dataset(tmp_path) -> Path:
    path = tmp_path / "arith.jsonl"
    rows = [{"prompt": f"{i} + {i} =", "completion": str(2 * i)} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# ---------- submit, list, events, cancel ----------
def test_submit_list_and_filter(capsys, url, http, dataset):
    code, out = run_cli(capsys, "--url", url, "submit", str(dataset), "--name", "arith",
                        "--hyperparameters", '{"epochs": 1}')
    assert code == 0
    job_id = out.strip()
    assert re.fullmatch(r"job_[0-9a-f]{16}", job_id)
    job = http.get(f"/jobs/{job_id}").json()
    assert job["status"] == "queued"
    task = http.get(f"/tasks/{job['task_id']}").json()
    assert task["name"] == "arith" and task["hyperparameters"]["epochs"] == 1 and job_id in task["jobs"]

    listed = http.get("/jobs").json()
    assert job_id in [j["job_id"] for j in listed["jobs"]] and listed["total"] >= 1
    assert job_id in [j["job_id"] for j in http.get("/jobs", params={"status": "queued"}).json()["jobs"]]
    assert job_id not in [j["job_id"] for j in http.get("/jobs", params={"status": "running"}).json()["jobs"]]
    by_task = http.get("/jobs", params={"task_id": job["task_id"]}).json()
    assert [j["job_id"] for j in by_task["jobs"]] == [job_id] and by_task["total"] == 1

    code, out = run_cli(capsys, "--url", url, "jobs", "--status", "queued")
    assert code == 0 and job_id in out


def test_events_json_then_cancel(capsys, url, http, dataset):
    code, out = run_cli(capsys, "--url", url, "submit", str(dataset))
    job_id = out.strip()
    events = http.get(f"/jobs/{job_id}/events").json()
    assert events["job_id"] == job_id
    assert [e["status"] for e in events["events"] if e["type"] == "status"] == ["validating", "queued"]

    cancelled = http.post(f"/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = http.post(f"/jobs/{job_id}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    statuses = [e["status"] for e in http.get(f"/jobs/{job_id}/events").json()["events"] if e["type"] == "status"]
    assert statuses[-1] == "cancelled"
    assert run_cli(capsys, "--url", url, "watch", job_id)[0] == 1  # ended, but not promoted


def test_cli_errors_are_readable(capsys, url, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completion": "y"}\nnot json\n')
    assert cli.main(["--url", url, "submit", str(bad)]) == 2
    assert "line 2" in capsys.readouterr().err
    assert cli.main(["--url", url, "watch", "job_missing"]) == 2
    assert "404" in capsys.readouterr().err


def test_watch_follows_sse_until_promoted(capsys, url, gateway):
    ctx = gateway[1]
    task = add_task(ctx, "watch-me")
    job = JobRecord(job_id="job_watch00000000", task_id=task.task_id, status="queued")
    ctx.jobs.add(job)
    ctx.jobs.update(job.job_id, status="running", parent_version="v0")

    def worker():
        with held_lock(ctx.redis, f"job:{job.job_id}", ttl_s=30):  # as a live worker does: no recovery
            for step in range(1, 4):
                time.sleep(0.3)
                ctx.jobs.update(job.job_id, progress=Progress(step=step, total_steps=3, loss=1 / step, eta_s=3 - step))
            ctx.jobs.update(job.job_id, status="evaluating", candidate_version="v9")
            ctx.jobs.update(job.job_id, status="promoted")

    threading.Thread(target=worker, daemon=True).start()
    code, out = run_cli(capsys, "--url", url, "watch", job.job_id)
    assert code == 0
    assert "[##########" in out and "3/3" in out and "loss 0.3333" in out
    assert out.strip().splitlines()[-1] == f"{job.job_id}: promoted (v9)"


def test_generate_and_models_via_cli(capsys, url, http):
    assert cli.main(["--url", url, "generate", "hello", "--max-tokens", "3"]) == 0
    serving = http.get("/models").json()["serving"]
    assert capsys.readouterr().err.strip() == f"[{serving}]"
    code, out = run_cli(capsys, "--url", url, "models")
    assert code == 0 and re.search(r"^v0\s+\(base\)", out, re.M)


# ---------- a finished history, written as the worker writes it ----------
def items(n: int, hits: int) -> dict:
    return {"ids": [f"i{k}" for k in range(n)], "values": [1.0] * hits + [0.0] * (n - hits)}


def version_scores(tasks: dict[str, int], harmful: int = 10, benign: int = 1, ifeval: int = 12,
                   nll: float = 2.0) -> gates.VersionScores:
    """Scores over 20 items per part: `tasks` maps a task id to its number of correct items."""
    return gates.VersionScores(
        tasks={t: gates.TaskScores(**items(20, hits)) for t, hits in tasks.items()},
        harmful_refusal=gates.ItemScores(**items(20, harmful)), benign_refusal=gates.ItemScores(**items(20, benign)),
        ifeval_strict=gates.ItemScores(**items(20, ifeval)),
        perplexity=gates.PerplexityScores(ids=[f"t{k}" for k in range(10)], nll=[nll * 50] * 10, tokens=[50] * 10),
        general_chat=gates.ChatAnswers(ids=[f"c{k}" for k in range(30)], answers=[f"answer {k} in words" for k in range(30)],
                                       nll=[5.0] * 30, tokens=[5] * 30),
        chat_vs_parent=gates.ItemScores(ids=[f"c{k}" for k in range(30)], values=[1.0 + 0.01 * (k % 3) for k in range(30)]),
        harmful_answers=gates.ChatAnswers(ids=[f"i{k}" for k in range(20)], answers=["no"] * 20, nll=[1.0] * 20,
                                          tokens=[1] * 20),
        harmful_vs_parent=gates.ItemScores(ids=[f"i{k}" for k in range(20)], values=[1.0] * 20),
        ifeval_answers=gates.ChatAnswers(ids=[f"i{k}" for k in range(20)], answers=["ok"] * 20, nll=[1.0] * 20,
                                         tokens=[1] * 20),
        ifeval_vs_parent=gates.ItemScores(ids=[f"i{k}" for k in range(20)], values=[1.0] * 20),
    )


def add_task(ctx: Context, name: str) -> TaskRecord:
    task = TaskRecord(task_id=f"task_{name}", name=name, digest=name, dataset_uri=f"file:///{name}.jsonl",
                      num_examples=100, num_eval_examples=20, size_bytes=1000)
    ctx.tasks.add(task)
    return task


def finish_job(ctx: Context, task: TaskRecord, parent: str, candidate: str, report: gates.GateReport) -> JobRecord:
    job = JobRecord(job_id=f"job_{candidate}_{task.name}", task_id=task.task_id, status="queued")
    ctx.jobs.add(job)
    ctx.jobs.update(job.job_id, status="running", parent_version=parent)
    ctx.jobs.update(job.job_id, progress=Progress(step=40, total_steps=40, epoch=2, loss=0.21))
    ctx.jobs.update(job.job_id, status="evaluating", candidate_version=candidate)
    status = "promoted" if report.passed else "rejected"
    return ctx.jobs.update(job.job_id, status=status, gates=report.model_dump(mode="json"),
                           error=None if report.passed else report.summary)


def promote(ctx: Context, version: str, parent: str, task: TaskRecord, job: JobRecord, model_dir: Path) -> None:
    checkpoints.publish_dir(ctx.store, model_dir, version)  # the same weights: the gateway's swap succeeds
    ctx.versions.promote(ModelVersion(version=version, parent=parent, task_id=task.task_id, job_id=job.job_id,
                                      checkpoint_uri=ctx.store.uri(checkpoints.prefix(version))))


@pytest.fixture(scope="module")
def history(gateway, tiny_model_dir):
    """v0 -> v1 (learned arithmetic) -> v2 (learned capitals); v3 (learned dates) rejected; one job running."""
    ctx = gateway[1]
    arith, capitals, dates = add_task(ctx, "arithmetic"), add_task(ctx, "capitals"), add_task(ctx, "dates")
    a, c, d = arith.task_id, capitals.task_id, dates.task_id
    scores = {
        "v0": version_scores({a: 2}),
        "v1": version_scores({a: 18, c: 5}),
        "v2": version_scores({a: 17, c: 16, d: 4}),
        "v3": version_scores({a: 8, c: 16, d: 18}, nll=2.02),
    }
    for version, s in scores.items():
        save_scores(ctx, version, s)
    thresholds = gates.GateThresholds(bootstrap_samples=500)
    job1 = finish_job(ctx, arith, "v0", "v1", gates.decide(scores["v1"], scores["v0"], a, thresholds))
    promote(ctx, "v1", "v0", arith, job1, tiny_model_dir)
    job2 = finish_job(ctx, capitals, "v1", "v2", gates.decide(scores["v2"], scores["v1"], c, thresholds))
    promote(ctx, "v2", "v1", capitals, job2, tiny_model_dir)
    job3 = finish_job(ctx, dates, "v2", "v3", gates.decide(scores["v3"], scores["v2"], d, thresholds))
    running = JobRecord(job_id="job_running_now", task_id=add_task(ctx, "poetry").task_id, status="queued")
    ctx.jobs.add(running)
    with held_lock(ctx.redis, f"job:{running.job_id}", ttl_s=30):  # a live worker's lock: recovery leaves it be
        ctx.jobs.update(running.job_id, status="running", parent_version="v2")
        running = ctx.jobs.update(running.job_id,
                                  progress=Progress(step=12, total_steps=40, epoch=0.6, loss=1.234, eta_s=95))
        yield {"jobs": (job1, job2, job3, running), "tasks": (a, c, d)}


def test_history_gates_are_as_expected(history):
    job1, job2, job3, _ = history["jobs"]
    assert job1.status == job2.status == "promoted" and job1.gates.passed and job2.gates.passed
    assert job3.status == "rejected" and job3.gates.failed == [f"retention:{history['tasks'][0]}"]


def test_accuracy_matrix(http, history):
    a, c, _ = history["tasks"]
    body = http.get("/accuracy").json()
    assert body["version"] == "v2" and body["versions"] == ["v1", "v2"] and body["tasks"] == [a, c]
    assert body["R"]["v1"][a] == pytest.approx(0.9) and body["R"]["v2"][c] == pytest.approx(0.8)
    assert body["AA"] == pytest.approx((0.85 + 0.8) / 2)
    assert body["BWT"] == pytest.approx(0.85 - 0.9)
    assert http.get("/accuracy", params={"version": "v1"}).json()["versions"] == ["v1"]
    missing = http.get("/accuracy", params={"version": "v7"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_static_files(http):
    page = http.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert http.get("/static/dashboard.js").headers["content-type"].startswith("text/javascript")
    assert http.get("/static/../app.py").status_code == 404
    assert http.get("/static/nope.js").status_code == 404


# ---------- the dashboard in headless Chromium ----------
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail(f"headless Chromium is needed for the dashboard test and is not installed: run `{CHROMIUM_INSTALL}`")


def run_chromium(tmp_path: Path, *args: str) -> str:
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def wait_serving(http: httpx.Client, version: str, timeout_s: float = 30) -> None:
    wait_for(lambda: http.get("/models").json()["serving"] == version, timeout_s, f"the gateway to swap to {version}")


def test_dashboard_renders_in_chromium(tmp_path, url, http, history):
    wait_serving(http, "v2")
    page = f"{url}/dashboard"
    dom = run_chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", page)

    assert re.search(r'id="serving-version">v2<', dom)
    assert re.search(r'id="readiness" class="pill ready"', dom)
    for version in ("v0", "v1", "v2"):
        assert f'class="version{" serving" if version == "v2" else ""}" data-version="{version}"' in dom
    job1, job2, job3, running = history["jobs"]
    for job in (job1, job2, job3, running):
        assert f'data-job-id="{job.job_id}" data-status="{job.status}"' in dom
    running_row = dom.split(f'data-job-id="{running.job_id}"')[1].split("</tr>")[0]
    assert 'style="width:30.0%"' in running_row and "step 12 / 40" in running_row and "loss 1.23" in running_row
    # rows v0, v1, v2 x columns arithmetic, capitals; v0 never saw capitals; outlined: who learned what
    assert dom.count('class="cell') == 6 and dom.count('class="cell empty"') == 1 and dom.count("cell diag") == 2
    assert 'id="aa" class="value">82.5%<' in dom and 'id="bwt" class="value neg">-5.0 pts<' in dom
    assert '<div class="gate-version" data-version="v3" data-passed="false">' in dom
    assert '<div class="gate-version" data-version="v2" data-passed="true">' in dom
    assert 'class="gate-failed" data-gate="retention"' in dom
    registry = dom.split('id="registry">')[1].split("</section>")[0]
    assert "loading" not in registry and "error" not in registry

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    run_chromium(tmp_path, "--virtual-time-budget=5000", "--hide-scrollbars", "--window-size=1400,1900",
                 f"--screenshot={shot}", page)
    assert shot.exists() and shot.stat().st_size > 20_000
