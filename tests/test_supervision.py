"""`make run`'s launcher supervises its children: serving outlives a training worker that is killed.

The real launcher (`python -m deploy.run`) on a tiny model, with its embedded Redis, a Celery worker
and the gateway. SIGKILL the worker in the middle of a job: /generate keeps answering 200 while it is
down, /readyz shows no training worker, the launcher restarts it, and the job is retried, promoted
once and swapped in. Then SIGKILL the embedded Redis: serving goes on, and it is restarted on its
own data (the lineage is still there).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import waiting

from sculptor.redis_server import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
BACKOFF_S = 6  # the first restart comes this long after the kill: the window in which /generate is probed


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.2):
    return waiting.wait_for(predicate, timeout_s, what, poll_s, tolerate=(httpx.HTTPError,))


def launcher_env(tmp_path: Path, model_dir: Path, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update({
        "SCULPTOR_VAR_DIR": str(tmp_path / "var"), "SCULPTOR_BASE_MODEL_DIR": str(model_dir),
        "SCULPTOR_PORT": str(port), "SCULPTOR_EMBEDDED_REDIS_PORT": str(free_port()),
        "SCULPTOR_ENGINE": "transformers", "SCULPTOR_ENGINE_DTYPE": "float32", "SCULPTOR_ENGINE_MAX_MODEL_LEN": "256",
        "SCULPTOR_JOB_LOCK_TTL_S": "3", "SCULPTOR_RECOVERY_INTERVAL_S": "1", "SCULPTOR_WORKER_HEARTBEAT_TTL_S": "2",
        "SCULPTOR_RESTART_BACKOFF_S": str(BACKOFF_S), "HF_HUB_OFFLINE": "1",
    })
    env.update({f"SCULPTOR_GATE_{suite}_ITEMS": "4" for suite in ("HARMFUL", "BENIGN", "IFEVAL", "GENERAL_TEXT")})
    return env


def redis_processes(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher.pid).children() if "redis-server" in " ".join(p.cmdline())]


def worker_processes(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The launcher's Celery worker (Celery renames its process "[celeryd: ...]")."""
    return [p for p in psutil.Process(launcher.pid).children()
            if any(mark in " ".join(p.cmdline()) for mark in ("worker.main", "celeryd"))]


def generate(client: httpx.Client) -> httpx.Response:
    return client.post("/generate", json={"prompt": "the model learns", "max_tokens": 4, "temperature": 0.0})


def test_killed_worker_is_restarted_while_the_gateway_keeps_serving(tmp_path, tiny_learner_dir):
    port = free_port()
    log_path = tmp_path / "launcher.log"
    with open(log_path, "w") as log:
        launcher = subprocess.Popen([sys.executable, "-m", "deploy.run"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    env=launcher_env(tmp_path, tiny_learner_dir, port))
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        wait_for(lambda: client.get("/readyz").json()["training_workers"], 180, "the gateway and one worker")
        examples = [{"prompt": f"kill-me {i}", "completion": "hello world"} for i in range(40)]
        hyper = {"epochs": 30, "learning_rate": 1e-2, "batch_size": 8, "max_seq_len": 48}
        job_id = client.post("/tasks", json={"name": "kill-me", "examples": examples,
                                             "hyperparameters": hyper}).json()["job_id"]
        wait_for(lambda: client.get(f"/jobs/{job_id}").json()["status"] == "running", 180, "the job to train")

        [worker] = worker_processes(launcher)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        killed_at = time.monotonic()
        codes = []
        while time.monotonic() - killed_at < BACKOFF_S - 1:  # the worker is down for this whole loop
            codes.append(generate(client).status_code)
        assert codes and set(codes) == {200}, codes
        assert client.get("/readyz").json()["training_workers"] == []  # its heartbeat lapsed: absence shows
        assert not worker_processes(launcher)

        new_worker = wait_for(lambda: worker_processes(launcher), 60, "the launcher to restart the worker")
        assert new_worker[0].pid != worker.pid
        done = wait_for(lambda: (j := client.get(f"/jobs/{job_id}").json())["status"] in
                        ("promoted", "rejected", "failed") and j, 400, "the retried job to finish", poll_s=1)
        assert done["status"] == "promoted" and done["attempts"] == 2, done
        versions = client.get("/models").json()
        assert [v["version"] for v in versions["versions"]].count("v1") == 1 and len(versions["versions"]) == 2
        assert wait_for(lambda: generate(client).json()["model_version"] == "v1", 60, "the swap to v1")

        # The embedded Redis dies too: serving goes on, and it comes back on its own data.
        [redis] = redis_processes(launcher)
        redis.send_signal(signal.SIGKILL)
        redis.wait(10)
        assert generate(client).status_code == 200
        wait_for(lambda: client.get("/readyz").json()["redis"], 60, "Redis to be restarted")
        assert [v["version"] for v in client.get("/models").json()["versions"]] == ["v0", "v1"]
        assert launcher.poll() is None  # the stack stayed up throughout
    finally:
        client.close()
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(60)
        except subprocess.TimeoutExpired:
            launcher.kill()
    text = log_path.read_text()
    assert "worker exited with code -9; restarting it in" in text, text[-3000:]
    assert "redis exited with code -9; restarting it in" in text


def test_crash_loop_is_given_up_and_only_the_gateway_ends_the_stack(tmp_path, caplog):
    from deploy.run import Child, Stack
    from sculptor.config import Settings

    stack = Stack(Settings(var_dir=tmp_path, restart_backoff_s=0.5, restart_max=3, restart_window_s=60))
    starts = []

    def crashing_worker():
        starts.append(time.monotonic())
        return subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])

    stack._add(Child("worker", crashing_worker, essential=False))
    stack._add(Child("gateway", lambda: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(8)"]),
                     essential=True))
    with caplog.at_level("ERROR", logger="sculptor.run"):
        assert stack.wait() == 1  # returns when the gateway exits, with a failing code even for its 0
    worker = stack.children[0]
    assert len(starts) == 4 and worker.given_up and worker.proc is None  # the first start and 3 restarts
    delays = [line.split("restarting it in ")[1].split("s ")[0] for line in caplog.messages if "restarting it in" in line]
    assert delays == ["0.5", "1.0", "2.0"]  # the backoff doubles
    assert "worker exited with code 3 after 3 restarts within 60s: giving up on it" in caplog.text
    assert "gateway exited with code 0; stopping the service" in caplog.text
