"""The whole loop on real parts: `python -m deploy.run` starts a real redis-server, a real Celery
worker process and the real gateway (uvicorn) with an in-process vLLM engine, on a tiny random
Llama. We upload a task over HTTP, wait for the promotion, and check that the engine was hot-swapped:
`/generate` reports the new version and its greedy output equals the new checkpoint's, loaded fresh.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from waiting import wait_for
import torch

from sculptor.redis_server import free_port

pytestmark = pytest.mark.e2e

PROMPT = "what does the model say"
ANSWER = "hello world"


def task_examples(n: int = 48) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{PROMPT} {i}"},
                          {"role": "assistant", "content": ANSWER}]} for i in range(n)]


def wait_until(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    return wait_for(predicate, timeout_s, what, poll_s=1, proc=proc)


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_learner_dir):
    var = tmp_path_factory.mktemp("e2e-var")
    port = free_port()
    env = dict(os.environ, SCULPTOR_VAR_DIR=str(var), SCULPTOR_BASE_MODEL_DIR=str(tiny_learner_dir),
               SCULPTOR_PORT=str(port), SCULPTOR_EMBEDDED_REDIS_PORT=str(free_port()), SCULPTOR_ENGINE="vllm",
               SCULPTOR_ENGINE_ENFORCE_EAGER="true", SCULPTOR_ENGINE_MAX_MODEL_LEN="512",
               SCULPTOR_ENGINE_MAX_NUM_SEQS="8", VLLM_CPU_KVCACHE_SPACE="1",
               SCULPTOR_GATE_HARMFUL_ITEMS="8", SCULPTOR_GATE_BENIGN_ITEMS="8", SCULPTOR_GATE_IFEVAL_ITEMS="8",
               SCULPTOR_GATE_GENERAL_TEXT_ITEMS="8", HF_HUB_OFFLINE="1")
    env.pop("REDIS_URL", None)
    log = open(var / "service.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "deploy.run"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, timeout=60)

    def ready():
        try:
            return client.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 400, "the gateway to become ready", proc)
        yield client, var
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of the stack may outlive the test
        log.close()
        print((var / "service.log").read_text()[-4000:])


def greedy_fresh(model_dir: Path, prompt_messages: list[dict], max_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    text = tok.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_upload_train_promote_swap_serve(service):
    client, var = service
    messages = [{"role": "user", "content": f"{PROMPT} 7"}]
    before = client.post("/generate", json={"messages": messages, "max_tokens": 6}).json()
    assert before["model_version"] == "v0"

    body = {"name": "greeting", "examples": task_examples(), "metric": "exact_match",
            "hyperparameters": {"epochs": 5, "learning_rate": 1e-2, "batch_size": 8, "max_seq_len": 64}}
    r = client.post("/tasks", json=body)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]

    def finished():
        job = client.get(f"/jobs/{job_id}").json()
        return job if job["status"] in ("promoted", "rejected", "failed", "cancelled") else None

    job = wait_until(finished, 600, f"job {job_id} to finish")
    assert job["status"] == "promoted", json.dumps(job, indent=1)[:3000]
    assert job["parent_version"] == "v0" and job["candidate_version"] == "v1"
    assert job["progress"]["step"] == job["progress"]["total_steps"] > 0
    assert job["gates"]["passed"] is True

    def serving_v1():
        out = client.post("/generate", json={"messages": messages, "max_tokens": 6}).json()
        return out if out["model_version"] == "v1" else None

    after = wait_until(serving_v1, 60, "the gateway to serve v1")
    fresh = greedy_fresh(var / "cache" / "checkpoints" / "v1", messages, 6)
    assert after["text"] == fresh
    assert after["text"].strip().startswith(ANSWER)
    models = client.get("/models").json()
    assert models["serving"] == "v1" and [v["version"] for v in models["versions"]] == ["v0", "v1"]
