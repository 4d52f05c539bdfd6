"""Redis calls stay off the event loop (issue 15, item 11): a Redis that hangs does not stall token streams.

A real gateway (uvicorn) on the tiny model, on a private redis-server: short generations stream one after
another while `DEBUG SLEEP 5` makes that server stop answering for 5 s, and meanwhile /readyz, /jobs and
/models are asked (they may answer slowly or with errors). Chunks must keep arriving throughout the hang.
"""

import threading
import time

import httpx
import pytest
import redis
from gateway_helpers import running_gateway, tiny_settings

from sculptor import redis_server

HANG_S = 5.0
MAX_GAP_S = 2.0


@pytest.fixture
def private_redis(tmp_path):
    """Its own server: the hang must not stall the session's shared Redis."""
    proc, url = redis_server.start_redis(tmp_path / "redis")
    yield url
    redis_server.stop(proc)


def hang_redis(url: str, hung: list[float]) -> None:
    client = redis.Redis.from_url(url, socket_timeout=HANG_S + 10)
    hung.append(time.monotonic())
    client.execute_command("DEBUG", "SLEEP", HANG_S)
    hung.append(time.monotonic())


def ask(base_url: str, path: str) -> None:
    try:
        httpx.get(base_url + path, timeout=HANG_S + 10)
    except httpx.HTTPError:
        pass  # an error answer is fine; only the stream matters


def stream_chunks(client: httpx.Client, arrivals: list[float]) -> None:
    """One short streamed generation; the time each data chunk arrives. (A long greedy stream of the tiny random
    model can repeat one spaceless token, which the streamer holds back to the end: short ones always flush.)"""
    with client.stream("POST", "/generate", json={"prompt": "the model learns", "max_tokens": 8, "stream": True}) as r:
        arrivals += [time.monotonic() for line in r.iter_lines() if line.startswith("data: ")]


def test_streaming_continues_while_redis_hangs(tmp_path, private_redis, tiny_model_dir):
    settings = tiny_settings(tmp_path / "var", private_redis, tiny_model_dir)
    with running_gateway(settings) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        hung: list[float] = []
        threads = [threading.Thread(target=hang_redis, args=(private_redis, hung))]
        threads += [threading.Thread(target=ask, args=(url, path)) for path in ("/readyz", "/jobs", "/models")]
        arrivals: list[float] = []
        stream_chunks(client, arrivals)
        threads[0].start()
        time.sleep(0.2)  # the server has taken DEBUG SLEEP: it answers nobody now
        for thread in threads[1:]:
            thread.start()
        while not (len(hung) == 2 and arrivals[-1] > hung[1] + 0.5):
            stream_chunks(client, arrivals)
        for thread in threads:
            thread.join(HANG_S + 15)
    assert hung[1] - hung[0] >= HANG_S - 0.5, "Redis did not hang"
    during = [(a, b) for a, b in zip(arrivals, arrivals[1:]) if b > hung[0] and a < hung[1]]
    assert len(during) > 5, f"only {len(during)} chunks while Redis hung"
    gap = max(b - a for a, b in during)
    assert gap < MAX_GAP_S, f"the stream stalled for {gap:.1f} s while Redis hung"
