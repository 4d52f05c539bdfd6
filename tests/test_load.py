"""A bounded load test on loopback: uploads and generations in parallel through the real gateway
(HTTP, uvicorn) until 100 generations and 20 uploads have succeeded (at most 120 s); no answer other
than success or an intended 429 is allowed."""

import threading
import time
from collections import Counter

import httpx
from gateway_helpers import running_gateway, tiny_settings

MAX_DURATION_S = 120
GENERATIONS, UPLOADS = 100, 20
EXAMPLES = [{"prompt": f"say {i}", "completion": "hello world"} for i in range(20)]


def hammer(url: str, request, stop: threading.Event, codes: Counter, lock: threading.Lock) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            status = request(client).status_code
            with lock:
                codes[status] += 1


def generate(client: httpx.Client):
    return client.post("/generate", json={"prompt": "the model learns", "max_tokens": 8, "temperature": 0.7})


def upload(client: httpx.Client):
    time.sleep(0.5)
    return client.post("/tasks", json={"name": "load", "examples": EXAMPLES})


def test_parallel_uploads_and_generations(tmp_path, redis_url, tiny_model_dir):
    settings = tiny_settings(tmp_path / "var", redis_url, tiny_model_dir, rate_limit_uploads_per_min=40,
                             rate_limit_generate_per_min=100_000)
    codes: Counter = Counter()
    lock, stop = threading.Lock(), threading.Event()
    with running_gateway(settings) as (url, ctx):
        clients = [threading.Thread(target=hammer, args=(url, generate, stop, codes, lock)) for _ in range(6)]
        clients += [threading.Thread(target=hammer, args=(url, upload, stop, codes, lock)) for _ in range(2)]
        for t in clients:
            t.start()
        deadline = time.monotonic() + MAX_DURATION_S
        while time.monotonic() < deadline and not (codes[200] >= GENERATIONS and codes[202] >= UPLOADS):
            time.sleep(0.1)
        took = MAX_DURATION_S - (deadline - time.monotonic())
        stop.set()
        for t in clients:
            t.join(60)
        accepted_jobs = ctx.jobs.count()
    print(f"load test: {dict(codes)} in {took:.0f}s")
    assert set(codes) <= {200, 202, 429}, dict(codes)
    assert codes[200] >= GENERATIONS and codes[202] >= UPLOADS
    assert codes[202] == accepted_jobs  # every accepted upload has its job, nothing else does
