"""A generation whose client disconnects stops (issue 15, item 8), streamed or not, as vLLM's own server does.

A real gateway (uvicorn) on the tiny model asked for 1,000 tokens (over a minute of generating on this
machine); the client goes away after the first token, or before a JSON answer, and the engine's own count of
running requests (`sculptor_engine_running_requests` on /metrics) must fall to 0 within seconds.
"""

import json
import re
import socket
import time

import httpx
import pytest
from gateway_helpers import running_gateway, tiny_settings

LONG = {"prompt": "the model learns", "max_tokens": 1000}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, redis_url, tiny_model_dir):
    settings = tiny_settings(tmp_path_factory.mktemp("disconnect") / "var", redis_url, tiny_model_dir,
                             engine_max_model_len=1024)
    with running_gateway(settings) as (url, _):
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client


def running(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    return float(re.search(r'^sculptor_engine_running_requests\{replica="0"\} (\S+)$', text, re.M).group(1))


def wait_until_idle(client: httpx.Client, within_s: float = 10.0) -> float:
    started = time.monotonic()
    while running(client) != 0:
        assert time.monotonic() - started < within_s, f"the engine still generates {within_s:.0f} s after it"
        time.sleep(0.05)
    return time.monotonic() - started


def wait_until_generating(client: httpx.Client) -> None:
    deadline = time.monotonic() + 30
    while running(client) != 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("route", ["/generate", "/v1/completions"])
def test_a_stream_whose_client_leaves_stops_generating(gateway, route):
    with gateway.stream("POST", route, json={**LONG, "stream": True}) as streaming:
        lines = streaming.iter_lines()  # kept: a dropped iterator closes the response
        assert "model_version" in next(line for line in lines if line.startswith("data: "))  # not a ": ping"
        assert running(gateway) == 1
    wait_until_idle(gateway)
    assert gateway.post("/generate", json={"prompt": "hi", "max_tokens": 2}).status_code == 200  # serves on


@pytest.mark.parametrize("route, body", [("/generate", LONG),
                                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                                   "max_tokens": 1000})])
def test_a_json_request_whose_client_leaves_stops_generating(gateway, route, body):
    payload = json.dumps(body).encode()
    with socket.create_connection((gateway.base_url.host, gateway.base_url.port)) as client:
        client.sendall(f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        wait_until_generating(gateway)  # no answer comes before the 1,000 tokens; the client leaves
    wait_until_idle(gateway)
    sample = rf'^sculptor_http_requests_total\{{method="POST",route="{re.escape(route)}",status="499"\}} (\S+)$'
    closed = re.search(sample, gateway.get("/metrics").text, re.M)
    assert closed and float(closed.group(1)) >= 1, "the handler was cancelled, answering 499 to nobody"
